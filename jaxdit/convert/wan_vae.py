"""Wan 2.1's VAE (diffusers `AutoencoderKLWan`) as a jaxdit codec (`jaxdit.codec.wan_vae.WanVAE`).

    vae = wan_vae(config, tensors)       # config.json as a dict, the state_dict by key -> a WanVAE
    python -m jaxdit.convert.wan_vae Wan2.1-T2V-1.3B-Diffusers --out codecs/wan21_vae   # a codec directory

The codec decodes one latent frame at a time after frame 0 (`--decode-chunk`, saved in codec.json; 0 decodes
the whole clip at once): the same video, with the decoder's activations of 4 frames instead of the clip's.

jaxdit's module tree mirrors diffusers' names, so the mapping is a renaming: torch's convolution weights
(O, I, kt, kh, kw) and (O, I, kh, kw) become flax kernels (kt, kh, kw, I, O) and (kh, kw, I, O), the
spatial convolution of a resample block (`resample.1`, after diffusers' padding layer) is `resample`,
and the RMS norms' `gamma` of shape (C, 1, 1[, 1]) is a vector. Every tensor is checked first: a
missing, unexpected or mis-shaped one is named.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdit.codec.wan_vae import DECODE_CHUNK, WanVAE
from jaxdit.convert import read_tensors, some

_CONV_LAYOUTS = {5: (2, 3, 4, 1, 0), 4: (2, 3, 1, 0)}  # torch (O, I, *kernel) -> flax (*kernel, I, O)


def wan_vae_spec(config: dict) -> dict:
    """WanVAE's keyword arguments from a diffusers AutoencoderKLWan config.json."""
    unsupported = {
        "attn_scales": bool(config.get("attn_scales")), "is_residual": config.get("is_residual", False),
        "patch_size": config.get("patch_size") is not None,
        "decoder_base_dim": config.get("decoder_base_dim") not in (None, config["base_dim"]),
    }
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise ValueError(
            f"this AutoencoderKLWan sets {', '.join(f'{n}={config.get(n)!r}' for n in named)}: jaxdit reads Wan 2.1's VAE "
            "(no attention outside the mid blocks, no residual up/down blocks, no patchify: not Wan 2.2's)."
        )
    return dict(
        base_dim=config["base_dim"], z_dim=config["z_dim"], dim_mult=list(config["dim_mult"]),
        num_res_blocks=config["num_res_blocks"], temperal_downsample=list(config["temperal_downsample"]),
        latents_mean=list(config["latents_mean"]), latents_std=list(config["latents_std"]),
    )


def jaxdit_path(key: str) -> tuple:
    """'decoder.up_blocks.0.upsamplers.0.resample.1.weight' -> ('decoder', 'up_blocks', 0, 'upsamplers', 0,
    'resample', 'kernel')."""
    parts = key.split(".")
    parts = [p for i, p in enumerate(parts) if not (p == "1" and i and parts[i - 1] == "resample")]
    parts[-1] = {"weight": "kernel"}.get(parts[-1], parts[-1])
    return tuple(int(p) if p.isdigit() else p for p in parts)


def to_jaxdit(key: str, tensor: np.ndarray) -> np.ndarray:
    if key.endswith(".weight"):
        return np.transpose(tensor, _CONV_LAYOUTS[tensor.ndim])
    if key.endswith(".gamma"):
        return tensor.reshape(-1)
    return tensor


def wan_vae(config: dict, tensors: dict[str, np.ndarray], *, decode_chunk: int = DECODE_CHUNK) -> WanVAE:
    """A WanVAE with the weights of a diffusers AutoencoderKLWan state_dict (checked first), decoding
    `decode_chunk` latent frames at a time."""
    spec = wan_vae_spec(config)
    vae = nnx.eval_shape(lambda: WanVAE(**spec, decode_chunk=decode_chunk, rngs=nnx.Rngs(0)))  # no initialisation
    params = nnx.state(vae, nnx.Param)
    expected = {path: value.shape for path, value in flatten_dict(nnx.to_pure_dict(params)).items()}
    converted = {jaxdit_path(key): to_jaxdit(key, value) for key, value in tensors.items()}
    missing = sorted(".".join(map(str, p)) for p in expected.keys() - converted.keys())
    unexpected = sorted(k for k, v in tensors.items() if jaxdit_path(k) not in expected)
    wrong = sorted(
        f"{k} {tuple(v.shape)}" for k, v in tensors.items()
        if jaxdit_path(k) in expected and converted[jaxdit_path(k)].shape != expected[jaxdit_path(k)]
    )
    if missing or unexpected or wrong:
        parts = [f"lacks {len(missing)}: {some(missing)}" if missing else "",
                 f"has {len(unexpected)} it does not expect: {some(unexpected)}" if unexpected else "",
                 f"has {len(wrong)} of another shape: {some(wrong)}" if wrong else ""]
        raise ValueError(
            f"the Wan VAE's state_dict does not fit its config.json (base_dim {config['base_dim']}, dim_mult "
            f"{config['dim_mult']}): it {'; it '.join(p for p in parts if p)}."
        )
    nnx.replace_by_pure_dict(params, unflatten_dict(converted))
    nnx.update(vae, params)
    return vae


def convert(src, out, *, decode_chunk: int = DECODE_CHUNK) -> pathlib.Path:
    """Reads a diffusers AutoencoderKLWan folder `src` (config.json and diffusion_pytorch_model.safetensors, or
    the `vae/` folder of a Wan pipeline), writes the codec directory `out`, decoding `decode_chunk` latent
    frames at a time."""
    from jaxdit import codec

    src = pathlib.Path(src)
    folder = src / "vae" if (src / "vae" / "config.json").is_file() else src
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in {str(src)!r} or its vae/: give a diffusers AutoencoderKLWan folder (or a Wan pipeline's)."
        )
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = read_tensors(weights, what="a Wan VAE's weights")
    vae = wan_vae(json.loads((folder / "config.json").read_text()), tensors, decode_chunk=decode_chunk)
    return codec.save(vae, out, source=str(weights))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdit.convert.wan_vae", description="diffusers AutoencoderKLWan -> jaxdit codec directory"
    )
    parser.add_argument("src", help="a diffusers AutoencoderKLWan folder, or a Wan 2.1 pipeline folder (its vae/)")
    parser.add_argument("--out", required=True, help="the codec directory to write")
    parser.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK,
                        help="latent frames decoded at a time after frame 0 (0: the whole clip at once)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, decode_chunk=args.decode_chunk)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote the Wan VAE codec to {out} (use it with --codec.kind saved --codec.path {out})")


if __name__ == "__main__":
    main()
