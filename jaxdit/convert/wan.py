"""Wan 2.1's text-to-video transformer (diffusers' `WanTransformer3DModel`) as a VideoDiT.

Wan's block is VideoDiT with the options of `jaxdit.model_config.WAN_LAYOUT`; this module maps its
diffusers state_dict onto VideoDiT's parameters, key by key, and says which tensors are missing,
unexpected or of the wrong shape. Torch's Linear weights are (out, in), jaxdit's kernels (in, out);
the separate q, k, v (and k, v) projections are concatenated into jaxdit's fused ones; the Conv3d
patch embedding becomes a Linear over patches flattened as (pt ph pw c), jaxdit's patch layout.

    model = wan_model_config(diffusers_config)            # the ModelConfig of a transformer/config.json
    params = transformer_params(tensors, model)           # a checked state_dict -> VideoDiT's parameters
"""

import einops
import numpy as np
from flax.traverse_util import unflatten_dict

from jaxdit.convert import some
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


def check_tensors(tensors: dict[str, np.ndarray], model: ModelConfig) -> None:
    """A ValueError naming every tensor of a Wan state_dict that `model` lacks, does not expect, or
    expects in another shape."""
    expected = expected_shapes(model)
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & tensors.keys() if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [
            f"lacks {len(missing)} tensors: {some(missing)}" if missing else "",
            f"has {len(unexpected)} tensors it does not expect: {some(unexpected)}" if unexpected else "",
            f"has {len(wrong)} tensors of another shape: "
            + some(f"{k} {tuple(tensors[k].shape)} (expected {expected[k]})" for k in wrong) if wrong else "",
        ]
        raise ValueError(
            f"the Wan transformer's state_dict does not fit model.variant {model.variant} (width {model.width}, "
            f"{model.depth} blocks, MLP {model.hidden_width}, text {model.text_dim}): it "
            f"{'; it '.join(p for p in parts if p)}. Check that the folder is a Wan 2.1 T2V transformer and "
            "that every shard was read."
        )


def transformer_params(tensors: dict[str, np.ndarray], model: ModelConfig) -> dict:
    """A checked Wan state_dict -> VideoDiT's parameters (unrolled blocks) as a nested dict of arrays,
    in the tensors' dtype."""
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

