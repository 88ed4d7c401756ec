"""Wan 2.1's text-to-video transformer (diffusers' `WanTransformer3DModel`) as a VideoDiT.

Wan's block is VideoDiT with the options of `jaxdit.model_config.WAN_LAYOUT`; this module maps its
diffusers state_dict onto VideoDiT's parameters, key by key, and says which tensors are missing,
unexpected or of the wrong shape. Torch's Linear weights are (out, in), jaxdit's kernels (in, out);
the separate q, k, v (and k, v) projections are concatenated into jaxdit's fused ones; the Conv3d
patch embedding becomes a Linear over patches flattened as (pt ph pw c), jaxdit's patch layout.

    model = wan_model_config(diffusers_config)            # the ModelConfig of a transformer/config.json
    params = transformer_params(tensors, model)           # a checked state_dict -> VideoDiT's parameters

A whole diffusers Wan 2.1 T2V folder becomes a jaxdit run that sample.py and Pipeline.load read:

    python -m jaxdit.convert.wan Wan2.1-T2V-1.3B-Diffusers --out runs/wan21_t2v_1.3b [--dtype bfloat16]

The run holds the transformer's weights as a step-0 checkpoint's EMA weights (converted tensor by tensor
from the shards), the VAE as its codec (`jaxdit.convert.wan_vae`), umT5 with its tokenizer as its frozen
text encoder (`jaxdit.convert.t5`), Wan's pipeline settings as its config (`wan_config`) and the sha256
of every source file in imported.json (docs/wan.md).
"""

import argparse
import contextlib
import json
import pathlib
import sys

import einops
import jax
import numpy as np
from flax import nnx
from flax.traverse_util import unflatten_dict

from jaxdit import t5
from jaxdit.config import CodecConfig, Config, DataConfig, DiffusionConfig, SampleConfig, TextConfig
from jaxdit.convert import SafetensorsFolder, some
from jaxdit.model_config import VARIANTS, WAN_LAYOUT, ModelConfig

_LINEAR = "o i -> i o"  # torch (out, in) -> jaxdit (in, out)

# Layers outside the blocks: diffusers key prefix -> VideoDiT path.
_LAYERS = {
    "condition_embedder.time_embedder.linear_1": ("t_embed", "mlp", "fc1"),
    "condition_embedder.time_embedder.linear_2": ("t_embed", "mlp", "fc2"),
    "condition_embedder.time_proj": ("shared_modulation",),
    "condition_embedder.text_embedder.linear_1": ("text_proj", "fc1"),
    "condition_embedder.text_embedder.linear_2": ("text_proj", "fc2"),
    "proj_out": ("final", "linear"),
}
# Linear layers of block i: diffusers key prefix (after "blocks.{i}.") -> VideoDiT path (after ("blocks", i)).
_BLOCK_LAYERS = {
    "attn1.to_out.0": ("attn", "proj"),
    "attn2.to_q": ("cross", "q"),
    "attn2.to_out.0": ("cross", "proj"),
    "ffn.net.0.proj": ("mlp", "fc1"),
    "ffn.net.2": ("mlp", "fc2"),
}
# Projections fused in jaxdit: VideoDiT path -> the diffusers key prefixes concatenated, in order.
_FUSED = {
    ("attn", "qkv"): ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    ("cross", "kv"): ("attn2.to_k", "attn2.to_v"),
}
# Vectors copied as they are: diffusers key (after "blocks.{i}.") -> VideoDiT path.
_BLOCK_VECTORS = {
    "attn1.norm_q.weight": ("attn", "qk_norm", "q", "scale"),
    "attn1.norm_k.weight": ("attn", "qk_norm", "k", "scale"),
    "attn2.norm_q.weight": ("cross", "qk_norm", "q", "scale"),
    "attn2.norm_k.weight": ("cross", "qk_norm", "k", "scale"),
    "norm2.weight": ("cross_norm", "scale"),
    "norm2.bias": ("cross_norm", "bias"),
}


def wan_model_config(diffusers_config: dict, **overrides) -> ModelConfig:
    """The VideoDiT ModelConfig of a diffusers WanTransformer3DModel config (its config.json as a dict).

    Wan's sizes have variants of their own ("wan1.3B", "wan14B"); any other width, depth and heads
    (a test's tiny model) is written out as WIDTHxDEPTHxHEADS.
    """
    c = diffusers_config
    unsupported = {
        "image_dim": c.get("image_dim"), "added_kv_proj_dim": c.get("added_kv_proj_dim"),
        "cross_attn_norm": c.get("cross_attn_norm", True) is not True,
        "qk_norm": c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads",
    }
    named = [name for name, value in unsupported.items() if value]
    if named:
        raise ValueError(
            f"this Wan transformer has {', '.join(named)} set ({', '.join(f'{n}={c.get(n)!r}' for n in named)}): "
            "jaxdit imports Wan 2.1 text-to-video (no image embedding, cross-attention behind a LayerNorm, QK "
            "RMSNorm across heads)."
        )
    heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
    size = (heads * head_dim, c["num_layers"], heads)
    names = [name for name, dims in VARIANTS.items() if dims == size] or ["x".join(map(str, size))]
    pt, ph, pw = c.get("patch_size", (1, 2, 2))
    out_channels = c.get("out_channels") or c["in_channels"]
    if out_channels != c["in_channels"]:
        raise ValueError(f"in_channels {c['in_channels']} and out_channels {out_channels} differ: not a text-to-video Wan.")
    if abs(c.get("eps", 1e-6) - 1e-6) > 1e-12:
        raise ValueError(f"eps {c.get('eps')}: jaxdit's norms use 1e-6, as Wan 2.1.")
    return ModelConfig(
        variant=f"{names[0]}/{pt}x{ph}x{pw}", in_channels=c["in_channels"], text_dim=c["text_dim"],
        frequency_dim=c["freq_dim"], mlp_width=c["ffn_dim"], **{**WAN_LAYOUT, **overrides},
    )


def expected_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the Wan state_dict that `model` describes -> its shape in torch's layout."""
    d, (pt, ph, pw), out = model.width, model.patch, model.in_channels * np.prod(model.patch)
    shapes = {"patch_embedding.weight": (d, model.in_channels, pt, ph, pw), "patch_embedding.bias": (d,),
              "scale_shift_table": (1, 2, d)}
    layer_shapes = {
        "condition_embedder.time_embedder.linear_1": (d, model.frequency_dim),
        "condition_embedder.time_embedder.linear_2": (d, d),
        "condition_embedder.time_proj": (6 * d, d),
        "condition_embedder.text_embedder.linear_1": (d, model.text_dim),
        "condition_embedder.text_embedder.linear_2": (d, d),
        "proj_out": (int(out), d),
    }
    block_shapes = {
        **{f"attn{n}.to_{p}": (d, d) for n in (1, 2) for p in ("q", "k", "v", "out.0")},
        "ffn.net.0.proj": (model.hidden_width, d), "ffn.net.2": (d, model.hidden_width),
    }
    for i in range(model.depth):
        layer_shapes.update({f"blocks.{i}.{key}": shape for key, shape in block_shapes.items()})
        shapes[f"blocks.{i}.scale_shift_table"] = (1, 6, d)
        shapes.update({f"blocks.{i}.{key}": (d,) for key in _BLOCK_VECTORS})
    for key, shape in layer_shapes.items():
        shapes[f"{key}.weight"], shapes[f"{key}.bias"] = shape, shape[:1]
    return shapes


def check_tensors(tensors, model: ModelConfig) -> None:
    """A ValueError naming every tensor of a Wan state_dict (arrays by key, or a SafetensorsFolder, whose
    shapes come from the files' headers) that `model` lacks, does not expect, or expects in another shape."""
    expected, shapes = expected_shapes(model), _shapes(tensors)
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & shapes.keys() if shapes[k] != expected[k])
    if missing or unexpected or wrong:
        parts = [
            f"lacks {len(missing)} tensors: {some(missing)}" if missing else "",
            f"has {len(unexpected)} tensors it does not expect: {some(unexpected)}" if unexpected else "",
            f"has {len(wrong)} tensors of another shape: "
            + some(f"{k} {shapes[k]} (expected {expected[k]})" for k in wrong) if wrong else "",
        ]
        raise ValueError(
            f"the Wan transformer's state_dict does not fit model.variant {model.variant} (width {model.width}, "
            f"{model.depth} blocks, MLP {model.hidden_width}, text {model.text_dim}): it "
            f"{'; it '.join(p for p in parts if p)}. Check that the folder is a Wan 2.1 T2V transformer and "
            "that every shard was read."
        )


def _shapes(tensors) -> dict[str, tuple[int, ...]]:
    shapes = getattr(tensors, "shapes", None)  # a SafetensorsFolder knows them without reading a tensor
    return dict(shapes) if shapes is not None else {key: tuple(value.shape) for key, value in tensors.items()}


def transformer_params(tensors, model: ModelConfig) -> dict:
    """A checked Wan state_dict -> VideoDiT's parameters (unrolled blocks) as a nested dict of arrays,
    in the tensors' dtype. Each tensor is read once (a SafetensorsFolder streams them from disk)."""
    check_tensors(tensors, model)
    params = {
        ("patch_embed", "kernel"): einops.rearrange(tensors["patch_embedding.weight"], "d c t p q -> (t p q c) d"),
        ("patch_embed", "bias"): tensors["patch_embedding.bias"],
        ("final", "table"): tensors["scale_shift_table"][0],  # (2, D): shift, scale
    }
    for key, path in _LAYERS.items():
        _linear(params, path, tensors, key)
    for i in range(model.depth):
        block = f"blocks.{i}"
        for key, path in _BLOCK_LAYERS.items():
            _linear(params, ("blocks", i, *path), tensors, f"{block}.{key}")
        for path, keys in _FUSED.items():
            params[("blocks", i, *path, "kernel")] = np.concatenate(
                [einops.rearrange(tensors[f"{block}.{k}.weight"], _LINEAR) for k in keys], axis=1
            )
            params[("blocks", i, *path, "bias")] = np.concatenate([tensors[f"{block}.{k}.bias"] for k in keys])
        for key, path in _BLOCK_VECTORS.items():
            params[("blocks", i, *path)] = tensors[f"{block}.{key}"]
        params[("blocks", i, "table")] = tensors[f"{block}.scale_shift_table"][0]  # (6, D)
    return unflatten_dict(params)


def _linear(params: dict, path: tuple, tensors: dict[str, np.ndarray], key: str) -> None:
    params[(*path, "kernel")] = einops.rearrange(tensors[f"{key}.weight"], _LINEAR)
    params[(*path, "bias")] = tensors[f"{key}.bias"]



# ---------------------------------------------------------------------------------------------------------------------
# A diffusers Wan 2.1 T2V folder -> a jaxdit run: `python -m jaxdit.convert.wan SRC --out DIR`.

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")  # the folders of a diffusers WanPipeline
TEXT_DIR = "text_encoder"  # the run's copy of umT5: weights, config and tokenizer in one folder (text.path)
DTYPES = ("float32", "bfloat16")
WAN_TEXT_LENGTH = 512  # umT5 tokens per caption, zero-padded and all attended (WanPipeline's max_sequence_length)
WAN_SIZE = (81, 480, 832)  # frames, height, width: WanPipeline's default video
WAN_FPS, WAN_STEPS, WAN_GUIDANCE = 16.0, 50, 5.0
_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def check_pipeline_folder(src) -> pathlib.Path:
    """The diffusers Wan folder `src`, or an error naming what it lacks or what makes it another model."""
    src = pathlib.Path(src)
    index_file = src / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"no model_index.json in {str(src)!r}: give a diffusers-format Wan 2.1 T2V folder (e.g. "
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, downloaded whole), not the original Wan checkpoint."
        )
    index = json.loads(index_file.read_text())
    if index.get("_class_name") != "WanPipeline" or (index.get("transformer_2") or [None])[0] is not None:
        raise ValueError(
            f"{str(src)!r} is a {index.get('_class_name')!r} pipeline"
            f"{' with two transformers (Wan 2.2 A14B)' if (index.get('transformer_2') or [None])[0] else ''}: "
            "jaxdit imports Wan 2.1 text-to-video (WanPipeline, one transformer)."
        )
    missing = [part for part in PARTS if not (src / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{str(src)!r} has no {', no '.join(f'{m}/' for m in missing)}: download the whole folder.")
    return src


def _check_parts_fit(src: pathlib.Path, model: ModelConfig) -> None:
    """The VAE's latent channels and umT5's width are the transformer's, and the tokenizer is there."""
    vae = json.loads((src / "vae" / "config.json").read_text())
    if vae.get("z_dim") != model.in_channels:
        raise ValueError(f"the VAE makes {vae.get('z_dim')} latent channels but the transformer takes "
                         f"{model.in_channels}: vae/ and transformer/ are of different models.")
    width = t5.T5Spec.from_folder(src / "text_encoder", tokenizer=src / "tokenizer").width
    if width != model.text_dim:
        raise ValueError(f"the text encoder is {width} wide but the transformer reads {model.text_dim}-wide "
                         "features: text_encoder/ and transformer/ are of different models.")


def wan_config(src: pathlib.Path, out: pathlib.Path, *, text_length: int = WAN_TEXT_LENGTH) -> Config:
    """The jaxdit Config of the Wan pipeline in `src`, its codec and text encoder in the run folder `out`.

    Diffusion and sampling are WanPipeline's: flow matching with the velocity (noise - clean) as target,
    the time shift of its scheduler, UniPC with 50 steps and guidance 5, 81 frames of 480x832 at 16 fps.
    """
    from jaxdit import codec as codecs

    transformer = json.loads((src / "transformer" / "config.json").read_text())
    scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    if scheduler.get("prediction_type") != "flow_prediction":
        raise ValueError(f"the scheduler predicts {scheduler.get('prediction_type')!r}: Wan 2.1 is flow_prediction.")
    model = wan_model_config(transformer)
    frames, height, width = WAN_SIZE
    return Config(
        name=f"wan21_t2v_{model.variant.split('/')[0].removeprefix('wan').lower()}",
        model=model,
        data=DataConfig(num_frames=frames, size=height, buckets=(WAN_SIZE,)),
        diffusion=DiffusionConfig(process="flow", prediction="v", shift=float(scheduler.get("flow_shift", 1.0))),
        codec=CodecConfig(kind="saved", path=str(out / codecs.RUN_CODEC_DIR)),
        text=TextConfig(encoder="t5", path=str(out / TEXT_DIR), max_length=text_length),
        sample=SampleConfig(sampler="unipc", steps=WAN_STEPS, cfg_scale=WAN_GUIDANCE, fps=WAN_FPS),
    )


def save_transformer(tensors, config: Config, directory: pathlib.Path) -> None:
    """Wan's transformer tensors (checked) -> the EMA weights of a step-0 checkpoint in `directory`, read and
    written tensor by tensor: host memory holds the converted weights once, in the tensors' dtype."""
    from jaxdit.checkpoint import Checkpointer
    from jaxdit.train_step import make_model

    weights = nnx.state(nnx.eval_shape(lambda: make_model(config, rngs=nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(weights, {"dit": transformer_params(tensors, config.model)})  # NumPy arrays
    # The denoiser's RNG streams: part of a run's state; jit drops the parameters' initialisation.
    model_rngs = jax.jit(lambda: nnx.split(make_model(config, rngs=nnx.Rngs(config.train.seed)), nnx.Param, ...)[2])()
    checkpointer = Checkpointer(directory, async_save=False, save_concurrent_gb=1)  # 1 GB in flight
    try:
        with _numpy_written_in_place():
            checkpointer.save(0, {"ema": weights, "model_rngs": model_rngs}, config=config.to_dict(), force=True)
        del weights  # the read-back on close reuses their memory
    finally:
        checkpointer.close()


@contextlib.contextmanager
def _numpy_written_in_place():
    """Orbax writes NumPy arrays without first copying them all (its default guards arrays a training loop
    changes during an async save; the converter's are written synchronously and never changed)."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization.type_handlers import NumpyHandler

    default = ocp.type_handlers.get_type_handler(np.ndarray)
    ocp.type_handlers.register_type_handler(np.ndarray, NumpyHandler(deepcopy_host_arrays=False), override=True)
    try:
        yield
    finally:
        ocp.type_handlers.register_type_handler(np.ndarray, default, override=True)


def convert(src, out, *, dtype: str | None = None, text_length: int = WAN_TEXT_LENGTH) -> pathlib.Path:
    """Reads the diffusers Wan 2.1 T2V folder `src` and writes the run folder `out`; returns it.

    dtype: "float32" or "bfloat16" for the transformer's and the text encoder's stored weights; None keeps
    each as `src` stores it. The transformer's tensors are checked from the files' headers, and the parts
    against each other, before anything is written; the VAE's and umT5's tensors before their folders are.
    """
    from jaxdit import codec as codecs
    from jaxdit import frozen_text
    from jaxdit.checkpoint import IMPORT_RECORD
    from jaxdit.convert import t5 as t5_convert
    from jaxdit.convert import wan_vae

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)} (or unset: as stored), got {dtype!r}.")
    src, out = check_pipeline_folder(src), pathlib.Path(out).absolute()
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{str(out)!r} already holds checkpoints; give a new --out directory.")
    config = wan_config(src, out, text_length=text_length)
    tensors = SafetensorsFolder(src / "transformer", "diffusion_pytorch_model", dtype=dtype, what="the Wan transformer")
    check_tensors(tensors, config.model)  # from the headers: nothing is read before every tensor is known to fit
    _check_parts_fit(src, config.model)
    text_weights = SafetensorsFolder(src / "text_encoder", "model", what="umT5")
    stored = _STORED.get(next(iter(text_weights.dtypes.values())), "float32")

    codec_dir = out / codecs.RUN_CODEC_DIR
    wan_vae.convert(src / "vae", codec_dir)  # checks the VAE's tensors before it writes
    t5_convert.convert(src / "text_encoder", out / TEXT_DIR, dtype=dtype or stored, tokenizer=src / "tokenizer")

    save_transformer(tensors, config, out / "checkpoints")
    (out / codecs.RUN_RECORD).write_text(json.dumps(codecs.describe(codec_dir), indent=2) + "\n")
    frozen_text.record_run(config, out, resuming=False, primary=True)
    record = {
        "source": str(src.absolute()), "format": "diffusers WanPipeline (Wan 2.1 text-to-video)",
        "variant": config.model.variant, "dtype": dtype or "as stored",
        "parameters": int(sum(np.prod(shape) for shape in tensors.shapes.values())),
        "source_sha256": {f"{part}/{path.name}": t5._sha256(path) for part in PARTS
                          for path in sorted((src / part).iterdir()) if path.is_file()},
    }
    (out / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jaxdit.convert.wan", description="a diffusers Wan 2.1 T2V folder -> a jaxdit run folder"
    )
    parser.add_argument("src", help="the diffusers folder (model_index.json, transformer/, vae/, text_encoder/, "
                                    "tokenizer/, scheduler/), e.g. Wan2.1-T2V-1.3B-Diffusers")
    parser.add_argument("--out", required=True, help="the run folder to write (sample.py --workdir)")
    parser.add_argument("--dtype", choices=DTYPES, help="stored weights of the transformer and umT5 (default: as in SRC)")
    parser.add_argument("--text-length", type=int, default=WAN_TEXT_LENGTH,
                        help="umT5 tokens per caption, all attended (default: Wan's %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.out, dtype=args.dtype, text_length=args.text_length)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    record = json.loads((out / "imported.json").read_text())
    print(f"wrote Wan 2.1 T2V ({record['variant']}, {record['parameters']:,} transformer parameters) to {out}; "
          f"sample with: python sample.py --workdir {out} --prompt \"...\" --out video.mp4")


if __name__ == "__main__":
    main()
