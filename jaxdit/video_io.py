"""Write generated videos to disk; the extension of the output path picks the format.

    .npy  the uint8 array (B, T, H, W, 3) as given, for np.load
    .png  one image: a row per video with its frames across, its prompt above; single-frame videos
          (images) in a grid instead, a row per prompt's samples or IMAGE_COLUMNS images across
    .mp4  one H.264 video in which all videos play at once: a row per prompt, its samples side by side
    .gif  the same as an animated GIF (PIL merges identical consecutive frames, keeping their time)

B = prompts * samples, the samples of a prompt adjacent. Small frames are upscaled with
nearest-neighbour so that 32-pixel videos are legible. PIL and imageio are imported where
they are used, so `import jaxdit` stays light.
"""

import pathlib
import textwrap
import warnings
from collections.abc import Sequence

import numpy as np

FORMATS = (".mp4", ".gif", ".png", ".npy")
CELL = 96  # each frame is shown at least this many pixels wide (nearest-neighbour upscaling)
TEXT_HEIGHT = 28  # room for two lines of prompt in PIL's default font
GAP = 2  # white pixels between frames and between videos
IMAGE_COLUMNS = 4  # images across a .png grid of one sample per prompt (DiT's sample.png has 4)
WHITE = 255
MP4_QUALITY = 8  # imageio's 1-10 scale; 8 is x264 crf 10 (visually lossless), 10 would be lossless 4:4:4


def check_output_path(path) -> pathlib.Path:
    """The path as a Path; ValueError unless its extension is one of FORMATS (checked before sampling)."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"the output path must end in one of {', '.join(FORMATS)}; got {path.name!r}.")
    return path


def write_videos(path, videos: np.ndarray, prompts: Sequence[str], *, fps: float = 8.0,
                 num_samples: int = 1) -> pathlib.Path:
    """Write uint8 videos (B, T, H, W, 3), one prompt per video, in the format named by the extension."""
    path = check_output_path(path)
    videos = _checked(videos, prompts, fps, num_samples)  # (B, T, H, W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with open(path, "wb") as file:  # np.save(str) would append ".npy" to ".NPY"
            np.save(file, videos)
    elif suffix == ".png" and videos.shape[1] == 1:  # images: a grid, a row per prompt or IMAGE_COLUMNS across
        _save_png(path, image_grid(videos, prompts, num_samples if num_samples > 1 else IMAGE_COLUMNS))
    elif suffix == ".png":
        _save_png(path, grid_image(videos, prompts))
    elif suffix == ".mp4":
        _save_mp4(path, tile_videos(videos, prompts, num_samples), fps)
    else:
        _save_gif(path, tile_videos(videos, prompts, num_samples), fps)
    return path


def _checked(videos, prompts: Sequence[str], fps: float, num_samples: int) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.dtype != np.uint8:
        raise ValueError(f"videos must be uint8 in [0, 255]; got dtype {videos.dtype}.")
    if videos.ndim != 5 or videos.shape[-1] != 3 or 0 in videos.shape:
        raise ValueError(f"videos must be a non-empty (B, T, H, W, 3) array; got shape {videos.shape}.")
    if len(prompts) != len(videos):
        raise ValueError(f"got {len(prompts)} prompts for {len(videos)} videos; pass one prompt per video, "
                         "repeated for the samples of a prompt.")
    if num_samples < 1 or len(videos) % num_samples:
        raise ValueError(f"num_samples={num_samples} does not divide the {len(videos)} videos.")
    for start in range(0, len(prompts), num_samples):
        if len(set(prompts[start:start + num_samples])) > 1:
            raise ValueError(f"videos {start}..{start + num_samples - 1} are samples of one prompt but have prompts "
                             f"{list(prompts[start:start + num_samples])}; the samples of a prompt must be adjacent.")
    if not fps > 0:
        raise ValueError(f"fps must be positive; got {fps}.")
    return videos


def upscale(video: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) -> (..., H*k, W*k, 3) with k the smallest factor reaching CELL pixels of width."""
    k = max(1, -(-CELL // video.shape[-2]))
    return video.repeat(k, axis=-3).repeat(k, axis=-2)


def label(width: int, text: str) -> np.ndarray:
    """Up to two lines of black text on white -> (TEXT_HEIGHT, width, 3) uint8."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, TEXT_HEIGHT), "white")
    lines = textwrap.wrap(text or "(empty)", width=max(8, width // 6), max_lines=2, placeholder=" ...")
    ImageDraw.Draw(image).multiline_text((2, 1), "\n".join(lines), fill="black", spacing=2)
    return np.asarray(image)  # (TEXT_HEIGHT, width, 3)


def _join(parts: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Concatenate along `axis` with GAP white pixels between the parts."""
    gap_shape = list(parts[0].shape)
    gap_shape[axis] = GAP
    gap = np.full(gap_shape, WHITE, np.uint8)
    return np.concatenate([piece for part in parts for piece in (gap, part)][1:], axis=axis)


def stack_images(images: Sequence[np.ndarray]) -> np.ndarray:
    """Images (h_i, w_i, 3) of any sizes -> one, each below the last, padded white on the right to the widest."""
    width = max(image.shape[1] for image in images)
    padded = [np.pad(image, ((0, 0), (0, width - image.shape[1]), (0, 0)), constant_values=WHITE) for image in images]
    return _join(padded, axis=0)


def write_labelled(path, groups: Sequence[tuple[np.ndarray, Sequence[str]]]) -> pathlib.Path:
    """One .png of videos of several shapes: each group (uint8 videos (B, T, H, W, 3), a label per video) as
    `grid_image` draws it, the groups one below the other."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(path, stack_images([grid_image(videos, labels) for videos, labels in groups]))
    return path


def grid_image(videos: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """(B, T, H, W, 3) -> (B * (TEXT_HEIGHT + h), T * (w + GAP) - GAP, 3): a row of frames per video."""
    videos = upscale(videos)  # (B, T, h, w, 3)
    rows = []
    for video, prompt in zip(videos, prompts, strict=True):
        frames = _join(list(video), axis=-2)  # (h, T * (w + GAP) - GAP, 3)
        rows += [label(frames.shape[1], prompt), frames]
    return np.concatenate(rows, axis=0)


def image_grid(videos: np.ndarray, prompts: Sequence[str], columns: int) -> np.ndarray:
    """(B, 1, H, W, 3) -> one image of `columns` labelled images per row, the last row padded white."""
    pad = -len(videos) % columns if len(videos) > columns else 0
    blank = np.full((pad, *videos.shape[1:]), WHITE, np.uint8)
    return tile_videos(np.concatenate([videos, blank]), [*prompts, *[" "] * pad], columns)[0]


def tile_videos(videos: np.ndarray, prompts: Sequence[str], num_samples: int) -> np.ndarray:
    """(P * S, T, H, W, 3) -> (T, P * (TEXT_HEIGHT + h + GAP) - GAP, S * (w + GAP) - GAP, 3).

    A row per prompt P, its S samples side by side, each with its prompt above, all playing.
    """
    videos = upscale(videos)  # (B, T, h, w, 3)
    frames, width = videos.shape[1], videos.shape[3]
    panels = [np.concatenate([np.broadcast_to(label(width, prompt), (frames, TEXT_HEIGHT, width, 3)), video], axis=1)
              for video, prompt in zip(videos, prompts, strict=True)]  # each (T, TEXT_HEIGHT + h, w, 3)
    rows = [_join(panels[i:i + num_samples], axis=-2)
            for i in range(0, len(panels), num_samples)]  # each (T, TEXT_HEIGHT + h, S * (w + GAP) - GAP, 3)
    return _join(rows, axis=-3)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> (T, H + H % 2, W + W % 2, 3), white at the bottom and right: yuv420p halves both."""
    height, width = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), constant_values=WHITE)


def _save_png(path: pathlib.Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def _save_mp4(path: pathlib.Path, frames: np.ndarray, fps: float) -> None:
    import imageio.v2 as imageio

    frames = _pad_even(frames)  # (T, H', W', 3), both even
    # macro_block_size=2: the frames are already even, so imageio must not rescale them to multiples of 16.
    with warnings.catch_warnings():
        # imageio starts ffmpeg with subprocess, which execs right after forking: JAX's fork warning does not apply.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        imageio.mimwrite(path, frames, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                         quality=MP4_QUALITY, macro_block_size=2)


def _save_gif(path: pathlib.Path, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    first, *rest = (Image.fromarray(frame) for frame in frames)
    first.save(path, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
