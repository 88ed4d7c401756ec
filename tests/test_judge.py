"""The caption checker: ground-truth moving-shapes clips pass it, wrong captions and broken clips fail it."""

import dataclasses
import math

import numpy as np
import pytest

from jaxdit.data.judge import (
    CaptionObject,
    Verdict,
    centroids,
    judge,
    judge_all,
    one_object_prompts,
    parse_caption,
    summary,
)
from jaxdit.data.judge import rates as judge_rates
from jaxdit.data.shapes import COLOURS, SHAPES, MovingObject, ShapesDataset, caption_of, render

CHECKS = ("colour", "direction", "shape", "size")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
ACROSS = {"left": "up", "right": "down", "up": "right", "down": "left"}
GROUND_TRUTH = 0.97  # every check passes on at least this fraction of clean clips


@pytest.fixture(scope="module")
def clips():
    """(video, caption) for one-object clips: 200 at 32 px, 40 at 48 px, 40 at 64 px."""
    sets = [(ShapesDataset(num_frames=8, size=32, seed=21), 200),
            (ShapesDataset(num_frames=12, size=48, seed=22), 40),
            (ShapesDataset(num_frames=16, size=64, seed=23), 40)]
    return [(item["video"], item["caption"]) for ds, n in sets for item in map(ds.__getitem__, range(n))]


@pytest.fixture(scope="module")
def some_clips(clips):
    """120 of them for the tests that judge each clip several times: 100 at 32 px, 20 at 64 px."""
    return clips[:100] + clips[240:260]


def rates(verdicts: list[Verdict]) -> dict[str, float]:
    """Fraction of verdicts passing each check, and all of them."""
    out = {check: float(np.mean([getattr(v, f"{check}_ok") for v in verdicts])) for check in CHECKS}
    return out | {"all": float(np.mean([v.ok for v in verdicts]))}


def recaption(caption: str, **words) -> str:
    """The one-object caption with some of its words replaced."""
    (obj,) = parse_caption(caption)
    return caption_of([dataclasses.replace(obj, **words)])


def blur(video: np.ndarray) -> np.ndarray:
    """A separable [1, 2, 1] / 4 blur over rows and columns, as float."""
    out = video.astype(float)
    for axis in (1, 2):
        padded = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(4)], mode="edge")
        n = out.shape[axis]
        out = (np.take(padded, range(n), axis) + 2 * np.take(padded, range(1, n + 1), axis)
               + np.take(padded, range(2, n + 2), axis)) / 4
    return out


@pytest.mark.parametrize("shape", [(8, 32, 64), (8, 64, 32), (1, 32, 32), (1, 48, 32)])
def test_ground_truth_passes_at_any_frame_size_and_for_stills(shape):
    ds = ShapesDataset(seed=31)
    clips = [ds.clip(i, shape) for i in range(60)]
    verdicts = judge_all([c["video"] for c in clips], [c["caption"] for c in clips])
    fractions = judge_rates(verdicts)
    assert fractions["all"] >= GROUND_TRUTH and fractions["judged"] == 1.0
    if shape[0] == 1:  # a still's caption gives no direction: none is judged
        assert all(v.direction_ok is None for v in verdicts) and math.isnan(fractions["direction"])
        wrong = judge(clips[0]["video"], recaption(clips[0]["caption"], shape=SHAPES[0]
                                                   if "circle" not in clips[0]["caption"] else SHAPES[1]))
        assert not wrong[0].ok
        with pytest.raises(ValueError, match="at least 2 frames"):
            judge(clips[0]["video"], clips[0]["caption"] + " moving left")
    else:
        assert fractions["direction"] >= GROUND_TRUTH


def test_centroids_follow_the_object_and_are_nan_where_it_is_absent():
    obj = MovingObject("large", "red", "square", "right", (4.0, 10.0), (30.0, 10.0))
    video = render([obj], 6, 32, 48)  # (6, 32, 48, 3)
    xy = centroids(video, "red")  # (6, 2)
    assert xy.shape == (6, 2) and np.all(np.diff(xy[:, 0]) > 0) and np.allclose(xy[:, 1], xy[0, 1], atol=0.5)
    assert np.isnan(centroids(video, "blue")).all()


def test_still_prompts_have_no_motion_clause():
    stills = one_object_prompts(48, still=True)
    assert len(set(stills)) == 48 and not any("moving" in p for p in stills)
    assert all(parse_caption(p)[0].direction is None for p in stills)
    with pytest.raises(ValueError, match="count must be in 1..48"):
        one_object_prompts(49, still=True)


def test_parse_caption():
    assert parse_caption("a large red circle moving left") == [CaptionObject("large", "red", "circle", "left")]
    ds = ShapesDataset(num_frames=2, size=32, seed=1, max_objects=3)
    for i in range(20):
        objects = ds.objects(i)
        parsed = parse_caption(caption_of(objects))
        assert [(p.size, p.colour, p.shape, p.direction) for p in parsed] == [
            (o.size, o.colour, o.shape, o.direction) for o in objects]


@pytest.mark.parametrize("caption", [
    "", "a large red circle moving", "a large red circle still", "a huge red circle moving left",
    "a large purple circle moving left", "a large red hexagon moving left", "a large red circle moving sideways",
    "A large red circle moving left", "a large red circle moving left ", "a  large red circle moving left",
    "a large red circle moving left and", "a large red circle moving left, a small blue square moving up",
    "the large red circle moving left", None,
])
def test_captions_outside_the_grammar_raise(caption):
    with pytest.raises(ValueError, match="Not a moving-shapes caption"):
        parse_caption(caption)
    if caption is not None:
        with pytest.raises(ValueError):
            judge(np.zeros((4, 32, 32, 3), np.uint8), caption)


def test_ground_truth_passes(clips):
    verdicts = [v for video, caption in clips for v in judge(video, caption)]
    assert len(verdicts) == len(clips)
    accuracy = rates(verdicts)
    print("ground truth:", {k: round(v, 4) for k, v in accuracy.items()})
    assert all(accuracy[check] >= GROUND_TRUTH for check in CHECKS), accuracy
    assert all(v.judged and v.shape in SHAPES for v in verdicts)
    assert summary(*zip(*clips, strict=True)) == pytest.approx(accuracy | {"judged": 1.0})


def test_wrong_captions_fail(some_clips):
    wrong = {"direction": [], "across": [], "colour": [], "shape": [], "size": []}
    for index, (video, caption) in enumerate(some_clips):
        (obj,) = parse_caption(caption)
        others = [c for c in COLOURS if c != obj.colour]
        shapes = [s for s in SHAPES if s != obj.shape]
        (opposite,) = judge(video, recaption(caption, direction=OPPOSITE[obj.direction]))
        (across,) = judge(video, recaption(caption, direction=ACROSS[obj.direction]))
        (colour,) = judge(video, recaption(caption, colour=others[index % len(others)]))
        (shape,) = judge(video, recaption(caption, shape=shapes[index % len(shapes)]))
        (size,) = judge(video, recaption(caption, size="small" if obj.size == "large" else "large"))
        wrong["direction"].append(opposite.direction_ok)
        wrong["across"].append(across.direction_ok)
        wrong["colour"].append(colour.colour_ok)
        wrong["shape"].append(shape.shape_ok)
        wrong["size"].append(size.size_ok)
        assert opposite.colour_ok and shape.direction_ok and size.colour_ok  # the other checks do not move
    accepted = {k: float(np.mean(v)) for k, v in wrong.items()}
    print("wrong captions accepted:", accepted)
    assert accepted["direction"] == accepted["across"] == accepted["colour"] == 0.0
    assert accepted["shape"] <= 0.05 and accepted["size"] <= 0.05


def test_time_reversed_clip_fails_direction(some_clips):
    verdicts = [v for video, caption in some_clips for v in judge(video[::-1], caption)]
    assert not any(v.direction_ok for v in verdicts)
    assert rates(verdicts)["colour"] == 1.0  # only the motion is wrong
    assert all(v.displacement[0] < 0 for v in verdicts)  # it goes the other way


@pytest.mark.parametrize("size", [32, 64])
def test_black_and_empty_clips_fail(size):
    for video in [np.zeros((8, size, size, 3), np.uint8), np.full((8, size, size, 3), 10, np.uint8)]:
        (v,) = judge(video, "a large red circle moving left")
        assert v.judged and not v.ok
        assert (v.colour_ok, v.direction_ok, v.shape_ok, v.size_ok) == (False, False, False, False)
        assert v.presence == 0.0 and math.isnan(v.fill)


def test_uncaptioned_colour_that_dominates_fails_colour():
    # A large green square and a small red circle: the caption's red is there and moves, but green dominates.
    objects = [MovingObject("large", "green", "square", "up", (4.0, 20.0), (4.0, 8.0)),
               MovingObject("small", "red", "circle", "right", (2.0, 2.0), (24.0, 2.0))]
    video = render(objects, 8, 32, 32)
    (alone,) = judge(video, "a small red circle moving right")
    assert not alone.colour_ok and alone.direction_ok and alone.shape_ok and alone.size_ok
    both = judge(video, caption_of(objects))
    assert all(v.ok for v in both), both


def test_degraded_clips_mostly_pass(some_clips):
    # Generated clips are blurry, noisy, dim and patchy; the checks should not hinge on clean pixels.
    rng = np.random.default_rng(0)
    verdicts = []
    for video, caption in some_clips:
        degraded = 0.7 * blur(video) * (rng.random(video.shape[:3] + (1,)) > 0.1) + rng.normal(0, 15, video.shape)
        speckle = rng.random(video.shape[:3]) < 0.01
        degraded[speckle] = rng.integers(0, 256, (speckle.sum(), 3))
        verdicts += judge(np.clip(degraded, 0, 255).astype(np.uint8), caption)
    accuracy = rates(verdicts)
    print("degraded:", {k: round(v, 4) for k, v in accuracy.items()})
    assert accuracy["colour"] >= 0.97 and accuracy["direction"] >= 0.97
    assert accuracy["all"] >= 0.9


def test_several_objects():
    ds = ShapesDataset(num_frames=8, size=32, seed=24, max_objects=3)
    items = [ds[i] for i in range(60)]
    verdicts = [v for item in items for v in judge(item["video"], item["caption"])]
    assert len(verdicts) == sum(len(parse_caption(item["caption"])) for item in items) > 60
    accuracy = rates(verdicts)
    print("several objects:", {k: round(v, 4) for k, v in accuracy.items()})
    assert accuracy["colour"] >= 0.97 and accuracy["direction"] >= 0.97
    assert accuracy["all"] >= 0.85  # a small object drawn over a large one hides part of its shape


def test_objects_sharing_a_colour_are_not_judged():
    video = ShapesDataset(num_frames=8, size=32, seed=25)[0]["video"]
    verdicts = judge(video, "a large red circle moving left and a small blue square moving up and a small red"
                            " triangle moving down")
    assert [v.judged for v in verdicts] == [False, True, False]
    assert verdicts[0].colour_ok is None and not verdicts[0].ok
    rates_ = summary([video], ["a large red circle moving left and a small red square moving up"])
    assert rates_["judged"] == 0.0 and math.isnan(rates_["all"])


def test_bad_inputs_raise():
    caption = "a large red circle moving left"
    for video in [np.zeros((4, 32, 32, 3)), np.zeros((32, 32, 3), np.uint8), np.zeros((4, 32, 32, 4), np.uint8)]:
        with pytest.raises(ValueError, match="uint8"):
            judge(video, caption)
    with pytest.raises(ValueError, match="motion needs a video of at least 2 frames"):
        judge(np.zeros((1, 32, 32, 3), np.uint8), caption)
    with pytest.raises(ValueError, match="one caption per video"):
        summary([np.zeros((4, 32, 32, 3), np.uint8)], [caption, caption])
