"""VideoFolder: manifests, decoding, frame selection, crop, and skipping bad rows; fixtures are written here."""

import csv
import json
import logging
import pickle
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from jaxdit.data.video_folder import VideoFolder

SOURCE_FPS = 12
NUM_SOURCE_FRAMES = 24  # 2 s at SOURCE_FPS
RAMP_STEP = 10  # frame i of a ramp video has every pixel at i * RAMP_STEP, so the frame index can be read back
SETTINGS = dict(num_frames=4, size=16, frame_stride=2)  # needs 7 decoded frames
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)

GOOD = {  # file -> caption; all usable under SETTINGS
    "ramp.mp4": "a brightening grey square",
    "tall.mp4": "a red band between green bands",
    "halves.mp4": "red on the left, blue on the right",
    "gray.mkv": "a grey ramp in a grey pixel format",
    "odd.avi": "an odd-sized ramp",
    "square.mp4": "a square ramp",
}
BAD = {  # file -> (caption, the reason it is skipped)
    "uncaptioned.mp4": ("  ", "empty caption"),
    "truncated.mp4": ("the first half of a video", "cannot decode"),
    "zero.mp4": ("nothing at all", "zero-byte file"),
    "text.mp4": ("not a video", "cannot decode"),
    "short.mp4": ("five frames", "too short: 3 of 4 frames every 2 frame(s)"),
    "missing.mp4": ("no such file", "file not found"),
}


def write_video(path, frames, *, codec="libx264", pix_fmt="yuv420p", in_format="rgb24", options=None):
    """Encode (T, H, W, 3) or (T, H, W) uint8 frames at SOURCE_FPS with PyAV."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=SOURCE_FPS)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format=in_format)))
        container.mux(stream.encode())  # flush


def ramp(height, width, num_frames=NUM_SOURCE_FRAMES, gray=False):
    """(T, H, W, 3), or (T, H, W) if gray: frame i is flat at i * RAMP_STEP."""
    shape = (num_frames, height, width) if gray else (num_frames, height, width, 3)
    values = (np.arange(num_frames) * RAMP_STEP).astype(np.uint8)  # (T,)
    return np.broadcast_to(values.reshape(-1, *[1] * (len(shape) - 1)), shape).copy()


def frame_indices(video):
    """(T, H, W, 3) ramp clip -> the source frame index of each of its frames."""
    return [int(round(frame.mean() / RAMP_STEP)) for frame in video]


def write_manifest(path, rows):
    """rows: (path, caption) pairs, written as .csv or .jsonl with an extra column."""
    records = [{"path": str(p), "text": text, "aesthetic": 5.0} for p, text in rows]
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["aesthetic", "path", "text"])
            writer.writeheader()
            writer.writerows(records)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "ramp.mp4", ramp(48, 64))
    tall = np.zeros((NUM_SOURCE_FRAMES, 64, 40, 3), np.uint8)
    tall[:] = GREEN
    tall[:, 12:52] = RED  # the centred 40 x 40 square is all red
    write_video(root / "tall.mp4", tall)
    halves = np.zeros((8, 48, 64, 3), np.uint8)
    halves[:, :, :32], halves[:, :, 32:] = RED, BLUE
    write_video(root / "halves.mp4", halves)
    write_video(root / "gray.mkv", ramp(32, 40, gray=True), codec="ffv1", pix_fmt="gray", in_format="gray")
    write_video(root / "odd.avi", ramp(33, 47), codec="mjpeg", pix_fmt="yuvj444p")
    write_video(root / "square.mp4", ramp(40, 40))
    shutil.copy(root / "ramp.mp4", root / "uncaptioned.mp4")
    write_video(root / "whole.mp4", ramp(48, 64), options={"movflags": "faststart"})  # index first, frames after
    whole = (root / "whole.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n")
    write_video(root / "short.mp4", ramp(48, 64, num_frames=5))
    rows = [(name, caption) for name, caption in GOOD.items()] + [(n, c) for n, (c, _) in BAD.items()]
    rows[1] = (root / rows[1][0], rows[1][1])  # an absolute path
    write_manifest(root / "manifest.csv", rows)
    write_manifest(root / "manifest.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def ds(folder):
    return VideoFolder(folder / "manifest.csv", **SETTINGS)


def test_good_videos_load_as_uint8_clips_with_captions(ds):
    assert len(ds) == len(GOOD)
    for i, caption in enumerate(GOOD.values()):
        item = ds[i]
        assert item["video"].shape == (4, 16, 16, 3) and item["video"].dtype == np.uint8
        assert item["caption"] == caption


def test_bad_rows_are_skipped_with_their_reasons(ds):
    assert set(ds.skipped) == set(BAD)
    for name, (_, reason) in BAD.items():
        assert ds.skipped[name].startswith(reason), (name, ds.skipped[name])
    summary = ds.summary()
    assert summary.startswith(f"{len(GOOD)} of {len(GOOD) + len(BAD)} videos usable; skipped {len(BAD)}: ")
    assert "zero.mp4 (zero-byte file)" in summary and all(name in summary for name in BAD)


def test_each_skipped_row_is_logged_once(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxdit.data.video_folder"):
        VideoFolder(folder / "manifest.csv", **SETTINGS)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == len(BAD)
    for name, (_, reason) in BAD.items():
        assert sum(f"skipping {name} ({reason}" in m for m in messages) == 1, name


def test_centre_crop_keeps_the_centre(ds):
    # The filter reaches a little past the crop box, as resizing the whole frame then cropping would.
    tall = ds[list(GOOD).index("tall.mp4")]["video"].astype(int)  # (T, 16, 16, 3), source rows 12..52 of 64
    np.testing.assert_allclose(tall[:, 1:15], np.broadcast_to(RED, tall[:, 1:15].shape), atol=5)
    assert (tall[:, [0, 15], :, 0] > 180).all() and (tall[:, [0, 15], :, 1] < 60).all()  # mostly red, not green
    halves = ds[list(GOOD).index("halves.mp4")]["video"].astype(int)  # source columns 8..56 of 64
    np.testing.assert_allclose(halves[:, :, :7], np.broadcast_to(RED, halves[:, :, :7].shape), atol=5)
    np.testing.assert_allclose(halves[:, :, 9:], np.broadcast_to(BLUE, halves[:, :, 9:].shape), atol=5)
    assert (halves[:, :, 7, 0] > 200).all() and (halves[:, :, 8, 2] > 200).all()  # the boundary is centred


def test_grayscale_loads_as_rgb_with_equal_channels(ds):
    video = ds[list(GOOD).index("gray.mkv")]["video"]
    assert video.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(video[..., 0], video[..., 1])
    np.testing.assert_array_equal(video[..., 0], video[..., 2])
    assert frame_indices(video) == [0, 2, 4, 6]


def one_video(tmp_path, folder, name, **settings):
    return VideoFolder(write_manifest(tmp_path / "one.csv", [(folder / name, "a clip")]), **settings)


@pytest.mark.parametrize("name", ["ramp.mp4", "gray.mkv", "odd.avi"])
@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(num_frames=4), [0, 1, 2, 3]),
        (dict(num_frames=5, frame_stride=3), [0, 3, 6, 9, 12]),
        (dict(num_frames=4, fps=4), [0, 3, 6, 9]),  # every 3rd frame of 12 fps
        (dict(num_frames=4, fps=24), [0, 0, 1, 1]),  # each frame shown twice
        (dict(num_frames=3, fps=5), [0, 2, 4]),  # t = 0, 0.2, 0.4 s: frames at 0, 1/6, 1/3 s
        (dict(num_frames=4, fps=12, frame_stride=5), [0, 1, 2, 3]),  # fps wins over stride
        (dict(num_frames=8, fps=4), [0, 3, 6, 9, 12, 15, 18, 21]),  # t = 1.75 s: the last needs most of 2 s
    ],
)
def test_stride_and_fps_pick_the_right_frames(tmp_path, folder, name, settings, expected):
    ds = one_video(tmp_path, folder, name, size=8, **settings)
    assert frame_indices(ds[0]["video"]) == expected


def test_video_too_short_for_the_fps_clip_is_skipped(tmp_path, folder):
    with pytest.raises(ValueError, match=r"ramp.mp4 \(too short: 8 of 9 frames at 4 fps\)"):
        one_video(tmp_path, folder, "ramp.mp4", num_frames=9, fps=4)  # t = 2 s is past the end


def test_jsonl_manifest_gives_the_same_data_set(folder, ds):
    other = VideoFolder(folder / "manifest.jsonl", **SETTINGS)
    assert other.rows == ds.rows and other.skipped == ds.skipped
    np.testing.assert_array_equal(other[2]["video"], ds[2]["video"])


def test_two_constructions_agree_exactly(folder, ds):
    again = VideoFolder(folder / "manifest.csv", **SETTINGS)
    assert again.rows == ds.rows and again.skipped == ds.skipped
    for i in range(len(ds)):
        np.testing.assert_array_equal(again[i]["video"], ds[i]["video"])


def test_pickle_round_trip(ds):
    restored = pickle.loads(pickle.dumps(ds))
    assert restored.rows == ds.rows and restored.skipped == ds.skipped
    np.testing.assert_array_equal(restored[0]["video"], ds[0]["video"])


def test_too_few_usable_rows_is_an_error_naming_them(tmp_path, folder):
    manifest = write_manifest(tmp_path / "few.csv", [(folder / n, "c") for n in ["ramp.mp4", "zero.mp4", "text.mp4"]])
    with pytest.raises(ValueError, match=r"1 of 3 videos usable; skipped 2: .*zero.mp4 \(zero-byte file\).*"):
        VideoFolder(manifest, **SETTINGS, min_usable_fraction=0.5)
    assert len(VideoFolder(manifest, **SETTINGS)) == 1  # by default only (almost) nothing usable fails


def test_no_usable_rows_is_an_error_whatever_the_fraction(tmp_path, folder):
    manifest = write_manifest(tmp_path / "none.csv", [(folder / "zero.mp4", "c")])
    with pytest.raises(ValueError, match="0 of 1 videos usable"):
        VideoFolder(manifest, **SETTINGS, min_usable_fraction=0.0)


@pytest.mark.parametrize(
    "name, content, error, message",
    [
        ("absent.csv", None, FileNotFoundError, r"absent.csv not found"),
        ("no_text.csv", "path,caption\na.mp4,hi\n", ValueError, r"no_text.csv lacks column\(s\) \['text'\]"),
        ("no_path.jsonl", '{"text": "hi"}\n', ValueError, r"no_path.jsonl lacks column\(s\) \['path'\]"),
        ("broken.jsonl", '{"path": "a.mp4",\n', ValueError, r"line 1 of video manifest .*broken.jsonl is not JSON"),
        ("list.txt", "a.mp4\n", ValueError, r"list.txt has unknown extension '.txt': use .csv or .jsonl"),
    ],
)
def test_manifest_errors_name_the_file_and_the_fix(tmp_path, name, content, error, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(error, match=message):
        VideoFolder(tmp_path / name)


def test_file_changed_after_the_scan_is_a_runtime_error(tmp_path, folder):
    shutil.copy(folder / "ramp.mp4", tmp_path / "changing.mp4")
    ds = VideoFolder(write_manifest(tmp_path / "m.csv", [("changing.mp4", "c")]), **SETTINGS)
    (tmp_path / "changing.mp4").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"changing.mp4 .* zero-byte file"):
        ds[0]


@pytest.mark.parametrize("bad", [dict(num_frames=0), dict(frame_stride=0), dict(fps=0), dict(min_usable_fraction=2)])
def test_bad_arguments_are_rejected(folder, bad):
    with pytest.raises(ValueError):
        VideoFolder(folder / "manifest.csv", **bad)


def test_importing_the_module_does_not_import_pyav():
    code = "import sys, jaxdit.data.video_folder; assert 'av' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_buckets_take_each_row_by_its_shape_and_images_as_stills(tmp_path, folder):
    from PIL import Image

    from jaxdit.data.pipeline import plan_batches
    from tests.test_pipeline import config

    write_video(tmp_path / "wide.mp4", ramp(32, 64))
    write_video(tmp_path / "tall.mp4", ramp(64, 32))
    Image.fromarray(np.full((40, 90, 3), 200, np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(np.full((90, 40, 3), 100, np.uint8)).convert("L").save(tmp_path / "tall.jpg")  # grey: as RGB
    rows = [("wide.mp4", "wide"), ("tall.mp4", "tall"), (folder / "square.mp4", "square"), ("wide.png", "wide still"),
            ("tall.jpg", "tall still"), (folder / "short.mp4", "five frames")]
    manifest = write_manifest(tmp_path / "mixed.csv", rows)
    shapes = [(4, 16, 32), (4, 32, 16), (4, 16, 16), (1, 16, 32), (1, 32, 16)]
    ds = VideoFolder(manifest, frame_stride=2, shapes=shapes)
    expected = {"wide": (4, 16, 32), "tall": (4, 32, 16), "square": (4, 16, 16), "wide still": (1, 16, 32),
                "tall still": (1, 32, 16), "five frames": (1, 16, 32)}  # 3 frames at stride 2: its first, as an image
    assert {caption: shapes[b] for (_, _, caption), b in zip(ds.rows, ds.assignment, strict=True)} == expected
    for i in range(len(ds)):
        assert ds[i]["video"].shape == (*shapes[ds.assignment[i]], 3) and ds[i]["video"].dtype == np.uint8
    assert ds.natives[0] == (4, 32, 64) and ds.natives[3] == (1, 40, 90)  # frames counted up to the longest bucket
    np.testing.assert_array_equal(ds[4]["video"], 100)  # an image is one frame, grey as RGB

    videos_only = VideoFolder(manifest, frame_stride=2, shapes=shapes[:3])
    assert videos_only.skipped == {
        "wide.png": "one frame (an image), and no bucket of one frame: add one to data.buckets, e.g. 1x32x32",
        "tall.jpg": "one frame (an image), and no bucket of one frame: add one to data.buckets, e.g. 1x32x32",
        str(folder / "short.mp4"): "too short: 3 of 4 frames every 2 frame(s)",
    }
    buckets = "4x16x32;4x32x16;4x16x16;1x16x32;1x32x16"
    run = config(source="folder", manifest=str(manifest), frame_stride=2, buckets=buckets.split(";"),
                 bucket_batches=(1, 1, 1, 2, 1), caption_dropout=0.0)
    batches = plan_batches(run)
    assert batches.plan.report() == ("4x16x32: 1 clips, 1 batches of 1; 4x32x16: 1 clips, 1 batches of 1; 4x16x16: 1 clips, "
                                     "1 batches of 1; 1x16x32: 2 clips, 1 batches of 2; 1x32x16: 1 clips, 1 batches of 1")
    assert [batches.example(b)["video"].shape for b in range(5)] == [
        (1, 4, 16, 32, 3), (1, 4, 32, 16, 3), (1, 4, 16, 16, 3), (2, 1, 16, 32, 3), (1, 1, 32, 16, 3)]
