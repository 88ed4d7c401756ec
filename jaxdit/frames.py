"""Frame conditioning: prompting with images and clips, as a mask of given latent frames.

A clip is generated with some of its latent frames given: the first (image-to-video), the last, both
(a clip that connects two images; the same image twice: a loop), a leading clip of k frames (continue
a video forward) or a trailing one (what came before it). Training draws one kind per clip from
`train.condition` (the rest are text only), with k = `train.condition_frames`:

- the given frames are clean in the model's input (x_t = x0 there) and left out of the loss;
- the model is told which frames are given, and what they hold, by the mask and the given latents as
  extra input channels through a zero-initialised patch embedding (`model.frame_condition`; Open-Sora
  2.0's way). The mask is per latent frame, not per token: a token of a 2-frame temporal patch that
  holds one given and one generated frame sees which is which, so any temporal patch and any codec
  work, where a per-token time in adaLN would have to call such a token given or not;
- sampling resets the given frames after every step of the scan, for every sampler.

A reference is encoded on its own (`reference_latents`), never as part of the clip it prompts: with a
causal codec a trailing frame is not the clip's causal head, and nothing of the target leaks into it.

Axes: B batch, T latent frames, H, W latent height and width, C latent channels.
"""

import math

import jax
import jax.numpy as jnp

from jaxdit.options import CONDITIONS, parse_condition  # noqa: F401 (the kinds, and how train.condition reads)


def masks(kinds: jax.Array, frames: int, clip_frames: int) -> jax.Array:
    """(B,) indices into CONDITIONS -> (B, T) bool: the given latent frames of each clip.

    A leading or trailing clip is `clip_frames` frames, at most T - 1: one frame is always generated (so
    the first and last frames of a 2-frame clip are its first only). A one-frame clip (an image) has none
    given.
    """
    index = jnp.arange(frames)  # (T,)
    k = min(clip_frames, frames - 1)
    first, last = index == 0, index == frames - 1  # (T,)
    table = jnp.stack([
        jnp.zeros(frames, bool), first, last, first | (last & (frames > 2)), index < k, index >= frames - k,
    ])  # (kinds, T)
    if frames == 1:
        table = jnp.zeros_like(table)
    return table[kinds]  # (B, T)


def draw_masks(rng: jax.Array, batch: int, frames: int, probabilities: dict[str, float], clip_frames: int):
    """Each clip's kind drawn from `probabilities` (parse_condition's) -> (kinds (B,) int32, masks (B, T) bool)."""
    p = jnp.asarray([probabilities[name] for name in CONDITIONS], jnp.float32)
    kinds = jax.random.choice(rng, len(CONDITIONS), (batch,), p=p / p.sum()).astype(jnp.int32)  # (B,)
    return kinds, masks(kinds, frames, clip_frames)


def masked_mean(x: jax.Array, keep: jax.Array) -> jax.Array:
    """x (B, T, ...) -> (B,) the mean over the frames that keep (B, T) marks (at least one per example)."""
    kept = keep.reshape(keep.shape + (1,) * (x.ndim - 2))  # (B, T, 1, ...)
    total = jnp.where(kept, x, 0.0).sum(axis=tuple(range(1, x.ndim)))  # (B,)
    per_frame = math.prod(x.shape[2:])
    return total / (jnp.maximum(keep.sum(axis=1), 1) * per_frame)  # (B,)


def keep_given(x: jax.Array, given: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, T, H, W, C) with its given frames (mask (B, T) True) replaced by `given`'s, bitwise."""
    return jnp.where(mask[:, :, None, None, None], given.astype(x.dtype), x)


def reference_latents(codec, video: jax.Array, latents: jax.Array, kinds: jax.Array, clip_frames: int) -> jax.Array:
    """The latents of each clip's given frames, each reference encoded on its own: (B, T, H, W, C).

    video (B, F, H', W', 3) pixels, latents (B, T, H, W, C) the clip's; kinds (B,) as `masks` takes.
    A codec with no temporal compression encodes every frame on its own, and a causal one keeps the
    first latent frames as the causal head of the first pixels, so leading references are the clip's
    own latents. With a causal codec that compresses time, the last frame (or the trailing clip) is
    encoded again on its own: as a reference it is the head of its own clip.
    """
    ft = codec.factors[0]
    if ft == 1 or latents.shape[1] == 1:
        return latents
    frames = latents.shape[1]
    k = min(clip_frames, frames - 1)
    tails = {1: ["last", "first_last"]}  # latent frames at the end -> the kinds that give them
    tails.setdefault(k, []).append("trail")
    references = latents
    for count, kind_names in tails.items():  # each tail encoded once, whichever kinds use it
        pixels = 1 + ft * (count - 1)  # a causal codec's pixel frames for `count` latent frames
        tail = jax.lax.stop_gradient(codec.encode(video[:, -pixels:]))  # (B, count, H, W, C)
        placed = jnp.concatenate([latents[:, : frames - count], tail], axis=1)  # (B, T, H, W, C)
        uses = jnp.isin(kinds, jnp.asarray([CONDITIONS.index(n) for n in kind_names]))  # (B,)
        references = jnp.where(uses[:, None, None, None, None], placed, references)
    return references


def pad_frames(x: jax.Array, temporal_patch: int) -> jax.Array:
    """An image's one latent frame (B, 1, H, W, C) repeated to fill a temporal patch: (B, pt, H, W, C).

    A model whose temporal patch holds pt > 1 frames sees an image as a still clip of pt identical
    frames; its prediction is cut back to the first (`cut_frames`). Other frame counts pass unchanged.
    """
    if x.shape[1] != 1 or temporal_patch == 1:
        return x
    return jnp.repeat(x, temporal_patch, axis=1)


def cut_frames(x: jax.Array, frames: int) -> jax.Array:
    """The first `frames` latent frames of (B, T, H, W, C): undoes `pad_frames`."""
    return x[:, :frames]
