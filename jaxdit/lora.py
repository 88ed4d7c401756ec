"""LoRA: low-rank adapters on the linear layers of a VideoDiT's blocks (`train.lora_rank`).

A targeted layer computes y = x W + b + (alpha / r) (x A) B, with A (D_in, r) drawn as PEFT draws it
(uniform in +-1/sqrt(D_in)) and B (r, D_out) zero, so a model with fresh adapters computes exactly what
its base computes. A fused projection (self-attention's qkv, cross-attention's kv) gets one adapter per
part, as PEFT and diffusers give `to_q`, `to_k` and `to_v` each their own: A (D_in, parts * r), B (parts,
r, D_out / parts). The adapters are `nnx.LoRAParam`s (a kind of `nnx.Param`), so
`nnx.split(model, nnx.LoRAParam, nnx.Param, ...)` separates them from the base weights: a LoRA run trains
and checkpoints only them, and takes the base weights as a frozen argument of its step (`jaxdit.train_step`).

Axes: M tokens (all leading axes folded), I input width, O output width, P parts, R rank.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit.config import Config, TrainConfig
from jaxdit.options import LORA_PARTS, LORA_TARGETS, parse_lora_targets

log = logging.getLogger(__name__)


def scale(train: TrainConfig) -> float:
    """alpha / r, the factor on the adapters' product (train.lora_alpha 0: the rank, a factor of 1)."""
    return (train.lora_alpha or train.lora_rank) / train.lora_rank


class LoRA(nnx.Module):
    """The adapter of one linear layer (or of `leading` stacked layers): x (M, I) -> (M, O)."""

    def __init__(self, d_in: int, d_out: int, *, rank: int, scale: float, parts: int = 1, leading=(), dtype,
                 rngs: nnx.Rngs):
        self.scale, self.dtype = scale, dtype
        bound = d_in**-0.5
        self.down = nnx.LoRAParam(  # (..., I, P R)
            jax.random.uniform(rngs.params(), (*leading, d_in, parts * rank), jnp.float32, -bound, bound)
        )
        self.up = nnx.LoRAParam(jnp.zeros((*leading, parts, rank, d_out // parts), jnp.float32))  # (..., P, R, O/P)

    def __call__(self, x: jax.Array) -> jax.Array:
        parts, rank, _ = self.up.shape
        h = (x @ self.down.astype(self.dtype)).reshape(x.shape[0], parts, rank)  # (M, P, R)
        y = jnp.einsum("mpr,pro->mpo", h, self.up.astype(self.dtype))  # (M, P, O/P)
        return (y.reshape(x.shape[0], -1) * self.scale).astype(self.dtype)  # (M, O)

    def delta(self) -> jax.Array:
        """The change the adapter makes to its layer's kernel, float32 (..., I, O)."""
        *leading, d_in, _ = self.down.shape
        parts, rank, d_part = self.up.shape[-3:]
        down = self.down[...].reshape(*leading, d_in, parts, rank)  # (..., I, P, R)
        product = jnp.einsum("...ipr,...pro->...ipo", down, self.up[...])  # (..., I, P, O/P)
        return product.reshape(*leading, d_in, parts * d_part) * self.scale  # (..., I, O)


def _target_layers(dit) -> list[tuple[str, nnx.Module]]:
    """(name, module) of every block sublayer of LORA_TARGETS, in the blocks of a VideoDiT (stacked or not)."""
    blocks = [dit.stacked_blocks] if dit.config.scan_layers else list(dit.blocks)
    return [
        (sublayer, getattr(block, sublayer))
        for block in blocks for sublayer in LORA_TARGETS if getattr(block, sublayer, None) is not None
    ]


def add_adapters(dit, train: TrainConfig, *, rngs: nnx.Rngs) -> None:
    """Gives each linear layer of `dit`'s blocks that train.lora_targets names a fresh adapter (`linear.lora`)."""
    targets = parse_lora_targets(train.lora_targets)
    found = set()
    for sublayer, module in _target_layers(dit):
        for name in LORA_TARGETS[sublayer]:
            target = f"{sublayer}.{name}"
            if target not in targets:
                continue
            linear = getattr(module, name)
            *leading, d_in, d_out = linear.kernel.shape  # stacked blocks: a leading layer axis
            linear.lora = LoRA(
                d_in, d_out, rank=train.lora_rank, scale=scale(train), parts=LORA_PARTS.get(target, 1), leading=tuple(leading),
                dtype=linear.dtype, rngs=rngs,
            )
            found.add(target)
    if not found:
        raise ValueError(
            f"train.lora_targets={train.lora_targets!r} names no layer of this model's blocks (it has "
            f"{', '.join(sorted({name for name, _ in _target_layers(dit)}))}); name some of those."
        )
    absent = [t for t in targets if t not in found]
    if absent:
        log.info("LoRA: this model's blocks have no %s; adapting %s", ", ".join(absent), ", ".join(sorted(found)))


def merge_adapters(model: nnx.Module) -> None:
    """Folds every adapter into its layer's kernel (W + alpha/r A B) and removes it: the model then computes
    as its base would with the adapted weights, at the base's cost."""
    for _, linear in nnx.iter_modules(model):
        adapter = getattr(linear, "lora", None)
        if adapter is not None:
            kernel = linear.kernel[...]
            linear.kernel[...] = (kernel.astype(jnp.float32) + adapter.delta()).astype(kernel.dtype)
            del linear.lora


def merged_params(graphdef: nnx.GraphDef, base: nnx.State, adapters: nnx.State, model_rngs: nnx.State) -> nnx.State:
    """A LoRA model's parameters with its adapters folded into the base weights (`merge_adapters`): the
    parameters of the model without adapters (`base_config`). One jitted program; `base` is donated, so the
    merged kernels reuse its buffers. graphdef: the LoRA model's (`jaxdit.train_step.model_graphdef`)."""
    def merge(base, adapters, model_rngs):
        model = nnx.merge(graphdef, nnx.merge_state(base, adapters), model_rngs)
        merge_adapters(model)
        return nnx.state(model, nnx.Param)

    return jax.jit(merge, donate_argnums=0)(base, adapters, model_rngs)


def base_config(config: Config) -> Config:
    """The config of the model a LoRA run adapts: the same one, without adapters."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lora_rank=0))
