"""Small helpers shared by the tests."""

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdit


def tiny_config(**overrides) -> jaxdit.ModelConfig:
    return jaxdit.ModelConfig.from_variant(overrides.pop("variant", "tiny/2x2x2"), **overrides)


def randomized(model: nnx.Module, seed: int = 0, scale: float = 0.2) -> nnx.Module:
    """The model with every parameter drawn at random, the zero-initialised ones included."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def pure_forward(model: nnx.Module):
    """A jitted pure function (state, x, t, **conditions) -> prediction, as train and sample steps use."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, t, text=None, text_mask=None, label=None):
        return nnx.merge(graphdef, state)(x, t, text=text, text_mask=text_mask, label=label)

    return lambda *args, **kwargs: forward(state, *args, **kwargs)


def inputs(config: jaxdit.ModelConfig, batch=2, frames=4, size=8, text_len=5, seed=0):
    """Random latents, steps and the conditions the config asks for."""
    kx, kt, ktext, kl = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (batch, frames, size, size, config.in_channels))
    t = jax.random.randint(kt, (batch,), 0, 1000)
    conditions = {}
    if config.has_text:
        conditions["text"] = jax.random.normal(ktext, (batch, text_len, config.text_dim))
        lengths = jnp.maximum(text_len - 3 * jnp.arange(batch), 1)  # (B,): full, then shorter captions
        conditions["text_mask"] = jnp.arange(text_len)[None] < lengths[:, None]
    if config.num_classes:
        conditions["label"] = jax.random.randint(kl, (batch,), 0, config.num_classes)
    return x, t, conditions
