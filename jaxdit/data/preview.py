"""Preview a config's training clips with their captions, as a PNG grid or an animated GIF.

    python -m jaxdit.data.preview --config configs/default.py --out grid.png
    python -m jaxdit.data.preview --config configs/default.py --out clips.gif --num-clips 6

PNG: one row per clip, `--columns` frames evenly spaced over the clip, the caption above.
GIF: the clips side by side, playing, each with its caption underneath.
"""

import argparse
import pathlib

import numpy as np

from jaxdit.config import load_config
from jaxdit.data.pipeline import make_source
from jaxdit.video_io import GAP, label, upscale

_GIF_FRAME_MS = 125  # 8 frames per second


def grid_image(clips: list[dict], columns: int) -> np.ndarray:
    """Clips -> (rows * (text + cell), columns * (cell + gap), 3) uint8: a row of frames per clip."""
    rows = []
    for clip in clips:
        video = upscale(clip["video"])  # (T, h, w, 3)
        picks = np.linspace(0, len(video) - 1, min(columns, len(video))).round().astype(int)
        gapped = np.pad(video[picks], ((0, 0), (0, 0), (0, GAP), (0, 0)), constant_values=255)  # (k, h, w+gap, 3)
        frames = np.concatenate(list(gapped), axis=1)  # (h, k * (w + gap), 3)
        rows += [label(frames.shape[1], clip["caption"]), frames]
    return np.concatenate(rows, axis=0)


def gif_frames(clips: list[dict]) -> np.ndarray:
    """Clips -> (T, cell + text, clips * cell, 3) uint8: the clips side by side, playing."""
    videos = [upscale(clip["video"]) for clip in clips]
    length = min(len(v) for v in videos)
    labels = [label(v.shape[2], clip["caption"]) for v, clip in zip(videos, clips, strict=True)]
    panels = [np.concatenate([v[:length], np.broadcast_to(row, (length, *row.shape))], axis=1)
              for v, row in zip(videos, labels, strict=True)]  # each (T, h + text, w, 3)
    return np.concatenate(panels, axis=2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a configs/*.py file")
    parser.add_argument("--out", required=True, help="output path: .png (grid) or .gif (animation)")
    parser.add_argument("--num-clips", type=int, default=4)
    parser.add_argument("--start", type=int, default=0, help="index of the first clip shown")
    parser.add_argument("--columns", type=int, default=8, help="frames per row in a PNG grid")
    args = parser.parse_args(argv)

    out = pathlib.Path(args.out)
    if out.suffix.lower() not in (".png", ".gif"):
        parser.error(f"--out must end in .png or .gif, got {out.name!r}")
    source = make_source(load_config(args.config).data)
    count = min(args.num_clips, len(source) - args.start)
    if count < 1:
        parser.error(f"--start {args.start} is past the {len(source)} clips of this data set")
    clips = [source[args.start + i] for i in range(count)]

    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        Image.fromarray(grid_image(clips, args.columns)).save(out)
    else:
        first, *rest = (Image.fromarray(frame) for frame in gif_frames(clips))
        first.save(out, save_all=True, append_images=rest, duration=_GIF_FRAME_MS, loop=0)
    print(f"wrote {count} clips to {out}")
    for clip in clips:
        print(f"  {clip['caption']}")


if __name__ == "__main__":
    main()
