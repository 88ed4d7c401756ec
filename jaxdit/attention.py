"""One attention function, with the implementation chosen by config.

Axes: B batch, N query tokens, L key/value tokens, K heads, Dh head width.
"""

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention runs in 16-bit only
_CUDNN_MAX_HEAD_DIM = 128  # the largest head width every cuDNN flash kernel accepts


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
    """"auto" -> "cudnn" where cuDNN flash attention can run (GPU, 16-bit, head <= 128), else "xla".

    An explicit "cudnn" where it cannot run is an error, never a silent fallback.
    """
    if implementation not in ("auto", "xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {implementation!r}: use auto, xla or cudnn.")
    on_gpu = jax.default_backend() == "gpu"
    cudnn_ok = on_gpu and jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim <= _CUDNN_MAX_HEAD_DIM
    if implementation == "auto":
        return "cudnn" if cudnn_ok else "xla"
    if implementation == "cudnn" and not cudnn_ok:
        raise ValueError(
            f"model.attention='cudnn' needs a GPU, bfloat16/float16 compute and heads of at most "
            f"{_CUDNN_MAX_HEAD_DIM} channels; here backend={jax.default_backend()}, "
            f"dtype={jnp.dtype(dtype).name}, head width={head_dim}. Use 'auto' or 'xla'."
        )
    return implementation


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, implementation: str = "auto"
) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v over every head.

    q (B, N, K, Dh), k and v (B, L, K, Dh), mask (B, L) bool: True where a key may be attended to.
    Returns (B, N, K, Dh). A query row whose keys are all masked returns zeros.
    """
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1])
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)  # (B, N, K, Dh)
    full_mask = jnp.broadcast_to(mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))  # (B, 1, N, L)
    out = jax.nn.dot_product_attention(q, k, v, mask=full_mask, implementation=impl)  # (B, N, K, Dh)
    # With every key masked the softmax would spread evenly over the padding: return nothing instead.
    return out * mask.any(axis=1)[:, None, None, None].astype(out.dtype)  # (B, N, K, Dh)
