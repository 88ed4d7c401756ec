"""Starting a new run from another run's weights: `train.init_from`.

    python train.py --config configs/wan_finetune.py --workdir runs/wan_ft --train.init_from runs/wan21_t2v_1.3b

starts a run whose parameters and EMA are the EMA weights of the newest checkpoint of DIR (a folder written
by `python -m jaxdit.convert.wan` or `jaxdit.convert.dit`, or any finished jaxdit DiT run), with a fresh
optimizer state, at step 0. Those weights only mean something with the network, process, codec and text
encoder they were made with, so the new run takes these from DIR's saved config:

- `model`: every field but `USER_FIELDS["model"]`, which only change how the network computes or trains
  (dtype, attention, remat, scan_layers, context parallelism, class-label dropout), not its parameters;
- `diffusion`: every field but the training-time sampling (`USER_FIELDS["diffusion"]`);
- `codec` and `text`: all of them but `text.dtype`; the codec and text encoder stay where DIR has them,
  unless the config names their new place (`codec.path`, `text.path`: a moved or copied DIR), which
  must hold the codec and text encoder DIR recorded.

Everything else (name, data, train, sample) is the config's. A field taken from DIR that the config sets
to something other than its default and DIR's value is refused, each one named; a field left at its
default is DIR's. `model.scan_layers=True` from unrolled weights (an import) stacks the blocks as they
are read; scanned weights into an unrolled run are refused.

Only the start reads DIR's settings. Once the new run has a checkpoint, it resumes from that as any run
does, its fixed settings taken from its own saved config instead. The run records where it started in
`RECORD`. A LoRA run (`train.lora_rank`, jaxdit.lora) checkpoints only its adapters: every start of it,
and every `Pipeline.load` of it, reads its base weights from the run and step that RECORD names
(`recorded_source`, `base_params`).
"""

import dataclasses
import functools
import json
import logging
import pathlib

import jax
from flax import nnx

from jaxdit import codec as codecs
from jaxdit import frozen_text, lora
from jaxdit.checkpoint import IMPORT_RECORD, Checkpointer, CheckpointError, latest_step
from jaxdit.config import Config, ConfigError
from jaxdit.model import stack_blocks
from jaxdit.train_step import abstract_train_state, stored_in

log = logging.getLogger(__name__)

RECORD = "init_from.json"  # in the new run: DIR, the step read and DIR's imported.json
TAKEN = ("model", "diffusion", "codec", "text")  # the config sections a run takes from DIR
# Fields of those sections that stay the config's: how the model computes (not its parameters) and how
# training draws its noise times and drops class labels.
USER_FIELDS = {
    "model": ("dtype", "attention", "remat", "scan_layers", "context_attention", "ulysses_degree", "class_dropout_prob"),
    "diffusion": ("time_sampling", "time_mean", "time_std"),
    "text": ("dtype",),
}
MOVABLE = {"codec": ("path",), "text": ("path",)}  # DIR's, or the config's when set: where they are now


@dataclasses.dataclass(frozen=True)
class Source:
    """The run a new run starts from: its folder, the checkpoint's step and the config saved with it."""

    directory: pathlib.Path
    step: int
    config: Config


def read_source(directory) -> Source:
    """The config and step of the newest checkpoint of the run folder `directory`, or a ConfigError that says
    what the folder lacks."""
    directory = pathlib.Path(directory).absolute()
    checkpoints = directory / "checkpoints"
    where = f"train.init_from={str(directory)!r}"
    if not checkpoints.is_dir():
        raise ConfigError(
            f"{where} holds no checkpoints (looked for {str(checkpoints)!r}): give a run folder written by "
            "python -m jaxdit.convert.wan (or .dit), or by train.py."
        )
    with Checkpointer(checkpoints, read_only=True) as checkpointer:
        if checkpointer.latest_step() is None:
            raise ConfigError(f"{where} holds no complete checkpoint in {str(checkpoints)!r}; train or convert it first.")
        step, saved = checkpointer.newest_readable(checkpointer.restore_config)
    config = Config.from_dict(saved)
    if config.task != "dit":
        raise ConfigError(
            f"{where} trained a {config.task}, not a DiT: its weights cannot start one. Train a DiT on its "
            f"latents with --codec.kind saved --codec.path {directory}."
        )
    return Source(directory, step, config)


def starting_config(config: Config, workdir) -> tuple[Config, Source | None]:
    """The run's config with DIR's fixed settings, and the Source to read its first weights from.

    A run that already has a checkpoint takes them from its own saved config and reads nothing from DIR
    (Source None): it resumes.
    """
    workdir = pathlib.Path(workdir)
    directory = pathlib.Path(config.train.init_from).absolute()
    if config.task != "dit":
        raise ConfigError(f"train.init_from starts a DiT from a DiT's weights; task={config.task!r} trains a codec.")
    if directory == workdir.absolute():
        raise ConfigError(
            f"train.init_from names the run's own --workdir {str(workdir)!r}: start the new run in another folder."
        )
    own = workdir / "checkpoints"
    if latest_step(own) is not None:  # resuming: the settings it started with are in its own checkpoints
        with Checkpointer(own, read_only=True) as checkpointer:
            _, saved = checkpointer.newest_readable(checkpointer.restore_config)
        return merge(config, Config.from_dict(saved), f"the run in {workdir}"), None
    source = read_source(directory)
    merged = merge(config, source.config, f"train.init_from={str(directory)!r}")
    _check_codec_and_text(merged, directory)
    return merged, source


def merge(config: Config, source: Config, where: str) -> Config:
    """`config` with the sections of TAKEN from `source` (but USER_FIELDS, and MOVABLE paths it sets), or a
    ConfigError naming every field that `config` sets otherwise; `where` names `source`'s run in messages."""
    sections, conflicts = {}, []
    for name in TAKEN:
        mine, theirs = getattr(config, name), getattr(source, name)
        default = type(mine)()
        values = {}
        for field in dataclasses.fields(mine):
            user, saved, unset = (getattr(c, field.name) for c in (mine, theirs, default))
            kept = field.name in USER_FIELDS.get(name, ()) or (field.name in MOVABLE.get(name, ()) and user != unset)
            values[field.name] = user if kept else saved
            if not kept and user not in (unset, saved):
                conflicts.append(f"{name}.{field.name} is {saved!r} there, {user!r} in this config")
        sections[name] = dataclasses.replace(theirs, **values)
    if conflicts:
        raise ConfigError(
            f"{where} fixes the model, diffusion, codec and text settings its weights were made with, and this "
            f"config sets {len(conflicts)} of them otherwise: {'; '.join(conflicts)}. Remove them from the config "
            "or the command line to take the run's, or train from scratch without train.init_from."
        )
    if source.model.scan_layers and not sections["model"].scan_layers:
        raise ConfigError(
            f"{where} holds its blocks stacked (model.scan_layers=True); an unrolled run cannot start from "
            "them: set --model.scan_layers true."
        )
    try:
        return dataclasses.replace(config, **sections)
    except ValueError as error:  # e.g. a sample.sampler of the other diffusion process
        raise ConfigError(f"with the settings of {where}: {error}") from None


def _check_codec_and_text(config: Config, directory: pathlib.Path) -> None:
    """The codec and text encoder the run will use are the ones DIR recorded (they may have moved)."""
    record = directory / codecs.RUN_RECORD
    if config.codec.kind == "saved" and record.is_file():
        try:
            codecs.check_unchanged(config.codec.path, json.loads(record.read_text()), f"the run in {directory}")
        except FileNotFoundError as error:
            raise ConfigError(f"{error} The run in {directory} needs its codec: give its new place with --codec.path.") from None
        except ValueError as error:
            raise ConfigError(str(error)) from None
    frozen_text.check_run(config, directory)


def weights_target(abstract_state, param_dtype: str = "float32"):
    """A train state's shapes and shardings with the EMA's floating-point arrays in `param_dtype`: what a
    checkpoint's EMA weights are read into, cast as they are read (no float32 copy on a device)."""
    return abstract_state.replace(ema=stored_in(abstract_state.ema, param_dtype))


def initial_params(
    config: Config, source: Source, mesh: jax.sharding.Mesh, abstract_state, param_dtype: str = "float32"
) -> nnx.State:
    """DIR's EMA weights as the run's parameters, each array read straight onto `mesh` with the sharding
    `abstract_state` gives it, in `param_dtype`; unrolled blocks stacked for a scan_layers run."""
    stack = config.model.scan_layers and not source.config.model.scan_layers
    target = weights_target(abstract_state, param_dtype)
    if stack:  # read in DIR's layout, onto the same mesh
        unrolled = dataclasses.replace(config, model=dataclasses.replace(config.model, scan_layers=False))
        target = weights_target(abstract_train_state(unrolled, mesh), param_dtype)
    with Checkpointer(source.directory / "checkpoints", read_only=True) as checkpointer:
        try:
            params = checkpointer.restore_weights(target, step=source.step)["ema"]
        except Exception as error:
            raise CheckpointError(
                f"the weights of checkpoint {source.step} in {source.directory} do not read ({error}); check the folder "
                f"with python -m jaxdit.checkpoint verify {source.directory}."
            ) from error
    if stack:
        shardings = jax.tree.map(lambda x: x.sharding, abstract_state.params)
        stacked = functools.partial(_stacked, layout=abstract_state.params)
        params = jax.jit(stacked, out_shardings=shardings)(params)
    return params


def _stacked(params: nnx.State, *, layout: nnx.State) -> nnx.State:
    """A Denoiser's parameters with the VideoDiT's blocks stacked (`jaxdit.model.stack_blocks`), in the tree
    structure of `layout` (the scanned run's abstract parameters)."""
    stacked = nnx.to_pure_dict(nnx.State({**params, "dit": stack_blocks(params["dit"])}))
    params = jax.tree.map(lambda x: x, layout)  # a copy to fill
    nnx.replace_by_pure_dict(params, stacked)
    return params


def base_params(config: Config, source: Source, mesh: jax.sharding.Mesh, param_dtype: str = "float32") -> nnx.State:
    """A LoRA run's frozen base weights: `source`'s EMA weights as the parameters of the run's model without
    adapters (`jaxdit.train_step.abstract_base`), read onto `mesh` in `param_dtype`."""
    base = lora.base_config(config)
    return initial_params(base, source, mesh, abstract_train_state(base, mesh), param_dtype)


def recorded_source(workdir) -> Source:
    """The run and step that `workdir`'s run started from, as its RECORD says: where a LoRA run's base weights
    are. A ConfigError says what is missing."""
    record = pathlib.Path(workdir) / RECORD
    if not record.is_file():
        raise ConfigError(
            f"the LoRA run in {str(workdir)!r} has no {RECORD}, which names the weights its adapters adapt; it was "
            "not started by train.py --train.init_from DIR --train.lora_rank R."
        )
    what = json.loads(record.read_text())
    directory, step = pathlib.Path(what["init_from"]), what["step"]
    where = f"the base weights of the LoRA run in {str(workdir)!r}, checkpoint {step} of {str(directory)!r}"
    checkpoints = directory / "checkpoints"
    if not checkpoints.is_dir():
        raise ConfigError(f"{where}, are gone: put that run folder back where it was ({RECORD} names it).")
    with Checkpointer(checkpoints, read_only=True) as checkpointer:
        if step not in checkpointer.all_steps():
            raise ConfigError(f"{where}, are gone (that folder holds steps {checkpointer.all_steps()}): restore it.")
        config = Config.from_dict(checkpointer.restore_config(step))
    return Source(directory, step, config)


def record_start(workdir, source: Source, *, primary: bool) -> None:
    """Logs where the run starts and writes it to workdir/RECORD: DIR, its step and its imported.json."""
    imported = source.directory / IMPORT_RECORD
    what = {
        "init_from": str(source.directory),
        "step": source.step,
        "imported": json.loads(imported.read_text()) if imported.is_file() else None,
    }
    origin = f", imported from {what['imported'].get('source')}" if what["imported"] else ""
    log.info("starting from the EMA weights of %s at step %d%s: fresh optimizer, step 0", source.directory,
             source.step, origin)
    if primary:
        path = pathlib.Path(workdir) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(what, indent=2) + "\n")

