"""Buckets: where a clip goes, the plan of global batches (one shape each), and the batches a process reads."""

import dataclasses

import numpy as np
import pytest

import jaxdit
from jaxdit.data.buckets import ENDLESS_EPOCH, Bucket, Plan, bucket_for, make_buckets
from jaxdit.data.pipeline import make_dataset, plan_batches
from jaxdit.data.shapes import ShapesDataset

SHAPES = [(8, 32, 64), (8, 64, 32), (8, 32, 32), (16, 32, 64), (1, 32, 32), (1, 32, 64)]


@pytest.mark.parametrize(
    "native, expected",
    [
        ((40, 720, 1280), (16, 32, 64)),  # 16:9 video: the landscape bucket of most frames
        ((12, 720, 1280), (8, 32, 64)),  # too short for 16 frames
        ((40, 1280, 720), (8, 64, 32)),  # portrait
        ((40, 720, 720), (8, 32, 32)),  # square: the square bucket, not a larger one of another aspect
        ((1, 720, 720), (1, 32, 32)),  # an image goes to an image bucket
        ((1, 300, 900), (1, 32, 64)),  # 3:1 is nearer 2:1 than 1:1
        ((4, 720, 1280), (1, 32, 64)),  # shorter than every video bucket: its first frame, as an image
    ],
)
def test_a_clip_goes_to_the_largest_bucket_of_its_aspect_that_it_covers(native, expected):
    assert SHAPES[bucket_for(native, SHAPES)] == expected


def test_area_tolerance_and_clips_that_fit_nothing():
    shapes = [(4, 32, 32), (4, 64, 64)]
    assert shapes[bucket_for((4, 58, 58), shapes)] == (4, 64, 64)  # 3364 >= 0.8 * 4096: upscaled a little
    assert shapes[bucket_for((4, 56, 56), shapes)] == (4, 32, 32)  # 3136 < 0.8 * 4096: the smaller one
    assert shapes[bucket_for((4, 8, 8), shapes)] == (4, 32, 32)  # smaller than every bucket: the smallest
    assert bucket_for((3, 64, 64), shapes) is None  # too short, and no image bucket
    assert bucket_for((1, 64, 64), shapes) is None  # an image, and no image bucket


def plan(assignment, batches=(4, 2), keep=(1.0, 1.0), seed=0):
    buckets = [Bucket((2, 16, 16), batches[0], keep[0]), Bucket((1, 16, 32), batches[1], keep[1])]
    return Plan(buckets, None if assignment is None else np.asarray(assignment), seed=seed)


def test_every_epoch_each_clip_once_in_batches_of_one_bucket_reshuffled():
    assignment = np.array([0] * 13 + [1] * 7 + [-1] * 3)  # 3 clips fit no bucket
    p = plan(assignment)
    seen = []
    for epoch in range(3):
        batches = p.epoch(epoch)
        ids = np.concatenate([ids for _, ids in batches])
        assert len(set(ids.tolist())) == len(ids)  # at most once an epoch
        for b, ids_b in batches:  # one bucket a batch, of its size
            assert (assignment[ids_b] == b).all() and len(ids_b) == p.buckets[b].batch
        assert sum(b == 0 for b, _ in batches) == 3 and sum(b == 1 for b, _ in batches) == 3  # 13 // 4, 7 // 2
        seen.append(ids.tolist())
    assert seen[0] != seen[1] != seen[2]  # a new order every epoch
    assert [p[k][1].tolist() for k in range(6, 12)] == [ids.tolist() for _, ids in p.epoch(1)]  # k counts on
    assert p.report() == "2x16x16: 13 clips, 3 batches of 4; 1x16x32: 7 clips, 3 batches of 2; 3 clips fit no bucket"
    again = plan(assignment)
    assert all(np.array_equal(again[k][1], p[k][1]) for k in range(40))  # a pure function of the seed
    assert not all(np.array_equal(plan(assignment, seed=1)[k][1], p[k][1]) for k in range(6))


def test_keep_probability_and_endless_sources():
    assignment = np.array([0] * 400 + [1] * 400)
    kept = plan(assignment, keep=(1.0, 0.25)).batches_per_bucket(0)
    assert kept[0] == 100 and 35 <= kept[1] <= 65  # about a quarter of bucket 1's 200 batches
    endless = plan(None)
    ids = np.concatenate([ids for _, ids in endless.epoch(0)] + [ids for _, ids in endless.epoch(1)])
    assert len(set(ids.tolist())) == len(ids) and ids.min() >= 0  # fresh clips every epoch
    assert (np.concatenate([ids for _, ids in endless.epoch(1)]) >= ENDLESS_EPOCH).all()


def test_an_empty_bucket_is_an_error_that_names_it():
    with pytest.raises(ValueError, match=r"bucket\(s\) 1x16x32 get no whole global batch .* 1x16x32: 1 clips"):
        plan(np.array([0] * 8 + [1]))


def test_batches_from_the_token_budget_divide_the_devices():
    data = jaxdit.DataConfig(buckets=("8x32x64", "8x32x32", "1x32x32"), bucket_tokens=4096)
    tokens = {(8, 32, 64): 512, (8, 32, 32): 256, (1, 32, 32): 16}  # tokens a clip of each
    buckets = make_buckets(data, batch_size=99, devices=3, tokens=tokens.__getitem__)
    assert [b.batch for b in buckets] == [6, 15, 255]  # 8, 16, 256 rounded down to multiples of 3
    assert [b.name for b in buckets] == ["8x32x64", "8x32x32", "1x32x32"]
    with pytest.raises(ValueError, match="gives bucket.s. 8x32x64, 8x32x32 no batch: their 512, 256 tokens a clip on 4 devices"):
        make_buckets(dataclasses.replace(data, bucket_tokens=1000), batch_size=8, devices=4, tokens=tokens.__getitem__)
    plain = make_buckets(jaxdit.DataConfig(num_frames=4, size=16), batch_size=8, devices=4)
    assert plain == [Bucket((4, 16, 16), 8)]


def config(**data):
    base = jaxdit.Config(text=jaxdit.TextConfig(max_length=16))
    return dataclasses.replace(base, data=dataclasses.replace(base.data, **data))


def test_processes_read_slices_of_the_same_global_batches_of_every_shape():
    buckets = [Bucket((2, 16, 16), 4), Bucket((2, 16, 32), 4), Bucket((1, 16, 16), 8)]
    source = ShapesDataset(seed=3, length=48)  # finite: a bucket drawn for each clip, fixed across epochs
    one = plan_batches(config(), buckets=buckets, source=source)
    two = [plan_batches(config(), buckets=buckets, source=source, process_index=i, process_count=2) for i in range(2)]
    shapes = set()
    for k in range(12):
        whole = one[k]
        halves = [t[k] for t in two]
        for name in whole:
            np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), whole[name])
        shapes.add(whole["video"].shape)
    assert shapes == {(4, 2, 16, 16, 3), (4, 2, 16, 32, 3), (8, 1, 16, 16, 3)}
    assert {tuple(e["video"].shape) for e in map(one.example, range(3))} == shapes
    batches = list(make_dataset(config(), buckets=buckets, source=source, num_epochs=1))  # through grain
    assert len(batches) == len(one.plan.epoch(0)) and {b["video"].shape for b in batches} == shapes
    with pytest.raises(ValueError, match="global batch 4 of bucket 2x16x16 must divide evenly over 3 processes"):
        plan_batches(config(), buckets=buckets, source=source, process_count=3)


def test_a_source_of_one_shape_takes_one_bucket():
    from tests.test_pipeline import NumberedClips

    with pytest.raises(ValueError, match="this source gives clips of one shape"):
        plan_batches(config(), buckets=[Bucket((2, 4, 4), 2), Bucket((1, 4, 4), 2)], source=NumberedClips(8))


def test_buckets_on_the_command_line_and_their_errors():
    overridden = jaxdit.config.apply_overrides(
        jaxdit.Config(), ["--data.buckets", "8x32x64;8x64x32;1x32x32", "--data.bucket_batches", "8,8,32"]
    )
    assert overridden.data.shapes == ((8, 32, 64), (8, 64, 32), (1, 32, 32))
    assert overridden.data.bucket_batches == (8, 8, 32)
    assert jaxdit.DataConfig(num_frames=4, size=16).shapes == ((4, 16, 16),)
    for fields, message in [
        ({"buckets": ("8x32",)}, "frames x height x width"),
        ({"buckets": ("8x32x32", "8x32x32")}, "lists a shape twice"),
        ({"buckets": ("8x32x32",), "bucket_batches": (8, 8)}, "one value per bucket"),
        ({"buckets": ("8x32x32",), "bucket_keep": (0.0,)}, r"keep probability must be in \(0, 1\]"),
        ({"bucket_batches": (8,), "bucket_tokens": 64}, "not both"),
    ]:
        with pytest.raises(ValueError, match=message):
            jaxdit.DataConfig(**fields)
