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
    contracts two axes, (B, N), at half that speed (docs/performance.md). A LoRA run gives some of them an
    adapter (`lora`, jaxdit.lora), whose low-rank product is added.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        tokens = x.reshape(-1, x.shape[-1])  # (M, D_in)
        y = super().__call__(tokens)  # (M, D_out)
        adapter = getattr(self, "lora", None)
        if adapter is not None:
            y = y + adapter(tokens)  # (M, D_out)
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
    """RMSNorm of queries and keys, with learned scales (SD3, Wan): keeps attention logits bounded
    whatever the width, so they cannot saturate the softmax early in training. scope "head": over each
    head's Dh channels (SD3); "all_heads": over all K * Dh channels of a token at once (Wan)."""

    def __init__(self, head_dim: int, heads: int = 1, *, scope: str = "head", dtype, rngs: nnx.Rngs):
        dim = head_dim if scope == "head" else head_dim * heads
        self.all_heads = scope == "all_heads"
        self.q = nnx.RMSNorm(dim, epsilon=_NORM_EPS, dtype=dtype, rngs=rngs)
        self.k = nnx.RMSNorm(dim, epsilon=_NORM_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._apply(self.q, q), self._apply(self.k, k)  # (B, N, K, Dh), (B, L, K, Dh)

    def _apply(self, norm: nnx.RMSNorm, x: jax.Array) -> jax.Array:
        if self.all_heads:
            return norm(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)  # over (K Dh) together
        return norm(x)  # (B, N, K, Dh)


def _qk_norm(width: int, heads: int, qk_norm: bool, scope: str, dtype, rngs: nnx.Rngs):
    return nnx.data(QKNorm(width // heads, heads, scope=scope, dtype=dtype, rngs=rngs) if qk_norm else None)


class SelfAttention(nnx.Module):
    """Multi-head self-attention: over all space-time tokens in DiT blocks, over valid text tokens in the encoder.

    context_attention: how the attention runs over tokens split along the mesh's context axis
    (`jaxdit.context_parallel`; one of CONTEXT_ATTENTION), for the DiT's video tokens; None (the
    text encoder): the tokens are never split.
    """

    def __init__(self, width: int, heads: int, *, implementation: str, qk_norm: bool = False,
                 qk_norm_scope: str = "head", rope_pairs: str = "halves", context_attention: str | None = None,
                 ulysses_degree: int = 0, dtype, rngs: nnx.Rngs):
        self.heads, self.implementation, self.rope_pairs = heads, implementation, rope_pairs
        self.context_attention, self.ulysses_degree = context_attention, ulysses_degree
        self.qkv = Linear(width, 3 * width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.proj = Linear(width, width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.qk_norm = _qk_norm(width, heads, qk_norm, qk_norm_scope, dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, rope=None) -> jax.Array:
        """x (B, N, D), mask (B, N) bool: the keys that may be attended to (default: all);
        rope: the tokens' rotary (cos, sin), each (N, Dh/2), or None."""
        q, k, v = einops.rearrange(self.qkv(x), "b n (three k h) -> three b n k h", three=3, k=self.heads)  # 3x(B, N, K, Dh)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        if rope is not None:
            q, k = apply_rope(q, *rope, pairs=self.rope_pairs), apply_rope(k, *rope, pairs=self.rope_pairs)
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

    def __init__(self, width: int, heads: int, text_dim: int, *, implementation: str, qk_norm: bool = False,
                 qk_norm_scope: str = "head", dtype, rngs: nnx.Rngs):
        self.heads, self.implementation = heads, implementation
        self.q = Linear(width, width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.kv = Linear(text_dim, 2 * width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.proj = Linear(width, width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.qk_norm = _qk_norm(width, heads, qk_norm, qk_norm_scope, dtype, rngs)

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

    The condition gives a (shift, scale, gate) triple per sublayer: self-attention, the MLP and, with
    `text_dim > 0` and `cross_norm="adaln"`, cross-attention to the text tokens (its triple comes last,
    so the first six chunks keep DiT's layout). With `cross_norm="layernorm"` (Wan) cross-attention
    sits behind a LayerNorm with a learned scale and bias, added without a gate. The triples come from
    the block's own `modulation` Linear of SiLU(c) (DiT), or with `modulation="shared"` (Wan) from one
    projection of c shared by all blocks (`VideoDiT.shared_modulation`) plus the block's learned table.
    Self-attention runs over tokens split along the mesh's context axis as `context_attention` says
    (`jaxdit.context_parallel`). `text_dim` is the width of the text features cross-attention reads.
    """

    def __init__(
        self, width: int, heads: int, mlp_width: int, *, text_dim: int = 0, attention: str = "auto",
        qk_norm: bool = False, qk_norm_scope: str = "head", rope_pairs: str = "halves", modulation: str = "per_block",
        cross_norm: str = "adaln", context_attention: str = "ulysses_ring", ulysses_degree: int = 0,
        dtype=jnp.float32, rngs: nnx.Rngs,
    ):
        self.attn = SelfAttention(
            width, heads, implementation=attention, qk_norm=qk_norm, qk_norm_scope=qk_norm_scope, rope_pairs=rope_pairs,
            context_attention=context_attention, ulysses_degree=ulysses_degree, dtype=dtype, rngs=rngs,
        )
        self.mlp = Mlp(width, mlp_width, dtype=dtype, rngs=rngs)
        self.cross = nnx.data(
            CrossAttention(
                width, heads, text_dim, implementation=attention, qk_norm=qk_norm, qk_norm_scope=qk_norm_scope,
                dtype=dtype, rngs=rngs,
            ) if text_dim else None
        )
        self.cross_norm = nnx.data(  # Wan's: a LayerNorm with scale and bias, fp32 statistics
            nnx.LayerNorm(width, epsilon=_NORM_EPS, use_fast_variance=False, dtype=dtype, rngs=rngs)
            if text_dim and cross_norm == "layernorm" else None
        )
        self.chunks = modulation_chunks(text_dim, cross_norm)
        shared = modulation == "shared"
        # adaLN-Zero: the modulation starts at zero, so every gate is 0 and the block starts as the identity.
        self.modulation = nnx.data(
            None if shared else Linear(width, self.chunks * width, kernel_init=zeros, dtype=dtype, rngs=rngs)
        )
        # Wan's per-block table, added to the shared projection of c: (chunks, D).
        self.table = nnx.data(
            nnx.Param(jax.random.normal(rngs.params(), (self.chunks, width), jnp.float32) / width**0.5) if shared else None
        )

    def __call__(
        self, x: jax.Array, c: jax.Array, text: jax.Array | None = None, text_mask: jax.Array | None = None,
        rope=None, token_mask: jax.Array | None = None,
    ) -> jax.Array:
        """x (B, N, D); c (B, D), or with shared modulation its projection (B, chunks, D); text (B, L, E),
        text_mask (B, L); rope: rotary (cos, sin) (N, Dh/2) or None; token_mask (B, N) bool: the tokens
        self-attention may attend to (None: all; False: padding)."""
        if self.table is None:
            mods = jnp.split(self.modulation(nnx.silu(c)), self.chunks, axis=-1)  # each (B, D)
        else:
            mods = list(jnp.moveaxis(c + self.table.astype(c.dtype), 1, 0))  # each (B, D)
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        h = self.attn(norm_modulate(x, shift_attn, scale_attn), mask=token_mask, rope=rope)  # (B, N, D)
        x = x + gate_attn[:, None] * h  # (B, N, D)
        if self.cross_norm is not None:
            x = x + self.cross(self.cross_norm(x), text, text_mask)  # (B, N, D)
        elif self.cross is not None:
            shift_cross, scale_cross, gate_cross = mods[6:]
            h = norm_modulate(x, shift_cross, scale_cross)  # (B, N, D)
            x = x + gate_cross[:, None] * self.cross(h, text, text_mask)  # (B, N, D)
        return x + gate_mlp[:, None] * self.mlp(norm_modulate(x, shift_mlp, scale_mlp))  # (B, N, D)


def modulation_chunks(text_dim: int, cross_norm: str) -> int:
    """How many (B, D) chunks of modulation a block takes: a (shift, scale, gate) triple per sublayer
    behind adaLN."""
    return 9 if text_dim and cross_norm == "adaln" else 6


class FinalLayer(nnx.Module):
    """adaLN shift/scale, then a linear map of each token to its patch of predictions.

    mode "adaln" (DiT): shift and scale from Linear(SiLU(c)); "table" (Wan): a learned (2, D) table
    added to c itself.
    """

    def __init__(self, width: int, out_dim: int, *, mode: str = "adaln", dtype, rngs: nnx.Rngs):
        table = mode == "table"
        # Zero-initialised, with the linear map: the model predicts exactly 0 at initialisation.
        self.modulation = nnx.data(None if table else Linear(width, 2 * width, kernel_init=zeros, dtype=dtype, rngs=rngs))
        self.table = nnx.data(  # (2, D): shift, scale
            nnx.Param(jax.random.normal(rngs.params(), (2, width), jnp.float32) / width**0.5) if table else None
        )
        self.linear = Linear(width, out_dim, kernel_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        if self.table is None:
            shift, scale = jnp.split(self.modulation(nnx.silu(c)), 2, axis=-1)  # each (B, D)
        else:
            shift, scale = jnp.moveaxis(c[:, None] + self.table.astype(c.dtype), 1, 0)  # each (B, D)
        return self.linear(norm_modulate(x, shift, scale))  # (B, N, out_dim)
