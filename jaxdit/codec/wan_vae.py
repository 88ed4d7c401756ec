"""Wan 2.1's causal 3-D VAE (diffusers `AutoencoderKLWan`) in Flax NNX, as a frozen video codec.

    video (B, 1 + 4k, H, W, 3) -> Encoder -> quant_conv -> mean, log-variance (B, 1 + k, H/8, W/8, z)
    z -> post_quant_conv -> Decoder -> video (B, 1 + 4k, H, W, 3) in [-1, 1]

A pure function of the whole clip. Diffusers encodes the first frame, then chunks of four, and decodes
one latent frame at a time, carrying the last frames of every causal convolution in a cache; here
each causal convolution is padded with zeros in front of the whole clip instead, which gives the same
result (its time downsampling keeps frame 0 and then strides over the rest; its time upsampling keeps
frame 0 and doubles the rest). Channels-last (B, T, H, W, C) throughout; the module tree mirrors
diffusers' names (`encoder.down_blocks[i]`, `decoder.up_blocks[i].upsamplers[0].time_conv`, ...) so that
`jaxdit.convert.wan_vae` maps a checkpoint onto it by renaming.

- causal convolution: zeros in front in time (2 x its padding), zeros on both sides in space;
- RMS norm over channels: x / max(||x||, 1e-12) * sqrt(C) * gamma, no bias;
- attention (mid blocks only): per frame, one head over the H x W positions;
- latents: (mean - latents_mean) / latents_std per channel, as Wan's pipeline scales them.

Axes: B batch, T frames, H, W, C channels.
"""

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from jaxdit.attention import attention
from jaxdit.codec.base import latent_shape, to_float

_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this
# Wan 2.1's VAE: its size and the per-channel statistics of its latents (diffusers' defaults).
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class CausalConv3d(nnx.Conv):
    """A 3-D convolution that sees only the present and past frames: zeros in front in time, on both sides in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel=3, padding=1, *, rngs: nnx.Rngs):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size=kernel, padding=((2 * pt, 0), (ph, ph), (pw, pw)),
                         rngs=rngs)


class RMSNorm(nnx.Module):
    """x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma (torch's F.normalize, as Wan's VAE)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.gamma = nnx.Param(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))  # (..., 1)
        return x / jnp.maximum(norm, 1e-12) * (x.shape[-1] ** 0.5) * self.gamma


class ResidualBlock(nnx.Module):
    """(RMS norm -> SiLU -> causal 3x3x3 conv) twice, plus the input (through a 1x1x1 conv where the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(in_channels, rngs=rngs)
        self.conv1 = CausalConv3d(in_channels, out_channels, rngs=rngs)
        self.norm2 = RMSNorm(out_channels, rngs=rngs)
        self.conv2 = CausalConv3d(out_channels, out_channels, rngs=rngs)
        self.conv_shortcut = nnx.data(
            CausalConv3d(in_channels, out_channels, 1, 0, rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B, T, H, W, C_out)
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttentionBlock(nnx.Module):
    """Single-head self-attention over each frame's H x W positions, with a residual."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(channels, rngs=rngs)
        self.to_qkv = nnx.Conv(channels, 3 * channels, kernel_size=(1, 1), rngs=rngs)
        self.proj = nnx.Conv(channels, channels, kernel_size=(1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        frames = einops.rearrange(self.norm(x), "b t h w c -> (b t) h w c")
        q, k, v = jnp.split(einops.rearrange(self.to_qkv(frames), "n h w c -> n (h w) 1 c"), 3, axis=-1)  # (BT, HW, 1, C)
        out = einops.rearrange(attention(q, k, v, implementation="xla"), "n (h w) 1 c -> n h w c", h=h)
        return x + einops.rearrange(self.proj(out), "(b t) h w c -> b t h w c", b=b)


class Resample(nnx.Module):
    """Down- or upsampling by 2 in space, and in time for the "3d" modes.

    downsample: per frame, zeros on the right and bottom, then a 3x3 conv of stride 2; in time, frame 0
    is kept and a (3, 1, 1) conv of stride 2 runs over all frames: 1 + 2m frames -> 1 + m.
    upsample: in time, frame 0 is kept and the others go through a causal (3, 1, 1) conv to twice the
    channels, each frame becoming two: 1 + m frames -> 1 + 2m; then per frame, nearest x2 and a 3x3 conv
    to half the channels.
    """

    def __init__(self, channels: int, mode: str, *, rngs: nnx.Rngs):
        self.mode = mode
        out = channels // 2 if mode.startswith("up") else channels
        padding = "SAME" if mode.startswith("up") else "VALID"
        self.resample = nnx.Conv(channels, out, kernel_size=(3, 3), strides=1 if padding == "SAME" else 2,
                                 padding=padding, rngs=rngs)
        self.time_conv = nnx.data(None)
        if mode == "downsample3d":
            self.time_conv = nnx.Conv(channels, channels, kernel_size=(3, 1, 1), strides=(2, 1, 1), padding="VALID",
                                      rngs=rngs)
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1), (1, 0, 0), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mode == "upsample3d" and x.shape[1] > 1:
            doubled = einops.rearrange(self.time_conv(x[:, 1:]), "b t h w (two c) -> b (t two) h w c", two=2)
            x = jnp.concatenate([x[:, :1], doubled], axis=1)  # (B, 1 + 2m, H, W, C)
        b = x.shape[0]
        frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
        if self.mode.startswith("up"):
            frames = jnp.repeat(jnp.repeat(frames, 2, axis=1), 2, axis=2)  # nearest x2
        else:
            frames = jnp.pad(frames, ((0, 0), (0, 1), (0, 1), (0, 0)))  # right and bottom
        x = einops.rearrange(self.resample(frames), "(b t) h w c -> b t h w c", b=b)
        if self.mode == "downsample3d" and x.shape[1] > 1:
            x = jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)  # (B, 1 + m, H, W, C)
        return x


class MidBlock(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(channels, channels, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nnx.Module):
    def __init__(self, base: int, mult, res_blocks: int, time_down, z: int, *, rngs: nnx.Rngs):
        dims = [base * m for m in (1, *mult)]
        self.conv_in = CausalConv3d(3, dims[0], rngs=rngs)
        blocks = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(res_blocks):
                blocks.append(ResidualBlock(d_in, d_out, rngs=rngs))
                d_in = d_out
            if i != len(mult) - 1:
                blocks.append(Resample(d_out, "downsample3d" if time_down[i] else "downsample2d", rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 2 * z, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(self.mid_block(x))))  # (B, t, h, w, 2z)


class UpBlock(nnx.Module):
    def __init__(self, d_in: int, d_out: int, res_blocks: int, mode: str | None, *, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResidualBlock(d_in if j == 0 else d_out, d_out, rngs=rngs) for j in range(res_blocks + 1)]
        )
        self.upsamplers = nnx.List([Resample(d_out, mode, rngs=rngs)] if mode else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in (*self.resnets, *self.upsamplers):
            x = block(x)
        return x


class Decoder(nnx.Module):
    def __init__(self, base: int, mult, res_blocks: int, time_down, z: int, *, rngs: nnx.Rngs):
        dims = [base * mult[-1]] + [base * m for m in reversed(mult)]
        time_up = tuple(reversed(time_down))
        self.conv_in = CausalConv3d(z, dims[0], rngs=rngs)
        self.mid_block = MidBlock(dims[0], rngs=rngs)
        blocks = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            d_in = d_in // 2 if i > 0 else d_in  # the previous block's upsampling halved the channels
            mode = None if i == len(mult) - 1 else "upsample3d" if time_up[i] else "upsample2d"
            blocks.append(UpBlock(d_in, d_out, res_blocks, mode, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 3, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return jnp.clip(self.conv_out(jax.nn.silu(self.norm_out(x))), -1.0, 1.0)  # (B, T, H, W, 3)


class WanVAE(nnx.Module):
    """Wan 2.1's VAE as a frozen codec: 1 + 4k frames of H x W -> 1 + k latent frames of H/8 x W/8 x z_dim."""

    kind = "wan_vae"
    clip_latents = False

    def __init__(
        self, *, base_dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
        temperal_downsample=(False, True, True), latents_mean=WAN21_MEAN, latents_std=WAN21_STD, rngs: nnx.Rngs,
    ):
        self.base_dim, self.channels, self.dim_mult = base_dim, z_dim, tuple(dim_mult)
        self.num_res_blocks, self.temperal_downsample = num_res_blocks, tuple(temperal_downsample)
        self.latents_mean, self.latents_std = tuple(latents_mean), tuple(latents_std)
        if len(self.latents_mean) != z_dim or len(self.latents_std) != z_dim:
            raise ValueError(f"latents_mean and latents_std need {z_dim} values each (z_dim).")
        spatial = 2 ** (len(self.dim_mult) - 1)
        self.factors = (2 ** sum(self.temperal_downsample), spatial, spatial)
        arch = (base_dim, self.dim_mult, num_res_blocks, self.temperal_downsample, z_dim)
        self.encoder = Encoder(*arch, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * z_dim, 2 * z_dim, 1, 0, rngs=rngs)
        self.post_quant_conv = CausalConv3d(z_dim, z_dim, 1, 0, rngs=rngs)
        self.decoder = Decoder(*arch, rngs=rngs)

    def spec(self) -> dict:
        return dict(
            base_dim=self.base_dim, z_dim=self.channels, dim_mult=list(self.dim_mult), num_res_blocks=self.num_res_blocks,
            temperal_downsample=list(self.temperal_downsample), latents_mean=list(self.latents_mean),
            latents_std=list(self.latents_std),
        )

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return latent_shape(video_shape, self.factors, self.channels, causal=True)

    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video (B, T, H, W, 3) float in [-1, 1] -> the posterior's mean and clamped log-variance (B, t, h, w, z)."""
        mean, logvar = jnp.split(self.quant_conv(self.encoder(video)), 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode_z(self, z: jax.Array) -> jax.Array:
        """z (B, t, h, w, z), unscaled -> video (B, T, H, W, 3) in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """video -> latents (z - latents_mean) / latents_std (B, t, h, w, z); z the posterior mean, or a sample."""
        self.latent_shape(video.shape)  # a shape the codec can take, or a clear error
        mean, logvar = self.encode_moments(to_float(video))
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return (z - jnp.asarray(self.latents_mean)) / jnp.asarray(self.latents_std)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (B, t, h, w, z) -> float video (B, T, H, W, 3) in [-1, 1]."""
        z = latents.astype(jnp.float32) * jnp.asarray(self.latents_std) + jnp.asarray(self.latents_mean)
        return self.decode_z(z)
