"""Frozen pretrained T5 text encoders in Flax NNX, loaded from a transformers checkpoint folder.

    encoder, tokenizer = load("checkpoints/t5-v1_1-xxl")    # config.json, *.safetensors, spiece.model or tokenizer.json
    batch = tokenizer.encode_batch(["a red circle moving left"])
    features = encoder(batch["text_tokens"], batch["text_mask"])  # (1, L, 4096), zeros at padding

Axes: B batch, L tokens, E width (d_model), K heads, Dh head width (d_kv), F MLP width (d_ff), R buckets.

The layouts of the text-to-video models:
- T5 v1.1 / mT5 / Flan-T5 (`model_type` "t5" or "mt5", gated-GELU MLP): PixArt, Open-Sora 1.x, Latte, CogVideoX;
- umT5 ("umt5"): a relative position bias in every layer, where T5 has one, in the first layer, shared by all: Wan;
- the original T5 (ReLU MLP).

Every layer is pre-RMSNorm with no bias anywhere; attention logits are not scaled by 1/sqrt(Dh)
(T5 folds that into its initialisation) and get a learned bias per head and relative-position
bucket; there are no absolute positions. Padded keys are masked, and the features at padded
positions are set to zero, so nothing of the padding reaches the DiT.

A folder holds what `save_pretrained` writes for `T5EncoderModel`, `UMT5EncoderModel`, `MT5EncoderModel`
or their `...ForConditionalGeneration` / `...Model` (whose decoder is not read): `config.json`,
`model.safetensors` or a sharded `model.safetensors.index.json`, and the tokenizer: `tokenizer.json`
(read with `tokenizers`) or `spiece.model` (with `sentencepiece`). Nothing is downloaded.
"""

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import math
import pathlib
import re

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdit.convert import SafetensorsFolder

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # the first one present is read
MODEL_TYPES = ("t5", "mt5", "umt5")  # config.json's model_type; umt5: a relative position bias in every layer
ARCHITECTURES = tuple(  # the transformers classes whose encoder is read
    f"{prefix}{suffix}" for prefix in ("T5", "MT5", "UMT5")
    for suffix in ("EncoderModel", "ForConditionalGeneration", "Model")
)
_ACTIVATIONS = {  # transformers' ACT2FN names
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # what "gated-gelu" means
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}
# A tokenizer may have fewer entries than the embedding (T5 pads 32100 tokens to 32128 rows), never more.
_VOCAB_SLACK = 256
_HASH_CHUNK = 1 << 24


@dataclasses.dataclass(frozen=True)
class T5Spec:
    """What builds the encoder, read from a transformers config.json."""

    architecture: str
    vocab_size: int
    width: int  # d_model
    head_dim: int  # d_kv
    heads: int
    mlp_width: int  # d_ff
    depth: int  # num_layers (the encoder's)
    num_buckets: int
    max_distance: int
    eps: float
    activation: str  # a key of _ACTIVATIONS
    gated: bool  # wi_0 (activated) * wi_1, then wo; else wi, activation, wo
    bias_per_layer: bool  # umT5
    pad_id: int = 0
    eos_id: int = 1

    @classmethod
    def from_folder(cls, folder, *, tokenizer=None) -> "T5Spec":
        folder = check_folder(folder, tokenizer=tokenizer)
        config = json.loads((folder / CONFIG_FILE).read_text())
        model_type = config.get("model_type", "")
        architecture = (config.get("architectures") or [f"{model_type.upper()}EncoderModel"])[0]
        if model_type not in MODEL_TYPES or architecture not in ARCHITECTURES:
            raise ValueError(
                f"{str(folder / CONFIG_FILE)!r} describes a {architecture} (model_type {model_type!r}), not a T5 "
                f"encoder: text.encoder='t5' reads {', '.join(ARCHITECTURES)} checkpoints."
            )
        # As transformers derives them (dense_act_fn in config.json is not read): "gated-gelu" is the tanh GELU.
        projection = config.get("feed_forward_proj", "gated-gelu" if model_type == "umt5" else "relu")
        gated = projection.startswith("gated-")
        activation = "gelu_new" if projection == "gated-gelu" else projection.split("-")[-1]
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"{str(folder / CONFIG_FILE)!r} has feed_forward_proj={projection!r} (activation {activation!r}); "
                f"supported activations: {', '.join(_ACTIVATIONS)}."
            )
        return cls(
            architecture=architecture, vocab_size=config["vocab_size"], width=config["d_model"],
            head_dim=config["d_kv"], heads=config["num_heads"], mlp_width=config["d_ff"], depth=config["num_layers"],
            num_buckets=config.get("relative_attention_num_buckets", 32),
            max_distance=config.get("relative_attention_max_distance", 128),
            eps=config.get("layer_norm_epsilon", 1e-6), activation=activation, gated=gated,
            bias_per_layer=model_type == "umt5", pad_id=config.get("pad_token_id", 0),
            eos_id=config.get("eos_token_id", 1),
        )


def check_folder(folder, *, tokenizer=None) -> pathlib.Path:
    """The checkpoint folder, or an error naming what is missing from it. tokenizer: the folder holding the
    tokenizer file when it is not `folder` (a diffusers pipeline's sibling tokenizer/)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no T5 checkpoint folder at {str(folder)!r}: give text.path, a folder holding a transformers "
            f"T5EncoderModel / UMT5EncoderModel ({CONFIG_FILE}, {WEIGHTS_FILE} or {INDEX_FILE}, and "
            f"{' or '.join(TOKENIZER_FILES)})."
        )
    missing = []
    if not (folder / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    if not ((folder / WEIGHTS_FILE).is_file() or (folder / INDEX_FILE).is_file()):
        missing.append(f"{WEIGHTS_FILE} (or {INDEX_FILE})")
    tokenizer = folder if tokenizer is None else pathlib.Path(tokenizer)
    if not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES) + ("" if tokenizer == folder else f" in {str(tokenizer)!r}"))
    if missing:
        raise FileNotFoundError(
            f"the T5 checkpoint folder {str(folder)!r} has no {', no '.join(missing)}: copy the whole folder that "
            "transformers' save_pretrained (or the model's hub page) gives, tokenizer included."
        )
    return folder


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """The bidirectional relative-position bucket of every (query, key) pair: int32 (L, L).

    Half the buckets for keys before the query, half after; within each half, exact offsets up
    to a quarter of the buckets, then logarithmic bins up to `max_distance`, then the last bin.
    Computed in float32 as transformers does, so the same offsets land in the same buckets.
    """
    position = np.arange(length)
    relative = position[None, :] - position[:, None]  # (L, L) key - query
    half = num_buckets // 2
    buckets = (relative > 0) * half
    distance = np.abs(relative)
    exact = half // 2
    far = np.maximum(distance, exact).astype(np.float32)  # the logarithmic bins start at `exact`
    log_ratio = np.log(far / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    large = np.minimum(exact + (log_ratio * np.float32(half - exact)).astype(np.int64), half - 1)
    return (buckets + np.where(distance < exact, distance, large)).astype(np.int32)


class RMSNorm(nnx.Module):
    """T5's LayerNorm: x / rms(x) (computed in float32) times a learned scale; no mean, no bias."""

    def __init__(self, width: int, eps: float, *, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((width,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)  # (B, L, 1)
        return self.weight[...] * (x * jax.lax.rsqrt(variance + self.eps)).astype(self.weight.dtype)  # (B, L, E)


def _linear(d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


class T5Attention(nnx.Module):
    """Self-attention with unscaled logits plus a relative-position bias, which this layer owns when `num_buckets`
    > 0 (T5: the first layer, shared by all; umT5: every layer)."""

    def __init__(self, width: int, heads: int, head_dim: int, num_buckets: int, *, dtype, rngs: nnx.Rngs):
        inner = heads * head_dim
        self.heads = heads
        self.q, self.k, self.v = (_linear(width, inner, dtype=dtype, rngs=rngs) for _ in range(3))
        self.o = _linear(inner, width, dtype=dtype, rngs=rngs)
        self.relative_bias = nnx.data(
            nnx.Embed(num_buckets, heads, dtype=dtype, param_dtype=dtype, rngs=rngs) if num_buckets else None
        )

    def position_bias(self, buckets: jax.Array) -> jax.Array:
        """(L, L) buckets -> (1, K, L, L) logit bias."""
        return einops.rearrange(self.relative_bias(buckets), "q l k -> 1 k q l")

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, L, E), bias (1, K, L, L), mask (B, L) bool: the keys that may be attended to."""
        q, k, v = (einops.rearrange(proj(x), "b l (k h) -> b l k h", k=self.heads) for proj in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(
            q, k, v, bias=bias.astype(q.dtype), mask=mask[:, None, None, :], scale=1.0
        )  # (B, L, K, Dh)
        return self.o(einops.rearrange(out, "b l k h -> b l (k h)"))  # (B, L, E)


class T5MLP(nnx.Module):
    """wo(act(wi x)), or with `gated` wo(act(wi_0 x) * wi_1 x) (T5 v1.1, umT5)."""

    def __init__(self, width: int, mlp_width: int, activation: str, gated: bool, *, dtype, rngs: nnx.Rngs):
        self.act, self.gated = _ACTIVATIONS[activation], gated
        if gated:
            self.wi_0 = _linear(width, mlp_width, dtype=dtype, rngs=rngs)
            self.wi_1 = _linear(width, mlp_width, dtype=dtype, rngs=rngs)
        else:
            self.wi = _linear(width, mlp_width, dtype=dtype, rngs=rngs)
        self.wo = _linear(mlp_width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, L, F)
        return self.wo(hidden)  # (B, L, E)


class T5Block(nnx.Module):
    def __init__(self, spec: T5Spec, *, has_bias: bool, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(spec.width, spec.eps, param_dtype=dtype)
        self.attn = T5Attention(
            spec.width, spec.heads, spec.head_dim, spec.num_buckets if has_bias else 0, dtype=dtype, rngs=rngs
        )
        self.mlp_norm = RMSNorm(spec.width, spec.eps, param_dtype=dtype)
        self.mlp = T5MLP(spec.width, spec.mlp_width, spec.activation, spec.gated, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), bias, mask)  # (B, L, E)
        return x + self.mlp(self.mlp_norm(x))  # (B, L, E)


class T5Encoder(nnx.Module):
    """(B, L) token ids + (B, L) mask -> (B, L, E) features; padded positions give zeros.

    Parameters and computation are in `dtype` (bfloat16 on accelerators); norms reduce in float32.
    """

    def __init__(self, spec: T5Spec, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = nnx.Embed(spec.vocab_size, spec.width, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            T5Block(spec, has_bias=spec.bias_per_layer or i == 0, dtype=dtype, rngs=rngs) for i in range(spec.depth)
        )
        self.final_norm = RMSNorm(spec.width, spec.eps, param_dtype=dtype)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        buckets = jnp.asarray(relative_buckets(tokens.shape[1], self.spec.num_buckets, self.spec.max_distance))
        x = self.embed(tokens)  # (B, L, E)
        bias = None
        for block in self.blocks:
            if block.attn.relative_bias is not None:  # T5: the first layer's bias serves all; umT5: each its own
                bias = block.attn.position_bias(buckets)  # (1, K, L, L)
            x = block(x, bias, mask)  # (B, L, E)
        return self.final_norm(x) * mask[..., None].astype(x.dtype)  # (B, L, E)


# ---------------------------------------------------------------------------------------------------------------
# Weights: transformers' key names -> the encoder's parameters.

_BLOCK_KEYS = {  # under encoder.block.{i}.: transformers' name -> (module path, transposed: torch Linear is (out, in))
    "layer.0.layer_norm.weight": (("attn_norm", "weight"), False),
    **{f"layer.0.SelfAttention.{n}.weight": (("attn", n, "kernel"), True) for n in "qkvo"},
    "layer.0.SelfAttention.relative_attention_bias.weight": (("attn", "relative_bias", "embedding"), False),
    "layer.1.layer_norm.weight": (("mlp_norm", "weight"), False),
    **{f"layer.1.DenseReluDense.{n}.weight": (("mlp", n, "kernel"), True) for n in ("wi", "wi_0", "wi_1", "wo")},
}
_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # tied: either one
_FINAL_NORM = "encoder.final_layer_norm.weight"


def _weights(folder) -> SafetensorsFolder:
    """The folder's weights (model.safetensors, or the shards its index names), read a tensor at a time."""
    return SafetensorsFolder(folder, WEIGHTS_FILE.removesuffix(".safetensors"), what="the T5 encoder")


def read_weights(folder) -> dict[str, np.ndarray]:
    """The encoder's tensors of a checkpoint folder, by transformers key (the decoder's are not read)."""
    weights = _weights(folder)
    return {key: weights[key] for key in weights if key.startswith("encoder.") or key == "shared.weight"}


def convert(tensors: dict[str, np.ndarray], encoder: T5Encoder) -> dict:
    """transformers' encoder tensors -> a pure dict of `encoder`'s parameters, or a ValueError naming
    every missing, extra and mis-shaped key."""
    expected = flatten_dict(nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))  # path -> shape (abstract or real)
    mapping = {}  # our path -> (transformers key, whether torch's (out, in) Linear weight is transposed)
    for i in range(encoder.spec.depth):
        for key, (path, transposed) in _BLOCK_KEYS.items():
            if ("blocks", i, *path) in expected:
                mapping["blocks", i, *path] = (f"encoder.block.{i}.{key}", transposed)
    mapping["final_norm", "weight"] = (_FINAL_NORM, False)
    mapping["embed", "embedding"] = (next((key for key in _EMBEDDINGS if key in tensors), _EMBEDDINGS[0]), False)

    wanted = {key for key, _ in mapping.values()}
    missing = [key for key in wanted if key not in tensors]
    extra = [key for key in tensors if key not in wanted and key not in _EMBEDDINGS]
    arrays, misshaped = {}, []
    for path, (key, transposed) in mapping.items():
        if key not in tensors:
            continue
        value = tensors[key].T if transposed else tensors[key]
        want = tuple(expected[path].shape)
        if value.shape != want:
            misshaped.append(f"{key} {tuple(tensors[key].shape)} (expected {want[::-1] if transposed else want})")
        arrays[path] = value
    problems = []
    if missing:
        problems.append(f"missing {_by_layer(missing)}")
    if extra:
        problems.append(f"unexpected {_by_layer(extra)}")
    if misshaped:
        problems.append(f"mis-shaped {'; '.join(misshaped)}")
    if problems:
        raise ValueError(
            f"the checkpoint's tensors do not fit the {encoder.spec.architecture} its config.json describes "
            f"({'; '.join(problems)}): is config.json the one saved with these weights?"
        )
    return unflatten_dict(arrays)


def _by_layer(keys: list[str]) -> str:
    """Every key, those that differ only in the layer index written once: `encoder.block.{0,1,5}.layer.0.k.weight`."""
    layers = {}
    for key in keys:
        match = re.fullmatch(r"(encoder\.block\.)(\d+)(\..+)", key)
        pattern = f"{match[1]}{{}}{match[3]}" if match else key
        layers.setdefault(pattern, []).append(match[2] if match else None)

    def name(pattern: str, indices: list) -> str:
        if indices[0] is None:
            return pattern
        return pattern.format(indices[0] if len(indices) == 1 else "{" + ",".join(sorted(indices, key=int)) + "}")

    return ", ".join(name(pattern, indices) for pattern, indices in layers.items())


def load(folder, *, max_length: int = 512, dtype=jnp.float32, sharding=None) -> tuple[T5Encoder, "T5Tokenizer"]:
    """The frozen encoder (weights in `dtype`) and the tokenizer of a checkpoint folder.

    sharding: a function from the parameter tree (of ShapeDtypeStructs) to a tree of shardings;
    each array then goes from the host straight to its shards (T5-XXL never sits whole on one device).
    """
    spec = T5Spec.from_folder(folder)
    tokenizer = T5Tokenizer(folder, max_length=max_length, spec=spec)
    abstract = nnx.eval_shape(lambda: T5Encoder(spec, dtype=dtype, rngs=nnx.Rngs(0)))
    arrays = convert(read_weights(folder), abstract)
    graphdef, state = nnx.split(abstract)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nnx.to_pure_dict(state))
    placements = sharding(shapes) if sharding is not None else jax.tree.map(lambda _: None, shapes)
    put = lambda value, where: jax.device_put(np.asarray(value, dtype), where)
    nnx.replace_by_pure_dict(state, jax.tree.map(put, arrays, placements))
    log.info("T5 encoder %s from %s: %s parameters in %s", spec.architecture, folder,
             f"{sum(x.size for x in jax.tree.leaves(arrays)):,}", jnp.dtype(dtype).name)
    return nnx.merge(graphdef, state), tokenizer


def digests(folder, *, tokenizer=None) -> dict:
    """sha256 of each weight file and of the tokenizer file: what a run records to refuse another encoder.

    Whole files are read (about 10 s for T5-XXL in bfloat16), once per process and file version:
    the digests are kept by (path, size, modification time).
    """
    folder = pathlib.Path(folder)
    files = folder if tokenizer is None else pathlib.Path(tokenizer)  # tokenizer: the folder of its file, if not `folder`
    tokenizer = next(files / name for name in TOKENIZER_FILES if (files / name).is_file())
    return {
        "weights": {path.name: _sha256(path) for path in sorted(set(_weights(folder).files.values()))},
        "tokenizer": {tokenizer.name: _sha256(tokenizer)},
    }


@functools.cache
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256(path: pathlib.Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.absolute()), stat.st_size, stat.st_mtime_ns)


class T5Tokenizer:
    """A caption -> T5 token ids: the folder's tokenizer.json (`tokenizers`) or spiece.model (`sentencepiece`),
    then </s>, right-padded with the pad id to `max_length` (a longer caption keeps its first
    max_length - 1 tokens and the </s>, as transformers truncates). Same interface as `ByteTokenizer`.
    """

    def __init__(self, folder, *, max_length: int, spec: T5Spec | None = None, tokenizer=None):
        folder = check_folder(folder, tokenizer=tokenizer)
        spec = spec or T5Spec.from_folder(folder)
        if max_length < 2:
            raise ValueError(f"text.max_length must be at least 2 (one token and </s>), got {max_length}.")
        self.max_length, self.pad_id, self.eos_id = max_length, spec.pad_id, spec.eos_id
        self.truncated = 0
        files = folder if tokenizer is None else pathlib.Path(tokenizer)  # tokenizer: another folder holds the file
        path = next(files / name for name in TOKENIZER_FILES if (files / name).is_file())
        self.path = path
        library = "tokenizers" if path.suffix == ".json" else "sentencepiece"
        try:
            backend_module = importlib.import_module(library)
        except ImportError:
            raise ImportError(
                f"reading {path.name} needs the {library} package: pip install 'jaxdit[t5]' (tokenizers and "
                "sentencepiece, the libraries T5's tokenizer files are made for)."
            ) from None
        if path.suffix == ".json":
            backend = backend_module.Tokenizer.from_file(str(path))
            backend.no_padding(), backend.no_truncation()  # a saved file may carry its last call's settings
            self._ids = lambda text: backend.encode(text, add_special_tokens=False).ids
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        else:
            backend = backend_module.SentencePieceProcessor(model_file=str(path))
            self._ids = backend.encode
            self.vocab_size = backend.get_piece_size()
        if not spec.vocab_size - _VOCAB_SLACK < self.vocab_size <= spec.vocab_size:
            raise ValueError(
                f"the tokenizer {str(path)!r} has {self.vocab_size} tokens but the weights embed {spec.vocab_size}: "
                "they belong to different models. Put the tokenizer saved with these weights in the folder."
            )

    def encode(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        """caption -> tokens int32 (L,), mask bool (L,) with L = max_length."""
        body = list(self._ids(caption))
        if len(body) > self.max_length - 1:
            if not self.truncated:
                log.warning("caption of %d T5 tokens truncated to text.max_length=%d (further truncations are "
                            "counted, not logged): %r", len(body), self.max_length, caption[:80])
            self.truncated += 1
            body = body[: self.max_length - 1]
        tokens = np.full(self.max_length, self.pad_id, np.int32)  # (L,)
        tokens[: len(body) + 1] = [*body, self.eos_id]
        mask = np.zeros(self.max_length, bool)
        mask[: len(body) + 1] = True
        return tokens, mask

    def encode_batch(self, captions: list[str]) -> dict[str, np.ndarray]:
        """captions -> {"text_tokens": int32 (B, L), "text_mask": bool (B, L)}."""
        tokens, masks = zip(*map(self.encode, captions), strict=True)
        return {"text_tokens": np.stack(tokens), "text_mask": np.stack(masks)}

    def count(self, caption: str) -> int:
        """Tokens of the caption, </s> included (before truncation)."""
        return len(self._ids(caption)) + 1
