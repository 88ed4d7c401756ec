"""The identity codec: the model works on pixels, scaled from [0, 255] to [-1, 1].

It has no parameters, so it is trivially frozen; the learned video autoencoders and the
SD-VAE import (jaxdit.codec, issue 6) have the same interface.
"""

import jax
import jax.numpy as jnp

PIXEL_MAX = 255.0


class IdentityCodec:
    """videos (B, T, H, W, 3) <-> latents (B, T, H, W, 3) in [-1, 1]."""

    channels = 3  # latent channels C
    factors = (1, 1, 1)  # compression in (T, H, W)
    scale = 1.0  # latents = scale * encoder output; pixels in [-1, 1] need no rescaling
    clip_latents = True  # latents are bounded to [-1, 1], so the sampler clips its x0 estimates

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*video_shape[:-1], self.channels)

    def encode(self, video: jax.Array) -> jax.Array:
        """uint8 frames in [0, 255], or float frames already in [-1, 1] -> float32 latents."""
        if video.shape[-1] != self.channels:
            raise ValueError(f"the identity codec takes RGB videos (..., 3); got shape {tuple(video.shape)}.")
        if jnp.issubdtype(video.dtype, jnp.integer):
            return video.astype(jnp.float32) / (PIXEL_MAX / 2) - 1.0  # (B, T, H, W, 3)
        return video.astype(jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents -> float frames in [-1, 1] (not clipped; `to_uint8` clips)."""
        return latents.astype(jnp.float32)


def to_uint8(video: jax.Array) -> jax.Array:
    """Float frames in [-1, 1] -> uint8 in [0, 255], clipped and rounded."""
    return jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * (PIXEL_MAX / 2)).astype(jnp.uint8)
