"""From a trained run to videos: `Pipeline.load(workdir).generate(prompts)`.

    pipe = Pipeline.load("runs/shapes_tiny")                 # config + EMA weights of the latest checkpoint
    videos = pipe.generate(["a large red circle moving left"], num_samples=2, seed=0)
    videos.shape, videos.dtype                              # (2, 8, 32, 32, 3) uint8

Generation is one jitted program per (sampler, steps, shape, batch): encode the prompts once,
run the whole reverse diffusion as a `lax.scan` with classifier-free guidance batched into
one forward pass, decode with the frozen codec, clip and convert to uint8. Samples are split
over every local device, or with `context` > 1 each sample's video tokens over groups of that
many devices (`jaxdit.context_parallel`) and the samples over the groups. Sample j (prompts in order, the samples of a prompt adjacent) starts
from the noise of fold_in(key(seed), j), so the same seed gives the same videos on any number
of devices and at any batch size. `VideoSampler` is that program; train.py uses it too.
"""

import dataclasses
import json
import logging
import math
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdit import context_parallel, frozen_text, host, sampling
from jaxdit.checkpoint import Checkpointer
from jaxdit.codec import frozen_codec_state, make_codec, to_uint8
from jaxdit.config import Config
from jaxdit.sharding import batch_sharding, data_parallel_size, make_mesh
from jaxdit.text import make_tokenizer
from jaxdit.train_step import abstract_train_state, flow_shift, model_graphdef

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.8  # SDEdit: the share of the denoising path rerun from the edited clip (diffusers' default)


def conditions(config: Config, prompts: list[str]) -> tuple[dict, dict]:
    """Prompts -> the model's conditioning arrays (B, ...), and the null condition of CFG.

    A text model reads the prompt (tokens, mask); a class-conditional model without text reads
    it as a class index ("207"); the null condition is the empty caption (for a frozen T5 too, as
    in Open-Sora and PixArt: its features of "") and the null label.
    """
    model = config.model
    cond, null = {}, {}
    if model.has_text:
        tokenizer = make_tokenizer(config.text)
        for prompt in prompts:
            if tokenizer.count(prompt) > config.text.max_length:
                warnings.warn(
                    f"prompt of {tokenizer.count(prompt)} tokens truncated to the model's text.max_length="
                    f"{config.text.max_length}: {prompt!r}", stacklevel=3,
                )
        tokenizer.truncated = 1  # warned above; keep the tokenizer's own log quiet
        cond = tokenizer.encode_batch(prompts)  # text_tokens, text_mask (B, L)
        null = tokenizer.encode_batch([""] * len(prompts))
    if model.num_classes:
        null["label"] = np.full(len(prompts), model.num_classes, np.int32)  # (B,) the null label
        cond["label"] = null["label"] if model.has_text else _labels(prompts, model.num_classes)
    return cond, null


def _labels(prompts: list[str], num_classes: int) -> np.ndarray:
    try:
        labels = np.array([int(p) for p in prompts], np.int32)  # (B,)
    except ValueError:
        raise ValueError(
            f"this model is class-conditional ({num_classes} classes, no text): prompts must be class "
            f"indices such as '207'; got {prompts}."
        ) from None
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class indices must lie in [0, {num_classes}); got {labels.tolist()}.")
    return labels


class VideoSampler:
    """The generation program of one model over one mesh: params + prompts -> uint8 videos."""

    def __init__(
        self, config: Config, graphdef: nnx.GraphDef, codec, mesh: jax.sharding.Mesh, param_shardings, codec_state=None,
        text_encoder=None,
    ):
        self.config, self.graphdef, self.codec, self.mesh = config, graphdef, codec, mesh
        self.param_shardings = param_shardings
        self._codec_graphdef = nnx.graphdef(codec)
        # Arguments of the program, never constants; a trainer passes the copies its step already uses.
        self._codec_state = frozen_codec_state(codec, mesh) if codec_state is None else codec_state
        # A frozen text encoder's (graphdef, state) (jaxdit.frozen_text.load); (None, empty) for the byte encoder.
        self._text_graphdef, self._text_state = frozen_text.load(config, mesh) if text_encoder is None else text_encoder
        self._programs = {}

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Frames, height and width of the videos -> one sample's latent shape (T, H, W, C), or a clear error."""
        patch, factors = self.config.model.patch, self.codec.factors
        checks = (("frames", num_frames, 0), ("height", height, 1), ("width", width, 2))

        def misfit(name, value, axis):
            multiple = patch[axis] * factors[axis]
            return ValueError(
                f"this model cannot make videos of {value} {name}: {name} must be a positive multiple of "
                f"{multiple} (patch {patch} x codec compression {factors}); e.g. {max(multiple, value - value % multiple)}."
            )

        for name, value, axis in checks:
            if value < 1:
                raise misfit(name, value, axis)
        latents = self.codec.latent_shape((num_frames, height, width, 3))  # the codec's rule (causal: 1 + 2^k n frames)
        for name, value, axis in checks:
            if latents[axis] % patch[axis]:
                raise misfit(name, value, axis)
        return tuple(latents)

    def __call__(
        self, params, model_rngs, prompts: list[str], *, seed: int, sampler: str, steps: int, eta: float,
        cfg_scale: float, num_frames: int, height: int, width: int, batch_size: int | None = None,
        progress: bool = False, edit: np.ndarray | None = None, strength: float = 1.0,
    ) -> np.ndarray:
        """One video per prompt (repeat a prompt for several samples) -> uint8 (B, T, H, W, 3).

        edit: SDEdit of this uint8 clip (T, H, W, 3) of the videos' size: every sample starts from its
        latents noised to `strength` of the path (`sampling.sdedit_start`) instead of from noise.
        """
        config = self.config
        sampler = sampling.check_sampler(sampler, steps, config.diffusion.num_steps, config.diffusion.process)
        shape = self.latent_shape(num_frames, height, width)
        skipped = 0  # SDEdit: the steps of the path not rerun
        if edit is not None:
            edit = np.asarray(edit)
            if edit.dtype != np.uint8 or edit.shape != (num_frames, height, width, 3):
                raise ValueError(
                    f"the clip to edit must be uint8 frames (T, H, W, 3) of the videos' size {(num_frames, height, width, 3)}; "
                    f"got {edit.dtype} {edit.shape}."
                )
            skipped = sampling.sdedit_start(steps, strength)
        cond, null = conditions(config, prompts)
        guided = bool(null) and cfg_scale != 1.0  # no condition, or g = 1: one pass per step
        total = len(prompts)
        devices = data_parallel_size(self.mesh)  # the devices that hold different samples
        batch = devices * math.ceil(min(batch_size or total, total) / devices)  # a multiple of them
        program = self._program(sampler, steps, eta, guided, shape, batch, progress, skipped, edit is not None)
        bar = _progress_bar(math.ceil(total / batch) * (steps - skipped), enabled=progress)
        frozen = (self._codec_state, self._text_state)
        edited = () if edit is None else _global((edit,), self.mesh, replicate=True)  # copied to the devices once
        videos = []
        with bar:
            self._bar = bar
            for start in range(0, total, batch):
                index = np.arange(start, start + batch)  # (b,) sample indices; past `total`: padding
                take = np.minimum(index, total - 1)
                cond_chunk, null_chunk = ({name: value[take] for name, value in arrays.items()} for arrays in (cond, null))
                inputs = (cond_chunk, null_chunk, index.astype(np.int32), np.uint32(seed), np.float32(cfg_scale))
                out = program(params, model_rngs, *frozen, *_global(inputs, self.mesh), *edited)  # (b, T, H, W, 3) uint8
                videos.append(_to_host(out)[: total - start])
            jax.effects_barrier()
        return np.concatenate(videos)

    def _program(self, sampler, steps, eta, guided, shape, batch, progress, start=0, editing=False):
        key = (sampler, steps, eta, guided, shape, batch, progress, start, editing)
        if key not in self._programs:
            self._programs[key] = self._compile(sampler, steps, eta, guided, shape, progress, start, editing)
        return self._programs[key]

    def _compile(self, sampler, steps, eta, guided, shape, progress, start, editing):
        config, graphdef = self.config, self.graphdef
        channels = shape[-1]
        guided_channels = config.sample.guidance_channels or channels  # checked by Config

        def generate(params, model_rngs, codec_state, text_state, cond, null, index, seed, cfg_scale, edit=None):
            model = nnx.merge(graphdef, params, model_rngs)
            codec = nnx.merge(self._codec_graphdef, codec_state)
            text_encoder = model.text_encoder
            if self._text_graphdef is not None:  # frozen (T5)
                text_encoder = nnx.merge(self._text_graphdef, text_state)
            if guided:  # [conditional; null] in one batch
                cond = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null)
            kwargs = {"label": cond.get("label")}
            if config.model.has_text:  # the text is encoded once, not at every step
                text = text_encoder(cond["text_tokens"], cond["text_mask"])  # (B, L, E)
                kwargs |= {"text": text, "text_mask": cond["text_mask"]}
            denoise = lambda x, t: model.dit(x, t, **kwargs)
            if guided:
                denoise = sampling.guide(denoise, cfg_scale, guided_channels)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)  # (B,)
            advance = self._advance if progress else None
            sdedit = {}
            if editing:  # the clip's latents, the same for every sample: (B, T, H, W, C)
                init = codec.encode(edit[None])  # (1, T, H, W, C): the posterior mean
                sdedit = {"init": jnp.broadcast_to(init, (index.shape[0], *shape)), "start": start}
            if config.diffusion.process == "flow":
                x0 = sampling.sample_flow(
                    denoise, keys, shape, steps=steps, sampler=sampler, prediction=config.diffusion.prediction,
                    shift=flow_shift(config, shape), clip_x0=codec.clip_latents, progress=advance, **sdedit,
                )  # (B, T, H, W, C)
            else:
                x0 = sampling.sample(
                    denoise, keys, shape, schedule_kind=config.diffusion.schedule,
                    num_train_steps=config.diffusion.num_steps, steps=steps, sampler=sampler, eta=eta,
                    prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma,
                    clip_x0=codec.clip_latents, progress=advance, **sdedit,
                )  # (B, T, H, W, C)
            return to_uint8(codec.decode(x0))  # (B, T', H', W', 3)

        batched = batch_sharding(self.mesh)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        text_shardings = jax.tree.map(lambda x: x.sharding, self._text_state)
        return jax.jit(
            context_parallel.traced_on(self.mesh, generate),
            in_shardings=(
                self.param_shardings, replicated, replicated, text_shardings, batched, batched, batched, replicated,
                replicated, *((replicated,) if editing else ()),
            ),
            out_shardings=batched,
            compiler_options=host.compiler_options(self.mesh.devices.flat[0].platform),
        )

    def _advance(self, done):
        self._bar.update(1)


def _warn_if_untrained(trained: tuple[tuple[int, int, int], ...], shape: tuple[int, int, int]) -> None:
    """Any grid runs, but a size far from the training sizes may be drawn poorly: say so."""
    if shape not in trained:
        named = ", ".join("x".join(map(str, s)) for s in trained)
        warnings.warn(
            f"{'x'.join(map(str, shape))} (frames x height x width) is not a size this run trained on ({named}); "
            "the model runs on any grid, but may draw this one poorly.", stacklevel=3,
        )


def _check_codec_record(config: Config, workdir: pathlib.Path) -> None:
    """A DiT trained on a saved codec samples only with that same codec (train.py recorded its codec.json)."""
    from jaxdit import codec as codecs

    record = workdir / codecs.RUN_RECORD
    if config.codec.kind == "saved" and record.is_file():
        codecs.check_unchanged(config.codec.path, json.loads(record.read_text()), f"the run in {workdir}")


def _global(inputs: tuple, mesh: jax.sharding.Mesh, *, replicate: bool = False) -> tuple:
    """Host arrays (the same on every process) -> global arrays: batched ones split, scalars (everything, with
    `replicate`) replicated."""
    batched, replicated = batch_sharding(mesh), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    put = lambda a: jax.make_array_from_callback(a.shape, batched if a.ndim and not replicate else replicated,
                                                  lambda i: a[i])
    return jax.tree.map(lambda a: put(np.asarray(a)), inputs)


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _progress_bar(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", desc="sampling", dynamic_ncols=True)


class Pipeline:
    """A trained model ready to generate: `.config`, `.model` (the VideoDiT with EMA weights), `.codec`.

    devices: the devices to generate on (default: every local one). context: split each video's
    tokens over groups of this many of them (the mesh's context axis), for videos too long for one
    device's memory; the samples are split over the groups. The pixels are the same.
    """

    def __init__(self, config: Config, params, model_rngs, *, step: int | None = None, devices=None, context: int = 1):
        self.config, self.step = config, step
        self.codec = make_codec(config.codec)
        mesh = make_mesh(1, devices=jax.local_devices() if devices is None else devices, context=context)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        graphdef = model_graphdef(config)
        params = jax.device_put(params, replicated)
        self.denoiser = nnx.merge(graphdef, params, jax.device_put(model_rngs, replicated))
        self._sampler = VideoSampler(config, graphdef, self.codec, mesh, replicated)

    @property
    def model(self):
        """The VideoDiT (with the EMA weights); its trained text encoder is `denoiser.text_encoder` (None with
        a frozen T5, which `text_encoder` holds)."""
        return self.denoiser.dit

    @property
    def text_encoder(self):
        """The frozen pretrained text encoder (`jaxdit.t5.T5Encoder`) of a text.encoder="t5" run, else None."""
        graphdef, state = self._sampler._text_graphdef, self._sampler._text_state
        return None if graphdef is None else nnx.merge(graphdef, state)

    @classmethod
    def load(
        cls, workdir: str | pathlib.Path, *, step: int | None = None, devices=None, context: int = 1,
        text_path: str | None = None,
    ) -> "Pipeline":
        """The run's config and the EMA weights of its latest checkpoint (or of `step`); `devices` and
        `context` as `Pipeline`'s (any context size: the weights do not depend on it).

        text_path: where a text.encoder="t5" run's encoder folder is now, if it moved (checked to be the same one).
        """
        directory = pathlib.Path(workdir) / "checkpoints"
        if not directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoints in {str(workdir)!r} (looked for {str(directory)!r}); train a model first, "
                f"e.g. python train.py --workdir {workdir}"
            )
        with Checkpointer(directory, read_only=True) as checkpointer:
            latest = checkpointer.latest_step()
            if latest is None:
                raise FileNotFoundError(
                    f"{str(directory)!r} holds no complete checkpoint; train (or resume) the run first."
                )
            step = latest if step is None else step
            config = Config.from_dict(checkpointer.restore_config(step))
            if text_path is not None:
                text = dataclasses.replace(config.text, path=os.path.abspath(text_path))
                config = dataclasses.replace(config, text=text)
            _check_codec_record(config, pathlib.Path(workdir))
            frozen_text.check_run(config, pathlib.Path(workdir))
            if config.task == "codec":
                raise ValueError(
                    f"{str(workdir)!r} trained a codec, not a DiT: load it with jaxdit.codec.load({str(workdir)!r}), "
                    f"or train a DiT on its latents with --codec.kind saved --codec.path {workdir}."
                )
            mesh = make_mesh(1, devices=[jax.local_devices()[0]])
            state = checkpointer.restore_weights(abstract_train_state(config, mesh), step=step)
        log.info("loaded %s at step %d", workdir, step)
        return cls(config, state["ema"], state["model_rngs"], step=step, devices=devices, context=context)

    def generate(
        self,
        prompts: str | list[str],
        *,
        num_samples: int = 1,
        steps: int | None = None,
        sampler: str | None = None,
        cfg_scale: float | None = None,
        eta: float | None = None,
        seed: int = 0,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        size: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        edit: np.ndarray | None = None,
        strength: float = DEFAULT_STRENGTH,
    ) -> np.ndarray:
        """Prompts -> uint8 videos (len(prompts) * num_samples, T, H, W, 3), samples of a prompt adjacent.

        The video is `num_frames` frames of `height` x `width` pixels (`size`: a square), any that the patch
        and the codec divide; `num_frames=1` is an image. Unset arguments come from the run's `sample`
        config (sampler, steps, cfg_scale, eta) and `data` config (its first clip shape: `data.shapes[0]`). A
        shape the run did not train on works, with a warning. `batch_size` caps the samples per forward pass.

        edit: SDEdit of a uint8 clip (T, H, W, 3), which gives the videos' size: its latents are noised to
        `strength` (in (0, 1]) of the denoising path and denoised from there with each prompt. Strength 1
        is plain sampling from the same seed; a strength under 1 / steps returns the clip through the codec.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or num_samples < 1:
            raise ValueError(f"give at least one prompt and num_samples >= 1; got {len(prompts)} and {num_samples}.")
        defaults, data = self.config.sample, self.config.data
        if size is not None and (height is not None or width is not None):
            raise ValueError(f"give size (a square) or height and width, not both; got size={size}, "
                             f"height={height}, width={width}.")
        if edit is not None:
            edit = np.asarray(edit)
            if edit.dtype != np.uint8 or edit.ndim != 4 or edit.shape[-1] != 3:
                raise ValueError(f"edit must be a uint8 clip (T, H, W, 3); got {edit.dtype} {edit.shape}.")
            given = {"num_frames": num_frames, "height": height if size is None else size, "width": width if size is None else size}
            for (name, value), own in zip(given.items(), edit.shape[:3], strict=True):
                if value is not None and value != own:
                    raise ValueError(f"{name}={value} differs from the clip to edit ({own}): leave it unset, or resize the clip.")
            num_frames, height, width = edit.shape[:3]
        default_frames, default_height, default_width = data.shapes[0]
        num_frames = default_frames if num_frames is None else num_frames
        height = size if size is not None else default_height if height is None else height
        width = size if size is not None else default_width if width is None else width
        self._sampler.latent_shape(num_frames, height, width)  # a size the model cannot make: an error first
        _warn_if_untrained(data.shapes, (num_frames, height, width))
        _, params, model_rngs = nnx.split(self.denoiser, nnx.Param, ...)
        return self._sampler(
            params, model_rngs, [p for p in prompts for _ in range(num_samples)], seed=seed,
            sampler=defaults.sampler if sampler is None else sampler,
            steps=defaults.steps if steps is None else steps,
            eta=defaults.eta if eta is None else eta,
            cfg_scale=defaults.cfg_scale if cfg_scale is None else cfg_scale,
            num_frames=num_frames, height=height, width=width, batch_size=batch_size, progress=progress,
            edit=edit, strength=strength,
        )
