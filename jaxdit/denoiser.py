"""The trained network: the text encoder and the VideoDiT, from caption tokens and noisy
latents to the prediction. Training and sampling both call this; the codec stays outside, and so
does a frozen pretrained text encoder (`text.encoder="t5"`, jaxdit.frozen_text), whose features
come in as `text`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit.config import Config
from jaxdit.model import VideoDiT
from jaxdit.text import TextEncoder


class Denoiser(nnx.Module):
    """tokens (B, L) + mask (B, L) -> text features -> VideoDiT(x_t, t, text) -> prediction.

    With a frozen text encoder the Denoiser has none of its own (`text_encoder` is None) and takes
    the features the frozen one computed.
    """

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        model = config.model
        self.dit = VideoDiT(model, rngs=rngs)
        self.text_encoder = nnx.data(
            TextEncoder(
                model.text_dim, config.text.depth, config.text.heads, config.text.max_length,
                bigram_buckets=config.text.bigram_buckets, dtype=jnp.dtype(model.dtype), rngs=rngs,
            )
            if model.has_text and config.text.encoder == "byte"
            else None
        )

    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        text_tokens: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        text: jax.Array | None = None,
        label: jax.Array | None = None,
        given: jax.Array | None = None,
        given_mask: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """x (B, T, H, W, C) latents, t (B,), tokens and mask (B, L), label (B,) -> (B, T, H, W, C_out).

        text: (B, L, E) token features from a frozen encoder, in place of the tokens. given, given_mask:
        frame conditioning, as VideoDiT takes them.
        """
        frames = {"given": given, "given_mask": given_mask}
        if not self.dit.config.has_text:
            return self.dit(x, t, label=label, train=train, **frames)
        if text_mask is None or (text is None and (self.text_encoder is None or text_tokens is None)):
            what = "text_tokens" if self.text_encoder is not None else "text (the frozen encoder's features)"
            raise ValueError(f"this model is text-conditioned: pass {what} and text_mask (B, L).")
        if text is None:
            text = self.text_encoder(text_tokens, text_mask)  # (B, L, E)
        return self.dit(x, t, text=text, text_mask=text_mask, label=label, train=train, **frames)
