"""Video folders: a CSV or JSONL manifest of (path, text) rows, decoded with PyAV into uint8 clips.

The manifest has `path` and `text` columns (extra columns are ignored), as Open-Sora's CSVs; paths are
relative to the manifest's folder, or absolute. A row may be an image (.png, .jpg, .jpeg, .webp): a
one-frame clip. A clip of shape (frames, height, width) is the first `frames` frames of the video (no
random temporal crop): every `frame_stride`-th decoded frame, or, when `fps` is given, the frames
shown at times 0, 1/fps, 2/fps, ... Each frame is resized to cover height x width and centre-cropped.
Output: {"video": uint8 (T, H, W, 3), "caption": str}.

A folder serves clips of `shapes` (the run's buckets, `jaxdit.data.buckets`; by default the one shape
(num_frames, size, size)): every row is judged once, at construction, by decoding it, and goes to the
bucket its native frames, height and width fit (`bucket_for`). An empty caption, a file that does not
decode, or a clip that fits no bucket (a video too short) is skipped (logged once, named in `skipped`).
So the same rows are usable on every run and a resumed run sees the same data set. PyAV and PIL are
imported where they are used, so `import jaxdit` stays light; a VideoFolder holds only plain data and
pickles.
"""

import csv
import json
import logging
import os
import pathlib

import numpy as np

from jaxdit.data.buckets import bucket_for

log = logging.getLogger(__name__)

COLUMNS = ("path", "text")  # manifest columns we read; any others are ignored
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # rows read as one-frame clips
_MAX_FRAMES = 100_000  # read_video's limit on a whole video's frames
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


def _resize_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) -> (height, width, 3): the largest centred box of the target's aspect ratio, resized to it."""
    from PIL import Image

    h, w = frame.shape[:2]
    crop_w, crop_h = min(w, h * width / height), min(h, w * height / width)
    left, top = (w - crop_w) / 2, (h - crop_h) / 2  # sub-pixel box keeps the crop exactly centred
    box = (left, top, left + crop_w, top + crop_h)
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC, box=box))


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


def _read_image(path: str) -> np.ndarray:
    """An image file as a one-frame clip: uint8 (1, H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]  # (1, H, W, 3); grey/alpha/palette -> RGB
    except (UnidentifiedImageError, OSError) as e:
        raise UnusableVideo(f"cannot read the image: {e}") from e


def _decode(path: str, num_frames: int, frame_stride: int, fps: float | None, *, exact: bool) -> list[np.ndarray]:
    """The first `num_frames` frames of the video or image at `path` as (H, W, 3) arrays, or raise UnusableVideo;
    with `exact` False, as many as there are up to `num_frames`."""
    import av

    if not os.path.isfile(path):
        raise UnusableVideo("file not found")
    if os.path.getsize(path) == 0:
        raise UnusableVideo("zero-byte file")
    if path.lower().endswith(IMAGE_SUFFIXES):
        return list(_read_image(path))
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
            if exact and len(picked) < num_frames:
                raise UnusableVideo(f"too short: {len(picked)} of {num_frames} frames {_how(frame_stride, fps)}")
            return [frame.to_ndarray(format="rgb24") for frame in picked]  # T x (H, W, 3); grey/alpha -> RGB
    except av.FFmpegError as e:
        raise UnusableVideo(f"cannot decode: {e.strerror or e}") from e


def _how(frame_stride: int, fps: float | None) -> str:
    return f"every {frame_stride} frame(s)" if fps is None else f"at {fps} fps"


def read_clip(path: str, shape: tuple[int, int, int], frame_stride: int, fps: float | None) -> np.ndarray:
    """The clip of `shape` (frames, height, width) from the start of the video (or image) at `path`:
    uint8 (T, H, W, 3), or raise UnusableVideo."""
    num_frames, height, width = shape
    frames = _decode(path, num_frames, frame_stride, fps, exact=True)
    return np.stack([_resize_crop(frame, height, width) for frame in frames[:num_frames]])  # (T, H, W, 3)


def read_video(path: str, num_frames: int | None = None) -> np.ndarray:
    """Every frame (or the first `num_frames`) of a video, an image or a .npy clip: uint8 (T, H, W, 3), or
    raise UnusableVideo naming why."""
    if str(path).lower().endswith(".npy"):
        try:
            video = np.load(path)
        except (OSError, ValueError) as e:
            raise UnusableVideo(f"cannot read the array: {e}") from e
        video = video[0] if video.ndim == 5 and len(video) == 1 else video  # sample.py's .npy of one video
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise UnusableVideo(f"a .npy clip must be uint8 (T, H, W, 3); got {video.dtype} {video.shape}")
    else:
        video = np.stack(_decode(str(path), num_frames or _MAX_FRAMES, 1, None, exact=num_frames is not None))
    if num_frames is not None and len(video) < num_frames:
        raise UnusableVideo(f"too short: {len(video)} of {num_frames} frames")
    return video[:num_frames]


def resize_crop(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (T, height, width, 3): each frame resized to cover and centre-cropped."""
    return np.stack([_resize_crop(frame, height, width) for frame in video])


def probe(path: str, max_frames: int, frame_stride: int, fps: float | None) -> tuple[int, int, int]:
    """A video's (or image's) native (frames, height, width), its frames counted at the sampling rate up to
    `max_frames`; raises UnusableVideo for a file that does not decode."""
    frames = _decode(path, max_frames, frame_stride, fps, exact=False)
    if not frames:
        raise UnusableVideo("no frames")
    return (len(frames), *frames[0].shape[:2])


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
        shapes: list[tuple[int, int, int]] | None = None,
    ):
        if num_frames < 1 or size < 1 or frame_stride < 1 or (fps is not None and fps <= 0):
            raise ValueError(
                f"need num_frames, size, frame_stride >= 1 and fps > 0 (or None); got num_frames={num_frames}, "
                f"size={size}, frame_stride={frame_stride}, fps={fps}."
            )
        if not 0 <= min_usable_fraction <= 1:
            raise ValueError(f"min_usable_fraction must be in [0, 1], got {min_usable_fraction}.")
        self.manifest = pathlib.Path(manifest)
        self.frame_stride, self.fps = frame_stride, fps
        self.shapes = [tuple(s) for s in shapes] if shapes else [(num_frames, size, size)]
        self.num_rows = 0
        self.rows: list[tuple[str, str, str]] = []  # usable (manifest path, resolved path, caption)
        self.natives: list[tuple[int, int, int]] = []  # each usable row's (frames up to the longest bucket's, H, W)
        self.assignment: list[int] = []  # each usable row's bucket: an index into `shapes`
        self.skipped: dict[str, str] = {}  # manifest path -> reason
        longest = max(frames for frames, _, _ in self.shapes)
        for row in read_manifest(self.manifest):
            self.num_rows += 1
            name, caption = str(row["path"]), str(row["text"] or "").strip()
            path = str(self.manifest.parent / name)  # an absolute `name` replaces the folder
            try:
                if not caption:
                    raise UnusableVideo("empty caption")
                native = probe(path, longest, frame_stride, fps)
                bucket = bucket_for(native, self.shapes)
                if bucket is None:
                    raise UnusableVideo(self._misfit(native))
            except UnusableVideo as e:
                self.skipped[name] = str(e)
                log.warning("%s: skipping %s (%s)", self.manifest, name, e)
                continue
            self.rows.append((name, path, caption))
            self.natives.append(native)
            self.assignment.append(bucket)
        if not self.rows or len(self.rows) < min_usable_fraction * self.num_rows:
            raise ValueError(
                f"too few usable videos in {self.manifest}: {self.summary()}. Check that the paths are relative "
                f"to the manifest's folder (or absolute) and fix the files named, or lower min_usable_fraction "
                f"(now {min_usable_fraction}) to accept a partial data set."
            )

    def __len__(self) -> int:
        return len(self.rows)

    def _misfit(self, native: tuple[int, int, int]) -> str:
        """Why a clip of `native` shape fits no bucket (bucket_for): a still with no one-frame bucket, or a
        video shorter than every video bucket."""
        if native[0] == 1 and all(frames > 1 for frames, _, _ in self.shapes):
            return "one frame (an image), and no bucket of one frame: add one to data.buckets, e.g. 1x32x32"
        shortest = min(frames for frames, _, _ in self.shapes if frames > 1)
        return f"too short: {native[0]} of {shortest} frames {_how(self.frame_stride, self.fps)}"

    def __getitem__(self, i: int) -> dict:
        """{"video": uint8 (T, H, W, 3), "caption": str} for usable row i, in the shape of its bucket."""
        return self.clip(i, self.shapes[self.assignment[i]])

    def clip(self, i: int, shape: tuple[int, int, int]) -> dict:
        """Usable row i as a clip of `shape` (frames, height, width): {"video": uint8 (T, H, W, 3), "caption": str}."""
        name, path, caption = self.rows[i]
        try:
            video = read_clip(path, shape, self.frame_stride, self.fps)
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
