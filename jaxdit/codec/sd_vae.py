"""Stable Diffusion's image VAE (diffusers `AutoencoderKL`) in Flax NNX, as a frozen video codec.

    image (B, H, W, 3) -> Encoder -> quant_conv -> mean, log-variance (B, H/f, W/f, c) -> z
    z -> post_quant_conv -> Decoder -> image (B, H, W, 3),   f = 2 ** (levels - 1)

It is an image model, so a video is coded frame by frame (frames folded into the batch): no
temporal compression. Channels-last (NHWC) throughout. The module tree mirrors diffusers' names
(`encoder.down_blocks[i].resnets[j].conv1`, `mid_block.attentions[0].to_q`, ...) so that
`jaxdit.convert.sd_vae` maps a diffusers checkpoint onto it with a short renaming table; with the
default arguments it is SD-VAE's architecture (about 84M parameters).

Axes: B batch (frames folded in), T frames, H, W, C channels, N = H * W tokens.
"""

import itertools

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit.attention import attention
from jaxdit.codec.base import latent_shape, to_float

_NORM_EPS = 1e-6  # diffusers' GroupNorm epsilon in the VAE's resnets, attention and output norms
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this
# The latent scaling of SD 1.x/2.x's VAE (diffusers' `scaling_factor`): it gives the latents about unit
# variance; SD's VAE has no shift (diffusers' `shift_factor` is None).
SD_SCALE, SD_SHIFT = 0.18215, 0.0


def group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance, as torch computes it: the fast E[x^2] - E[x]^2 loses precision on large activations.
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=_NORM_EPS, use_fast_variance=False, rngs=rngs)


def conv(in_channels: int, out_channels: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1, padding="SAME"):
    return nnx.Conv(
        in_channels, out_channels, kernel_size=(kernel, kernel), strides=stride, padding=padding, rngs=rngs
    )


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D without a time embedding: (norm -> SiLU -> conv) twice, plus the input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = group_norm(in_channels, groups, rngs)
        self.conv1 = conv(in_channels, out_channels, 3, rngs)
        self.norm2 = group_norm(out_channels, groups, rngs)
        self.conv2 = conv(out_channels, out_channels, 3, rngs)
        # A 1x1 projection of the input where the width changes (diffusers' use_in_shortcut).
        self.conv_shortcut = nnx.data(conv(in_channels, out_channels, 1, rngs) if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B, H, W, C_out)
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # (B, H, W, C_out)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nnx.Module):
    """diffusers' single-head `Attention` over all H * W positions, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.group_norm = group_norm(channels, groups, rngs)
        self.to_q = nnx.Linear(channels, channels, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, rngs=rngs)
        self.to_out = nnx.Linear(channels, channels, rngs=rngs)  # diffusers' to_out.0 (to_out.1 is a dropout)

    def __call__(self, x: jax.Array) -> jax.Array:
        height = x.shape[1]
        h = einops.rearrange(self.group_norm(x), "b h w c -> b (h w) 1 c")  # (B, N, 1, C): one head
        # One head as wide as the channels, softmax(q k^T / sqrt(C)) v: too wide for cuDNN's flash kernels.
        out = attention(self.to_q(h), self.to_k(h), self.to_v(h), implementation="xla")  # (B, N, 1, C)
        out = self.to_out(einops.rearrange(out, "b (h w) 1 c -> b h w c", h=height))  # (B, H, W, C)
        return x + out


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2D: resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))  # (B, H, W, C)


class Downsample(nnx.Module):
    """Halves H and W: pad one pixel at the bottom and right only, then a stride-2 3x3 conv (diffusers' way)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, rngs, stride=2, padding="VALID")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # (B, H + 1, W + 1, C)
        return self.conv(x)  # (B, H/2, W/2, C)


class Upsample(nnx.Module):
    """Doubles H and W: nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = einops.repeat(x, "b h w c -> b (h dh) (w dw) c", dh=2, dw=2)  # (B, 2H, 2W, C)
        return self.conv(x)


class DownBlock(nnx.Module):
    """An encoder level (diffusers' DownEncoderBlock2D): `layers` resnets, then a downsampler unless it is the last."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, *, last: bool, rngs: nnx.Rngs):
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nnx.List([ResnetBlock(i, o, groups, rngs=rngs) for i, o in itertools.pairwise(widths)])
        self.downsample = nnx.data(None if last else Downsample(out_channels, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)  # (B, H, W, C_out)
        return x if self.downsample is None else self.downsample(x)  # (B, H/2, W/2, C_out)


class UpBlock(nnx.Module):
    """A decoder level (diffusers' UpDecoderBlock2D): `layers` resnets, then an upsampler unless it is the last."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, *, last: bool, rngs: nnx.Rngs):
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nnx.List([ResnetBlock(i, o, groups, rngs=rngs) for i, o in itertools.pairwise(widths)])
        self.upsample = nnx.data(None if last else Upsample(out_channels, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)  # (B, H, W, C_out)
        return x if self.upsample is None else self.upsample(x)  # (B, 2H, 2W, C_out)


class Encoder(nnx.Module):
    """image (B, H, W, in) -> moments (B, H/f, W/f, 2c): the posterior's mean and log-variance, stacked."""

    def __init__(self, in_channels, block_out_channels, layers_per_block, latent_channels, groups, *, rngs):
        levels = len(block_out_channels)
        self.conv_in = conv(in_channels, block_out_channels[0], 3, rngs)
        widths = [block_out_channels[0], *block_out_channels]
        self.down_blocks = nnx.List([
            DownBlock(widths[i], widths[i + 1], layers_per_block, groups, last=i == levels - 1, rngs=rngs)
            for i in range(levels)
        ])
        self.mid_block = MidBlock(block_out_channels[-1], groups, rngs=rngs)
        self.norm_out = group_norm(block_out_channels[-1], groups, rngs)
        self.conv_out = conv(block_out_channels[-1], 2 * latent_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)  # (B, H, W, C0)
        for block in self.down_blocks:
            h = block(h)  # ... -> (B, H/f, W/f, C_last)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))  # (B, H/f, W/f, 2c)


class Decoder(nnx.Module):
    """z (B, h, w, c) -> image (B, h*f, w*f, out); its levels run over the widths in reverse, one resnet more each."""

    def __init__(self, out_channels, block_out_channels, layers_per_block, latent_channels, groups, *, rngs):
        levels = len(block_out_channels)
        widths = list(reversed(block_out_channels))
        self.conv_in = conv(latent_channels, widths[0], 3, rngs)
        self.mid_block = MidBlock(widths[0], groups, rngs=rngs)
        widths = [widths[0], *widths]
        self.up_blocks = nnx.List([
            UpBlock(widths[i], widths[i + 1], layers_per_block + 1, groups, last=i == levels - 1, rngs=rngs)
            for i in range(levels)
        ])
        self.norm_out = group_norm(block_out_channels[0], groups, rngs)
        self.conv_out = conv(block_out_channels[0], out_channels, 3, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z))  # (B, h, w, C_last)
        for block in self.up_blocks:
            h = block(h)  # ... -> (B, H, W, C0)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))  # (B, H, W, out)


class SDVAE(nnx.Module):
    """SD-VAE as a codec (`jaxdit.codec.base`): videos (B, T, H, W, 3) <-> latents (B, T, H/f, W/f, c)."""

    kind = "sd_vae"
    clip_latents = False  # latents are unbounded

    def __init__(
        self,
        *,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        scale: float = SD_SCALE,
        shift: float = SD_SHIFT,
        rngs: nnx.Rngs,
    ):
        self.block_out_channels, self.layers_per_block = tuple(block_out_channels), layers_per_block
        self.norm_num_groups, self.in_channels, self.out_channels = norm_num_groups, in_channels, out_channels
        self.channels, self.scale, self.shift = latent_channels, scale, shift
        spatial = 2 ** (len(block_out_channels) - 1)
        self.factors = (1, spatial, spatial)  # frame by frame: no temporal compression
        arch = (block_out_channels, layers_per_block, latent_channels, norm_num_groups)
        self.encoder = Encoder(in_channels, *arch, rngs=rngs)
        self.quant_conv = conv(2 * latent_channels, 2 * latent_channels, 1, rngs)
        self.post_quant_conv = conv(latent_channels, latent_channels, 1, rngs)
        self.decoder = Decoder(out_channels, *arch, rngs=rngs)

    def spec(self) -> dict:
        return dict(
            block_out_channels=list(self.block_out_channels), layers_per_block=self.layers_per_block,
            latent_channels=self.channels, norm_num_groups=self.norm_num_groups, in_channels=self.in_channels,
            out_channels=self.out_channels, scale=self.scale, shift=self.shift,
        )

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return latent_shape(video_shape, self.factors, self.channels)

    # The 2-D model, on images: what diffusers' AutoencoderKL computes (used for parity tests).

    def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, 3) float in [-1, 1] -> the posterior's mean and clamped log-variance (B, h, w, c)."""
        moments = self.quant_conv(self.encoder(images))  # (B, h, w, 2c)
        mean, logvar = jnp.split(moments, 2, axis=-1)  # (B, h, w, c) each
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode_images(self, z: jax.Array) -> jax.Array:
        """z (B, h, w, c), unscaled -> images (B, H, W, 3) in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    # The codec interface, on videos.

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """video -> latents scale * (z - shift) (B, T, h, w, c); z the posterior mean, or a sample given `rng`."""
        self.latent_shape(video.shape)  # a shape the codec can take, or a clear error
        frames = video.shape[1]
        images = einops.rearrange(to_float(video), "b t h w c -> (b t) h w c")  # (B*T, H, W, 3)
        mean, logvar = self.encode_moments(images)  # (B*T, h, w, c) each
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return einops.rearrange(self.scale * (z - self.shift), "(b t) h w c -> b t h w c", t=frames)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (B, T, h, w, c) -> float video (B, T, H, W, 3) in about [-1, 1], not clipped."""
        frames = latents.shape[1]
        z = einops.rearrange(latents.astype(jnp.float32) / self.scale + self.shift, "b t h w c -> (b t) h w c")
        return einops.rearrange(self.decode_images(z), "(b t) h w c -> b t h w c", t=frames)  # (B, T, H, W, 3)
