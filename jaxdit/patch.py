"""Spacetime patches and their positions: fixed sin-cos embeddings, or 3-D rotary angles.

Axes: B batch, T frames, H height, W width, C channels, N tokens, D width of the model.
A video (B, T, H, W, C) is cut into a grid (T', H', W') = (T/pt, H/ph, W/pw) of patches; tokens
run in (t, h, w) order with w fastest, so a one-frame grid has DiT's row-major token order.
"""

import functools

import einops
import jax
import numpy as np

Patch = tuple[int, int, int]
Grid = tuple[int, int, int]

_MAX_PERIOD = 10_000  # wavelengths of the sin-cos features run from 2*pi to 2*pi*10000 positions


def grid_shape(video_shape: tuple[int, ...], patch: Patch) -> Grid:
    """(B, T, H, W, C) -> the patch grid (T', H', W'), with an error naming any size that does not divide."""
    if len(video_shape) != 5:
        raise ValueError(f"expected a video batch (B, T, H, W, C), got shape {tuple(video_shape)}.")
    sizes = dict(zip(("frames", "height", "width"), video_shape[1:4], strict=True))
    bad = [f"{name} {size} by {p}" for (name, size), p in zip(sizes.items(), patch, strict=True) if size % p]
    if bad:
        raise ValueError(
            f"video of shape {tuple(video_shape)} does not divide into patches {'x'.join(map(str, patch))}: "
            f"{', '.join(bad)}. Crop or pad the video (or its latents) to a multiple of the patch."
        )
    return tuple(size // p for size, p in zip(video_shape[1:4], patch, strict=True))


def patchify(x: jax.Array, patch: Patch) -> jax.Array:
    """(B, T, H, W, C) -> (B, N, pt*ph*pw*C), patch features in (pt, ph, pw, C) order."""
    grid_shape(x.shape, patch)
    pt, ph, pw = patch
    return einops.rearrange(x, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(x: jax.Array, patch: Patch, grid: Grid) -> jax.Array:
    """(B, N, pt*ph*pw*C) -> (B, T, H, W, C), the inverse of `patchify` for the given grid."""
    pt, ph, pw = patch
    t, h, w = grid
    if x.ndim != 3 or x.shape[1] != t * h * w or x.shape[2] % (pt * ph * pw):
        raise ValueError(
            f"tokens of shape {tuple(x.shape)} do not fit grid {grid} with patch {patch}: "
            f"expected (B, {t * h * w}, k*{pt * ph * pw})."
        )
    return einops.rearrange(
        x, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw
    )


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(p * w_i), cos(p * w_i)] with w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / _MAX_PERIOD ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # (dim/2,)
    angles = np.einsum("m,d->md", positions.astype(np.float64), omega)  # (M, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (M, dim)


@functools.lru_cache(maxsize=32)
def sincos_3d(dim: int, grid: Grid) -> np.ndarray:
    """Fixed positions for a (T', H', W') grid -> (T'*H'*W', dim) float32, in token order.

    Space is DiT's 2-D embedding (first half of the channels from the w coordinate, second
    half from h). Time adds a 1-D embedding over all channels, shifted so frame 0 adds nothing:
    a one-frame grid gets exactly DiT's image embedding, so image checkpoints load unchanged,
    and any grid size works, so one model runs at other resolutions and durations.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}.")
    t, h, w = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")  # each (T', H', W')
    t, h, w = t.ravel(), h.ravel(), w.ravel()  # (N,)
    space = np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)  # (N, D)
    time = sincos_1d(dim, t) - sincos_1d(dim, np.zeros(1))  # (N, D), zero at frame 0
    return (space + time).astype(np.float32)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """How many of a head's head_dim / 2 rotated pairs encode t, h and w: h and w a third each
    (rounded down), t the rest (Wan's split)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3-D rotary positions need an even head width of at least 6, got {head_dim}.")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


@functools.lru_cache(maxsize=32)
def rope_3d(head_dim: int, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Rotary angles of a (T', H', W') grid -> (cos, sin), each (T'*H'*W', head_dim / 2) float32, in token order.

    Pair j of an axis with n pairs turns by position * 10000^(-j / n) (RoFormer's frequencies, per
    axis as in Wan, HunyuanVideo and Open-Sora 2.0), so attention scores depend on the offsets
    between tokens in t, h and w, not on where they are: any grid size works.
    """
    coords = np.meshgrid(*(np.arange(n) for n in grid), indexing="ij")  # 3x (T', H', W')
    angles = []
    for coord, pairs in zip(coords, rope_axes(head_dim), strict=True):
        omega = 1.0 / _MAX_PERIOD ** (np.arange(pairs, dtype=np.float64) / pairs)  # (n,)
        angles.append(np.einsum("m,d->md", coord.ravel().astype(np.float64), omega))  # (N, n)
    angles = np.concatenate(angles, axis=1)  # (N, head_dim / 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
