"""Converts a diffusers `AutoencoderKL` checkpoint (Stable Diffusion's VAE) into a jaxdit codec directory.

    python -m jaxdit.convert.sd_vae SRC.safetensors --out DIR [--config CONFIG.json]

SRC is the VAE's weights with diffusers key names (e.g. `vae/diffusion_pytorch_model.safetensors` of a
Stable Diffusion repository, or `diffusion_pytorch_model.safetensors` of `stabilityai/sd-vae-ft-mse`),
as .safetensors or as .npz with the same keys; a diffusers model folder holding both files may be given
instead. The architecture (widths, resnets per level, latent channels) is read from the tensor shapes;
`--config` (the diffusers config.json next to the weights) adds the GroupNorm groups and the latent
scaling, which the weights do not hold (without it: 32 groups and SD's 0.18215, no shift).
DIR then holds the frozen codec: `jaxdit.codec.load(DIR)` returns an `SDVAE`; give it to a run as
`codec.path`.
"""

import argparse
import json
import pathlib
import re
import sys

import einops
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdit.codec.sd_vae import SD_SCALE, SD_SHIFT, SDVAE
from jaxdit.convert import read_tensors as convert_tensors
from jaxdit.convert import some

DIFFUSERS_WEIGHTS, DIFFUSERS_CONFIG = "diffusion_pytorch_model.safetensors", "config.json"
DEFAULT_GROUPS = 32  # diffusers' AutoencoderKL default norm_num_groups, which every SD VAE uses
# AutoencoderKL options SD's VAEs share and SDVAE builds in (SD3's and Flux's VAEs, without quant convs, differ).
_ONLY_SUPPORTED = dict(use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True, act_fn="silu")

# The key mapping, in one place. jaxdit's module tree mirrors diffusers' names except for these modules:
_RENAMES = {  # jaxdit module name -> diffusers module name
    "to_out": "to_out.0",  # diffusers' to_out is [Linear, Dropout]
    "downsample": "downsamplers.0",
    "upsample": "upsamplers.0",
    "norm_out": "conv_norm_out",
}
# Older checkpoints (diffusers' deprecated AttentionBlock, e.g. the sd-vae-ft-mse upload) name attention
# layers differently; their keys are read as the current names.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NORMS = {"norm1", "norm2", "group_norm", "norm_out"}  # nnx.GroupNorm: weight -> scale
_LINEARS = {"to_q", "to_k", "to_v", "to_out"}  # nnx.Linear: weight (out, in) -> kernel (in, out)
_LAYOUTS = {  # how a torch weight is rearranged into the nnx parameter
    "conv": "o i h w -> h w i o",  # nnx.Conv kernels are HWIO
    "linear": "o i -> i o",
    "vector": "c -> c",  # biases and GroupNorm scales
}


def diffusers_key(path: tuple) -> tuple[str, str]:
    """An SDVAE parameter path, e.g. ('decoder', 'up_blocks', 0, 'upsample', 'conv', 'kernel') ->
    its diffusers key ('decoder.up_blocks.0.upsamplers.0.conv.weight') and the `_LAYOUTS` pattern that maps it."""
    *modules, param = (str(part) for part in path)
    layer = modules[-1]
    name = ".".join(_RENAMES.get(module, module) for module in modules)
    if param == "bias" or layer in _NORMS:
        return f"{name}.{'bias' if param == 'bias' else 'weight'}", _LAYOUTS["vector"]
    return f"{name}.weight", _LAYOUTS["linear" if layer in _LINEARS else "conv"]


def canonical_key(key: str) -> str:
    """A checkpoint key with old-style attention names replaced by the current ones."""
    return ".".join(_OLD_ATTENTION_NAMES.get(part, part) for part in key.split("."))


def source_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape a parameter of `shape` comes from: `layout` read backwards."""
    torch_axes, nnx_axes = (side.split() for side in layout.split("->"))
    sizes = dict(zip(nnx_axes, shape, strict=True))
    return tuple(sizes[axis] for axis in torch_axes)


def read_tensors(path) -> dict[str, np.ndarray]:
    """The VAE's tensors by key, float32 (see `jaxdit.convert.read_tensors`)."""
    return convert_tensors(path, what=f"a diffusers AutoencoderKL weights file (e.g. vae/{DIFFUSERS_WEIGHTS})")


def infer_spec(tensors: dict[str, np.ndarray], config: dict | None = None) -> dict:
    """SDVAE's keyword arguments: the architecture from the tensor shapes, groups and scaling from `config`."""
    level_widths = []  # one per encoder level, while the checkpoint has one more
    while (key := f"encoder.down_blocks.{len(level_widths)}.resnets.0.conv2.weight") in tensors:
        level_widths.append(tensors[key].shape[0])
    if not level_widths:
        hint = (
            " It looks like an original (CompVis/ldm) checkpoint: convert it to diffusers' layout first, e.g. "
            "AutoencoderKL.from_single_file(...).save_pretrained(DIR)."
            if any(key.startswith(("encoder.down.", "first_stage_model.")) for key in tensors) else ""
        )
        raise ValueError(
            "the checkpoint is not a diffusers AutoencoderKL: it has no encoder.down_blocks.0.resnets.0.conv2.weight "
            f"(its first keys: {sorted(tensors)[:5]}).{hint}"
        )
    resnets = {m.group(1) for key in tensors if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", key))}
    config = config or {}
    spec = dict(
        block_out_channels=level_widths,
        layers_per_block=len(resnets),
        latent_channels=_dim(tensors, "encoder.conv_out.weight", 0, 8) // 2,  # mean and log-variance
        norm_num_groups=config.get("norm_num_groups", DEFAULT_GROUPS),
        in_channels=_dim(tensors, "encoder.conv_in.weight", 1, 3),
        out_channels=_dim(tensors, "decoder.conv_out.weight", 0, 3),
        scale=float(config.get("scaling_factor", SD_SCALE)),
        shift=float(config.get("shift_factor") or SD_SHIFT),  # null in SD's config: no shift
    )
    for name in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"):
        if name in config and list(np.atleast_1d(config[name])) != list(np.atleast_1d(spec[name])):
            raise ValueError(f"the config says {name}={config[name]} but the weights have {name}={spec[name]}.")
    if any(width % spec["norm_num_groups"] for width in level_widths):
        raise ValueError(
            f"norm_num_groups={spec['norm_num_groups']} does not divide the widths {level_widths}: "
            "pass the checkpoint's config.json with --config."
        )
    for name, supported in _ONLY_SUPPORTED.items():
        if config.get(name, supported) != supported:
            raise ValueError(f"the config has {name}={config[name]!r}; SDVAE supports {name}={supported!r} only.")
    return spec


def _dim(tensors, key: str, axis: int, default: int) -> int:
    """A size read off a tensor; the default where it is missing (the missing key is then reported by name)."""
    return tensors[key].shape[axis] if key in tensors else default


def from_diffusers(tensors: dict[str, np.ndarray], config: dict | None = None) -> SDVAE:
    """The SDVAE holding a diffusers AutoencoderKL's weights, or a ValueError naming what does not fit."""
    spec = infer_spec(tensors, config)
    abstract = nnx.eval_shape(lambda: SDVAE(**spec, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    targets = flatten_dict(nnx.to_pure_dict(params))  # {path: ShapeDtypeStruct}
    by_key = {canonical_key(key): value for key, value in tensors.items()}
    wanted = {diffusers_key(path)[0]: path for path in targets}
    missing, unexpected = sorted(wanted.keys() - by_key.keys()), sorted(by_key.keys() - wanted.keys())
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} of the {len(wanted)} weights of an AutoencoderKL with {spec}: "
            f"{some(missing)}. Is it a complete diffusers AutoencoderKL checkpoint (with quant_conv and "
            "post_quant_conv), and does --config match it?"
        )
    if unexpected:
        raise ValueError(
            f"the checkpoint has {len(unexpected)} weights an AutoencoderKL with {spec} does not: {some(unexpected)}. "
            "Give the VAE's weights only (not a whole pipeline's), in diffusers' layout."
        )
    converted = {}
    for key, path in wanted.items():
        _, layout = diffusers_key(path)
        expected = source_shape(layout, targets[path].shape)
        if by_key[key].shape != expected:
            raise ValueError(
                f"{key} has shape {by_key[key].shape} in the checkpoint but shape {expected} in an AutoencoderKL with "
                f"{spec}: pass the checkpoint's config.json with --config if its norm groups or sizes differ."
            )
        converted[path] = einops.rearrange(by_key[key], layout)
    nnx.replace_by_pure_dict(params, unflatten_dict(converted))
    return nnx.merge(graphdef, params, rest)


def convert(src, out, config=None) -> pathlib.Path:
    """Reads the checkpoint `src` (and the diffusers config.json `config`), writes the codec directory `out`."""
    from jaxdit import codec

    src = pathlib.Path(src)
    if src.is_dir():  # a diffusers model folder: its weights and config
        config = config or (src / DIFFUSERS_CONFIG if (src / DIFFUSERS_CONFIG).is_file() else None)
        src = src / DIFFUSERS_WEIGHTS
    config_dict = None
    if config is not None:
        config_path = pathlib.Path(config)
        if not config_path.is_file():
            raise FileNotFoundError(f"no config file at {str(config_path)!r}: give the diffusers config.json.")
        config_dict = json.loads(config_path.read_text())
    vae = from_diffusers(read_tensors(src), config_dict)
    return codec.save(vae, out, source=str(src))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdit.convert.sd_vae", description="diffusers AutoencoderKL -> jaxdit codec directory"
    )
    parser.add_argument("src", help="the VAE's weights (.safetensors or .npz, diffusers keys), or a diffusers folder")
    parser.add_argument("--out", required=True, help="the codec directory to write")
    parser.add_argument("--config", help="the diffusers config.json (norm groups, scaling factor)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, args.config)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote the SD-VAE codec {json.loads((out / 'codec.json').read_text())['spec']} to {out}")


if __name__ == "__main__":
    main()
