"""The training loop: set up the mesh, state, data and checkpoints, then step until done.

`train(config, workdir)` is what `python train.py` runs. It resumes from the newest complete
checkpoint in `workdir/checkpoints` (state, EMA, optimizer, data position), so a run that is
killed at any moment loses at most the steps since its last checkpoint, and 2N steps in one go
give bit for bit the same result as N steps, a restart, and N more. A new run with `train.init_from`
starts from another run's weights (`jaxdit.init_from`).

Before the first step it reports the data's buckets (clips and batches per shape,
`jaxdit.data.buckets`) and compiles the train step once for each, ahead of time, logging the compile
time and XLA's memory estimate of each (`train.compile_only` stops there). The compiled programs are
kept in JAX's persistent compilation cache (the run's `compile_cache/`, unless JAX_COMPILATION_CACHE_DIR
names another), so a resumed run does not compile them again.
"""

import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import threading
import time

import jax
import numpy as np
from flax import nnx

from jaxdit import codec as codecs
from jaxdit import frozen_text, init_from
from jaxdit.checkpoint import IMPORT_RECORD, Checkpointer
from jaxdit.codec import frozen_codec_state, make_codec
from jaxdit.config import Config, ConfigError, parse_condition
from jaxdit.data.buckets import Bucket, make_buckets, shape_name
from jaxdit.data.judge import ADHERENCE_RATES, one_object_prompts, summary
from jaxdit.data.pipeline import PlannedBatches, make_dataset, plan_batches
from jaxdit.data.shapes import ShapesDataset, still_caption
from jaxdit.flops import num_tokens
from jaxdit.metrics import MetricsWriter
from jaxdit.pipeline import VideoSampler
from jaxdit.sharding import batch_sharding, data_parallel_size, global_batch, make_mesh
from jaxdit.train_step import (
    abstract_base,
    abstract_train_state,
    create_train_state,
    make_model,
    make_train_step,
    model_graphdef,
)

log = logging.getLogger(__name__)

# Sections a resumed run must share with the run that wrote the checkpoint; the rest
# (steps, logging, checkpoint cadence, data workers) may change between restarts.
_FIXED_SECTIONS = {
    "dit": ("task", "model", "text", "diffusion", "codec"),
    "codec": ("task", "autoencoder"),
}
# Fields of fixed sections that may change: what is evaluated, and where a frozen text encoder lives
# (frozen_text's record, of its files' contents, tells whether it is the same one).
_FREE_FIELDS = {"autoencoder": ("eval_clips",), "text": ("path",)}
_LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets")  # of `train`, fixed too


def _comparable(name: str, section):
    free = _FREE_FIELDS.get(name, ())
    return {k: v for k, v in section.items() if k not in free} if isinstance(section, dict) else section


def latent_shape(config: Config, codec, shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """The latents (t, h, w, c) the step sees for clips of `shape` (frames, height, width), or a ConfigError."""
    if config.data.source == "cache":
        from jaxdit.data.cache_format import open_cache

        return tuple(open_cache(config.data.cache).latent_shape_of(shape))  # (t, h, w, c)
    try:
        return tuple(codec.latent_shape((*shape, 3)))
    except ValueError as error:
        raise ConfigError(
            f"clips of {'x'.join(map(str, shape))} (frames x height x width; data.buckets, or data.num_frames and "
            f"data.size) do not fit the {config.codec.kind} codec: {error}"
        ) from None


def run_buckets(config: Config, mesh: jax.sharding.Mesh, codec) -> list[Bucket]:
    """The run's buckets with their global batches (`make_buckets`: the token budget counts the video tokens)."""
    model = config.model
    tokens = None if config.task == "codec" else lambda shape: num_tokens(model, latent_shape(config, codec, shape))
    try:
        return make_buckets(config.data, batch_size=config.train.batch_size, devices=data_parallel_size(mesh),
                            tokens=tokens)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_config(config: Config, mesh: jax.sharding.Mesh, codec, buckets: list[Bucket] | None = None) -> None:
    """Errors a user can act on, before anything is compiled."""
    devices, processes = data_parallel_size(mesh), jax.process_count()
    for bucket in buckets or run_buckets(config, mesh, codec):
        if bucket.batch % devices or bucket.batch % processes:
            where = (f"bucket {bucket.name}'s global batch {bucket.batch} (data.bucket_batches, data.bucket_tokens or "
                     "train.batch_size)" if config.data.buckets else f"train.batch_size={bucket.batch}")
            raise ConfigError(
                f"{where} must be divisible by the {devices} devices (and {processes} processes) it is split over; "
                f"use a multiple of {devices}."
            )
    context = mesh.shape["context"]
    if jax.local_device_count() % context:  # each process reads its own examples: a clip's devices must share them
        raise ConfigError(
            f"train.context={context} must divide the {jax.local_device_count()} devices of each process: "
            "the devices that split one clip's tokens must be on the same host."
        )
    if config.task == "codec":
        if config.data.source == "cache":
            raise ConfigError("a codec trains on videos, not on a latent cache: set data.source to shapes or folder.")
        autoencoder = nnx.eval_shape(lambda: make_model(config, rngs=nnx.Rngs(0)))
        for shape in config.data.shapes:
            try:
                autoencoder.latent_shape((*shape, 3))
            except ValueError as error:
                raise ConfigError(f"data.num_frames / data.size (or data.buckets): {error}") from None
        return
    tails = any(parse_condition(config.train.condition)[kind] for kind in ("last", "first_last", "trail"))
    if config.data.source == "cache" and tails and codec.factors[0] > 1:
        raise ConfigError(
            f"train.condition gives clips' last frames, which the {config.codec.kind} codec (causal, {codec.factors[0]}x "
            "in time) must encode on their own, from pixels: train on the videos (data.source='shapes' or 'folder'), "
            "or condition on first frames only (first, lead)."
        )
    for shape in config.data.shapes:
        latents = latent_shape(config, codec, shape)
        for name, length, patch in zip(("frames", "height", "width"), latents[:3], config.model.patch, strict=True):
            if length % patch and not (name == "frames" and length == 1):  # an image fills a temporal patch (jaxdit.frames)
                raise ConfigError(
                    f"the codec makes latents of {length} {name} for clips of {'x'.join(map(str, shape))}, which "
                    f"model.variant's patch {config.model.patch} does not divide: change data.num_frames / "
                    "data.size (or data.buckets) or the patch."
                )
    if codec.channels != config.model.in_channels:
        raise ConfigError(
            f"model.in_channels={config.model.in_channels} but the {config.codec.kind!r} codec makes "
            f"{codec.channels}-channel latents; set --model.in_channels {codec.channels}."
        )


def parameter_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def train(config: Config, workdir: str | pathlib.Path) -> dict:
    """Trains `config` into `workdir` up to `config.train.steps`; returns the last metrics."""
    workdir = pathlib.Path(workdir)
    if (workdir / IMPORT_RECORD).is_file():
        raise ValueError(
            f"{str(workdir)!r} holds imported weights ({IMPORT_RECORD}) without optimizer state or data position: "
            f"sample from it with sample.py, or train into another --workdir with --train.init_from {workdir} to "
            "fine-tune it."
        )
    source = None  # the run whose weights start this one (train.init_from), unless it resumes
    if config.train.lora_rank and not config.train.init_from:
        raise ConfigError(
            f"train.lora_rank={config.train.lora_rank} adapts another run's weights: name them with train.init_from "
            "(a folder of python -m jaxdit.convert.wan, or a jaxdit run), or train every weight with lora_rank 0."
        )
    if config.train.init_from:
        config, source = init_from.starting_config(config, workdir)
    if config.codec.kind == "saved":  # recorded as an absolute path, so the run loads it from anywhere
        config = dataclasses.replace(config, codec=dataclasses.replace(config.codec, path=os.path.abspath(config.codec.path)))
    config = frozen_text.resolve(config)  # a T5 run: its absolute path, and model.text_dim from its width
    cfg = config.train
    use_compilation_cache(workdir)
    mesh = make_mesh(cfg.fsdp, context=cfg.context)
    codec = make_codec(config.codec)
    buckets = run_buckets(config, mesh, codec)
    check_config(config, mesh, codec, buckets)
    primary = jax.process_index() == 0

    graphdef = model_graphdef(config)
    abstract_state = abstract_train_state(config, mesh)
    checkpointer = Checkpointer(
        workdir / "checkpoints", keep=cfg.keep_checkpoints, every=cfg.checkpoint_every, quarantine=cfg.quarantine_damaged
    )
    try:  # an empty bucket, a batch that does not split over the processes, a folder with too few usable clips
        batches = plan_batches(
            config, buckets=buckets, process_index=jax.process_index(), process_count=jax.process_count()
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    log.info("data: %s", batches.plan.report())
    data = iter(make_dataset(config, batches=batches))
    # A frozen T5 (else (None, empty)): for the step, unless a cache holds its features, and for samples.
    sampling = config.task == "dit" and bool(config.sample.prompts or config.sample.judge_prompts)
    text_encoder = (None, nnx.State({}))
    if config.data.source != "cache" or sampling:
        text_encoder = frozen_text.load(config, mesh)
    step_fn = make_train_step(config, graphdef, codec, mesh, abstract_state, text_encoder)
    codec_state, text_state = frozen_codec_state(codec, mesh), text_encoder[1]
    # From the state's shapes alone: a dry run (train.compile_only) allocates no train state.
    programs = compile_steps(
        step_fn, batches, mesh, abstract_state, codec_state, text_state, abstract_base(config, mesh)
    )  # shape -> (program, bucket)
    if cfg.compile_only:
        log.info("train.compile_only: compiled the step for %d bucket(s); stopping before the first step", len(programs))
        checkpointer.close()
        return {}
    resuming = checkpointer.latest_step() is not None
    _record_codec(config, workdir, resuming=resuming, primary=primary)
    frozen_text.record_run(config, workdir, resuming=resuming, primary=primary)
    base_state = nnx.State({})  # a LoRA run's frozen base weights, read at every start
    if cfg.lora_rank:
        base_source = source or init_from.recorded_source(workdir)
        base_state = init_from.base_params(config, base_source, mesh, cfg.lora_base_dtype)
    if not resuming:
        params = None
        if source is not None:
            if not cfg.lora_rank:  # a LoRA run starts its adapters afresh (the identity)
                params = init_from.initial_params(config, source, mesh, abstract_state)
            init_from.record_start(workdir, source, primary=primary)
        state = create_train_state(config, abstract_state, params)
        start = 0
    else:  # the newest checkpoint that reads and is of this run: a damaged one is named and passed over
        check = functools.partial(_check_same_run, config=config, workdir=workdir)
        state = checkpointer.restore(abstract_state, data_iterator=data, check_config=check)
        start = int(state.step)
        log.info("resuming %s from step %d", workdir, start)
    log.info(
        "%s: %s parameters%s, %d devices, mesh %s", config.name, f"{parameter_count(state.params):,}",
        " (LoRA adapters; the base and the frozen codec not counted)" if cfg.lora_rank
        else " (the frozen codec not counted)" if config.task == "dit" else " (the codec being trained)",
        mesh.size, dict(mesh.shape),
    )
    writer = MetricsWriter(workdir, enabled=primary)
    if config.task == "codec":
        from jaxdit.codec.train import CodecPreviews

        samples = CodecPreviews(config, graphdef, mesh, abstract_state, workdir, writer=writer, enabled=primary)
    else:
        samples = _Samples(
            config, graphdef, codec, codec_state, text_encoder, mesh, abstract_state, workdir, writer=writer,
            enabled=primary, base_state=base_state,
        )
    # The run's root key never changes; a host copy outlives the state, which each step donates.
    root_rng = jax.random.wrap_key_data(np.asarray(jax.random.key_data(state.rng)))
    progress = _progress_bar(start, cfg.steps, enabled=primary)
    last_metrics, pending = {}, None
    window = _Window(start, per_bucket=len(buckets) > 1)
    config_dict = config.to_dict()  # saved with every checkpoint
    step = start
    try:
        with _StopRequests() as stop:
            while step < cfg.steps and not stop.requested:
                local = next(data)
                program, bucket = programs[_example_shape(local)]
                batch = global_batch(local, mesh)
                state, metrics = program(
                    state, batch, jax.random.fold_in(root_rng, step), codec_state, text_state, base_state
                )
                # Read the previous step's metrics while this one runs: the device never waits on the host.
                if pending is not None:
                    last_metrics = _report(*pending, cfg, writer, progress, window)
                pending = (step + 1, metrics, bucket)
                step += 1
                if step < cfg.steps:
                    checkpointer.save(step, state, data_iterator=data, config=config_dict)
                    if config.sample.every and step % config.sample.every == 0:
                        samples.write(step, state)  # sample videos, or the codec's previews
        if pending is not None:
            last_metrics = _report(*pending, cfg, writer, progress, window)
        if step > start:  # the final (or interrupted) step, whatever the checkpoint cadence
            checkpointer.save(step, state, data_iterator=data, config=config_dict, force=True)
        if stop.requested:
            log.warning("stopped at step %d on request; run the same command again to resume", step)
        elif not samples.written(step):  # the end of training (also when a finished run is run again)
            samples.write(step, state)
    finally:
        checkpointer.wait()
        checkpointer.close()
        progress.close()
        writer.close()
    return last_metrics


def use_compilation_cache(workdir: pathlib.Path) -> None:
    """JAX's persistent compilation cache in the run's `compile_cache/`, unless the user chose one
    (JAX_COMPILATION_CACHE_DIR, or jax.config): a resumed run loads its programs instead of compiling them."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(workdir).absolute() / "compile_cache"))


def _example_shape(batch: dict) -> tuple[int, ...]:
    """The shape of one example's clip (or latents) in a batch: what tells the buckets apart."""
    return batch["latents" if "latents" in batch else "video"].shape[1:]


def compile_steps(step_fn, batches: PlannedBatches, mesh, state, codec_state, text_state, base_state) -> dict:
    """The train step compiled ahead of time for every bucket: {example shape: (program, bucket)}.

    Logs each bucket's compile time and XLA's estimate of its memory per device (arguments, outputs and
    temporaries: `jax.stages.Compiled.memory_analysis`).
    """
    programs = {}
    rng = jax.random.key(0)
    for b, bucket in enumerate(batches.buckets):
        example = batches.example(b)  # this process's share of one batch of the bucket
        spec = {
            name: jax.ShapeDtypeStruct((bucket.batch, *value.shape[1:]), value.dtype, sharding=batch_sharding(mesh))
            for name, value in example.items()
        }
        start = time.perf_counter()
        program = step_fn.lower(state, spec, rng, codec_state, text_state, base_state).compile()
        memory = program.memory_analysis()
        total = sum(getattr(memory, f"{kind}_size_in_bytes", 0) for kind in ("argument", "output", "temp")) if memory else 0
        log.info(
            "bucket %s: global batch %d, step compiled in %.1f s, %s per device (XLA's estimate: arguments, "
            "outputs and temporaries)", bucket.name, bucket.batch, time.perf_counter() - start,
            _bytes(total) if memory else "no memory estimate",
        )
        programs[_example_shape(example)] = (program, bucket)
    return programs


def _bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _record_codec(config: Config, workdir: pathlib.Path, *, resuming: bool, primary: bool) -> None:
    """Copies the saved codec's codec.json into the run; a resumed run checks the codec is unchanged."""
    if config.codec.kind != "saved":
        return
    record = workdir / codecs.RUN_RECORD
    if resuming and record.is_file():
        try:
            codecs.check_unchanged(config.codec.path, json.loads(record.read_text()), f"the run in {workdir}")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    elif primary:
        workdir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(codecs.describe(config.codec.path), indent=2) + "\n")


def _check_same_run(saved: dict, config: Config, workdir: pathlib.Path) -> None:
    current = config.to_dict()
    saved = Config.from_dict(saved).to_dict()  # JSON gave lists where the config has tuples
    fixed = _FIXED_SECTIONS[config.task]
    changed = [name for name in fixed if _comparable(name, saved[name]) != _comparable(name, current[name])]
    # What the checkpoint's arrays are: LoRA adapters (their rank and layers) or every weight.
    changed += [f"train.{name}" for name in _LORA_FIELDS if saved["train"][name] != current["train"][name]]
    if changed:
        raise ConfigError(
            f"{workdir} holds a run whose {', '.join(changed)} config differs from this one; "
            "resume it with the same settings, or train into a new --workdir."
        )


class _Samples:
    """Videos of the config's `sample.prompts` from the EMA weights: workdir/samples/step_N.{mp4,png};
    with `sample.judge_prompts`, the prompt-adherence rates of that many fixed prompts, logged as metrics.
    A LoRA run's samples apply the EMA adapters to its frozen `base_state`."""

    def __init__(self, config: Config, graphdef, codec, codec_state, text_encoder, mesh, abstract_state,
                 workdir: pathlib.Path, *, writer: MetricsWriter, enabled: bool, base_state=None):
        self.config, self.writer, self.enabled = config, writer, enabled
        self.directory = workdir / "samples"
        self.base_state = nnx.State({}) if base_state is None else base_state
        shardings = jax.tree.map(lambda x: x.sharding, nnx.merge_state(self.base_state, abstract_state.ema))
        self.sampler = VideoSampler(config, graphdef, codec, mesh, shardings, codec_state, text_encoder)
        s = config.sample
        self.shown = [p for p in s.prompts for _ in range(s.num_samples)]
        self.judged = one_object_prompts(s.judge_prompts) if s.judge_prompts else []

    def _weights(self, state) -> nnx.State:
        """The EMA weights the samples come from (a LoRA run's: its base and EMA adapters, one tree)."""
        return nnx.merge_state(self.base_state, state.ema)

    def _path(self, step: int, suffix: str) -> pathlib.Path:
        return self.directory / f"step_{step:07d}{suffix}"

    def written(self, step: int) -> bool:
        return not (self.shown or self.judged) or self._path(step, ".mp4").exists()

    def write(self, step: int, state) -> None:
        from jaxdit.video_io import write_labelled, write_videos

        s = self.config.sample
        if not (self.shown or self.judged):
            return
        shapes = self.config.data.shapes  # the first of more than one frame: the judged prompts move
        frames, height, width = next((shape for shape in shapes if shape[0] > 1), shapes[0])
        videos = self.sampler(  # one program for the shown and the judged prompts
            self._weights(state), state.model_rngs, self.shown + self.judged, seed=self.config.train.seed, sampler=s.sampler,
            steps=s.steps, eta=s.eta, cfg_scale=s.cfg_scale, num_frames=frames, height=height, width=width,
            negative_prompt=s.negative_prompt,
        )  # (P * S + J, T, H, W, 3) uint8, on every process
        showcase = self._showcase(state, (frames, height, width))  # every process runs the programs
        if not self.enabled:
            return
        if self.judged:
            rates = summary(videos[len(self.shown):], self.judged)
            self.writer.write(step, {f"adherence/{name}": rates[name] for name in ADHERENCE_RATES})
            log.info("step %d: prompt adherence of %d prompts: %s", step, len(self.judged),
                     ", ".join(f"{name} {rates[name]:.2f}" for name in ADHERENCE_RATES))
        if showcase:
            write_labelled(self._path(step, "_sizes.png"), showcase)
        shown, prompts = (videos[: len(self.shown)], self.shown) if self.shown else (videos, self.judged)
        for suffix in (".png", ".mp4"):  # the mp4 last: its presence marks the step as done
            write_videos(self._path(step, suffix), shown, prompts, fps=s.fps, num_samples=s.num_samples if self.shown else 1)
        log.info("step %d: sample videos of %d prompts in %s", step, len(prompts), self._path(step, ".mp4"))


    def _showcase(self, state, shape: tuple[int, int, int]) -> list[tuple[np.ndarray, list[str]]]:
        """What several buckets and frame conditioning add, each labelled: a video of the first prompt at
        every other bucket's shape (a still's caption without its motion), and, with frame conditioning on
        the built-in shapes, image-to-video from the first frames of clips the run never trained on."""
        s, data = self.config.sample, self.config.data
        if not s.prompts:
            return []
        generate = functools.partial(
            self.sampler, self._weights(state), state.model_rngs, seed=self.config.train.seed, sampler=s.sampler, steps=s.steps,
            eta=s.eta, cfg_scale=s.cfg_scale, negative_prompt=s.negative_prompt,
        )
        groups = []
        for frames, height, width in data.shapes:
            if (frames, height, width) == shape:
                continue
            kind = "still" if frames == 1 else "landscape" if width > height else "portrait" if height > width else "square"
            prompt = still_caption(s.prompts[0]) if frames == 1 and data.source == "shapes" else s.prompts[0]
            videos = generate([prompt] * s.num_samples, num_frames=frames, height=height, width=width)
            groups.append((videos, [f"{kind} {shape_name((frames, height, width))}: {prompt}"] * s.num_samples))
        if self.config.model.frame_condition and data.source == "shapes":
            clips = [ShapesDataset(seed=data.seed + 1).clip(i, shape) for i in range(len(s.prompts))]  # held out
            for clip in clips:
                videos = generate([clip["caption"]], num_frames=shape[0], height=shape[1], width=shape[2],
                                  head=clip["video"][:1])
                groups.append((videos, [f"image to video (the first frame given): {clip['caption']}"]))
        return groups


class _StopRequests:
    """Turns the first Ctrl-C or SIGTERM into a request to stop at the next step boundary."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False

    def _request(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Window:
    """What happened since the last metrics record: steps, samples, and (several buckets) each bucket's losses."""

    def __init__(self, step: int, *, per_bucket: bool):
        self.step, self.time, self.per_bucket = step, time.perf_counter(), per_bucket
        self.samples, self.losses = 0, {}

    def add(self, bucket: Bucket, loss: float) -> None:
        self.samples += bucket.batch
        self.losses.setdefault(bucket.name, []).append(loss)

    def close(self, step: int) -> dict:
        """The window's rates (and mean loss per bucket), and a new window from here."""
        now = time.perf_counter()
        seconds = max(now - self.time, 1e-9)
        figures = {"steps_per_s": (step - self.step) / seconds, "samples_per_s": self.samples / seconds}
        if self.per_bucket:  # the loss of each shape, which differ in scale: compare a bucket with itself
            figures |= {f"loss/{name}": float(np.mean(losses)) for name, losses in sorted(self.losses.items())}
        self.step, self.time, self.samples, self.losses = step, now, 0, {}
        return figures


def _report(step: int, metrics: dict, bucket: Bucket, cfg, writer: MetricsWriter, progress, window: _Window) -> dict:
    metrics = {"step": step} | {name: value.item() for name, value in jax.device_get(metrics).items()}
    window.add(bucket, metrics["loss"])
    if metrics["skipped"]:
        log.warning("step %d: non-finite loss or gradients (%s); update skipped", step, metrics["loss"])
        if metrics["bad_steps"] >= cfg.max_bad_steps:
            raise FloatingPointError(
                f"the loss or gradients were not finite for {metrics['bad_steps']} steps in a row (step {step}); "
                f"training stopped. Lower train.learning_rate or check the data; the run resumes from its last checkpoint."
            )
    progress.update(step - progress.n)
    if step % cfg.log_every == 0 or step == cfg.steps:
        metrics |= window.close(step)
        writer.write(step, metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", samples_per_s=f"{metrics['samples_per_s']:.1f}")
    return metrics


def _progress_bar(start: int, total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, disable=not enabled, unit="step", dynamic_ncols=True)
