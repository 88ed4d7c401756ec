"""What every codec shares: pixels <-> [-1, 1], shape checks, the latent scaling, and PSNR.

A codec is a `flax.nnx.Module` with
    kind: str                       its name in a codec directory's codec.json ("identity", "autoencoder", "sd_vae")
    channels: int                   latent channels c
    factors: (int, int, int)        compression in (T, H, W)
    scale, shift: float             latents = scale * (z - shift), z the encoder's output: about unit variance
    clip_latents: bool              latents are bounded to [-1, 1] (the sampler may clip its x0 estimates)
    latent_shape(video_shape)       (..., T, H, W, 3) -> (..., t, h, w, c), or a ValueError naming the bad size
    encode(video, *, rng=None)      uint8 [0, 255] or float [-1, 1] (B, T, H, W, 3) -> latents (B, t, h, w, c);
                                    the posterior mean, or a sample of it when given an rng key
    decode(latents)                 latents (B, t, h, w, c) -> float video in [-1, 1] (B, T, H, W, 3), not clipped
    spec() -> dict                  JSON-able keyword arguments that rebuild the same module: Cls(**spec, rngs=...)
Its parameters are `nnx.Param`s; a frozen codec's state is passed to jitted programs as an
argument (never baked in as constants) and is never given to the optimizer.
"""

import jax
import jax.numpy as jnp

PIXEL_MAX = 255.0
PIXEL_RANGE = 2.0  # float pixels live in [-1, 1]: PSNR's peak-to-peak signal


def to_float(video: jax.Array) -> jax.Array:
    """uint8 frames in [0, 255] -> float32 in [-1, 1]; float frames are taken as already in [-1, 1]."""
    if jnp.issubdtype(video.dtype, jnp.integer):
        return video.astype(jnp.float32) / (PIXEL_MAX / 2) - 1.0
    return video.astype(jnp.float32)


def to_uint8(video: jax.Array) -> jax.Array:
    """Float frames in [-1, 1] -> uint8 in [0, 255], clipped and rounded."""
    return jnp.round((jnp.clip(video, -1.0, 1.0) + 1.0) * (PIXEL_MAX / 2)).astype(jnp.uint8)


def latent_shape(video_shape, factors: tuple[int, int, int], channels: int, *, causal: bool = False) -> tuple[int, ...]:
    """(..., T, H, W, 3) -> (..., t, h, w, channels) for compression `factors` in (T, H, W).

    A causal-in-time codec keeps the first frame on its own: T = 1 + ft * k frames give 1 + k latent frames.
    """
    *lead, frames, height, width, rgb = video_shape
    ft, fh, fw = factors
    if rgb != 3:
        raise ValueError(f"codecs take RGB videos (..., T, H, W, 3); got shape {tuple(video_shape)}.")
    if height % fh or width % fw:
        raise ValueError(
            f"frames of {height}x{width} pixels do not divide by the codec's {fh}x{fw} spatial compression; "
            f"use a size that is a multiple of {fh} (e.g. {max(fh, height - height % fh)})."
        )
    if causal:
        if (frames - 1) % ft:
            raise ValueError(
                f"{frames} frames do not fit the codec's causal {ft}x temporal compression: "
                f"use 1 + {ft}k frames (e.g. {1 + ft * max(1, (frames - 1) // ft)})."
            )
        t = 1 + (frames - 1) // ft
    else:
        if frames % ft:
            raise ValueError(
                f"{frames} frames do not divide by the codec's {ft}x temporal compression; "
                f"use a multiple of {ft} (e.g. {max(ft, frames - frames % ft)})."
            )
        t = frames // ft
    return (*lead, t, height // fh, width // fw, channels)


def psnr(reconstruction: jax.Array, video: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB of each clip (B,), for float frames in [-1, 1]."""
    mse = jnp.square(reconstruction - video).reshape(video.shape[0], -1).mean(axis=1)  # (B,)
    return 10.0 * jnp.log10(PIXEL_RANGE**2 / jnp.maximum(mse, 1e-10))
