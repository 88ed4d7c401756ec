"""VideoDiT: the spacetime Diffusion Transformer.

Axes: B batch, T frames, H height, W width, C latent channels, N tokens, D model width,
L text tokens, E text width, P = pt*ph*pw*C patch features.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit import context_parallel
from jaxdit.blocks import DiTBlock, FinalLayer, Linear, modulation_chunks
from jaxdit.embed import LabelEmbedder, PooledTextEmbedder, TextProjection, TimestepEmbedder
from jaxdit.flow import TIME_SCALE
from jaxdit.model_config import ModelConfig
from jaxdit.patch import grid_shape, patchify, rope_3d, sincos_3d, unpatchify
from jaxdit.sharding import STACKED_BLOCKS

_REMAT_POLICIES = {
    "full": None,  # keep only the block's inputs; recompute the rest in the backward pass
    # Keep the outputs of the linear layers, recompute attention scores and activations.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class VideoDiT(nnx.Module):
    """Predicts the noise in noised latents x_t at step t, conditioned on text and/or a class.

    patchify -> linear patch embedding (a Conv3d with stride = kernel = patch) + fixed 3-D
    positions -> blocks (adaLN-Zero on c = t_embed + label_embed + pooled_text) -> final layer
    -> unpatchify; `ModelConfig`'s layout options also make it Wan 2.1's transformer (`WAN_LAYOUT`:
    shared modulation, a text projection, cross-attention behind a LayerNorm, no pooled text). Parameters
    are float32; computation runs in `config.dtype`. With
    `config.scan_layers` the blocks are one stacked DiTBlock applied by a scan over layers. Traced
    on a mesh with a `context` axis, the tokens are split along the sequence over it from the
    patch embedding to the final layer (`jaxdit.context_parallel`); the result is the same.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        width, dtype = config.width, jnp.dtype(config.dtype)
        patch_dim = math.prod(config.patch)
        self.patch_embed = Linear(
            patch_dim * config.in_channels, width, kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype, rngs=rngs
        )
        self.t_embed = TimestepEmbedder(width, config.frequency_dim, dtype=dtype, rngs=rngs)
        self.label_embed = (
            LabelEmbedder(config.num_classes, width, config.class_dropout_prob, rngs=rngs) if config.num_classes else None
        )
        pooled = config.has_text and config.pooled_text
        self.text_embed = PooledTextEmbedder(config.text_dim, width, dtype=dtype, rngs=rngs) if pooled else None
        # The text's tokens once through an MLP into the model width (Wan), or as they are, for cross-attention.
        self.text_proj = (
            TextProjection(config.text_dim, width, dtype=dtype, rngs=rngs) if config.has_text and config.text_projection
            else None
        )
        cross_dim = (width if config.text_projection else config.text_dim) if config.cross_attention else 0
        if config.modulation == "shared":  # Wan: one projection of c, to which each block adds its table
            chunks = modulation_chunks(cross_dim, config.cross_norm)
            self.shared_modulation = Linear(
                width, chunks * width, kernel_init=nnx.initializers.zeros_init(), dtype=dtype, rngs=rngs
            )

        def make_block(rngs: nnx.Rngs) -> DiTBlock:
            return DiTBlock(
                width, config.heads, config.hidden_width, text_dim=cross_dim, attention=config.attention,
                qk_norm=config.qk_norm, qk_norm_scope=config.qk_norm_scope, rope_pairs=config.rope_pairs,
                modulation=config.modulation, cross_norm=config.cross_norm, context_attention=config.context_attention,
                ulysses_degree=config.ulysses_degree, dtype=dtype, rngs=rngs,
            )

        if config.frame_condition:
            # The given frames' latents and the mask of given frames (jaxdit.frames), one channel more
            # than the latents, into the tokens; zero-initialised, so training starts from the model without it.
            self.condition_embed = Linear(
                patch_dim * (config.in_channels + 1), width, kernel_init=nnx.initializers.zeros_init(), dtype=dtype,
                rngs=rngs,
            )
        if config.token_mask_ratio:
            # What a hidden token shows the blocks (with its position): learned, starting at zero.
            self.mask_token = nnx.Param(jnp.zeros((width,), jnp.float32))
            self.mask_rng = nnx.RngStream(rngs.dropout(), tag="dropout")  # reseeded every train step

        if config.scan_layers:
            # One DiTBlock whose parameters have a leading depth axis: the constructor vmapped over
            # `depth` split keys, so every layer draws its own initialisation. The name is
            # jaxdit.sharding.STACKED_BLOCKS: FSDP never splits that leading axis.
            self.stacked_blocks = nnx.split_rngs(splits=config.depth)(nnx.vmap(make_block))(rngs)
        else:
            self.blocks = nnx.List(make_block(rngs) for _ in range(config.depth))
        self.final = FinalLayer(width, patch_dim * config.out_channels, mode=config.final_layer, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        text: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        label: jax.Array | None = None,
        given: jax.Array | None = None,
        given_mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """x (B, T, H, W, C) latents, t (B,) steps, text (B, L, E), text_mask (B, L) bool, label (B,) int.

        Frame conditioning (`model.frame_condition`): given (B, T, H, W, C) latents, of which the frames
        given_mask (B, T) bool marks are given (none given when both are None).
        Returns (B, T, H, W, C) float32 predicted noise, or (B, T, H, W, 2C) with `learn_sigma`
        (noise first, then the variance interpolation values).
        """
        cfg = self.config
        text_mask = self._check_inputs(x, t, text, text_mask, label, given, given_mask)
        grid = grid_shape(x.shape, cfg.patch)  # (T', H', W')
        dtype = jnp.dtype(cfg.dtype)

        if cfg.flow_input_scale:  # t is flow time * TIME_SCALE: the input's share of signal is 1 - t
            x = x * (1 - t.astype(jnp.float32) / TIME_SCALE)[:, None, None, None, None]  # (B, T, H, W, C)
        tokens = self.patch_embed(patchify(x.astype(dtype), cfg.patch))  # (B, N, D)
        if cfg.frame_condition:
            tokens = tokens + self._embed_given(x, given, given_mask)  # (B, N, D)
        if train and cfg.token_mask_ratio:
            tokens = self._hide_tokens(tokens)  # (B, N, D)
        rope = None
        if "rope" in cfg.positions:
            rope = tuple(jnp.asarray(a) for a in rope_3d(cfg.width // cfg.heads, grid))  # 2x (N, Dh/2)
        if "sincos" in cfg.positions:
            tokens = tokens + jnp.asarray(sincos_3d(cfg.width, grid), dtype)  # (B, N, D)

        c = self.t_embed(t)  # (B, D)
        if self.label_embed is not None:
            c = c + self.label_embed(label, train=train)  # (B, D)
        if self.text_embed is not None:
            c = c + self.text_embed(text, text_mask)  # (B, D)

        block_c = c  # (B, D), or with shared modulation its projection (B, chunks, D)
        if cfg.modulation == "shared":
            block_c = self.shared_modulation(nnx.silu(c)).reshape(c.shape[0], -1, c.shape[-1])  # (B, chunks, D)
        if cfg.has_text and cfg.text_padding == "attended":  # Wan: the padding's features are zeros, and attended
            text = jnp.where(text_mask[..., None], text, 0).astype(text.dtype)  # (B, L, E)
            text_mask = jnp.ones_like(text_mask)  # (B, L)
        if self.text_proj is not None:
            text = self.text_proj(text.astype(dtype))  # (B, L, D)

        num_tokens = tokens.shape[1]
        # Over a context axis: padded to a multiple of its size (masked keys) and split along N.
        tokens, rope, token_mask = context_parallel.split_tokens(tokens, rope)  # (B, N', D), N' >= N
        cross_text = (text, text_mask) if cfg.has_text and cfg.cross_attention else (None, None)
        if cfg.scan_layers:
            tokens = self._scan_blocks(tokens, block_c, *cross_text, rope, token_mask)  # (B, N', D)
        else:
            for block in self.blocks:
                tokens = self._run_block(block, tokens, block_c, *cross_text, rope, token_mask)  # (B, N', D)

        out = context_parallel.gather_tokens(self.final(tokens, c), num_tokens)  # (B, N, P_out)
        return unpatchify(out.astype(jnp.float32), cfg.patch, grid)  # (B, T, H, W, C_out)

    def _embed_given(self, x: jax.Array, given: jax.Array | None, given_mask: jax.Array | None) -> jax.Array:
        """The given frames and their mask as tokens: (B, T, H, W, C + 1) channels, patchified -> (B, N, D)."""
        if given is None:  # text only: nothing given
            given, given_mask = jnp.zeros_like(x), jnp.zeros(x.shape[:2], bool)
        mask = given_mask[:, :, None, None, None]  # (B, T, 1, 1, 1)
        channels = jnp.concatenate(
            [jnp.where(mask, given.astype(jnp.float32), 0.0), jnp.broadcast_to(mask, (*x.shape[:4], 1)).astype(jnp.float32)],
            axis=-1,
        )  # (B, T, H, W, C + 1)
        return self.condition_embed(patchify(channels.astype(jnp.dtype(self.config.dtype)), self.config.patch))

    def _hide_tokens(self, tokens: jax.Array) -> jax.Array:
        """(B, N, D) -> the same with each sample's tokens hidden (the mask token) with probability U(0, ratio)."""
        key = jax.random.fold_in(self.mask_rng(), 1)  # apart from the label dropout, reseeded with the same key
        ratio_key, token_key = jax.random.split(key)
        ratio = self.config.token_mask_ratio * jax.random.uniform(ratio_key, (tokens.shape[0], 1))  # (B, 1)
        hidden = jax.random.uniform(token_key, tokens.shape[:2]) < ratio  # (B, N)
        return jnp.where(hidden[..., None], self.mask_token.astype(tokens.dtype), tokens)  # (B, N, D)

    def _scan_blocks(self, tokens, c, text, text_mask, rope, token_mask):
        """The stacked blocks in order, one layer's parameters per scan step; remat applies per block."""
        step = lambda tokens, block: self._run_block(block, tokens, c, text, text_mask, rope, token_mask)  # (B, N, D)
        return nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(tokens, self.stacked_blocks)

    def _run_block(self, block, tokens, c, text, text_mask, rope, token_mask):
        if self.config.remat == "none":
            return block(tokens, c, text, text_mask, rope, token_mask)
        policy = _REMAT_POLICIES[self.config.remat]
        return nnx.remat(lambda blk, *args: blk(*args), policy=policy)(
            block, tokens, c, text, text_mask, rope, token_mask
        )

    def _check_inputs(self, x, t, text, text_mask, label, given=None, given_mask=None):
        """Shape and presence checks with messages that say what to pass; returns the text mask."""
        cfg = self.config
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"x must be latents (B, T, H, W, {cfg.in_channels}) (model.in_channels={cfg.in_channels}), "
                f"got shape {tuple(x.shape)}."
            )
        batch = x.shape[0]
        if t.shape != (batch,):
            raise ValueError(f"t must hold one diffusion step per sample, shape ({batch},); got {tuple(t.shape)}.")
        if cfg.num_classes and label is None:
            raise ValueError(f"this model is class-conditional ({cfg.num_classes} classes): pass label=(B,) ints.")
        if not cfg.num_classes and label is not None:
            raise ValueError("label was given but the model has no class embedding (model.num_classes=0).")
        if (given is None) != (given_mask is None):
            raise ValueError("frame conditioning takes both given (B, T, H, W, C) latents and given_mask (B, T).")
        if given is not None:
            if not cfg.frame_condition:
                raise ValueError(
                    "given frames were passed, but this model has no frame conditioning (model.frame_condition="
                    "False): train one with --model.frame_condition true --train.condition first=0.3,last=0.1."
                )
            if given.shape != x.shape or given_mask.shape != x.shape[:2]:
                raise ValueError(
                    f"given must have x's shape {tuple(x.shape)} and given_mask {tuple(x.shape[:2])}; got "
                    f"{tuple(given.shape)} and {tuple(given_mask.shape)}."
                )
        if label is not None and label.shape != (batch,):
            raise ValueError(f"label must have shape ({batch},), got {tuple(label.shape)}.")
        if not cfg.has_text:
            if text is not None or text_mask is not None:
                raise ValueError("text was given but the model has no text conditioning (model.text_dim=0).")
            return None
        if text is None or text.ndim != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise ValueError(
                f"this model is text-conditioned: pass text=(B, L, {cfg.text_dim}) token features "
                f"(model.text_dim={cfg.text_dim}); got {None if text is None else tuple(text.shape)}."
            )
        if text_mask is None:
            return jnp.ones(text.shape[:2], dtype=bool)
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask must have shape {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}.")
        return text_mask.astype(bool)


def stack_blocks(state: nnx.State) -> nnx.State:
    """A VideoDiT state in the unrolled layout -> the same arrays in the `scan_layers` layout.

    `blocks/<i>/<path>` (one entry per layer) become `stacked_blocks/<path>` with the layer as a
    new leading axis; everything else is kept. Takes a whole state or its parameters (or an EMA
    of them); for a Denoiser's, convert `state["dit"]`. E.g.
    `nnx.update(scanned_model, stack_blocks(nnx.state(unrolled_model)))`.
    """
    blocks = state["blocks"]
    layers = [blocks[i] for i in range(len(blocks))]
    converted = nnx.State({name: value for name, value in state.items() if name != "blocks"})
    converted[STACKED_BLOCKS] = jax.tree.map(lambda *arrays: jnp.stack(arrays), *layers)  # each (depth, ...)
    return converted


def unstack_blocks(dit: dict, depth: int) -> list[dict]:
    """A VideoDiT's parameters (a pure dict, NumPy or jax arrays) -> each block's, in order: the unrolled
    `blocks`, or layer i of every array of a `scan_layers` run's `stacked_blocks` (views, no copies)."""
    if STACKED_BLOCKS in dit:
        return [jax.tree.map(lambda a, i=i: a[i], dit[STACKED_BLOCKS]) for i in range(depth)]
    return [dit["blocks"][i] for i in range(depth)]
