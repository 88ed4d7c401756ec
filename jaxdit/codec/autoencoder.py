"""A video autoencoder to train as a codec: convolutional, KL-regularised (a VAE), causal in time.

    video (B, T, H, W, 3) -> Encoder -> mean, log-variance (B, t, h, w, c) -> z -> Decoder -> video

The input is first cut into `patch` x `patch` pixel squares stacked as channels (space to depth,
which spares the costly full-resolution convolutions; the decoder ends with the inverse), then
each level after the first halves height and width with a strided convolution; the first
`temporal_downsample` (k) of them also halve time. Time is causal: every convolution sees only
the current and earlier frames (the past is padded with copies of frame 0) and normalisation is
per frame, so latent frame j depends only on video frames <= 2^k j, and video frame i is decoded
from latent frames <= ceil(i / 2^k). Halving time keeps frame 0 on its own: 1 + 2n frames ->
1 + n, so a single image is a valid 1-frame video (as in MAGVIT-v2 and Open-Sora's VAE).

Trained by train.py with `task="codec"` on `codec_loss` (its previews and freezing:
`jaxdit.codec.train`); frozen, it is a codec with the interface of `jaxdit.codec.base`.
"""

import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit.codec.base import latent_shape, psnr, to_float
from jaxdit.config import AutoencoderConfig

_TIME_KERNEL = 3  # frames each temporal convolution sees: the current one and two before
_GROUPS = 8  # GroupNorm groups (fewer when a width does not divide)
_LOGVAR_RANGE = (-30.0, 20.0)  # clip the encoder's log-variance, as Stable Diffusion's VAE does
_INITIAL_LOGVAR = -8.0  # the encoder's log-variance at initialisation: posterior std ~0.02


class FrameNorm(nnx.Module):
    """GroupNorm over each frame on its own: no statistics cross time, which keeps the network causal."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(channels, num_groups=math.gcd(_GROUPS, channels), epsilon=1e-6, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        frames = x.shape[1]
        x = einops.rearrange(x, "b t h w c -> (b t) h w c")
        return einops.rearrange(self.norm(x), "(b t) h w c -> b t h w c", t=frames)


class CausalConv(nnx.Module):
    """A (2+1)-D convolution: 3x3 in space, then 3 frames in time, causally (output frame i sees
    input frames <= i). Factorised as in R(2+1)D: 12 instead of 27 taps per channel pair."""

    def __init__(self, in_channels: int, out_channels: int, *, stride=(1, 1, 1), rngs: nnx.Rngs):
        st, sh, sw = stride
        self.spatial = nnx.Conv(
            in_channels, out_channels, kernel_size=(1, 3, 3), strides=(1, sh, sw), padding=((0, 0), (1, 1), (1, 1)),
            rngs=rngs,
        )
        self.temporal = nnx.Conv(out_channels, out_channels, kernel_size=(_TIME_KERNEL, 1, 1), strides=(st, 1, 1),
                                 padding="VALID", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.spatial(x)  # (B, T, H', W', C_out)
        past = jnp.repeat(h[:, :1], _TIME_KERNEL - 1, axis=1)  # frame 0 stands in for the frames before it
        return self.temporal(jnp.concatenate([past, h], axis=1))  # (B, T', H', W', C_out)


class ResBlock(nnx.Module):
    """norm -> SiLU -> conv, twice, plus the input (projected when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.norm1 = FrameNorm(in_channels, rngs=rngs)
        self.conv1 = CausalConv(in_channels, out_channels, rngs=rngs)
        self.norm2 = FrameNorm(out_channels, rngs=rngs)
        self.conv2 = CausalConv(out_channels, out_channels, rngs=rngs)
        self.skip = nnx.data(
            nnx.Conv(in_channels, out_channels, kernel_size=(1, 1, 1), rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B, T, H, W, C_out)
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # (B, T, H, W, C_out)
        return h + (x if self.skip is None else self.skip(x))


class Downsample(nnx.Module):
    """Halves H and W (and T, causally: 1 + 2k frames -> 1 + k) with a strided convolution."""

    def __init__(self, channels: int, *, temporal: bool, rngs: nnx.Rngs):
        self.conv = CausalConv(channels, channels, stride=(2 if temporal else 1, 2, 2), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)  # (B, T', H/2, W/2, C)


class Upsample(nnx.Module):
    """Doubles H and W (and T: 1 + k frames -> 1 + 2k) by repetition, then a convolution."""

    def __init__(self, channels: int, *, temporal: bool, rngs: nnx.Rngs):
        self.temporal = temporal
        self.conv = CausalConv(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # (B, T, 2H, 2W, C)
        if self.temporal:
            x = jnp.repeat(x, 2, axis=1)[:, 1:]  # (B, 2T - 1, 2H, 2W, C): frame 0 stays single
        return self.conv(x)


class Encoder(nnx.Module):
    def __init__(self, channels, temporal_downsample: int, latent_channels: int, blocks: int, patch: int, *, rngs: nnx.Rngs):
        self.patch = patch
        self.conv_in = CausalConv(3 * patch * patch, channels[0], rngs=rngs)
        layers, width = [], channels[0]
        for level, level_width in enumerate(channels):
            for _ in range(blocks):
                layers.append(ResBlock(width, level_width, rngs=rngs))
                width = level_width
            if level < len(channels) - 1:
                layers.append(Downsample(width, temporal=level < temporal_downsample, rngs=rngs))
        self.layers = nnx.List(layers)
        self.mid = ResBlock(width, width, rngs=rngs)
        self.norm_out = FrameNorm(width, rngs=rngs)
        self.conv_out = CausalConv(width, 2 * latent_channels, rngs=rngs)  # mean and log-variance
        # Start nearly deterministic: with a KL weight of ~1e-6 nothing pulls the variance up, but
        # from log-variance 0 (noise as large as the latents) it takes thousands of steps to shrink.
        bias = self.conv_out.temporal.bias
        bias[...] = bias[...].at[latent_channels:].set(_INITIAL_LOGVAR)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        p = self.patch
        x = einops.rearrange(x, "b t (h p) (w q) c -> b t h w (p q c)", p=p, q=p)  # (B, T, H/p, W/p, 3p^2)
        h = self.conv_in(x)  # (B, T, H/p, W/p, C0)
        for layer in self.layers:
            h = layer(h)  # ... -> (B, t, h, w, C_last)
        h = self.conv_out(jax.nn.silu(self.norm_out(self.mid(h))))  # (B, t, h, w, 2c)
        mean, logvar = jnp.split(h, 2, axis=-1)  # (B, t, h, w, c) each
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)


class Decoder(nnx.Module):
    def __init__(self, channels, temporal_downsample: int, latent_channels: int, blocks: int, patch: int, *, rngs: nnx.Rngs):
        self.patch = patch
        width = channels[-1]
        self.conv_in = CausalConv(latent_channels, width, rngs=rngs)
        self.mid = ResBlock(width, width, rngs=rngs)
        layers = []
        for level in reversed(range(len(channels))):
            for _ in range(blocks):
                layers.append(ResBlock(width, channels[level], rngs=rngs))
                width = channels[level]
            if level > 0:  # undoes the encoder's halving after level - 1
                layers.append(Upsample(width, temporal=level - 1 < temporal_downsample, rngs=rngs))
        self.layers = nnx.List(layers)
        self.norm_out = FrameNorm(width, rngs=rngs)
        self.conv_out = CausalConv(width, 3 * patch * patch, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))  # (B, t, h, w, C_last)
        for layer in self.layers:
            h = layer(h)  # ... -> (B, T, H/p, W/p, C0)
        x = self.conv_out(jax.nn.silu(self.norm_out(h)))  # (B, T, H/p, W/p, 3p^2)
        return einops.rearrange(x, "b t h w (p q c) -> b t (h p) (w q) c", p=self.patch, q=self.patch)


class VideoAutoencoder(nnx.Module):
    """The trainable codec. `__call__` is the training forward pass; `encode`/`decode` the frozen interface."""

    kind = "autoencoder"
    clip_latents = False  # latents are unbounded

    def __init__(
        self,
        *,
        channels=(32, 64, 128),
        temporal_downsample: int = 0,
        latent_channels: int = 4,
        blocks: int = 1,
        patch: int = 1,
        scale: float = 1.0,
        shift: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.widths, self.temporal_downsample, self.blocks = tuple(channels), temporal_downsample, blocks
        self.channels, self.patch, self.scale, self.shift = latent_channels, patch, scale, shift
        spatial = patch * 2 ** (len(channels) - 1)
        self.factors = (2**temporal_downsample, spatial, spatial)
        self.encoder = Encoder(channels, temporal_downsample, latent_channels, blocks, patch, rngs=rngs)
        self.decoder = Decoder(channels, temporal_downsample, latent_channels, blocks, patch, rngs=rngs)

    @classmethod
    def from_config(cls, config, *, rngs: nnx.Rngs) -> "VideoAutoencoder":
        """From an `AutoencoderConfig` (the training objective's fields are not the module's)."""
        return cls(
            channels=config.channels, temporal_downsample=config.temporal_downsample,
            latent_channels=config.latent_channels, blocks=config.blocks, patch=config.patch, rngs=rngs,
        )

    def spec(self) -> dict:
        return dict(
            channels=list(self.widths), temporal_downsample=self.temporal_downsample, latent_channels=self.channels,
            blocks=self.blocks, patch=self.patch, scale=self.scale, shift=self.shift,
        )

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return latent_shape(video_shape, self.factors, self.channels, causal=self.temporal_downsample > 0)

    def moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video (B, T, H, W, 3) -> the posterior's mean and log-variance (B, t, h, w, c), unscaled."""
        self.latent_shape(video.shape)  # a shape the codec can take, or a clear error
        return self.encoder(to_float(video))

    def __call__(self, video: jax.Array, *, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Training: video -> (reconstruction (B, T, H, W, 3), mean, log-variance) through a sampled z."""
        mean, logvar = self.moments(video)  # (B, t, h, w, c) each
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)  # (B, t, h, w, c)
        return self.decoder(z), mean, logvar

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """video -> latents scale * (z - shift) (B, t, h, w, c); z the posterior mean, or a sample given `rng`."""
        mean, logvar = self.moments(video)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return self.scale * (z - self.shift)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (B, t, h, w, c) -> float video (B, T, H, W, 3) in about [-1, 1]."""
        return self.decoder(latents / self.scale + self.shift)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: (B,)."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)  # (B, t, h, w, c)
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def codec_loss(model, batch: dict, rng: jax.Array, *, config: AutoencoderConfig) -> tuple[jax.Array, dict]:
    """Reconstruction (L1 or MSE) + kl_weight * KL, both per pixel value.

    Stable Diffusion's VAE sums both over pixels and latents; dividing both by the same count
    keeps its balance, so a kl_weight means the same here as there.
    """
    video = to_float(batch["video"])  # (B, T, H, W, 3)
    reconstruction, mean, logvar = model(video, rng=rng)  # (B, T, H, W, 3), (B, t, h, w, c) x 2
    error = (reconstruction - video).reshape(video.shape[0], -1)  # (B, T*H*W*3)
    per_pixel = jnp.abs(error) if config.reconstruction == "l1" else jnp.square(error)
    rec = per_pixel.mean(axis=1)  # (B,)
    kl = kl_to_standard_normal(mean, logvar) / error.shape[1]  # (B,)
    loss = (rec + config.kl_weight * kl).mean()
    return loss, {"reconstruction": rec.mean(), "kl": kl.mean(), "psnr": psnr(reconstruction, video).mean()}
