"""video_io: each output format read back with an independent reader (np.load, PyAV, PIL)."""

import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image, ImageSequence

from jaxdit.video_io import CELL, FORMATS, GAP, TEXT_HEIGHT, check_output_path, write_videos

NUM_PROMPTS, NUM_SAMPLES, NUM_FRAMES, SIZE = 2, 2, 5, 16
SCALE = CELL // SIZE  # the nearest-neighbour factor that 16-pixel frames are shown at (6)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # one flat colour per video
PROMPTS = ["a red and a green square", "a red and a green square", "a blue and a yellow square",
           "a blue and a yellow square"]  # one per video, the samples of a prompt adjacent
FPS = 10.0


@pytest.fixture(scope="module")
def videos():
    """(4, T, 16, 16, 3): video b is flat COLOURS[b] with a black column at x = t in frame t, so frames differ."""
    out = np.empty((len(COLOURS), NUM_FRAMES, SIZE, SIZE, 3), np.uint8)
    out[:] = np.array(COLOURS, np.uint8)[:, None, None, None]  # (B, T, H, W, 3)
    for t in range(NUM_FRAMES):
        out[:, t, :, t] = 0
    return out


def tile_origin(b: int) -> tuple[int, int]:
    """Top-left pixel of video b's frame in an .mp4/.gif frame: a row per prompt, each video under its label."""
    row, column = divmod(b, NUM_SAMPLES)
    return row * (TEXT_HEIGHT + CELL + GAP) + TEXT_HEIGHT, column * (CELL + GAP)


TILE_SHAPE = (NUM_PROMPTS * (TEXT_HEIGHT + CELL + GAP) - GAP, NUM_SAMPLES * (CELL + GAP) - GAP, 3)  # (250, 194, 3)


def test_npy_round_trips_exactly(tmp_path, videos):
    path = write_videos(tmp_path / "new" / "dir" / "samples.npy", videos, PROMPTS, num_samples=NUM_SAMPLES)

    assert path == tmp_path / "new" / "dir" / "samples.npy"
    loaded = np.load(path)
    assert loaded.dtype == np.uint8 and loaded.shape == videos.shape
    np.testing.assert_array_equal(loaded, videos)


def test_npy_with_an_upper_case_extension_is_written_at_that_path(tmp_path, videos):
    path = write_videos(tmp_path / "samples.NPY", videos, PROMPTS)

    np.testing.assert_array_equal(np.load(path), videos)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.NPY"]


def test_mp4_plays_all_videos_at_once_in_a_grid(tmp_path, videos):
    path = write_videos(tmp_path / "samples.mp4", videos, PROMPTS, fps=FPS, num_samples=NUM_SAMPLES)

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert stream.average_rate == FPS
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
    assert frames.shape == (NUM_FRAMES, *TILE_SHAPE)
    for b, colour in enumerate(COLOURS):
        y, x = tile_origin(b)
        panel = frames[:, y:y + CELL, x:x + CELL].astype(int)  # (T, 96, 96, 3)
        np.testing.assert_allclose(np.median(panel, axis=(0, 1, 2)), colour, atol=8)  # e.g. the red video is red
        for t in range(NUM_FRAMES):  # the black column is where frame t put it: the frames play in order
            assert panel[t, CELL // 2, t * SCALE + SCALE // 2].max() < 40


def test_mp4_of_odd_sized_frames_is_padded_to_even_not_rescaled(tmp_path):
    video = np.full((1, 3, 33, 97, 3), 200, np.uint8)  # 97 wide: no upscaling, and odd both ways with the label

    path = write_videos(tmp_path / "odd.mp4", video, ["odd"])

    with av.open(str(path)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert frames.shape == (3, TEXT_HEIGHT + 33 + 1, 97 + 1, 3)
    np.testing.assert_allclose(np.median(frames[:, TEXT_HEIGHT:TEXT_HEIGHT + 33, :97], axis=(0, 1, 2)), 200, atol=4)


def test_gif_has_every_frame_in_a_grid_and_loops(tmp_path, videos):
    path = write_videos(tmp_path / "samples.gif", videos, PROMPTS, fps=FPS, num_samples=NUM_SAMPLES)

    with Image.open(path) as gif:
        assert gif.n_frames == NUM_FRAMES
        assert (gif.info["duration"], gif.info["loop"]) == (1000 / FPS, 0)
        frames = np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])
    assert frames.shape == (NUM_FRAMES, *TILE_SHAPE)
    for b in range(len(COLOURS)):
        y, x = tile_origin(b)
        expected = videos[b].repeat(SCALE, axis=1).repeat(SCALE, axis=2)  # (T, 96, 96, 3)
        np.testing.assert_array_equal(frames[:, y:y + CELL, x:x + CELL], expected)
        assert frames[0, y - TEXT_HEIGHT:y, x:x + CELL].min() < 128  # the prompt is written above


def test_png_is_a_row_of_frames_per_sample_with_its_prompt_above(tmp_path, videos):
    path = write_videos(tmp_path / "grid.png", videos, PROMPTS, num_samples=NUM_SAMPLES)

    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (len(videos) * (TEXT_HEIGHT + CELL), NUM_FRAMES * (CELL + GAP) - GAP, 3)
    for b in range(len(videos)):
        top = b * (TEXT_HEIGHT + CELL)
        assert grid[top:top + TEXT_HEIGHT].min() < 128  # the prompt
        for t in range(NUM_FRAMES):
            expected = videos[b, t].repeat(SCALE, axis=0).repeat(SCALE, axis=1)  # (96, 96, 3)
            left = t * (CELL + GAP)
            np.testing.assert_array_equal(grid[top + TEXT_HEIGHT:top + TEXT_HEIGHT + CELL, left:left + CELL], expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(videos=lambda v: v.astype(np.float32)), "uint8.*float32"),
        (dict(videos=lambda v: v[0]), r"\(B, T, H, W, 3\).*\(5, 16, 16, 3\)"),
        (dict(videos=lambda v: np.concatenate([v, v[..., :1]], axis=-1)), r"\(B, T, H, W, 3\).*16, 4\)"),
        (dict(videos=lambda v: v[:, :0]), r"non-empty"),
        (dict(prompts=PROMPTS[:3]), "3 prompts for 4 videos"),
        (dict(num_samples=3), "num_samples=3 does not divide the 4 videos"),
        (dict(prompts=PROMPTS[::2] * 2), "samples of a prompt must be adjacent"),
        (dict(fps=0.0), "fps must be positive"),
        (dict(name="samples.avi"), r"one of \.mp4, \.gif, \.png, \.npy; got 'samples\.avi'"),
        (dict(name="samples"), r"one of \.mp4, \.gif, \.png, \.npy; got 'samples'"),
    ],
)
def test_bad_inputs_raise_a_value_error_naming_the_problem_and_write_nothing(tmp_path, videos, change, message):
    args = dict(videos=videos, prompts=PROMPTS, num_samples=NUM_SAMPLES, fps=FPS, name="samples.gif")
    args.update(change)
    if callable(args["videos"]):
        args["videos"] = args["videos"](videos)

    with pytest.raises(ValueError, match=message):
        write_videos(tmp_path / "out" / args.pop("name"), args.pop("videos"), args.pop("prompts"), **args)
    assert not (tmp_path / "out").exists()


def test_check_output_path_accepts_the_formats_in_any_case():
    for suffix in FORMATS:
        assert check_output_path(f"dir/samples{suffix.upper()}").suffix == suffix.upper()
    with pytest.raises(ValueError, match=r"\.mp4, \.gif, \.png, \.npy"):
        check_output_path("samples.webm")


def test_importing_video_io_does_not_import_the_image_libraries():
    code = "import sys, jaxdit.video_io; print(sorted({'PIL', 'imageio', 'av'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
