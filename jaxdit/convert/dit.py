"""Imports facebookresearch/DiT's published checkpoints as a jaxdit run that sample.py and Pipeline load.

    python -m jaxdit.convert.dit DiT-XL-2-256x256.pt --variant XL/2 --image-size 256 --vae sd-vae-ft-ema --out runs/dit_xl2_256
    python sample.py --workdir runs/dit_xl2_256 --class-label 207 360 387 974 88 979 417 279 --out grid.png

SRC is a state_dict as DiT saves it (keys `x_embedder.proj.weight`, `blocks.N.attn.qkv.weight`,
`pos_embed`, ...): a .pt file read with torch when it is installed (a training checkpoint's
"ema" weights are taken), or the same tensors as .safetensors / .npz, which need no torch.
VideoDiT with 1 frame, patch 1x2x2, 4 latent channels, 1000 classes + the null class and a
learned variance computes exactly DiT; `dit_config` is that configuration, with DiT's diffusion
and sampling settings. The VAE that decodes the latents (`--vae`) is a codec directory from
`python -m jaxdit.convert.sd_vae`, or the diffusers AutoencoderKL weights (file or folder) that
are converted on the way; it is stored in OUT/codec/.

OUT then holds the config and the weights as the EMA weights of a step-0 checkpoint, and
`imported.json` saying where they came from. It has no optimizer state: it is for sampling.
"""

import argparse
import functools
import json
import logging
import pathlib
import shutil
import sys

import einops
import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdit.checkpoint import IMPORT_RECORD
from jaxdit.config import CodecConfig, Config, DataConfig, DiffusionConfig, SampleConfig, TrainConfig
from jaxdit.convert import read_tensors, some
from jaxdit.model_config import VARIANTS, ModelConfig, parse_variant
from jaxdit.patch import sincos_3d

log = logging.getLogger(__name__)

NUM_CLASSES = 1000  # ImageNet; label 1000 is DiT's null class
LATENT_CHANNELS, VAE_DOWNSAMPLE = 4, 8  # SD's VAE: 8x8 pixels -> one 4-channel latent
_WHAT = "a facebookresearch/DiT state_dict (e.g. DiT-XL-2-256x256.pt)"

# DiT key prefix -> (the VideoDiT module path, the rearrangement of DiT's weight into the kernel).
_LINEAR = "o i -> i o"  # torch Linear (out, in) -> nnx kernel (in, out)
_BLOCK_LAYERS = {
    "attn.qkv": ("attn", "qkv"),
    "attn.proj": ("attn", "proj"),
    "mlp.fc1": ("mlp", "fc1"),
    "mlp.fc2": ("mlp", "fc2"),
    "adaLN_modulation.1": ("modulation",),
}
_LAYERS = {
    "x_embedder.proj": (("patch_embed",), "d c p q -> (p q c) d"),  # Conv2d (D, C, p, p) on (p, p, C) patches
    "t_embedder.mlp.0": (("t_embed", "mlp", "fc1"), _LINEAR),
    "t_embedder.mlp.2": (("t_embed", "mlp", "fc2"), _LINEAR),
    "final_layer.adaLN_modulation.1": (("final", "modulation"), _LINEAR),
    "final_layer.linear": (("final", "linear"), _LINEAR),  # outputs in (p, q, C) order, as VideoDiT's unpatchify
}
_LABELS = "y_embedder.embedding_table.weight"  # (classes + 1, D): the last row is the null class
_POSITIONS = "pos_embed"  # (1, N, D): fixed 2-D sin-cos, which VideoDiT computes itself


def dit_config(variant: str = "XL/2", image_size: int = 256, *, num_classes: int = NUM_CLASSES, vae: str = "") -> Config:
    """DiT's class-conditional ImageNet model at `image_size` (256 or 512), as a jaxdit Config.

    Diffusion, training and sampling settings are DiT's: linear betas over 1000 steps, AdamW at
    1e-4 with batch 256 and EMA 0.9999, DDPM with 250 steps and guidance 4.0 on the first three
    latent channels, as DiT's sample.py. `vae`: the SD-VAE codec directory that decodes the latents.
    """
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"image size must be a multiple of {VAE_DOWNSAMPLE} (the VAE's downsampling); got {image_size}.")
    return Config(
        name=f"dit_{variant.replace('/', '').lower()}_{image_size}",
        model=ModelConfig(variant=variant, in_channels=LATENT_CHANNELS, num_classes=num_classes, learn_sigma=True),
        data=DataConfig(num_frames=1, size=image_size),
        diffusion=DiffusionConfig(num_steps=1000, schedule="linear", prediction="epsilon"),
        codec=CodecConfig(kind="saved", path=vae) if vae else CodecConfig(),
        train=TrainConfig(batch_size=256, learning_rate=1e-4, weight_decay=0.0, ema_decay=0.9999, grad_clip=0.0),
        sample=SampleConfig(sampler="ddpm", steps=250, cfg_scale=4.0, guidance_channels=3),
    )


def _dit_name(shape_of: dict) -> str:
    """The DiT model a checkpoint's tensors describe, e.g. "width 1152, 28 blocks, patch 2, 4 input channels: --variant XL/2"."""
    width, channels, patch, _ = shape_of["x_embedder.proj.weight"]
    depth = sum(1 for key in shape_of if key.startswith("blocks.") and key.endswith(".attn.qkv.weight"))
    names = [size for size, (w, d, _) in VARIANTS.items() if (w, d) == (width, depth)]
    name = f": --variant {names[0]}/{patch}" if names else ""
    return f"width {width}, {depth} blocks, patch {patch}, {channels} input channels{name}"


def check_tensors(tensors: dict[str, np.ndarray], config: Config) -> None:
    """A ValueError naming what in a DiT state_dict does not fit `config` (missing, extra, mis-shaped keys)."""
    model = config.model
    expected = expected_shapes(config)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}
    described = f"the checkpoint ({_dit_name(shapes)})" if "x_embedder.proj.weight" in shapes else "the checkpoint"
    wanted = f"DiT-{model.variant} for {config.data.size}x{config.data.size} images"
    if missing or unexpected:
        parts = [f"lacks {len(missing)} weights: {some(missing)}" if missing else "",
                 f"has {len(unexpected)} weights it does not: {some(unexpected)}" if unexpected else ""]
        raise ValueError(
            f"{described} is not {wanted}: it {' and '.join(p for p in parts if p)}. Pass the --variant the "
            "checkpoint was trained as (XL/2, L/4, ...), and give the model's weights alone (a state_dict)."
        )
    if shapes[_POSITIONS] != expected[_POSITIONS]:
        tokens = shapes[_POSITIONS][1]
        side = int(round(tokens**0.5)) * model.patch[1] * VAE_DOWNSAMPLE
        raise ValueError(
            f"{_POSITIONS} has {tokens} positions: the checkpoint is for {side}x{side} images, not "
            f"{config.data.size}x{config.data.size}. Pass --image-size {side}."
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ValueError(f"{key} has shape {shapes[key]} in {described} but {shape} in {wanted}: pass the right --variant.")
    grid = config.data.size // VAE_DOWNSAMPLE // model.patch[1]
    difference = np.abs(tensors[_POSITIONS][0] - sincos_3d(model.width, (1, grid, grid))).max()  # VideoDiT's (N, D)
    if difference > 1e-5:
        raise ValueError(
            f"the checkpoint's {_POSITIONS} is not DiT's fixed 2-D sin-cos embedding of a {grid}x{grid} grid "
            f"(largest difference {difference:.3g}), the only positions VideoDiT uses."
        )


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every key of the DiT state_dict that `config` describes -> its shape in torch's layout."""
    model = config.model
    width, (_, p, _) = model.width, model.patch
    tokens = (config.data.size // VAE_DOWNSAMPLE // p) ** 2
    shapes = {_POSITIONS: (1, tokens, width), _LABELS: (model.num_classes + 1, width)}
    params = _abstract_params(model)
    for key, (path, _) in _param_keys(model.depth).items():
        kernel = params[(*path, "kernel")].shape  # (in, out)
        shapes[f"{key}.weight"] = (width, model.in_channels, p, p) if key == "x_embedder.proj" else kernel[::-1]
        shapes[f"{key}.bias"] = params[(*path, "bias")].shape
    return shapes


def _param_keys(depth: int) -> dict[str, tuple[tuple, str]]:
    """DiT key prefix -> (VideoDiT module path, layout), the blocks included."""
    keys = dict(_LAYERS)
    for i in range(depth):
        for name, path in _BLOCK_LAYERS.items():
            keys[f"blocks.{i}.{name}"] = (("blocks", i, *path), _LINEAR)
    return keys


@functools.cache
def _abstract_params(model: ModelConfig) -> dict:
    """VideoDiT's parameter shapes by path, traced once per model config (tracing XL takes seconds)."""
    from jaxdit.model import VideoDiT

    abstract = nnx.eval_shape(lambda: VideoDiT(model, rngs=nnx.Rngs(0)))
    return flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def to_videodit(tensors: dict[str, np.ndarray], config: Config) -> dict:
    """A checked DiT state_dict -> VideoDiT's parameters as a nested dict of float32 arrays."""
    check_tensors(tensors, config)
    params = {}
    for key, (path, layout) in _param_keys(config.model.depth).items():
        params[(*path, "kernel")] = einops.rearrange(tensors[f"{key}.weight"], layout)
        params[(*path, "bias")] = tensors[f"{key}.bias"]
    params[("label_embed", "table", "embedding")] = tensors[_LABELS]
    if params.keys() != _abstract_params(config.model).keys():  # the table above must cover VideoDiT exactly
        raise AssertionError(f"the DiT key table does not cover VideoDiT: {sorted(params.keys() ^ _abstract_params(config.model).keys())}")
    return unflatten_dict(params)


def convert(src, out, *, variant: str = "XL/2", image_size: int = 256, vae) -> pathlib.Path:
    """Reads the DiT checkpoint `src`, writes the run directory `out` (config, EMA weights, codec)."""
    from jaxdit import codec as codecs
    from jaxdit.checkpoint import Checkpointer
    from jaxdit.train_step import make_model

    parse_variant(variant)  # a clear error for an unknown variant, before anything is read
    out = pathlib.Path(out).absolute()
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{str(out)!r} already holds checkpoints; give a new --out directory.")
    tensors = read_tensors(src, what=_WHAT)
    classes = tensors[_LABELS].shape[0] - 1 if _LABELS in tensors else NUM_CLASSES  # DiT's --num-classes
    config = dit_config(variant, image_size, num_classes=classes, vae=str(out / codecs.RUN_CODEC_DIR))
    params = to_videodit(tensors, config)

    codec = _install_vae(vae, out / codecs.RUN_CODEC_DIR)
    latents = tuple(codec.latent_shape((1, image_size, image_size, 3)))
    wanted = (1, image_size // VAE_DOWNSAMPLE, image_size // VAE_DOWNSAMPLE, LATENT_CHANNELS)
    if latents != wanted:
        shutil.rmtree(out / codecs.RUN_CODEC_DIR)
        raise ValueError(f"the VAE {vae!r} turns {image_size}px images into latents {latents}, DiT needs {wanted}: give SD's VAE.")

    # The denoiser's RNG streams (unused by an image model in eval, but part of the run's state);
    # jit drops the random initialisation of the parameters, so nothing the size of the model is made.
    model_rngs = jax.jit(lambda: nnx.split(make_model(config, rngs=nnx.Rngs(config.train.seed)), nnx.Param, ...)[2])()
    weights = nnx.state(nnx.eval_shape(lambda: make_model(config, rngs=nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(weights, {"dit": jax.tree.map(jax.numpy.asarray, params)})
    with Checkpointer(out / "checkpoints") as checkpointer:
        checkpointer.save(0, {"ema": weights, "model_rngs": model_rngs}, config=config.to_dict(), force=True)
    (out / codecs.RUN_RECORD).write_text(json.dumps(codecs.describe(out / codecs.RUN_CODEC_DIR), indent=2) + "\n")
    record = {"source": str(pathlib.Path(src).absolute()), "format": "facebookresearch/DiT", "variant": variant,
              "image_size": image_size, "vae": str(vae)}
    (out / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _install_vae(vae, directory: pathlib.Path):
    """The SD-VAE at `vae` (a codec directory, or diffusers weights to convert) copied into `directory`."""
    from jaxdit import codec as codecs
    from jaxdit.convert import sd_vae

    vae = pathlib.Path(vae)
    shutil.rmtree(directory, ignore_errors=True)  # left by an import that failed later on
    try:
        source = codecs.codec_directory(vae)
    except FileNotFoundError:
        sd_vae.convert(vae, directory)  # diffusers weights (file or folder)
    else:
        shutil.copytree(source, directory)
    return codecs.load(directory)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdit.convert.dit", description="facebookresearch/DiT checkpoint -> jaxdit run directory"
    )
    parser.add_argument("src", help="the DiT state_dict: .pt (needs torch), .safetensors or .npz with DiT's key names")
    parser.add_argument("--variant", default="XL/2", help="the DiT model the checkpoint is, e.g. XL/2 (default), L/4")
    parser.add_argument("--image-size", type=int, default=256, help="pixels per side it was trained at: 256 or 512")
    parser.add_argument("--vae", required=True, help="SD's VAE: a codec directory from jaxdit.convert.sd_vae, or "
                        "the diffusers weights (e.g. the sd-vae-ft-ema folder or its .safetensors)")
    parser.add_argument("--out", required=True, help="the run directory to write (then: sample.py --workdir OUT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        out = convert(args.src, args.out, variant=args.variant, image_size=args.image_size, vae=args.vae)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote DiT-{args.variant} ({args.image_size}x{args.image_size}) to {out}; sample with: "
          f"python sample.py --workdir {out} --class-label 207 360 387 974 --out grid.png")


if __name__ == "__main__":
    main()
