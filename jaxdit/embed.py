"""Condition embedders: timestep, class label and pooled text, each -> (B, D).

Their sum is the condition vector c that scales, shifts and gates every block (adaLN).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_MAX_PERIOD = 10_000  # the slowest timestep frequency has a period of 10000 steps
EMBED_STD = 0.02  # DiT's initialisation of embedding tables and the timestep MLP

xavier = nnx.initializers.xavier_uniform()


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
    """(B,) timesteps (may be fractional) -> (B, dim) features [cos(t * f_i), sin(t * f_i)]."""
    half = dim // 2
    # DiT's float32 frequencies, rounded once from float64 rather than left to a float32 exp, whose last
    # bit differs between libraries (XLA, torch on CPU or CUDA): at t = 999 one bit moves the output by ~1e-5.
    exponents = (-math.log(_MAX_PERIOD) * np.arange(half, dtype=np.float32) / half).astype(np.float32)  # as DiT's
    freqs = jnp.asarray(np.exp(exponents.astype(np.float64)).astype(np.float32))  # (dim/2,)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]  # (B, dim/2)
    features = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)  # (B, 2*(dim/2))
    return jnp.pad(features, ((0, 0), (0, dim % 2)))  # (B, dim)


class Mlp2(nnx.Module):
    """Linear -> SiLU -> Linear: the small MLP that lifts a condition into the model width."""

    def __init__(self, in_dim: int, width: int, *, kernel_init, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(in_dim, width, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, kernel_init=kernel_init, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.silu(self.fc1(x)))  # (B, D)


class TimestepEmbedder(nnx.Module):
    """(B,) diffusion steps -> (B, D): sinusoidal features through an MLP."""

    def __init__(self, width: int, frequency_dim: int, *, dtype, rngs: nnx.Rngs):
        self.frequency_dim = frequency_dim
        init = nnx.initializers.normal(EMBED_STD)
        self.mlp = Mlp2(frequency_dim, width, kernel_init=init, dtype=dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp(timestep_features(t, self.frequency_dim))  # (B, D)


class LabelEmbedder(nnx.Module):
    """(B,) class labels -> (B, D). Row `num_classes` is the learned null label.

    In training a fraction `dropout_prob` of labels is replaced by the null label, so the same
    model also learns the unconditional prediction that classifier-free guidance needs. The
    dropout draws from the model's "dropout" stream; the train step reseeds it every step
    (`nnx.reseed(model, dropout=key)`).
    """

    def __init__(self, num_classes: int, width: int, dropout_prob: float, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nnx.Embed(num_classes + 1, width, embedding_init=nnx.initializers.normal(EMBED_STD), rngs=rngs)
        self.dropout_rng = nnx.RngStream(rngs.dropout(), tag="dropout")

    def __call__(self, labels: jax.Array, *, train: bool) -> jax.Array:
        if train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.dropout_rng(), labels.shape) < self.dropout_prob  # (B,)
            labels = jnp.where(drop, self.num_classes, labels)  # (B,)
        return self.table(labels)  # (B, D)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, L, E) token features, (B, L) bool -> (B, E) mean of the valid tokens; 0 where none is."""
    weights = mask.astype(x.dtype)[..., None]  # (B, L, 1)
    return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)  # (B, E)


class PooledTextEmbedder(nnx.Module):
    """(B, L, E) text tokens + (B, L) mask -> (B, D): masked mean over tokens, then an MLP."""

    def __init__(self, text_dim: int, width: int, *, dtype, rngs: nnx.Rngs):
        self.mlp = Mlp2(text_dim, width, kernel_init=xavier, dtype=dtype, rngs=rngs)

    def __call__(self, text: jax.Array, mask: jax.Array) -> jax.Array:
        return self.mlp(masked_mean(text, mask))  # (B, D)


class TextProjection(nnx.Module):
    """(B, L, E) text tokens -> (B, L, D): Linear -> GELU (tanh) -> Linear, once before the blocks
    (Wan's text embedder), so every block's cross-attention reads D-wide keys and values."""

    def __init__(self, text_dim: int, width: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(text_dim, width, kernel_init=xavier, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, kernel_init=xavier, dtype=dtype, rngs=rngs)

    def __call__(self, text: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(text), approximate=True))  # (B, L, D)
