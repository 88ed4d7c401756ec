"""From a trained run to videos: `Pipeline.load(workdir).generate(prompts)`.

    pipe = Pipeline.load("runs/shapes_tiny")                 # config + EMA weights of the latest checkpoint
    videos = pipe.generate(["a large red circle moving left"], num_samples=2, seed=0)
    videos.shape, videos.dtype                              # (2, 8, 32, 32, 3) uint8

Generation is one jitted program per (sampler, steps, shape, batch): encode the prompts once,
run the whole reverse diffusion as a `lax.scan` with classifier-free guidance batched into
one forward pass, decode with the frozen codec, clip and convert to uint8. Samples are split
over every local device, or with `context` > 1 each sample's video tokens over groups of that
many devices (`jaxdit.context_parallel`) and the samples over the groups; with `fsdp` > 1 the
parameters are split over groups of that many devices too (`Pipeline`). Sample j (prompts in order, the samples of a prompt adjacent) starts
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

from jaxdit import context_parallel, frames, frozen_text, host, init_from, lora, sampling
from jaxdit.checkpoint import Checkpointer
from jaxdit.codec import frozen_codec_state, make_codec, to_uint8
from jaxdit.config import Config
from jaxdit.options import DTYPES, check_choice
from jaxdit.sharding import batch_sharding, data_parallel_size, make_mesh, state_sharding
from jaxdit.text import make_tokenizer
from jaxdit.train_step import abstract_train_state, flow_shift, model_graphdef

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.8  # SDEdit: the share of the denoising path rerun from the edited clip (diffusers' default)
PIXEL_TYPES = ("uint8", "float")  # what generate returns: uint8 frames, or float32 in [0, 1] (diffusers' "np")


def conditions(config: Config, prompts: list[str], negative_prompt: str = "") -> tuple[dict, dict]:
    """Prompts -> the model's conditioning arrays (B, ...), and the null condition of CFG.

    A text model reads the prompt (tokens, mask); a class-conditional model without text reads
    it as a class index ("207"); the null condition is the empty caption (for a frozen T5 too, as
    in Open-Sora and PixArt: its features of ""), or `negative_prompt`, and the null label.
    """
    model = config.model
    cond, null = {}, {}
    if negative_prompt and not model.has_text:
        raise ValueError("a negative prompt needs a text-conditioned model; this one has no text (model.text_dim=0).")
    if model.has_text:
        tokenizer = make_tokenizer(config.text)
        for prompt in [*prompts, negative_prompt]:
            if tokenizer.count(prompt) > config.text.max_length:
                warnings.warn(
                    f"prompt of {tokenizer.count(prompt)} tokens truncated to the model's text.max_length="
                    f"{config.text.max_length}: {prompt!r}", stacklevel=3,
                )
        tokenizer.truncated = 1  # warned above; keep the tokenizer's own log quiet
        cond = tokenizer.encode_batch(prompts)  # text_tokens, text_mask (B, L)
        null = tokenizer.encode_batch([negative_prompt] * len(prompts))
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
            if latents[axis] % patch[axis] and not (axis == 0 and latents[0] == 1):  # an image fills a patch
                raise misfit(name, value, axis)
        return tuple(latents)

    def given_frames(self, count: int, height: int, width: int) -> int:
        """The latent frames that `count` pixel frames of a reference make, encoded on their own."""
        return self.codec.latent_shape((count, height, width, 3))[0]

    def reference_pixels(self, latent_frames: int, height: int, width: int) -> int:
        """The fewest pixel frames that encode on their own to `latent_frames` latent frames."""
        for count in range(1, self.codec.factors[0] * latent_frames + 1):
            try:
                if self.given_frames(count, height, width) == latent_frames:
                    return count
            except ValueError:  # a frame count the codec does not take
                continue
        raise ValueError(f"the {self.config.codec.kind} codec makes no {latent_frames} latent frames of {height}x{width}.")

    def __call__(
        self, params, model_rngs, prompts: list[str], *, seed: int, sampler: str, steps: int, eta: float,
        cfg_scale: float, num_frames: int, height: int, width: int, batch_size: int | None = None,
        progress: bool = False, edit: np.ndarray | None = None, strength: float = 1.0,
        head: np.ndarray | None = None, tail: np.ndarray | None = None, negative_prompt: str = "",
        noise: np.ndarray | None = None, pixels: str = "uint8",
    ) -> np.ndarray:
        """One video per prompt (repeat a prompt for several samples) -> uint8 (B, T, H, W, 3).

        edit: SDEdit of this uint8 clip (T, H, W, 3) of the videos' size: every sample starts from its
        latents noised to `strength` of the path (`sampling.sdedit_start`) instead of from noise.
        head, tail: frame conditioning (`jaxdit.frames`): uint8 frames (k, H, W, 3) that begin (end) every
        video, each encoded on its own; the model generates the rest.
        noise: every video's starting noise (B, T, H, W, C) of the latent shape, instead of the seed's draw.
        pixels: "uint8", or "float" for float32 frames in [0, 1].
        """
        config = self.config
        sampler = sampling.check_sampler(sampler, steps, config.diffusion.num_steps, config.diffusion.process)
        check_choice("pixels", pixels, PIXEL_TYPES)
        shape = self.latent_shape(num_frames, height, width)
        noise = self._check_noise(noise, len(prompts), shape)
        references = self._check_references(head, tail, shape, num_frames, height, width, edit is not None)
        skipped = 0  # SDEdit: the steps of the path not rerun
        if edit is not None:
            edit = np.asarray(edit)
            if edit.dtype != np.uint8 or edit.shape != (num_frames, height, width, 3):
                raise ValueError(
                    f"the clip to edit must be uint8 frames (T, H, W, 3) of the videos' size {(num_frames, height, width, 3)}; "
                    f"got {edit.dtype} {edit.shape}."
                )
            skipped = sampling.sdedit_start(steps, strength)
        cond, null = conditions(config, prompts, negative_prompt)
        guided = bool(null) and cfg_scale != 1.0  # no condition, or g = 1: one pass per step
        total = len(prompts)
        devices = data_parallel_size(self.mesh)  # the devices that hold different samples
        batch = devices * math.ceil(min(batch_size or total, total) / devices)  # a multiple of them
        layout = tuple(None if r is None else r.shape[0] for r in (head, tail))  # pixel frames given at each end
        program = self._program(
            sampler, steps, eta, guided, shape, batch, progress, skipped, edit is not None, layout, noise is not None, pixels
        )
        bar = _progress_bar(math.ceil(total / batch) * (steps - skipped), enabled=progress)
        frozen = (self._codec_state, self._text_state)
        edited = () if edit is None else _global((edit,), self.mesh, replicate=True)  # copied to the devices once
        edited += _global(references, self.mesh, replicate=True)
        videos = []
        with bar:
            self._bar = bar
            for start in range(0, total, batch):
                index = np.arange(start, start + batch)  # (b,) sample indices; past `total`: padding
                take = np.minimum(index, total - 1)
                cond_chunk, null_chunk = ({name: value[take] for name, value in arrays.items()} for arrays in (cond, null))
                noise_chunk = None if noise is None else noise[take]
                inputs = (cond_chunk, null_chunk, index.astype(np.int32), noise_chunk, np.uint32(seed), np.float32(cfg_scale))
                out = program(params, model_rngs, *frozen, *_global(inputs, self.mesh), *edited)  # (b, T, H, W, 3)
                videos.append(_to_host(out)[: total - start])
            jax.effects_barrier()
        return np.concatenate(videos)

    def _check_references(self, head, tail, shape, num_frames, height, width, editing) -> tuple:
        """The given frames (head, tail) that are not None, checked against the videos asked for."""
        given = {name: r for name, r in (("leading", head), ("trailing", tail)) if r is not None}
        if not given:
            return ()
        if not self.config.model.frame_condition:
            raise ValueError(
                "this run was trained with no frame conditioning (model.frame_condition=False), so it cannot be "
                "prompted with images or clips: train one with --model.frame_condition true --train.condition "
                "first=0.3,last=0.1 (configs/shapes_tiny.py does), or use --edit (SDEdit), which any run can do."
            )
        if editing:
            raise ValueError("give frames to keep (an image or a clip) or a clip to edit, not both.")
        if num_frames == 1:
            raise ValueError("an image (one frame) cannot be prompted with frames: ask for a video (num_frames > 1).")
        count = 0
        for name, clip in given.items():
            if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[1:] != (height, width, 3):
                raise ValueError(
                    f"the {name} frames must be uint8 (k, H, W, 3) of the videos' size {height}x{width}; got "
                    f"{clip.dtype} {clip.shape}: resize them, or ask for their size."
                )
            count += self.given_frames(clip.shape[0], height, width)
        if count >= shape[0]:
            raise ValueError(
                f"the given frames fill {count} of the {shape[0]} latent frames of a {num_frames}-frame video: "
                "ask for more frames, or give fewer."
            )
        return tuple(given.values())

    def _check_noise(self, noise, total: int, shape: tuple) -> np.ndarray | None:
        """The given starting noise as float32 (total, *sampled shape), or None; an image's one latent frame is
        repeated to fill a temporal patch, as the sampler does."""
        if noise is None:
            return None
        noise = np.asarray(noise, np.float32)
        if noise.shape != (total, *shape):
            raise ValueError(
                f"the starting noise must be one latent video per sample, (samples, T, H, W, C) = {(total, *shape)} "
                f"for these prompts and this size; got {noise.shape}."
            )
        if shape[0] == 1:
            noise = np.repeat(noise, self.config.model.patch[0], axis=1)
        return noise

    def _program(self, sampler, steps, eta, guided, shape, batch, progress, start=0, editing=False,
                 layout=(None, None), noised=False, pixels="uint8"):
        key = (sampler, steps, eta, guided, shape, batch, progress, start, editing, layout, noised, pixels)
        if key not in self._programs:
            self._programs[key] = self._compile(*key[:5], *key[6:])
        return self._programs[key]

    def _given(self, codec, shape, layout, references):
        """The given frames of every video: (latents (1, T, H, W, C), mask (1, T) bool), each reference
        encoded on its own and placed at its end of the clip."""
        length = shape[0]
        given, mask = jnp.zeros((1, *shape), jnp.float32), np.zeros((1, length), bool)
        references = list(references)
        for end, count in zip(("head", "tail"), layout, strict=True):
            if count is None:
                continue
            latents = codec.encode(references.pop(0)[None])  # (1, k, H, W, C): the posterior mean
            k = latents.shape[1]
            where = slice(0, k) if end == "head" else slice(length - k, length)
            given = given.at[:, where].set(latents)
            mask[:, where] = True
        return given, jnp.asarray(mask)

    def _compile(self, sampler, steps, eta, guided, shape, progress, start, editing, layout, noised, pixels):
        config, graphdef = self.config, self.graphdef
        channels = shape[-1]
        guided_channels = config.sample.guidance_channels or channels  # checked by Config
        image = shape[0] == 1  # one latent frame: an image, sampled as a still clip that fills a temporal patch
        sampled = (config.model.patch[0] if image else shape[0], *shape[1:])
        conditioned = layout != (None, None)

        def generate(params, model_rngs, codec_state, text_state, cond, null, index, noise, seed, cfg_scale, *arrays):
            edit, references = (arrays[0], arrays[1:]) if editing else (None, arrays)
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
            batch = index.shape[0]
            kept = {}  # the sampler's: the given frames it resets after every step
            if conditioned:  # the same frames for every sample: the guided pair's halves included
                latents, mask = self._given(codec, shape, layout, references)
                kept = {"given": (jnp.broadcast_to(latents, (batch, *shape)), jnp.broadcast_to(mask, (batch, shape[0])))}
                kwargs |= {"given": latents, "given_mask": mask}
            # The model merged again from fresh copies of its variables where it runs, inside the sampler's scan:
            # nnx's scan over stacked blocks (model.scan_layers) takes only variables of the trace it runs in.
            def denoise(x, t):
                dit = nnx.merge(graphdef, *jax.tree.map(lambda a: a, (params, model_rngs))).dit
                return dit(x, t, **_batched(kwargs, x.shape[0]))

            if guided:
                denoise = sampling.guide(denoise, cfg_scale, guided_channels)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)  # (B,)
            advance = self._advance if progress else None
            sdedit = {}
            if editing:  # the clip's latents, the same for every sample: (B, T, H, W, C)
                init = frames.pad_frames(codec.encode(edit[None]), sampled[0])  # (1, T, H, W, C): the posterior mean
                sdedit = {"init": jnp.broadcast_to(init, (batch, *sampled)), "start": start}
            if config.diffusion.process == "flow":
                x0 = sampling.sample_flow(
                    denoise, keys, sampled, steps=steps, sampler=sampler, prediction=config.diffusion.prediction,
                    shift=flow_shift(config, sampled), clip_x0=codec.clip_latents, progress=advance, x_T=noise, **sdedit,
                    **kept,
                )  # (B, T, H, W, C)
            else:
                x0 = sampling.sample(
                    denoise, keys, sampled, schedule_kind=config.diffusion.schedule,
                    num_train_steps=config.diffusion.num_steps, steps=steps, sampler=sampler, eta=eta,
                    prediction=config.diffusion.prediction, learn_sigma=config.model.learn_sigma,
                    clip_x0=codec.clip_latents, progress=advance, x_T=noise, **sdedit, **kept,
                )  # (B, T, H, W, C)
            video = codec.decode(frames.cut_frames(x0, shape[0]))  # (B, T', H', W', 3) in [-1, 1]
            return to_uint8(video) if pixels == "uint8" else jnp.clip((video + 1) / 2, 0.0, 1.0)

        batched = batch_sharding(self.mesh)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        text_shardings = jax.tree.map(lambda x: x.sharding, self._text_state)
        return jax.jit(
            context_parallel.traced_on(self.mesh, generate),
            in_shardings=(
                self.param_shardings, replicated, replicated, text_shardings, batched, batched, batched, batched,
                replicated, replicated, *((replicated,) * (editing + sum(count is not None for count in layout))),
            ),
            out_shardings=batched,
            compiler_options=host.compiler_options(self.mesh.devices.flat[0].platform),
        )

    def _advance(self, done):
        self._bar.update(1)


def _uint8_frames(name: str, array, ndim: int) -> np.ndarray:
    """A uint8 image (H, W, 3) (ndim 3) or clip (T, H, W, 3) (ndim 4), or an error naming it."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        what = "a uint8 image (H, W, 3)" if ndim == 3 else "a uint8 clip (T, H, W, 3)"
        raise ValueError(f"{name} must be {what}; got {array.dtype} {array.shape}.")
    return array


def _batched(kwargs: dict, batch: int) -> dict:
    """The model's keyword arguments with the given frames (1, ...) broadcast to the batch it runs on."""
    if "given" not in kwargs:
        return kwargs
    given, mask = kwargs["given"], kwargs["given_mask"]
    return kwargs | {"given": jnp.broadcast_to(given, (batch, *given.shape[1:])),
                     "given_mask": jnp.broadcast_to(mask, (batch, *mask.shape[1:]))}


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


def _in_dtype(params, dtype: str):
    """The parameters with their floating-point arrays in `dtype`; other arrays, and those already in it, as they are."""
    def cast(x):
        wanted = _stored_dtype(x.dtype, dtype)
        return x if x.dtype == wanted else x.astype(wanted)

    return jax.tree.map(cast, params)


def _stored_dtype(dtype, param_dtype: str):
    """The dtype an array of `dtype` is kept in: `param_dtype` for floating point, its own otherwise (RNG keys, counts)."""
    return jnp.dtype(param_dtype) if jnp.issubdtype(dtype, jnp.floating) else dtype


def _one_copy(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The devices of `mesh` at data 0 and context 0: together they hold one copy of parameters split over fsdp,
    each the shard it holds in `mesh`."""
    return jax.sharding.Mesh(mesh.devices[:1, :, :1], mesh.axis_names, axis_types=mesh.axis_types)


def _progress_bar(total: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", desc="sampling", dynamic_ncols=True)


class Pipeline:
    """A trained model ready to generate: `.config`, `.model` (the VideoDiT with EMA weights), `.codec`.

    devices: the devices to generate on (default: every local one), a (data, fsdp, context) mesh of them.
    context: split each video's tokens over groups of this many of them (the mesh's context axis), for
    videos too long for one device's memory. fsdp: split every large parameter over this many of them
    (`jaxdit.sharding.state_sharding`), for models too large for one device's memory; XLA gathers a
    layer's parameters where it runs. The samples are split over data x fsdp. param_dtype: the dtype the
    parameters are kept in on the devices ("bfloat16" halves their memory); the model computes in
    `config.model.dtype` whatever it is. The same seed gives the same pixels on any mesh (to float
    rounding with context or fsdp > 1).
    """

    def __init__(
        self, config: Config, params, model_rngs, *, step: int | None = None, devices=None, context: int = 1,
        fsdp: int = 1, param_dtype: str = "float32",
    ):
        check_choice("param_dtype", param_dtype, DTYPES)
        self.config, self.step = config, step
        self.codec = make_codec(config.codec)
        mesh = make_mesh(fsdp, devices=jax.local_devices() if devices is None else devices, context=context)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        graphdef = model_graphdef(config)
        # Merged and split again: the parameters as `generate` passes them to the sampler, whatever tree came in.
        _, params, model_rngs = nnx.split(nnx.merge(graphdef, _in_dtype(params, param_dtype), model_rngs), nnx.Param, ...)
        shardings = state_sharding(params, mesh)
        self.denoiser = nnx.merge(graphdef, jax.device_put(params, shardings), jax.device_put(model_rngs, replicated))
        self._sampler = VideoSampler(config, graphdef, self.codec, mesh, shardings)

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
        fsdp: int = 1, param_dtype: str = "float32", dtype: str | None = None, text_path: str | None = None,
        merge_lora: bool = False,
    ) -> "Pipeline":
        """The run's config and the EMA weights of its latest checkpoint (or of `step`); `devices`, `context`,
        `fsdp` and `param_dtype` as `Pipeline`'s (any mesh: the weights do not depend on it). The weights are
        read straight into `param_dtype`, split over fsdp onto one copy's devices, then copied to the others.
        A LoRA run's adapters are applied to the base weights it started from (`jaxdit.init_from.base_params`);
        merge_lora folds them into those weights (`jaxdit.lora.merge_adapters`), which samples at the base
        model's cost.

        dtype: the model's computation dtype (`model.dtype`: "bfloat16" on accelerators) in place of the run's.
        text_path: where a text.encoder="t5" run's encoder folder is now, if it moved (checked to be the same one).
        """
        check_choice("param_dtype", param_dtype, DTYPES)
        if dtype is not None:
            check_choice("dtype", dtype, DTYPES)
        directory = pathlib.Path(workdir) / "checkpoints"
        if not directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoints in {str(workdir)!r} (looked for {str(directory)!r}); train a model first, "
                f"e.g. python train.py --workdir {workdir}"
            )
        devices = jax.local_devices() if devices is None else list(devices)
        mesh = _one_copy(make_mesh(fsdp, devices=devices, context=context))

        def read(step):  # the config saved with a checkpoint, then the weights it describes
            config = Config.from_dict(checkpointer.restore_config(step))
            if config.task == "codec":
                return config, None
            return config, checkpointer.restore_weights(
                init_from.weights_target(abstract_train_state(config, mesh), param_dtype), step=step
            )

        with Checkpointer(directory, read_only=True) as checkpointer:
            if checkpointer.latest_step() is None:
                raise FileNotFoundError(
                    f"{str(directory)!r} holds no complete checkpoint; train (or resume) the run first."
                )
            # The newest checkpoint that reads (or `step`, with no fallback): a damaged one is named and passed over.
            step, (config, state) = checkpointer.newest_readable(read, step=step)
        if config.task == "codec":
            raise ValueError(
                f"{str(workdir)!r} trained a codec, not a DiT: load it with jaxdit.codec.load({str(workdir)!r}), "
                f"or train a DiT on its latents with --codec.kind saved --codec.path {workdir}."
            )
        if text_path is not None:
            config = dataclasses.replace(config, text=dataclasses.replace(config.text, path=os.path.abspath(text_path)))
        if dtype is not None:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype))
        _check_codec_record(config, pathlib.Path(workdir))
        frozen_text.check_run(config, pathlib.Path(workdir))
        params, model_rngs = state["ema"], state["model_rngs"]
        if config.train.lora_rank:
            base = init_from.base_params(config, init_from.recorded_source(workdir), mesh, param_dtype)
            if merge_lora:
                params = lora.merged_params(model_graphdef(config), base, params, model_rngs)
                config = lora.base_config(config)
            else:
                params = nnx.merge_state(base, params)  # the base weights and the adapters, one tree
        elif merge_lora:
            raise ValueError(f"merge_lora: {str(workdir)!r} is not a LoRA run (train.lora_rank=0); load it without.")
        log.info("loaded %s at step %d", workdir, step)
        return cls(
            config, params, model_rngs, step=step, devices=devices, context=context, fsdp=fsdp, param_dtype=param_dtype,
        )

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
        image: np.ndarray | None = None,
        last_image: np.ndarray | None = None,
        video: np.ndarray | None = None,
        backward: bool = False,
        negative_prompt: str | None = None,
        latents: np.ndarray | None = None,
        pixels: str = "uint8",
    ) -> np.ndarray:
        """Prompts -> uint8 videos (len(prompts) * num_samples, T, H, W, 3), samples of a prompt adjacent.

        The video is `num_frames` frames of `height` x `width` pixels (`size`: a square), any that the patch
        and the codec divide; `num_frames=1` is an image. Unset arguments come from the run's `sample`
        config (sampler, steps, cfg_scale, eta, negative_prompt: the caption guidance steers away from,
        instead of the empty one) and `data` config (its first clip shape: `data.shapes[0]`). A
        shape the run did not train on works, with a warning. `batch_size` caps the samples per forward pass.

        edit: SDEdit of a uint8 clip (T, H, W, 3), which gives the videos' size: its latents are noised to
        `strength` (in (0, 1]) of the denoising path and denoised from there with each prompt. Strength 1
        is plain sampling from the same seed; a strength under 1 / steps returns the clip through the codec.

        Prompting with images and clips (a run trained with frame conditioning, `jaxdit.frames`), applied to
        every prompt, each reference giving the videos' size unless it is given:
        image: a uint8 image (H, W, 3), the first frame (image-to-video); last_image: the last frame (with
        `image`, a clip that connects them; the same image twice, a loop); video: a uint8 clip (T, H, W, 3)
        continued forward, its last frames leading the new video (the run's train.condition_frames latent
        frames of them), or with `backward` what came before it, its first frames ending the new video.

        latents: the starting noise of every video, float (len(prompts) * num_samples, T, H, W, C) in the
        model's latent shape (channels last), instead of the seed's draw: to reproduce another
        implementation's samples from its initial latents. pixels: "uint8" (default) or "float", float32
        frames in [0, 1] (diffusers' output_type="np").
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or num_samples < 1:
            raise ValueError(f"give at least one prompt and num_samples >= 1; got {len(prompts)} and {num_samples}.")
        defaults, data = self.config.sample, self.config.data
        if size is not None and (height is not None or width is not None):
            raise ValueError(f"give size (a square) or height and width, not both; got size={size}, "
                             f"height={height}, width={width}.")
        if size is not None:
            height = width = size
        if edit is not None:
            edit = _uint8_frames("edit", edit, 4)
            asked = {"num_frames": num_frames, "height": height, "width": width}
            for (name, value), own in zip(asked.items(), edit.shape[:3], strict=True):
                if value is not None and value != own:
                    raise ValueError(f"{name}={value} differs from the clip to edit ({own}): leave it unset, or resize the clip.")
            num_frames, height, width = edit.shape[:3]
        references = {"image": image, "last_image": last_image, "video": video}
        references = {
            name: _uint8_frames(name, r, 4 if name == "video" else 3) for name, r in references.items() if r is not None
        }
        for name, reference in references.items():
            own = reference.shape[-3:-1]
            for axis, value in (("height", height), ("width", width)):
                if value is not None and value != own[axis == "width"]:
                    raise ValueError(
                        f"{name} is {own[0]}x{own[1]} pixels, but the videos asked for are {height}x{width}: resize "
                        f"it, or leave height and width unset to use its size."
                    )
            height, width = own
        if backward and video is None:
            raise ValueError("backward=True generates what came before a clip: give it as video=.")
        default_frames, default_height, default_width = data.shapes[0]
        num_frames = default_frames if num_frames is None else num_frames
        height = default_height if height is None else height
        width = default_width if width is None else width
        self._sampler.latent_shape(num_frames, height, width)  # a size the model cannot make: an error first
        head, tail = self._given_ends(references, backward, height, width)
        _warn_if_untrained(data.shapes, (num_frames, height, width))
        _, params, model_rngs = nnx.split(self.denoiser, nnx.Param, ...)
        return self._sampler(
            params, model_rngs, [p for p in prompts for _ in range(num_samples)], seed=seed,
            sampler=defaults.sampler if sampler is None else sampler,
            steps=defaults.steps if steps is None else steps,
            eta=defaults.eta if eta is None else eta,
            cfg_scale=defaults.cfg_scale if cfg_scale is None else cfg_scale,
            num_frames=num_frames, height=height, width=width, batch_size=batch_size, progress=progress,
            edit=edit, strength=strength, head=head, tail=tail,
            negative_prompt=defaults.negative_prompt if negative_prompt is None else negative_prompt,
            noise=latents, pixels=pixels,
        )

    def _given_ends(self, references: dict, backward: bool, height: int, width: int):
        """image, last_image and video -> the frames that begin and end every video (head, tail), or None."""
        head = None if "image" not in references else references["image"][None]  # (1, H, W, 3)
        tail = None if "last_image" not in references else references["last_image"][None]
        if "video" in references:
            clip = references["video"]
            if not self.config.model.frame_condition:  # the sampler names it; before counting frames here
                return clip, None
            count = self._sampler.reference_pixels(self.config.train.condition_frames, height, width)
            if clip.shape[0] < count:
                raise ValueError(
                    f"the video gives {clip.shape[0]} frames, but this run continues clips from {count} "
                    f"(train.condition_frames={self.config.train.condition_frames} latent frames): give a longer clip."
                )
            end = "tail" if backward else "head"
            if (head if end == "head" else tail) is not None:
                raise ValueError(
                    "a video continued forward already gives the first frames (drop image=), and one continued "
                    "backward the last (drop last_image=)."
                )
            if backward:
                tail = clip[:count]  # its first frames end the new video
            else:
                head = clip[-count:]  # its last frames begin the new video
        return head, tail
