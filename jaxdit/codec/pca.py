"""A linear codec fitted in closed form: PCA of p x p pixel patches, ready in seconds.

    video (B, T, H, W, 3) -> patches (B, T, H/p, W/p, 3p^2) -> minus mean, onto the top `channels`
    principal directions -> latents (B, T, H/p, W/p, channels), times the scale that makes them unit variance

decode is the transpose (the reconstruction is the projection onto the kept directions).
No training loop: `fit` takes clips and solves an SVD, so a latent space for a new data set
costs one command (`jaxdit.codec.linear`, which reads a config's clips):

    python -m jaxdit.codec.linear --config configs/shapes_tiny.py --out codecs/pca --patch 4 --channels 8

On the built-in 8x32x32 moving shapes, 8 components of 4x4 patches give a held-out PSNR of 26 dB
(4 components: 23 dB), as much as the video autoencoder reaches in a CPU-minutes run.
"""

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdit.codec.base import latent_shape, to_float

_MIN_STD = 1e-6  # latents this flat carry nothing: no scale can be measured


class LinearCodec(nnx.Module):
    """PCA of p x p x 3 patches; parameters `mean` (3p^2,) and `components` (3p^2, channels), frozen."""

    kind = "linear"
    clip_latents = False

    def __init__(self, *, patch: int = 4, channels: int = 8, scale: float = 1.0, shift: float = 0.0, rngs: nnx.Rngs):
        features = 3 * patch * patch
        if not 1 <= channels <= features:
            raise ValueError(f"a linear codec of {patch}x{patch} patches keeps 1..{features} channels; got {channels}.")
        self.patch, self.channels, self.scale, self.shift = patch, channels, scale, shift
        self.factors = (1, patch, patch)
        self.mean = nnx.Param(jnp.zeros((features,)))
        self.components = nnx.Param(jnp.eye(features, channels))  # orthonormal columns once fitted

    def spec(self) -> dict:
        return dict(patch=self.patch, channels=self.channels, scale=self.scale, shift=self.shift)

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return latent_shape(video_shape, self.factors, self.channels)

    def _patches(self, video: jax.Array) -> jax.Array:
        self.latent_shape(video.shape)  # a shape the codec can take, or a clear error
        p = self.patch
        return einops.rearrange(to_float(video), "b t (h p) (w q) c -> b t h w (p q c)", p=p, q=p)

    def encode(self, video: jax.Array, *, rng=None) -> jax.Array:
        """video (B, T, H, W, 3) -> latents (B, T, H/p, W/p, channels); deterministic (rng is ignored)."""
        z = (self._patches(video) - self.mean[...]) @ self.components[...]  # (B, T, h, w, channels)
        return self.scale * (z - self.shift)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents -> float video (B, T, H, W, 3) in about [-1, 1]: the patches' projection."""
        z = latents / self.scale + self.shift
        patches = z @ self.components[...].T + self.mean[...]  # (B, T, h, w, 3p^2)
        p = self.patch
        return einops.rearrange(patches, "b t h w (p q c) -> b t (h p) (w q) c", p=p, q=p)


def fit(videos: np.ndarray, *, patch: int, channels: int) -> LinearCodec:
    """The PCA codec of uint8 clips (N, T, H, W, 3): mean and top principal directions of their
    patches, and the scale that gives the latents unit variance."""
    codec = LinearCodec(patch=patch, channels=channels, rngs=nnx.Rngs(0))
    patches = np.asarray(codec._patches(jnp.asarray(videos)), np.float64).reshape(-1, 3 * patch * patch)
    mean = patches.mean(axis=0)
    _, _, directions = np.linalg.svd(patches - mean, full_matrices=False)  # rows: directions, by variance
    components = directions[:channels].T  # (3p^2, channels)
    latents = (patches - mean) @ components
    std = float(latents.std())
    if not np.isfinite(std) or std < _MIN_STD:
        raise ValueError("the clips are (almost) constant: a linear codec cannot be fitted to them; give varied clips.")
    codec.mean[...] = jnp.asarray(mean, jnp.float32)
    codec.components[...] = jnp.asarray(components, jnp.float32)
    codec.scale = 1.0 / std  # the mean is 0 by construction: no shift
    return codec
