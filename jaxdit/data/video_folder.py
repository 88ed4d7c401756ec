"""Video folders: a CSV or JSONL manifest of (path, text) rows, decoded with PyAV into uint8 clips.

The manifest has `path` and `text` columns (extra columns are ignored), as Open-Sora's CSVs; paths are
relative to the manifest's folder, or absolute. A clip is `num_frames` frames from the start of the
video (no random temporal crop): every `frame_stride`-th decoded frame, or, when `fps` is given, the
frames shown at times 0, 1/fps, 2/fps, ... Each frame is resized so its short side is `size` and
centre-cropped to `size x size`. Output: {"video": uint8 (T, H, W, 3), "caption": str}.

Every row is judged once, at construction, by decoding its clip: an empty caption, a file that does
not decode, or a video too short for the clip is skipped (logged once, named in `skipped`). So the same
rows are usable on every run and a resumed run sees the same data set. PyAV and PIL are imported where
they are used, so `import jaxdit` stays light; a VideoFolder holds only plain data and pickles.
"""

import csv
import json
import logging
import os
import pathlib

import numpy as np

log = logging.getLogger(__name__)

COLUMNS = ("path", "text")  # manifest columns we read; any others are ignored
_TIME_TOLERANCE_S = 1e-3  # container timestamps are often rounded to milliseconds (Matroska)
_SUMMARY_MAX_NAMED = 10  # summary() names this many skipped files, then counts the rest


class UnusableVideo(Exception):
    """A row that cannot give a clip; the message is the reason, e.g. 'zero-byte file'."""


def read_manifest(manifest: pathlib.Path) -> list[dict]:
    """Rows of a .csv or .jsonl manifest as dicts with (at least) `path` and `text`."""
    if not manifest.is_file():
        raise FileNotFoundError(
            f"video manifest {manifest} not found: pass the path of a .csv or .jsonl file with {COLUMNS} columns."
        )
    suffix = manifest.suffix.lower()
    with open(manifest, encoding="utf-8", newline="") as f:
        if suffix == ".csv":
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            rows = list(reader)
        elif suffix == ".jsonl":
            rows = [_json_row(manifest, number, line) for number, line in enumerate(f, 1) if line.strip()]
            missing = sorted({c for row in rows for c in COLUMNS if not (isinstance(row, dict) and c in row)})
        else:
            raise ValueError(f"video manifest {manifest} has unknown extension {suffix!r}: use .csv or .jsonl.")
    if missing:
        raise ValueError(
            f"video manifest {manifest} lacks column(s) {missing}: every row needs `path` (relative to the "
            f"manifest's folder, or absolute) and `text` (the caption)."
        )
    return rows


def _json_row(manifest: pathlib.Path, number: int, line: str):
    """One JSONL line, or an error naming the file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {number} of video manifest {manifest} is not JSON ({e}): one object a line.") from e


def _resize_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3): the centred square of side min(H, W), resized to `size`."""
    from PIL import Image

    h, w = frame.shape[:2]
    side = min(h, w)
    left, top = (w - side) / 2, (h - side) / 2  # sub-pixel box keeps the crop exactly centred
    box = (left, top, left + side, top + side)
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.BICUBIC, box=box))


def _pick_by_stride(frames, num_frames: int, stride: int) -> list:
    """Decoded frames 0, stride, 2*stride, ...; stops decoding once `num_frames` are picked."""
    picked = []
    for i, frame in enumerate(frames):
        if i % stride == 0:
            picked.append(frame)
            if len(picked) == num_frames:
                break
    return picked


def _pick_by_time(frames, num_frames: int, fps: float, period: float) -> list:
    """The frames on screen at times 0, 1/fps, 2/fps, ... (from the first frame's timestamp).

    A frame is on screen from its timestamp until the next frame's; the last one for `period`
    (one source frame). A target past the end of the video gets no frame.
    """
    targets = np.arange(num_frames) / fps  # (T,) seconds
    picked, shown, start, last_time = [], None, None, 0.0
    for frame in frames:
        if frame.time is None:
            raise UnusableVideo("frames have no timestamps (use frame_stride instead of fps)")
        start = frame.time if start is None else start
        last_time = frame.time - start
        while len(picked) < num_frames and last_time > targets[len(picked)] + _TIME_TOLERANCE_S:
            picked.append(shown)  # this frame comes after the target: the previous one was on screen
        if len(picked) == num_frames:
            return picked
        shown = frame
    end = last_time + period  # the last frame stays on screen for one source frame
    while shown is not None and len(picked) < num_frames and targets[len(picked)] < end - _TIME_TOLERANCE_S:
        picked.append(shown)
    return picked


def read_clip(path: str, num_frames: int, size: int, frame_stride: int, fps: float | None) -> np.ndarray:
    """Decode a clip from the start of the video at `path`: uint8 (T, size, size, 3), or raise UnusableVideo."""
    import av

    if not os.path.isfile(path):
        raise UnusableVideo("file not found")
    if os.path.getsize(path) == 0:
        raise UnusableVideo("zero-byte file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise UnusableVideo("no video stream")
            stream = container.streams.video[0]
            frames = container.decode(stream)
            if fps is None:
                picked = _pick_by_stride(frames, num_frames, frame_stride)
            else:
                rate = stream.average_rate or stream.guessed_rate
                picked = _pick_by_time(frames, num_frames, fps, period=1 / float(rate) if rate else 0.0)
            if len(picked) < num_frames:
                how = f"every {frame_stride} frame(s)" if fps is None else f"at {fps} fps"
                raise UnusableVideo(f"too short: {len(picked)} of {num_frames} frames {how}")
            rgb = [frame.to_ndarray(format="rgb24") for frame in picked]  # T x (H, W, 3); grey/alpha -> RGB
    except av.FFmpegError as e:
        raise UnusableVideo(f"cannot decode: {e.strerror or e}") from e
    return np.stack([_resize_crop(frame, size) for frame in rgb])  # (T, size, size, 3)


class VideoFolder:
    """Random-access video-caption data set over a manifest; only rows that decode are kept."""

    def __init__(
        self,
        manifest: str | os.PathLike,
        *,
        num_frames: int = 16,
        size: int = 32,
        frame_stride: int = 1,
        fps: float | None = None,
        min_usable_fraction: float = 0.1,
    ):
        if num_frames < 1 or size < 1 or frame_stride < 1 or (fps is not None and fps <= 0):
            raise ValueError(
                f"need num_frames, size, frame_stride >= 1 and fps > 0 (or None); got num_frames={num_frames}, "
                f"size={size}, frame_stride={frame_stride}, fps={fps}."
            )
        if not 0 <= min_usable_fraction <= 1:
            raise ValueError(f"min_usable_fraction must be in [0, 1], got {min_usable_fraction}.")
        self.manifest = pathlib.Path(manifest)
        self.num_frames, self.size, self.frame_stride, self.fps = num_frames, size, frame_stride, fps
        self.num_rows = 0
        self.rows: list[tuple[str, str, str]] = []  # usable (manifest path, resolved path, caption)
        self.skipped: dict[str, str] = {}  # manifest path -> reason
        for row in read_manifest(self.manifest):
            self.num_rows += 1
            name, caption = str(row["path"]), str(row["text"] or "").strip()
            path = str(self.manifest.parent / name)  # an absolute `name` replaces the folder
            try:
                if not caption:
                    raise UnusableVideo("empty caption")
                read_clip(path, num_frames, size, frame_stride, fps)
            except UnusableVideo as e:
                self.skipped[name] = str(e)
                log.warning("%s: skipping %s (%s)", self.manifest, name, e)
                continue
            self.rows.append((name, path, caption))
        if not self.rows or len(self.rows) < min_usable_fraction * self.num_rows:
            raise ValueError(
                f"too few usable videos in {self.manifest}: {self.summary()}. Check that the paths are relative "
                f"to the manifest's folder (or absolute) and fix the files named, or lower min_usable_fraction "
                f"(now {min_usable_fraction}) to accept a partial data set."
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        """{"video": uint8 (T, size, size, 3), "caption": str} for usable row i."""
        name, path, caption = self.rows[i]
        try:
            video = read_clip(path, self.num_frames, self.size, self.frame_stride, self.fps)
        except UnusableVideo as e:  # it decoded at construction, so the file changed on disk
            raise RuntimeError(f"{path} from {self.manifest} decoded when scanned but not now: {e}.") from e
        return {"video": video, "caption": caption}

    def summary(self) -> str:
        """'12 of 15 videos usable; skipped 3: a.mp4 (zero-byte file), ...'."""
        text = f"{len(self.rows)} of {self.num_rows} videos usable"
        if not self.skipped:
            return text
        named = [f"{name} ({reason})" for name, reason in list(self.skipped.items())[:_SUMMARY_MAX_NAMED]]
        more = len(self.skipped) - len(named)
        skipped = self.num_rows - len(self.rows)  # can exceed len(self.skipped) if a path is listed twice
        return f"{text}; skipped {skipped}: {', '.join(named)}" + (f", and {more} more" if more else "")
