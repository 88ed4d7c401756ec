"""Wan 2.1's causal 3-D VAE (diffusers `AutoencoderKLWan`) in Flax NNX, as a frozen video codec.

    video (B, 1 + 4k, H, W, 3) -> Encoder -> quant_conv -> mean, log-variance (B, 1 + k, H/8, W/8, z)
    z -> post_quant_conv -> Decoder -> video (B, 1 + 4k, H, W, 3) in [-1, 1]

Causal in time: each causal convolution sees the frames before it through its `past`, its last 2 input
frames (zeros before the clip starts). The encoder runs on the whole clip at once. The decoder maps
(latents, past) -> (video, past), past being one pytree of arrays, so it decodes the whole clip at once
(past None) or a chunk at a time, as diffusers does with its feature cache: latent frame 0 alone (the
time upsampling keeps frame 0 as is and doubles every later frame), then `decode_chunk` latent frames at
a time under `lax.scan`, each chunk's past carried to the next. The two give the same video; the chunked
one keeps a single chunk's activations alive. Channels-last (B, T, H, W, C) throughout; the module tree
mirrors diffusers' names (`encoder.down_blocks[i]`, `decoder.up_blocks[i].upsamplers[0].time_conv`, ...)
so that `jaxdit.convert.wan_vae` maps a checkpoint onto it by renaming.

- causal convolution: its past (or zeros) in front in time, zeros on both sides in space;
- time downsampling (encoder): frame 0 kept, then a stride-2 conv over all frames; time upsampling
  (decoder): frame 0 kept, every later frame through a causal conv to two frames;
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
# Latent frames per decoded chunk after frame 0, as diffusers decodes: the decoder's activations are then
# those of 4 video frames, whatever the clip's length (0 decodes the whole clip at once).
DECODE_CHUNK = 1


def _check_decode_chunk(chunk) -> int:
    """`chunk` if it is a number of latent frames per decoded chunk (0: the whole clip), else a ValueError."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"decode_chunk={chunk!r}: latent frames decoded at a time, 1 or more (0: the whole clip at once).")
    return chunk


def _each(past, count: int) -> tuple:
    """A module's past as its parts' pasts: None (the clip starts here) for each part when it is None."""
    return (None,) * count if past is None else tuple(past)


class CausalConv3d(nnx.Conv):
    """A 3-D convolution that sees only the present and past frames: its `past` (the `context` input frames
    before this chunk, zeros before the clip starts) in front in time, zeros on both sides in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel=3, padding=1, *, rngs: nnx.Rngs):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size=kernel, padding=((0, 0), (ph, ph), (pw, pw)),
                         rngs=rngs)
        self.context = 2 * pt  # past frames in front of each output frame's own: kernel - 1

    def __call__(self, x: jax.Array, past: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x (B, T, H, W, C_in), past (B, context, H, W, C_in) or None -> (B, T, H, W, C_out) and the next past."""
        if past is None:  # the clip starts here
            past = jnp.zeros((x.shape[0], self.context, *x.shape[2:]), x.dtype)
        x = jnp.concatenate([past, x], axis=1)  # (B, context + T, H, W, C_in)
        return super().__call__(x), x[:, x.shape[1] - self.context:]


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
            nnx.Conv(in_channels, out_channels, kernel_size=(1, 1, 1), rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, past=None) -> tuple[jax.Array, tuple]:
        """x (B, T, H, W, C_in) -> (B, T, H, W, C_out), and the pasts of its two convolutions."""
        past1, past2 = _each(past, 2)
        h, past1 = self.conv1(jax.nn.silu(self.norm1(x)), past1)  # (B, T, H, W, C_out)
        h, past2 = self.conv2(jax.nn.silu(self.norm2(h)), past2)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x)), (past1, past2)


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
    channels, each frame becoming two: 1 + m frames -> 1 + 2m (a later chunk, with a past: m -> 2m); then
    per frame, nearest x2 and a 3x3 conv to half the channels.
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

    def __call__(self, x: jax.Array, past=None) -> tuple[jax.Array, jax.Array | None]:
        """x (B, T, H, W, C) -> resampled, and the time conv's past when upsampling in time (else None)."""
        if self.mode == "upsample3d":
            x, past = self.double_frames(x, past)
        b = x.shape[0]
        frames = einops.rearrange(x, "b t h w c -> (b t) h w c")
        if self.mode.startswith("up"):
            frames = jnp.repeat(jnp.repeat(frames, 2, axis=1), 2, axis=2)  # nearest x2
        else:
            frames = jnp.pad(frames, ((0, 0), (0, 1), (0, 1), (0, 0)))  # right and bottom
        x = einops.rearrange(self.resample(frames), "(b t) h w c -> b t h w c", b=b)
        if self.mode == "downsample3d" and x.shape[1] > 1:
            x = jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)  # (B, 1 + m, H, W, C)
        return x, past

    def double_frames(self, x: jax.Array, past) -> tuple[jax.Array, jax.Array]:
        """Time upsampling: each frame through the causal time conv becomes two; at the start of the clip (past
        None) frame 0 passes as it is and the conv starts after it, on zeros (frame 0 alone: on no frame yet)."""
        kept = 1 if past is None else 0
        doubled, past = self.time_conv(x[:, kept:], past)  # (B, T - kept, H, W, 2C)
        doubled = einops.rearrange(doubled, "b t h w (two c) -> b (t two) h w c", two=2)
        return jnp.concatenate([x[:, :kept], doubled], axis=1), past  # (B, kept + 2 (T - kept), H, W, C)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(channels, channels, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, rngs=rngs)])

    def __call__(self, x: jax.Array, past=None) -> tuple[jax.Array, tuple]:
        past0, past1 = _each(past, 2)
        x, past0 = self.resnets[0](x, past0)
        x, past1 = self.resnets[1](self.attentions[0](x), past1)
        return x, (past0, past1)


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
        """video (B, T, H, W, 3), the whole clip -> (B, t, h, w, 2z)."""
        x, _ = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x, _ = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))[0]  # (B, t, h, w, 2z)


class UpBlock(nnx.Module):
    def __init__(self, d_in: int, d_out: int, res_blocks: int, mode: str | None, *, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResidualBlock(d_in if j == 0 else d_out, d_out, rngs=rngs) for j in range(res_blocks + 1)]
        )
        self.upsamplers = nnx.List([Resample(d_out, mode, rngs=rngs)] if mode else [])

    def __call__(self, x: jax.Array, past=None) -> tuple[jax.Array, tuple]:
        blocks = (*self.resnets, *self.upsamplers)
        pasts = []
        for block, block_past in zip(blocks, _each(past, len(blocks)), strict=True):
            x, block_past = block(x, block_past)
            pasts.append(block_past)
        return x, tuple(pasts)


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

    def __call__(self, z: jax.Array, past=None) -> tuple[jax.Array, tuple]:
        """z (B, t, h, w, z) and the past of the chunks before (None: z starts the clip) -> video in [-1, 1]
        (B, 1 + 4(t - 1), H, W, 3) at the start of the clip, else (B, 4t, H, W, 3); and the next past."""
        past_in, past_mid, past_up, past_out = _each(past, 4)
        x, past_in = self.conv_in(z, past_in)  # (B, t, h, w, D)
        x, past_mid = self.mid_block(x, past_mid)
        past_up = list(_each(past_up, len(self.up_blocks)))
        for i, block in enumerate(self.up_blocks):
            x, past_up[i] = block(x, past_up[i])
        x, past_out = self.conv_out(jax.nn.silu(self.norm_out(x)), past_out)
        return jnp.clip(x, -1.0, 1.0), (past_in, past_mid, tuple(past_up), past_out)  # (B, T, H, W, 3)


class WanVAE(nnx.Module):
    """Wan 2.1's VAE as a frozen codec: 1 + 4k frames of H x W -> 1 + k latent frames of H/8 x W/8 x z_dim.

    `decode_chunk`: latent frames decoded at a time after frame 0 (0: the whole clip at once); it bounds the
    decoder's activations, never changes the video.
    """

    kind = "wan_vae"
    clip_latents = False

    def __init__(
        self, *, base_dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
        temperal_downsample=(False, True, True), latents_mean=WAN21_MEAN, latents_std=WAN21_STD,
        decode_chunk: int = DECODE_CHUNK, rngs: nnx.Rngs,
    ):
        self.decode_chunk = _check_decode_chunk(decode_chunk)
        self.base_dim, self.channels, self.dim_mult = base_dim, z_dim, tuple(dim_mult)
        self.num_res_blocks, self.temperal_downsample = num_res_blocks, tuple(temperal_downsample)
        self.latents_mean, self.latents_std = tuple(latents_mean), tuple(latents_std)
        if len(self.latents_mean) != z_dim or len(self.latents_std) != z_dim:
            raise ValueError(f"latents_mean and latents_std need {z_dim} values each (z_dim).")
        spatial = 2 ** (len(self.dim_mult) - 1)
        self.factors = (2 ** sum(self.temperal_downsample), spatial, spatial)
        arch = (base_dim, self.dim_mult, num_res_blocks, self.temperal_downsample, z_dim)
        self.encoder = Encoder(*arch, rngs=rngs)
        self.quant_conv = nnx.Conv(2 * z_dim, 2 * z_dim, kernel_size=(1, 1, 1), rngs=rngs)
        self.post_quant_conv = nnx.Conv(z_dim, z_dim, kernel_size=(1, 1, 1), rngs=rngs)
        self.decoder = Decoder(*arch, rngs=rngs)

    def spec(self) -> dict:
        return dict(
            base_dim=self.base_dim, z_dim=self.channels, dim_mult=list(self.dim_mult), num_res_blocks=self.num_res_blocks,
            temperal_downsample=list(self.temperal_downsample), latents_mean=list(self.latents_mean),
            latents_std=list(self.latents_std), decode_chunk=self.decode_chunk,
        )

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        return latent_shape(video_shape, self.factors, self.channels, causal=True)

    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video (B, T, H, W, 3) float in [-1, 1] -> the posterior's mean and clamped log-variance (B, t, h, w, z)."""
        mean, logvar = jnp.split(self.quant_conv(self.encoder(video)), 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode_z(self, z: jax.Array, *, chunk: int | None = None) -> jax.Array:
        """z (B, t, h, w, z), unscaled -> video (B, T, H, W, 3) in [-1, 1], decoded `chunk` latent frames at a
        time after frame 0 (default decode_chunk; 0: the whole clip at once)."""
        chunk = self.decode_chunk if chunk is None else _check_decode_chunk(chunk)
        x = self.post_quant_conv(z)  # (B, t, h, w, z)
        if chunk == 0 or x.shape[1] == 1:
            return self.decoder(x)[0]
        return self.decode_chunks(x, chunk)

    def decode_chunks(self, x: jax.Array, chunk: int) -> jax.Array:
        """post_quant_conv's output (B, t, h, w, z) -> video (B, 1 + ft (t - 1), H, W, 3): frame 0 alone, then
        `chunk` latent frames per step of a scan that carries the decoder's past. Zero latent frames pad the
        last chunk; the decoder being causal, they change no frame before theirs, and their frames are cut."""
        head, past = self.decoder(x[:, :1])  # (B, 1, H, W, 3)
        rest = x[:, 1:]
        pad = -rest.shape[1] % chunk
        rest = jnp.pad(rest, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))  # (B, n * chunk, h, w, z)
        chunks = einops.rearrange(rest, "b (n k) h w c -> n b k h w c", k=chunk)

        def step(past, z_chunk):
            video, past = self.decoder(z_chunk, past)  # (B, ft * chunk, H, W, 3)
            return past, video

        _, videos = jax.lax.scan(step, past, chunks)  # (n, B, ft * chunk, H, W, 3)
        tail = einops.rearrange(videos, "n b t h w c -> b (n t) h w c")[:, : self.factors[0] * (x.shape[1] - 1)]
        return jnp.concatenate([head, tail], axis=1)  # (B, 1 + ft (t - 1), H, W, 3)

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
