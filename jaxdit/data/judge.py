"""Checks a clip against its moving-shapes caption: is each object the captioned colour, shape and
size, and does it move the captioned way? Frames may be of any height and width; a still (one frame,
its caption with no motion clause) is judged on colour, shape and size.

Meant for generated clips, which are noisy, blurry, dim and sometimes fragmented, so every
measurement is soft. A bright pixel's colour is the palette colour nearest its chromaticity (RGB
over its brightest channel, so a dim or anti-aliased red is still red). A captioned object is the
coverage (mass) of its colour on each frame: speckle dropped, brightness read relative to the
colour's own interior, one-pixel holes closed (every shape is convex). Then, per object:
- colour: present (mass of at least half the smallest object) on at least half the frames, and
  more pixel mass over the clip than any colour the caption does not name;
- direction: the least-squares slope of its centroid over the present frames, times the clip's
  length, goes the captioned way by at least half the guaranteed travel (a fraction of the frame's
  extent along it), and further than across; None when the caption gives no direction;
- shape: an apex-up triangle keeps its mass low (negative vertical skew); a square fills the box
  of its widest row and tallest column, a circle pi/4 of it (row and column sums survive blur);
- size: the side sqrt(widest row x tallest column), as a fraction of the frame's short side, against
  the geometric mean of the two classes.
Objects whose colour the caption names twice are not judged (their checks are None). Image
coordinates: x is the column (left = decreasing x), y is the row (up = decreasing y).

    verdicts = judge(video, "a large red circle moving left")  # one Verdict per object
    rates = summary(videos, captions)  # {"colour": 0.9, ..., "all": 0.7, "judged": 1.0}
    fractions = rates(judge_all(videos, captions))  # the same, from verdicts kept for other uses
    captions = one_object_prompts(64)  # the fixed prompts that benchmarks and training judge
"""

import dataclasses
import itertools
import math
import re

import numpy as np

from jaxdit.data.shapes import COLOURS, DIRECTIONS, MIN_TRAVEL, SHAPES, SIZES

BRIGHT = 0.25  # a pixel whose brightest channel is below this fraction of 255 is background
HUE_TOLERANCE = 0.4  # farthest chromaticity from a palette colour still called that colour (they are >= 0.5 apart)
SUPPORT = 2  # a pixel of a colour with fewer neighbours of that colour is speckle
REFERENCE = 0.9  # brightness quantile of a colour's pixels taken as full coverage
PRESENT = 0.5  # a colour is on a frame when its mass reaches this fraction of the smallest object's area
MOST_FRAMES = 0.5  # colour_ok needs the colour present on at least this fraction of the frames
MIN_DISPLACEMENT = 0.5  # direction_ok needs this fraction of the guaranteed travel (MIN_TRAVEL of the frame)
TRIANGLE_SKEW = -0.2  # vertical skew below this is a triangle: an apex-up one's is -0.57 (-0.2 blurred), a circle's 0
SQUARE_FILL = 0.9  # fill above this is a square (1.0), below a circle (pi/4, measured about 0.8 on pixels)
LARGE_SIDE = math.sqrt(SIZES["small"] * SIZES["large"])  # side / frame side between the two size classes
SMALLEST_AREA = 0.5 * min(SIZES.values()) ** 2  # a small triangle's area / frame area: the least an object covers

_PALETTE = np.array(list(COLOURS.values()), np.float32) / 255  # (8, 3): a channel at 1 each: chromaticities
_CHECKS = ("colour", "direction", "shape", "size")
ADHERENCE_RATES = ("colour", "direction", "shape", "size", "all")  # the pass rates `summary` reports
_OBJECT = (f"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
           f"(?: moving ({'|'.join(DIRECTIONS)}))?")
_CAPTION = re.compile(f"{_OBJECT}(?: and {_OBJECT})*")


@dataclasses.dataclass(frozen=True)
class CaptionObject:
    """One object as a caption describes it."""

    size: str
    colour: str
    shape: str
    direction: str | None  # None: a still


def parse_caption(caption: str) -> list[CaptionObject]:
    """The objects of a caption `a {size} {colour} {shape}[ moving {direction}][ and ...]`, or a ValueError."""
    if not isinstance(caption, str) or not _CAPTION.fullmatch(caption):
        raise ValueError(f"Not a moving-shapes caption (DESIGN.md, 'Moving-shapes captions'): {caption!r}.")
    return [CaptionObject(*match.groups()) for match in re.finditer(_OBJECT, caption)]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How one captioned object fares in a clip: four checks (None: not judgeable) and what was measured.

    Sizes are fractions of the frame's short side; `displacement` is (along, across) the captioned
    direction over the whole clip, as fractions of the frame's extent on each axis, along positive when
    it goes the captioned way. `direction_ok` is None for a still.
    """

    expected: CaptionObject
    colour_ok: bool | None
    direction_ok: bool | None
    shape_ok: bool | None
    size_ok: bool | None
    presence: float = math.nan  # fraction of frames the colour is on
    displacement: tuple[float, float] = (math.nan, math.nan)
    skew: float = math.nan  # median vertical skew of the colour's mass
    fill: float = math.nan  # median area / (widest row x tallest column)
    side: float = math.nan  # median sqrt(widest row x tallest column)
    shape: str | None = None  # the shape and size class the measurements point to
    size: str | None = None

    @property
    def judged(self) -> bool:
        return self.colour_ok is not None

    @property
    def ok(self) -> bool:
        """Every check passed (False when not judged); a still's direction is not a check."""
        return self.judged and all(
            getattr(self, f"{check}_ok") is True for check in _CHECKS
            if not (check == "direction" and self.expected.direction is None)
        )


def _classify_pixels(video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's palette colour, int (T, H, W) indexing COLOURS (-1: dark or off-palette), and its
    brightness (brightest channel / 255), float (T, H, W)."""
    rgb = video.astype(np.float32) / 255  # (T, H, W, 3)
    brightness = rgb.max(-1)  # (T, H, W)
    labels = np.full(brightness.shape, -1)  # (T, H, W)
    bright = brightness >= BRIGHT  # (T, H, W): only these are given a colour, so mostly black clips are cheap
    chroma = rgb[bright] / brightness[bright][:, None]  # (P, 3)
    distance = ((chroma[:, None, :] - _PALETTE) ** 2).sum(-1)  # (P, 8): squared
    nearest = distance.argmin(-1)  # (P,)
    labels[bright] = np.where(distance.min(-1) <= HUE_TOLERANCE**2, nearest, -1)
    return labels, brightness


def _box_sum(a: np.ndarray) -> np.ndarray:
    """Sum of each pixel's 3x3 neighbourhood, itself included, for (T, H, W) frames padded with zeros."""
    height, width = a.shape[1:]
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1)))  # (T, H+2, W+2)
    return sum(padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3))  # (T, H, W)


def _object_mass(own: np.ndarray, brightness: np.ndarray) -> np.ndarray:
    """One colour's coverage of each pixel, float (T, H, W), from its pixels (bool (T, H, W)) and their brightness.

    A pixel of the colour with fewer than SUPPORT neighbours of it is speckle and dropped. Brightness
    is read relative to the colour's typical interior (its REFERENCE quantile), so a dim object
    weighs as much as a bright one. Holes (a 3x3 closing: every shape is convex) get the mean
    coverage of their neighbours, so a fragmented object keeps its area.
    """
    own = own & (_box_sum(own.astype(np.int8)) - own >= SUPPORT)  # (T, H, W)
    if not own.any():
        return np.zeros(own.shape)
    reference = max(float(np.quantile(brightness[own], REFERENCE)), BRIGHT)
    mass = np.where(own, np.minimum(brightness / reference, 1.0), 0.0)  # (T, H, W)
    neighbours = _box_sum(own.astype(np.int8))  # (T, H, W): own pixels in each 3x3 window
    closed = _box_sum((neighbours > 0).astype(np.int8)) == 9  # (T, H, W): the closing, dilation then erosion
    holes = closed & ~own  # (T, H, W)
    return np.where(holes, _box_sum(mass) / np.maximum(neighbours, 1), mass)  # (T, H, W)


def _frame_measures(mass: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame of one colour's mass (T, H, W): area, centroid, widest row, tallest column, vertical skew."""
    area = mass.sum((1, 2))  # (T,)
    safe = np.maximum(area, 1e-6)  # (T,)
    ys = np.arange(mass.shape[1], dtype=float)[None, :, None]  # (1, H, 1)
    xs = np.arange(mass.shape[2], dtype=float)[None, None, :]  # (1, 1, W)
    cx, cy = (mass * xs).sum((1, 2)) / safe, (mass * ys).sum((1, 2)) / safe  # (T,) each
    dy = ys - cy[:, None, None]  # (T, H, 1)
    variance = (mass * dy**2).sum((1, 2)) / safe  # (T,)
    skew = (mass * dy**3).sum((1, 2)) / safe / np.maximum(variance, 1e-6) ** 1.5  # (T,)
    width, height = mass.sum(2).max(1), mass.sum(1).max(1)  # (T,) each
    return {"area": area, "cx": cx, "cy": cy, "skew": skew, "width": width, "height": height}


def _slope(t: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of values over t (at least two distinct t)."""
    t = t - t.mean()
    return float((t * (values - values.mean())).sum() / (t * t).sum())


def _judge_object(expected: CaptionObject, mass: np.ndarray, dominant: bool) -> Verdict:
    """The verdict on one object from its colour's mass (T, H, W), and whether no uncaptioned colour outweighs it."""
    num_frames, height, width = mass.shape
    short_side = min(height, width)  # object sizes are fractions of it
    m = _frame_measures(mass)
    present = m["area"] >= PRESENT * SMALLEST_AREA * short_side**2  # (T,)
    presence = float(present.mean())
    colour_ok = presence >= MOST_FRAMES and dominant

    t = np.flatnonzero(present).astype(float)
    still = expected.direction is None
    if len(t) < (1 if still else 2):  # nothing to measure: no motion, no shape, no size
        return Verdict(expected, colour_ok, None if still else False, False, False, presence)
    direction_ok, along, across = None, math.nan, math.nan
    if not still:
        dx, dy = DIRECTIONS[expected.direction]
        clip = num_frames - 1  # the slope is per frame; the displacement covers the whole clip
        move_x, move_y = _slope(t, m["cx"][present]) * clip / width, _slope(t, m["cy"][present]) * clip / height
        along, across = dx * move_x + dy * move_y, abs(dy * move_x) + abs(dx * move_y)
        direction_ok = along >= MIN_DISPLACEMENT * MIN_TRAVEL and along > across

    skew = float(np.median(m["skew"][present]))
    fill = float(np.median((m["area"] / np.maximum(m["width"] * m["height"], 1e-6))[present]))
    if skew < TRIANGLE_SKEW:
        shape = "triangle"
    else:
        shape = "square" if fill > SQUARE_FILL else "circle"
    side = float(np.median(np.sqrt(m["width"] * m["height"])[present])) / short_side
    size = "large" if side > LARGE_SIDE else "small"
    return Verdict(expected, colour_ok, direction_ok, shape == expected.shape, size == expected.size, presence,
                   (along, across), skew, fill, side, shape, size)


def judge(video: np.ndarray, caption: str) -> list[Verdict]:
    """One Verdict per object of the caption, in its order, for a uint8 (T, H, W, 3) clip on black."""
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"judge needs a uint8 (T, H, W, 3) video; got {video.dtype} {video.shape}.")
    objects = parse_caption(caption)
    if video.shape[0] < 2 and any(o.direction for o in objects):
        raise ValueError(f"judging motion needs a video of at least 2 frames; got {video.shape[0]} for {caption!r}.")
    named = [o.colour for o in objects]
    labels, brightness = _classify_pixels(video)  # (T, H, W) each
    totals = np.bincount(labels[labels >= 0], brightness[labels >= 0], minlength=len(COLOURS))  # (8,)
    rival = max((total for total, c in zip(totals, COLOURS, strict=True) if c not in named), default=0.0)
    verdicts = []
    for o in objects:
        k = list(COLOURS).index(o.colour)
        if named.count(o.colour) > 1:  # two objects share the mask: neither can be told apart
            verdicts.append(Verdict(o, None, None, None, None))
        else:
            verdicts.append(_judge_object(o, _object_mass(labels == k, brightness), bool(totals[k] > rival)))
    return verdicts


def centroids(video: np.ndarray, colour: str) -> np.ndarray:
    """Where the object of `colour` is in each frame of a uint8 (T, H, W, 3) clip: float (T, 2) (x, y) in
    pixels, as the judge measures it (nan where the colour is absent)."""
    labels, brightness = _classify_pixels(np.asarray(video))  # (T, H, W) each
    measures = _frame_measures(_object_mass(labels == list(COLOURS).index(colour), brightness))
    xy = np.stack([measures["cx"], measures["cy"]], axis=-1)  # (T, 2)
    return np.where((measures["area"] > 0)[:, None], xy, np.nan)


def judge_all(videos, captions) -> list[Verdict]:
    """`judge` of each video against its caption: the verdicts of every object of every video, in order."""
    videos, captions = list(videos), list(captions)
    if len(videos) != len(captions):
        raise ValueError(f"judging needs one caption per video; got {len(videos)} videos, {len(captions)} captions.")
    return [v for video, caption in zip(videos, captions, strict=True) for v in judge(video, caption)]


def summary(videos, captions) -> dict[str, float]:
    """Fractions of the judged objects passing each check ("colour", "direction", "shape", "size", "all"),
    and the fraction of objects judged ("judged"). Rates are nan when nothing could be judged."""
    return rates(judge_all(videos, captions))


def rates(verdicts) -> dict[str, float]:
    """`summary`'s fractions from verdicts already made (`judge`'s, of every object of every video)."""
    verdicts = list(verdicts)
    judged = [v for v in verdicts if v.judged]
    fractions = {}
    for check in _CHECKS:  # over the objects the check applies to (a still has no direction)
        results = [getattr(v, f"{check}_ok") for v in judged if getattr(v, f"{check}_ok") is not None]
        fractions[check] = float(np.mean(results)) if results else math.nan
    fractions["all"] = float(np.mean([v.ok for v in judged])) if judged else math.nan
    fractions["judged"] = len(judged) / len(verdicts) if verdicts else math.nan
    return fractions


def one_object_prompts(count: int, seed: int = 0, *, still: bool = False) -> list[str]:
    """`count` distinct one-object captions of the full grammar (2 sizes x 8 colours x 3 shapes x 4
    directions = 192; `still`: no motion clause, 48), in a fixed random order: the same prompts for the
    same (count, seed)."""
    motions = [""] if still else [f" moving {direction}" for direction in DIRECTIONS]
    grammar = [
        f"a {size} {colour} {shape}{motion}"
        for size, colour, shape, motion in itertools.product(SIZES, COLOURS, SHAPES, motions)
    ]
    if not 1 <= count <= len(grammar):
        raise ValueError(f"one_object_prompts: count must be in 1..{len(grammar)}, got {count}.")
    picks = np.random.default_rng(seed).permutation(len(grammar))[:count]
    return [grammar[i] for i in picks]
