"""The DiT block with adaLN-Zero conditioning, and the final layer.

Axes: B batch, N video tokens, L text tokens, D model width, E text width, K heads, Dh head width.
"""

import functools

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit import context_parallel
from jaxdit.attention import apply_rope, attention

_NORM_EPS = 1e-6  # DiT's LayerNorm epsilon

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()


class Linear(nnx.Linear):
    """nnx.Linear over the last axis of tokens (..., D_in), computed as one 2-D matrix product.

    The same parameters and result as nnx.Linear. Folding the leading axes first makes the
    weight gradient a plain (D_in, M) x (M, D_out) product; XLA:CPU runs the gradient that
    contracts two axes, (B, N), at half that speed (docs/performance.md).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x.reshape(-1, x.shape[-1]))  # (M, D_out)
        return y.reshape(*x.shape[:-1], y.shape[-1])  # (..., D_out)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """(B, N, D) tokens, (B, D) shift and scale -> x * (1 + scale) + shift, per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)


# Written in jnp, the LayerNorm and the tanh GELU would have autodiff keep every intermediate for the
# backward pass: two float32 copies of the tokens per norm and four (B, N, 4D) arrays per GELU, most
# of a block's activation memory (docs/performance.md). PyTorch's fused kernels keep only their inputs;
# under jax.checkpoint these do the same and recompute the rest, a few element-wise operations.


@jax.checkpoint
def norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: a LayerNorm without scale and bias over D, then the condition's shift and scale:
    (B, N, D) tokens, (B, D) shift and scale -> (B, N, D) in the tokens' dtype. The statistics are
    float32 (E[x^2] - E[x]^2, at least 0), as flax's LayerNorm computes them."""
    x32 = x.astype(jnp.float32)  # (B, N, D)
    mean = x32.mean(-1, keepdims=True)  # (B, N, 1)
    var = jnp.maximum((x32 * x32).mean(-1, keepdims=True) - mean * mean, 0.0)  # (B, N, 1)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + _NORM_EPS)).astype(x.dtype)  # (B, N, D)
    return modulate(normed, shift, scale)  # (B, N, D)


gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=True))  # DiT's GELU, tanh approximation


class QKNorm(nnx.Module):
    """RMSNorm of each head's queries and keys, with learned scales (SD3, Wan): keeps attention
    logits bounded whatever the width, so they cannot saturate the softmax early in training."""

    def __init__(self, head_dim: int, *, dtype, rngs: nnx.Rngs):
        self.q = nnx.RMSNorm(head_dim, epsilon=_NORM_EPS, dtype=dtype, rngs=rngs)
        self.k = nnx.RMSNorm(head_dim, epsilon=_NORM_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.q(q), self.k(k)  # (B, N, K, Dh), (B, L, K, Dh)


class SelfAttention(nnx.Module):
    """Multi-head self-attention: over all space-time tokens in DiT blocks, over valid text tokens in the encoder.

    context_attention: how the attention runs over tokens split along the mesh's context axis
    (`jaxdit.context_parallel`; one of CONTEXT_ATTENTION), for the DiT's video tokens; None (the
    text encoder): the tokens are never split.
    """

    def __init__(self, width: int, heads: int, *, implementation: str, qk_norm: bool = False,
                 context_attention: str | None = None, ulysses_degree: int = 0, dtype, rngs: nnx.Rngs):
        self.heads, self.implementation = heads, implementation
        self.context_attention, self.ulysses_degree = context_attention, ulysses_degree
        self.qkv = Linear(width, 3 * width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.proj = Linear(width, width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.qk_norm = nnx.data(QKNorm(width // heads, dtype=dtype, rngs=rngs) if qk_norm else None)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, rope=None) -> jax.Array:
        """x (B, N, D), mask (B, N) bool: the keys that may be attended to (default: all);
        rope: the tokens' rotary (cos, sin), each (N, Dh/2), or None."""
        q, k, v = einops.rearrange(self.qkv(x), "b n (three k h) -> three b n k h", three=3, k=self.heads)  # 3x(B, N, K, Dh)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.context_attention is None:
            out = attention(q, k, v, mask=mask, implementation=self.implementation)  # (B, N, K, Dh)
        else:
            out = context_parallel.self_attention(
                q, k, v, mask=mask, mode=self.context_attention, implementation=self.implementation,
                ulysses_degree=self.ulysses_degree,
            )  # (B, N, K, Dh)
        return self.proj(einops.rearrange(out, "b n k h -> b n (k h)"))  # (B, N, D)


class CrossAttention(nnx.Module):
    """Video tokens attend to the valid text tokens (each context-parallel device from its own video tokens)."""

    def __init__(self, width: int, heads: int, text_dim: int, *, implementation: str, qk_norm: bool = False, dtype,
                 rngs: nnx.Rngs):
        self.heads, self.implementation = heads, implementation
        self.q = Linear(width, width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.kv = Linear(text_dim, 2 * width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.proj = Linear(width, width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.qk_norm = nnx.data(QKNorm(width // heads, dtype=dtype, rngs=rngs) if qk_norm else None)

    def __call__(self, x: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
        q = einops.rearrange(self.q(x), "b n (k h) -> b n k h", k=self.heads)  # (B, N, K, Dh)
        k, v = einops.rearrange(self.kv(text), "b l (two k h) -> two b l k h", two=2, k=self.heads)  # 2x(B, L, K, Dh)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        out = context_parallel.cross_attention(q, k, v, mask=text_mask, implementation=self.implementation)  # (B, N, K, Dh)
        return self.proj(einops.rearrange(out, "b n k h -> b n (k h)"))  # (B, N, D)


class Mlp(nnx.Module):
    """The pointwise MLP: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(width, hidden, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, width, kernel_init=xavier, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))  # (B, N, D)


class DiTBlock(nnx.Module):
    """adaLN-Zero block: x + gate * sublayer(modulate(norm(x), shift, scale)) for each sublayer.

    The condition c gives a (shift, scale, gate) triple per sublayer: self-attention, the MLP
    and, with `text_dim > 0`, cross-attention to the text tokens (its triple comes last, so the
    first six chunks keep DiT's layout). Its self-attention runs over tokens split along the mesh's
    context axis as `context_attention` says (`jaxdit.context_parallel`).
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, *, text_dim: int = 0, attention: str = "auto",
        qk_norm: bool = False, context_attention: str = "ulysses_ring", ulysses_degree: int = 0,
        dtype=jnp.float32, rngs: nnx.Rngs,
    ):
        self.attn = SelfAttention(
            width, heads, implementation=attention, qk_norm=qk_norm, context_attention=context_attention,
            ulysses_degree=ulysses_degree, dtype=dtype, rngs=rngs,
        )
        self.mlp = Mlp(width, int(width * mlp_ratio), dtype=dtype, rngs=rngs)
        if text_dim:
            self.cross = CrossAttention(
                width, heads, text_dim, implementation=attention, qk_norm=qk_norm, dtype=dtype, rngs=rngs
            )
        else:
            self.cross = None
        # adaLN-Zero: the modulation starts at zero, so every gate is 0 and the block starts as the identity.
        chunks = 9 if text_dim else 6
        self.modulation = Linear(width, chunks * width, kernel_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, c: jax.Array, text: jax.Array | None = None, text_mask: jax.Array | None = None,
        rope=None, token_mask: jax.Array | None = None,
    ) -> jax.Array:
        """x (B, N, D), c (B, D), text (B, L, E), text_mask (B, L); rope: rotary (cos, sin) (N, Dh/2) or None;
        token_mask (B, N) bool: the tokens self-attention may attend to (None: all; False: padding)."""
        mods = jnp.split(self.modulation(nnx.silu(c)), 9 if self.cross is not None else 6, axis=-1)  # each (B, D)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        h = self.attn(norm_modulate(x, shift_attn, scale_attn), mask=token_mask, rope=rope)  # (B, N, D)
        x = x + gate_attn[:, None] * h  # (B, N, D)
        if self.cross is not None:
            shift_cross, scale_cross, gate_cross = mods[6:]
            h = norm_modulate(x, shift_cross, scale_cross)  # (B, N, D)
            x = x + gate_cross[:, None] * self.cross(h, text, text_mask)  # (B, N, D)
        return x + gate_mlp[:, None] * self.mlp(norm_modulate(x, shift_mlp, scale_mlp))  # (B, N, D)


class FinalLayer(nnx.Module):
    """adaLN shift/scale, then a linear map of each token to its patch of predictions."""

    def __init__(self, width: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
        # Zero-initialised, with the modulation: the model predicts exactly 0 at initialisation.
        self.modulation = Linear(width, 2 * width, kernel_init=zeros, dtype=dtype, rngs=rngs)
        self.linear = Linear(width, out_dim, kernel_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation(nnx.silu(c)), 2, axis=-1)  # each (B, D)
        return self.linear(norm_modulate(x, shift, scale))  # (B, N, out_dim)
