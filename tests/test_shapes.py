"""The moving-shapes data set: every caption is checked against the pixels it describes."""

import pickle
import re

import numpy as np
import pytest

from jaxdit.data.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    MovingObject,
    ShapesDataset,
    caption_of,
    coverage,
    sample_objects,
)

# The caption grammar and colours exactly as DESIGN.md ("Moving-shapes captions") states them.
_OBJECT = (
    r"a (small|large) (red|green|blue|yellow|cyan|magenta|white|orange) (circle|square|triangle)"
    r" moving (left|right|up|down)"
)
DESIGN_COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255), "orange": (255, 128, 0),
}
CAPTION = re.compile(rf"{_OBJECT}(?: and {_OBJECT})*")
STILL = re.compile(r"a (small|large) (red|green|blue|yellow|cyan|magenta|white|orange) (circle|square|triangle)")
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}  # area of the shape / area of its box
PURE = {rgb: name for name, rgb in COLOURS.items()}
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy): image rows grow downwards


def parse(caption: str) -> list[tuple[str, str, str, str]]:
    """The caption's objects as (size, colour, shape, direction), or a failed assertion if off-grammar."""
    assert CAPTION.fullmatch(caption), caption
    return [tuple(m.groups()) for m in re.finditer(_OBJECT, caption)]


def pure_colours(video: np.ndarray) -> set[str]:
    """Names of the pure colours some pixel of the video has exactly."""
    pixels = np.unique(video.reshape(-1, 3), axis=0)
    return {PURE[tuple(int(c) for c in p)] for p in pixels if tuple(int(c) for c in p) in PURE}


def measure(video: np.ndarray) -> dict:
    """Per-frame area, centroid (x, y), extent, fill ratio and vertical skew of a lone object over black."""
    alpha = video.max(-1) / 255.0  # (T, H, W): every pure colour has a 255 channel, black is 0
    area = alpha.sum((1, 2))  # (T,)
    ys, xs = np.arange(video.shape[1])[None, :, None], np.arange(video.shape[2])[None, None, :]
    cx, cy = (alpha * xs).sum((1, 2)) / area, (alpha * ys).sum((1, 2)) / area  # (T,) each
    dy = ys - cy[:, None, None]
    skew = (alpha * dy**3).sum((1, 2)) / area / ((alpha * dy**2).sum((1, 2)) / area) ** 1.5  # (T,)
    width, height = alpha.sum(2).max(1), alpha.sum(1).max(1)  # (T,): widest row, tallest column
    return {"alpha": alpha, "area": area, "cx": cx, "cy": cy, "skew": skew,
            "extent": np.maximum(width, height), "fill": area / (width * height)}


def classify(m: dict) -> str:
    """The shape from its pixels: a triangle's mass sits low (skewed); a square fills its box, a circle pi/4 of it."""
    if np.median(m["skew"]) < -0.3:
        return "triangle"
    return "square" if np.median(m["fill"]) > 0.9 else "circle"


def _near(mask: np.ndarray, others: np.ndarray, margin: int = 2) -> bool:
    """Whether any pixel of `others` (H, W) lies within `margin` pixels of the bounding box of `mask` (H, W)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return True
    box = others[max(ys.min() - margin, 0) : ys.max() + margin + 1, max(xs.min() - margin, 0) : xs.max() + margin + 1]
    return bool(box.any())


@pytest.fixture(scope="module")
def single_clips():
    """(size, index, item) for 200 one-object clips at 32 px and 40 at 64 px."""
    clips = [(32, i, ShapesDataset(num_frames=8, size=32, seed=3)[i]) for i in range(200)]
    return clips + [(64, i, ShapesDataset(num_frames=16, size=64, seed=4)[i]) for i in range(40)]


def test_vocabulary_is_the_design_grammar():
    assert COLOURS == DESIGN_COLOURS
    assert set(SIZES) == {"small", "large"} and set(SHAPES) == {"circle", "square", "triangle"}
    assert set(DIRECTIONS) == set(STEP)


def test_single_object_captions_match_pixels(single_clips):
    seen, extents = set(), {"small": [], "large": []}
    for size, i, item in single_clips:
        video = item["video"]
        ((size_name, colour, shape, direction),) = parse(item["caption"])
        seen.update([size_name, colour, shape, direction])
        where = f"clip {i} at {size}px, {item['caption']!r}"
        m = measure(video)

        # Colour: the interior is exactly the named RGB, no other pure colour appears, and every
        # pixel is that colour blended with black (so the background is black).
        assert pure_colours(video) == {colour}, where
        rgb = np.array(COLOURS[colour])
        assert np.abs(video - m["alpha"][..., None] * rgb).max() <= 1.0, where
        assert (video == rgb).all(-1).sum() >= 0.3 * m["area"].sum(), where

        # Size and shape: the area is the shape's area at its size class on every frame, so the
        # object is never clipped by the frame's edge.
        side = SIZES[size_name] * size
        np.testing.assert_allclose(m["area"], FILL[shape] * side**2, rtol=0.1, err_msg=where)
        assert (m["extent"].max() < size / 4) == (size_name == "small"), where
        extents[size_name].append(m["extent"].max() / size)
        assert classify(m) == shape, where

        # Motion: linear, along the caption's direction, by at least a third of the frame.
        (ux, uy), (along, across) = STEP[direction], (m["cx"], m["cy"])
        if ux == 0:
            along, across = m["cy"], m["cx"]
        travel = (along[-1] - along[0]) * (ux + uy)
        assert travel >= size / 3 - 1, where
        assert np.abs(across - across[0]).max() < 0.5, where
        linear = np.linspace(along[0], along[-1], len(along))
        assert np.abs(along - linear).max() < 0.5, where
    assert seen == set(SIZES) | set(COLOURS) | set(SHAPES) | set(DIRECTIONS)
    assert 1.5 * max(extents["small"]) < min(extents["large"])  # the two size classes are far apart


@pytest.mark.parametrize("shape", [(8, 32, 64), (6, 64, 32), (1, 32, 48)])
def test_any_frame_size_and_stills_match_their_captions(shape):
    frames, height, width = shape
    ds = ShapesDataset(seed=9)
    for i in range(60):
        item = ds.clip(i, shape)
        video, where = item["video"], f"clip {i} as {shape}, {item['caption']!r}"
        assert video.shape == (*shape, 3) and video.dtype == np.uint8
        if frames == 1:  # a still: no motion clause
            size_name, colour, shape_name = STILL.fullmatch(item["caption"]).groups()
        else:
            ((size_name, colour, shape_name, direction),) = parse(item["caption"])
        m = measure(video)
        assert pure_colours(video) == {colour}, where
        side = SIZES[size_name] * min(height, width)  # sizes are fractions of the short side
        np.testing.assert_allclose(m["area"], FILL[shape_name] * side**2, rtol=0.1, err_msg=where)  # never clipped
        assert classify(m) == shape_name, where
        if frames > 1:  # at least a third of the frame's extent along the motion, linearly
            (ux, uy), (along, across) = STEP[direction], (m["cx"], m["cy"])
            extent = width if ux else height
            if ux == 0:
                along, across = m["cy"], m["cx"]
            assert (along[-1] - along[0]) * (ux + uy) >= extent / 3 - 1, where
            assert np.abs(across - across[0]).max() < 0.5, where
    assert ds[3]["caption"] == ds.clip(3, (16, 32, 32))["caption"]  # ds[i] is clip i at the data set's shape
    np.testing.assert_array_equal(ShapesDataset(num_frames=2, height=16, width=32, seed=9)[4]["video"],
                                  ds.clip(4, (2, 16, 32))["video"])


def _whole_frame_coverage(obj: MovingObject, frames: int, height: int, width: int) -> np.ndarray:
    """The coverage the shapes' definition gives, sampled over the whole frame: (T, H, W) sixteenths."""
    side = SIZES[obj.size] * min(height, width)
    fraction = np.linspace(0.0, 1.0, frames)[:, None, None]
    x0 = obj.start[0] + fraction * (obj.end[0] - obj.start[0])
    y0 = obj.start[1] + fraction * (obj.end[1] - obj.start[1])
    x = (np.arange(width * SUPERSAMPLE) + 0.5)[None, None, :] / SUPERSAMPLE - x0  # (T, 1, W*4)
    y = (np.arange(height * SUPERSAMPLE) + 0.5)[None, :, None] / SUPERSAMPLE - y0  # (T, H*4, 1)
    inside = {
        "square": lambda: (0 <= x) & (x < side) & (0 <= y) & (y < side),
        "circle": lambda: (x - side / 2) ** 2 + (y - side / 2) ** 2 < (side / 2) ** 2,
        "triangle": lambda: (y < side) & (np.abs(x - side / 2) <= y / 2),
    }[obj.shape]()
    inside = np.broadcast_to(inside, (frames, height * SUPERSAMPLE, width * SUPERSAMPLE))
    return inside.reshape(frames, height, SUPERSAMPLE, width, SUPERSAMPLE).sum((2, 4)) / SUPERSAMPLE**2


@pytest.mark.parametrize("shape", [(8, 32, 32), (8, 32, 48), (5, 50, 17), (1, 16, 16), (3, 100, 20)])
def test_coverage_is_the_whole_frame_sampling(shape):
    """Each frame is drawn in a window around its box: the same values, bit for bit, as sampling the
    whole frame, for random objects, for boxes against every edge of the frame and for boxes partly or
    wholly outside it."""
    frames, height, width = shape
    rng = np.random.default_rng(5)
    objects = [o for _ in range(40) for o in sample_objects(rng, height, width, 3, still=frames == 1)]
    for size in SIZES:
        room_x, room_y = width - SIZES[size] * min(height, width), height - SIZES[size] * min(height, width)
        for shape_name in SHAPES:
            for start, end in (((0, 0), (room_x, room_y)), ((room_x, 0), (0, room_y)), ((room_x, room_y), (room_x, 0)),
                               ((-3.5, -2.25), (room_x + 4.5, room_y + 3)), ((-width, 0), (width, height))):
                objects.append(MovingObject(size, "red", shape_name, "left", start, end))  # the last two leave the frame
    for obj in objects:
        np.testing.assert_array_equal(coverage(obj, *shape), _whole_frame_coverage(obj, *shape), err_msg=str(obj))


def test_several_objects():
    ds = ShapesDataset(num_frames=8, size=32, seed=5, max_objects=3)
    counts, total, checked = set(), 0, 0
    for i in range(100):
        item = ds[i]
        video, objects = item["video"], parse(item["caption"])
        counts.add(len(objects))
        total += len(objects)
        colours = [colour for _, colour, _, _ in objects]
        assert len(set(colours)) == len(colours), item["caption"]
        sizes = [SIZES[size_name] for size_name, _, _, _ in objects]
        assert sizes == sorted(sizes, reverse=True), "large objects are drawn first, under small ones"
        assert set(colours) <= pure_colours(video), item["caption"]
        exact = {c: (video == np.array(COLOURS[c])).all(-1) for c in colours}  # (T, H, W) each: unblended pixels
        for _, colour, _, direction in objects:
            others = np.any([exact[c] & (c != colour) for c in colours], axis=0)  # (T, H, W)
            if any(_near(exact[colour][t], others[t]) for t in (0, -1)):
                continue  # another object is next to it at an end of the clip and may hide part of it
            ys, xs = np.nonzero(exact[colour][0])
            ye, xe = np.nonzero(exact[colour][-1])
            dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
            ux, uy = STEP[direction]
            assert dx * ux + dy * uy >= 32 / 3 - 1, item["caption"]
            assert abs(dx * uy) + abs(dy * ux) < 1.0, item["caption"]
            checked += 1
    assert counts == {1, 2, 3}
    assert checked >= total / 3  # in a 32 px frame many objects pass near another at an end


def test_deterministic_and_random_access():
    ds = ShapesDataset(num_frames=8, size=32, seed=7)
    fresh = ShapesDataset(num_frames=8, size=32, seed=7)
    for i in [0, 5, 123456, 2**40]:
        a, b, again = ds[i], fresh[i], ds[i]
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["video"], again["video"])
        assert a["caption"] == b["caption"] == again["caption"]
    videos = [ds[i]["video"] for i in range(6)]
    assert all(not np.array_equal(videos[j], videos[k]) for j in range(6) for k in range(j))
    other_seed = ShapesDataset(num_frames=8, size=32, seed=8)
    assert all(not np.array_equal(ds[i]["video"], other_seed[i]["video"]) for i in range(6))


def test_length_and_indices():
    assert len(ShapesDataset()) == 2**31 - 1
    ds = ShapesDataset(num_frames=2, size=16, length=10)
    assert len(ds) == 10
    assert ds[10]["video"].shape == (2, 16, 16, 3)  # past the virtual length is still a clip
    assert ds[np.int64(3)]["caption"] == ds[3]["caption"]
    with pytest.raises(IndexError):
        ds[-1]


@pytest.mark.parametrize("num_frames, size", [(8, 32), (16, 64), (2, 16), (5, 20)])
def test_shapes_and_dtype(num_frames, size):
    item = ShapesDataset(num_frames=num_frames, size=size, seed=1)[0]
    assert item["video"].shape == (num_frames, size, size, 3)
    assert item["video"].dtype == np.uint8
    assert item["video"].any() and parse(item["caption"])


@pytest.mark.parametrize(
    "kwargs, name",
    [({"num_frames": 0}, "num_frames"), ({"num_frames": 2.5}, "num_frames"), ({"size": 15}, "size"),
     ({"height": 15}, "height"), ({"width": 8}, "width"),
     ({"seed": -1}, "seed"), ({"max_objects": 0}, "max_objects"), ({"max_objects": 9}, "max_objects"),
     ({"length": 0}, "length")],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ShapesDataset(**kwargs)


def test_pickle_round_trip():
    ds = ShapesDataset(num_frames=8, size=32, seed=11, max_objects=3, length=100)
    copy = pickle.loads(pickle.dumps(ds))
    assert len(copy) == 100
    for i in range(4):
        np.testing.assert_array_equal(copy[i]["video"], ds[i]["video"])
        assert copy[i]["caption"] == ds[i]["caption"]


def test_caption_of_matches_objects():
    ds = ShapesDataset(size=32, seed=2, max_objects=3)
    objects = ds.objects(1)
    assert caption_of(objects) == ds[1]["caption"]
    assert parse(caption_of(objects)) == [(o.size, o.colour, o.shape, o.direction) for o in objects]
