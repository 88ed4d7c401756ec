"""Built-in moving-shapes data: procedurally drawn clips of coloured shapes on black, with captions.

Captions follow one grammar (DESIGN.md, "Moving-shapes captions") so a sample can be checked
against its prompt: `a {size} {colour} {shape} moving {direction}`, objects joined by " and ". A
still (a 1-frame clip: an image) has no motion, and its caption no motion clause: `a {size} {colour}
{shape}`. Clip i of a shape (frames, height, width) is a pure function of (seed, i, shape), so the
data set is endless, random access and shardable, at any size and duration.

Geometry, in pixels with x to the right and y down, on frames of H x W: an object fills a box of side
`s` (SIZES times the short side min(H, W)) whose top-left corner moves linearly from `start` on frame 0
to `end` on the last frame. The box stays inside [0, W] x [0, H] on every frame, and travels d >= 1/3 of
the frame's extent along its direction (W/3 left or right, H/3 up or down). Edges are anti-aliased by
supersampling; interior pixels are exactly the pure colour.
"""

import dataclasses
import math
import operator
import re

import numpy as np

COLOURS = {  # name -> pure RGB; interior pixels carry exactly these values
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
SHAPES = ("circle", "square", "triangle")  # the triangle points up, apex at the box's top middle
SIZES = {"small": 1 / 6, "large": 1 / 3}  # box side / frame side: a 2x gap, and large + S/3 travel still fits
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # unit (dx, dy)

_SIZE_NAMES, _DIRECTION_NAMES = tuple(SIZES), tuple(DIRECTIONS)

MIN_TRAVEL = 1 / 3  # every object of a video travels at least this fraction of the frame over the clip
MIN_SIZE = 16  # the short side: a small shape below 16 px is under 3 px wide
SUPERSAMPLE = 4  # draw at 4x and average 4x4 samples: anti-aliased edges, exact interiors


@dataclasses.dataclass(frozen=True)
class MovingObject:
    """One shape: its caption words and the top-left corner (x, y) of its box on the first and last frame."""

    size: str
    colour: str
    shape: str
    direction: str | None  # None: a still
    start: tuple[float, float]
    end: tuple[float, float]


def caption_of(objects: list[MovingObject]) -> str:
    """The caption of a clip: `a {size} {colour} {shape} moving {direction}` (a still: no motion clause),
    joined by " and "."""
    return " and ".join(
        f"a {o.size} {o.colour} {o.shape}" + (f" moving {o.direction}" if o.direction else "") for o in objects
    )


def still_caption(caption: str) -> str:
    """The caption of a still of the same objects: every motion clause dropped."""
    return re.sub(r" moving \w+", "", caption)


def sample_objects(rng: np.random.Generator, height: int, width: int, max_objects: int, *,
                   still: bool = False) -> list[MovingObject]:
    """Draws 1..max_objects objects with distinct colours for H x W frames (`still`: standing still);
    large ones first, so none is drawn over a small one."""
    count = int(rng.integers(1, max_objects + 1))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    objects = []
    # rng.integers(0, n) is the draw rng.choice makes from n items (the same stream), without converting
    # the list to an array: most of a still's drawing time.
    for colour in colours:
        size_name = _SIZE_NAMES[rng.integers(0, len(SIZES))]
        shape = SHAPES[rng.integers(0, len(SHAPES))]
        side = SIZES[size_name] * min(height, width)
        room_x, room_y = width - side, height - side  # the box's top-left corner lies in [0, room] on each axis
        if still:
            start = (rng.uniform(0, room_x), rng.uniform(0, room_y))
            objects.append(MovingObject(size_name, str(colour), shape, None, start, start))
            continue
        direction = _DIRECTION_NAMES[rng.integers(0, len(DIRECTIONS))]
        dx, dy = DIRECTIONS[direction]
        (extent, room), across_room = ((width, room_x), room_y) if dx else ((height, room_y), room_x)
        travel = rng.uniform(MIN_TRAVEL * extent, room)  # pixels over the whole clip
        first = rng.uniform(0, room - travel)  # where the moving coordinate starts, for a positive direction
        across = rng.uniform(0, across_room)  # the fixed coordinate
        if dx + dy < 0:  # left or up: run the same segment backwards
            first = room - first
        start = (first, across) if dx else (across, first)
        end = (start[0] + dx * travel, start[1] + dy * travel)
        objects.append(MovingObject(size_name, str(colour), shape, direction, start, end))
    return sorted(objects, key=lambda o: -SIZES[o.size])  # stable: colour order kept within a size


def coverage(obj: MovingObject, num_frames: int, height: int, width: int) -> np.ndarray:
    """The fraction of each pixel the object covers on each frame, in [0, 1]: (T, H, W)."""
    side = SIZES[obj.size] * min(height, width)
    fraction = np.linspace(0.0, 1.0, num_frames)  # (T,): linear motion
    x0 = obj.start[0] + fraction * (obj.end[0] - obj.start[0])  # (T,)
    y0 = obj.start[1] + fraction * (obj.end[1] - obj.start[1])  # (T,)
    # Each frame is drawn in a window of n x n pixels that holds the box's part inside the frame.
    n = min(math.ceil(side) + 1, height, width)
    left = np.clip(np.floor(x0).astype(int), 0, width - n)  # (T,) the windows' first column
    top = np.clip(np.floor(y0).astype(int), 0, height - n)  # (T,) and first row
    sub = np.arange(n * SUPERSAMPLE)  # the samples of a window's row or column
    x = ((left[:, None] * SUPERSAMPLE + sub) + 0.5)[:, None, :] / SUPERSAMPLE - x0[:, None, None]  # (T, 1, n*4)
    y = ((top[:, None] * SUPERSAMPLE + sub) + 0.5)[:, :, None] / SUPERSAMPLE - y0[:, None, None]  # (T, n*4, 1)
    if obj.shape == "square":
        inside = (0 <= x) & (x < side) & (0 <= y) & (y < side)
    elif obj.shape == "circle":
        inside = (x - side / 2) ** 2 + (y - side / 2) ** 2 < (side / 2) ** 2
    else:  # triangle: apex (side/2, 0), base along y = side; half-width grows as y/2
        inside = (y < side) & (np.abs(x - side / 2) <= y / 2)
    blocks = inside.view(np.uint8).reshape(num_frames, n, SUPERSAMPLE, n, SUPERSAMPLE)
    # The samples inside each pixel, counted in uint8 (at most 16), then one division: exact sixteenths
    # (the renderer is most of a training batch's CPU time).
    counts = np.zeros((num_frames, height, width), np.uint8)  # (T, H, W)
    rows, cols = top[:, None] + np.arange(n), left[:, None] + np.arange(n)  # (T, n) each
    frames = np.arange(num_frames)[:, None, None]
    counts[frames, rows[:, :, None], cols[:, None, :]] = blocks.sum(axis=2, dtype=np.uint8).sum(axis=-1, dtype=np.uint8)
    return counts / SUPERSAMPLE**2  # (T, H, W)


def render(objects: list[MovingObject], num_frames: int, height: int, width: int) -> np.ndarray:
    """Draws the objects in order over black, each over the ones before: uint8 (T, H, W, 3)."""
    video = None  # black
    for obj in objects:
        alpha = coverage(obj, num_frames, height, width)[..., None]  # (T, H, W, 1)
        drawn = alpha * np.array(COLOURS[obj.colour], float)  # (T, H, W, 3)
        video = drawn if video is None else video * (1 - alpha) + drawn  # (T, H, W, 3)
    if video is None:
        return np.zeros((num_frames, height, width, 3), np.uint8)
    return np.rint(video).astype(np.uint8)  # (T, H, W, 3)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high], or a ValueError naming the argument and the allowed range."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {allowed}; got {value!r}.") from None
    if isinstance(value, bool) or number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be {allowed}; got {value!r}.")
    return number


def check_shape(shape) -> tuple[int, int, int]:
    """(frames, height, width) of a clip the shapes can be drawn in, or a ValueError naming the limits."""
    frames, height, width = shape
    return (_check_int("num_frames", frames, 1), _check_int("height", height, MIN_SIZE),
            _check_int("width", width, MIN_SIZE))


class ShapesDataset:
    """Endless moving-shapes clips: `ds[i]` -> {"video": uint8 (T, H, W, 3), "caption": str}.

    Clip i depends only on (seed, i) and its shape: (num_frames, height, width) for `ds[i]` (height and
    width default to `size`), any other through `ds.clip(i, shape)`. One frame is a still. Without a
    `length` the data set is endless (`endless`; its len is 2**31 - 1); any index i >= 0 can be drawn,
    past `length` too. Plain attributes only, so it pickles into data-loader worker processes.
    """

    def __init__(self, num_frames: int = 16, size: int = 32, seed: int = 0, max_objects: int = 1,
                 length: int | None = None, *, height: int | None = None, width: int | None = None):
        self.size = _check_int("size", size, MIN_SIZE)
        height, width = size if height is None else height, size if width is None else width
        self.num_frames, self.height, self.width = check_shape((num_frames, height, width))
        self.seed = _check_int("seed", seed, 0)
        self.max_objects = _check_int("max_objects", max_objects, 1, len(COLOURS))  # colours are distinct
        self.endless = length is None  # a data pipeline draws fresh clips every epoch (jaxdit.data.buckets)
        self.length = 2**31 - 1 if length is None else _check_int("length", length, 1)

    def __len__(self) -> int:
        return self.length

    def objects(self, i: int, shape: tuple[int, int, int] | None = None) -> list[MovingObject]:
        """The objects of clip i at `shape` (default: the data set's), in drawing order (the caption's order)."""
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"ShapesDataset index must be >= 0 (the data set is endless); got {i}.")
        frames, height, width = (self.num_frames, self.height, self.width) if shape is None else check_shape(shape)
        rng = np.random.default_rng([self.seed, i])
        return sample_objects(rng, height, width, self.max_objects, still=frames == 1)

    def clip(self, i: int, shape: tuple[int, int, int]) -> dict:
        """Clip i drawn as `shape` (frames, height, width): {"video": uint8 (T, H, W, 3), "caption": str}."""
        objects = self.objects(i, shape)
        return {"video": render(objects, *check_shape(shape)), "caption": caption_of(objects)}

    def __getitem__(self, i: int) -> dict:
        return self.clip(i, (self.num_frames, self.height, self.width))

    def __repr__(self) -> str:
        return (f"ShapesDataset(num_frames={self.num_frames}, height={self.height}, width={self.width}, "
                f"seed={self.seed}, max_objects={self.max_objects}, length={self.length})")
