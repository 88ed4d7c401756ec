"""One attention function, with the implementation chosen by config.

Axes: B batch, N query tokens, L key/value tokens, K heads, Dh head width.

Implementations: "xla" (softmax attention written in jnp with its own backward pass, everywhere),
"cudnn" (cuDNN flash attention, GPU) and "splash" (the Pallas splash-attention kernel that jax
ships for TPU); "auto" takes the first of cudnn / splash that can run, else xla.
"""

import math

import einops
import jax
import jax.numpy as jnp

from jaxdit.options import ATTENTION_IMPLEMENTATIONS

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention runs in 16-bit only
_CUDNN_MAX_HEAD_DIM = 128  # the largest head width every cuDNN flash kernel accepts
_CUDNN_PAD = 2  # cuDNN's training kernels with a mask (a bias) need even query and key lengths
_SPLASH_DTYPES = (jnp.float32, jnp.bfloat16)  # TPUs have no float16 matmul
_SPLASH_LANES = 128  # splash tiles are multiples of the TPU's 128 lanes and must divide N and L
_SPLASH_MAX_TILE = 512  # larger tiles spread the per-step cost over long video sequences
# Tests only: run the kernel in Pallas's interpreter (plain XLA ops, any backend and device count).
_SPLASH_INTERPRET = False


def _one_device() -> bool:
    """The kernel runs whole: XLA cannot split a Pallas TPU kernel across devices under jit, and
    jax 0.10's splash kernel fails inside a shard_map that checks varying axes (the default)."""
    return jax.device_count() == 1 and not jax.sharding.get_abstract_mesh().manual_axes


def resolve_implementation(
    implementation: str, dtype, head_dim: int, seq_lens: tuple[int, int] | None = None
) -> str:
    """The implementation that runs: "auto" -> "cudnn" or "splash" where one can run, else "xla".

    cudnn: a GPU, bfloat16/float16 compute, heads of at most 128 channels.
    splash: a TPU, float32/bfloat16 compute, query and key lengths `seq_lens` (N, L) that are
    multiples of 128 (not checked when None), and a single device: the model's data-parallel jit
    over several devices gets "xla" (running the kernel there would need a shard_map per device).
    An explicit choice where it cannot run is an error, never a silent fallback.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}: use {', '.join(ATTENTION_IMPLEMENTATIONS)}."
        )
    backend, dtype = jax.default_backend(), jnp.dtype(dtype)
    cudnn_ok = backend == "gpu" and dtype in _CUDNN_DTYPES and head_dim <= _CUDNN_MAX_HEAD_DIM
    lengths_ok = seq_lens is None or all(n % _SPLASH_LANES == 0 for n in seq_lens)
    splash_ok = dtype in _SPLASH_DTYPES and lengths_ok and (_SPLASH_INTERPRET or (backend == "tpu" and _one_device()))
    if implementation == "auto":
        return "cudnn" if cudnn_ok else "splash" if splash_ok else "xla"
    if implementation == "cudnn" and not cudnn_ok:
        raise ValueError(
            f"model.attention='cudnn' needs a GPU, bfloat16/float16 compute and heads of at most "
            f"{_CUDNN_MAX_HEAD_DIM} channels; here backend={backend}, dtype={dtype.name}, "
            f"head width={head_dim}. Use 'auto' or 'xla'."
        )
    if implementation == "splash" and not splash_ok:
        raise ValueError(
            f"model.attention='splash' needs a TPU, float32/bfloat16 compute, query and key lengths "
            f"that are multiples of {_SPLASH_LANES} and a single device (XLA cannot partition a Pallas "
            f"kernel); here backend={backend}, dtype={dtype.name}, lengths (N, L)={seq_lens}, "
            f"{jax.device_count()} devices. Use 'auto' or 'xla'."
        )
    return implementation


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The Pallas TPU splash-attention kernel over (B, N, K, Dh) inputs; the softmax as `attention`'s."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas: imported only here

    (batch, n, heads, head_dim), length = q.shape, k.shape[1]
    # The largest tile up to _SPLASH_MAX_TILE that divides the length (lengths are multiples of 128).
    tq, tkv = math.gcd(n, _SPLASH_MAX_TILE), math.gcd(length, _SPLASH_MAX_TILE)
    tiles = splash.BlockSizes(  # forward, then the backward's dk/dv and dq kernels
        block_q=tq, block_kv=tkv, block_q_dkv=tq, block_kv_dkv=tkv, block_q_dq=tq, block_kv_dq=tkv
    )
    kernel = splash.make_splash_mha(  # one example, every head; the batch is vmapped below
        splash.MultiHeadMask([splash.FullMask((n, length))] * heads),
        block_sizes=tiles, head_shards=1, q_seq_shards=1, interpret=_SPLASH_INTERPRET,
    )
    # The kernel does not scale the logits: fold 1/sqrt(Dh) into q.
    q = einops.rearrange(q * head_dim**-0.5, "b n k h -> b k n h")  # (B, K, N, Dh)
    k, v = (einops.rearrange(x, "b l k h -> b k l h") for x in (k, v))  # 2x(B, K, L, Dh)
    # Key padding as segment ids: every query has id 1, valid keys 1, padding 0; ids must match.
    segments = None
    if mask is not None:
        segments = splash.SegmentIds(q=jnp.ones((batch, n), jnp.int32), kv=mask.astype(jnp.int32))  # (B, N), (B, L)
    out = jax.vmap(kernel)(q, k, v, segments)  # (B, K, N, Dh)
    return einops.rearrange(out, "b k n h -> b n k h")  # (B, N, K, Dh)


def _masked_logit(dtype) -> float:
    """A masked key's logit: far below any real one, yet finite, so a row with every key masked
    stays finite (`attention` zeroes it)."""
    return 0.7 * float(jnp.finfo(dtype).min)


def _xla_forward(q, k, v, mask):
    """Heads-major softmax attention, and what its backward pass needs.

    q (B, N, K, Dh), k and v (B, L, K, Dh), mask (B, L) or None -> (B, N, K, Dh). The logits and
    the softmax are float32 (as jax.nn.dot_product_attention's), the products in the input dtype.
    """
    q = einops.rearrange(q * q.shape[-1] ** -0.5, "b n k h -> b k n h")  # (B, K, N, Dh), scaled
    k, v = (einops.rearrange(x, "b l k h -> b k l h") for x in (k, v))  # 2x(B, K, L, Dh)
    logits = jnp.einsum("bknh,bklh->bknl", q, k, preferred_element_type=jnp.float32)  # (B, K, N, L)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, _masked_logit(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, K, N, L)
    out = jnp.einsum("bknl,bklh->bknh", probs, v)  # (B, K, N, Dh)
    return einops.rearrange(out, "b k n h -> b n k h"), (q, k, v, probs, out)


def _xla_backward(residuals, d_out):
    """The softmax-attention gradients from the saved probabilities: d_out (B, N, K, Dh) ->
    (dq, dk, dv, None), the mask having none."""
    q, k, v, probs, out = residuals  # q scaled; all heads-major
    d_out = einops.rearrange(d_out, "b n k h -> b k n h")  # (B, K, N, Dh)
    d_v = jnp.einsum("bknl,bknh->bklh", probs, d_out)  # (B, K, L, Dh)
    d_probs = jnp.einsum("bknh,bklh->bknl", d_out, v, preferred_element_type=jnp.float32)  # (B, K, N, L)
    # softmax's Jacobian: d_logit = p (d_p - sum_l p d_p), and sum_l p d_p = <d_out, out> per row.
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # (B, K, N, 1)
    d_logits = (probs * (d_probs - row)).astype(q.dtype)  # (B, K, N, L)
    d_q = jnp.einsum("bknl,bklh->bknh", d_logits, k) * q.shape[-1] ** -0.5  # (B, K, N, Dh)
    d_k = jnp.einsum("bknl,bknh->bklh", d_logits, q)  # (B, K, L, Dh)
    d_q, d_k, d_v = (einops.rearrange(x, "b k n h -> b n k h") for x in (d_q, d_k, d_v))
    return d_q, d_k, d_v, None


@jax.custom_vjp
def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The "xla" implementation. Its own backward pass, in heads-major layout from the saved
    probabilities, is ~2x faster on XLA:CPU than autodiff of jax.nn.dot_product_attention (whose
    transposes and batched products fall on slow paths there); on other backends it is the
    same computation. Inside a shard_map (context parallelism) jax's own attention runs instead:
    there replicated keys and values get cotangents summed over the devices, which autodiff
    inserts and a hand-written backward would have to."""
    return _xla_forward(q, k, v, mask)[0]


_xla.defvjp(_xla_forward, _xla_backward)


def _dot_product_attention(q, k, v, mask, implementation: str) -> jax.Array:
    """jax.nn.dot_product_attention over (B, N, K, Dh) queries and (B, L, K, Dh) keys, with the key
    padding mask (B, L). cuDNN's masked training kernels need even query and key lengths (text of 77
    tokens is not): for "cudnn" both are padded to the next multiple of _CUDNN_PAD, the padded keys
    masked and the padded queries' rows dropped, which changes no output or gradient."""
    n, length = q.shape[1], k.shape[1]
    if implementation == "cudnn" and mask is not None and (n % _CUDNN_PAD or length % _CUDNN_PAD):
        q = jnp.pad(q, ((0, 0), (0, -n % _CUDNN_PAD), (0, 0), (0, 0)))  # (B, N', K, Dh)
        k, v = (jnp.pad(x, ((0, 0), (0, -length % _CUDNN_PAD), (0, 0), (0, 0))) for x in (k, v))  # (B, L', K, Dh)
        mask = jnp.pad(mask, ((0, 0), (0, -length % _CUDNN_PAD)))  # (B, L'): the padding is never attended to
    full_mask = None if mask is None else jnp.broadcast_to(
        mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1])
    )  # (B, 1, N', L')
    out = jax.nn.dot_product_attention(q, k, v, mask=full_mask, implementation=implementation)  # (B, N', K, Dh)
    return out[:, :n]  # (B, N, K, Dh)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, implementation: str = "auto"
) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v over every head.

    q (B, N, K, Dh), k and v (B, L, K, Dh), mask (B, L) bool: True where a key may be attended to.
    Returns (B, N, K, Dh). A query row whose keys are all masked returns zeros.
    """
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1], (q.shape[1], k.shape[1]))
    if impl == "splash":
        out = _splash(q, k, v, mask)  # (B, N, K, Dh)
    elif impl == "xla" and not jax.sharding.get_abstract_mesh().manual_axes:
        out = _xla(q, k, v, mask)  # (B, N, K, Dh)
    else:
        out = _dot_product_attention(q, k, v, mask, impl)  # (B, N, K, Dh)
    if mask is None:
        return out
    # With every key masked the softmax would spread evenly over the padding: return nothing instead.
    return out * mask.any(axis=1)[:, None, None, None].astype(out.dtype)  # (B, N, K, Dh)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, pairs: str = "halves") -> jax.Array:
    """Rotates each head's pairs by the token's angles: x (B, N, K, Dh), cos and sin (N, Dh/2) ->
    (B, N, K, Dh). Pair j is (x[..., j], x[..., j + Dh/2]) ("halves", GPT-NeoX's layout) or
    (x[..., 2j], x[..., 2j + 1]) ("interleaved", RoFormer's and Wan's). Dot products of rotated q and k
    see only offsets."""
    cos, sin = (a[None, :, None, :].astype(x.dtype) for a in (cos, sin))  # (1, N, 1, Dh/2)
    if pairs == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]  # 2x (B, N, K, Dh/2)
        return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)  # (B, N, K, Dh)
    x1, x2 = jnp.split(x, 2, axis=-1)  # 2x (B, N, K, Dh/2)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (B, N, K, Dh)
