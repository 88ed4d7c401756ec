"""The identity codec: the model works on pixels, scaled from [0, 255] to [-1, 1].

It has no parameters, so it is trivially frozen; it has the interface of every codec
(`jaxdit.codec.base`), so pixel-space and latent-space models share one code path.
"""

import jax
from flax import nnx

from jaxdit.codec.base import latent_shape, to_float


class IdentityCodec(nnx.Module):
    """videos (B, T, H, W, 3) <-> latents (B, T, H, W, 3) in [-1, 1]."""

    kind = "identity"
    channels = 3  # latent channels c
    factors = (1, 1, 1)  # compression in (T, H, W)
    scale, shift = 1.0, 0.0  # pixels in [-1, 1] need no rescaling
    clip_latents = True  # latents are bounded to [-1, 1], so the sampler clips its x0 estimates

    def __init__(self, *, rngs: nnx.Rngs | None = None):  # rngs: every codec is built as Cls(**spec, rngs=...)
        pass

    def spec(self) -> dict:
        return {}

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return latent_shape(video_shape, self.factors, self.channels)

    def encode(self, video: jax.Array, *, rng=None) -> jax.Array:
        """uint8 frames in [0, 255], or float frames already in [-1, 1] -> float32 latents."""
        self.latent_shape(video.shape)  # an RGB video, or a clear error
        return to_float(video)  # (B, T, H, W, 3)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents -> float frames in [-1, 1] (not clipped; `to_uint8` clips)."""
        return latents.astype("float32")
