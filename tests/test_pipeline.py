import dataclasses

import chex
import numpy as np
import pytest

import jaxdit
from jaxdit import video_io
from jaxdit.data.pipeline import make_dataset
from jaxdit.text import ByteTokenizer


class NumberedClips:
    """A finite source whose clip i has every pixel equal to i, so batches reveal their indices."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return {"video": np.full((2, 4, 4, 3), i, np.uint8), "caption": f"clip {i}"}


def config(**data):
    base = jaxdit.Config(text=jaxdit.TextConfig(max_length=16))
    return dataclasses.replace(base, data=dataclasses.replace(base.data, **data))


def indices(batch) -> list[int]:
    return batch["video"][:, 0, 0, 0, 0].tolist()


def test_batches_from_the_built_in_shapes():
    dataset = make_dataset(config(num_frames=4, size=16), global_batch_size=4)
    batch = next(iter(dataset))
    chex.assert_shape(batch["video"], (4, 4, 16, 16, 3))
    chex.assert_shape((batch["text_tokens"], batch["text_mask"]), (4, 16))
    assert batch["video"].dtype == np.uint8
    assert batch["text_tokens"].dtype == np.int32 and batch["text_mask"].dtype == bool
    assert batch["video"].max() > 0  # shapes were drawn


def test_process_shards_are_disjoint_and_cover_the_data():
    seen = []
    for process in range(3):
        dataset = make_dataset(
            config(caption_dropout=0.0), global_batch_size=6, process_index=process, process_count=3, num_epochs=1,
            source=NumberedClips(24),
        )
        seen.append([i for batch in dataset for i in indices(batch)])
    assert all(len(shard) == 8 for shard in seen)
    assert sorted(sum(seen, [])) == list(range(24))


def test_process_slices_put_together_are_the_single_process_batches():
    # Same global batches (and caption dropout) for any process count: training draws the same noise.
    single = [indices(batch) for batch in make_dataset(config(), global_batch_size=6, num_epochs=1, source=NumberedClips(25))]
    slices = [
        [indices(batch) for batch in make_dataset(
            config(), global_batch_size=6, process_index=process, process_count=2, num_epochs=1,
            source=NumberedClips(25),
        )]
        for process in range(2)
    ]
    assert len(single) == 4 and all(len(s) == 4 for s in slices)
    assert [a + b for a, b in zip(*slices, strict=True)] == single


def test_every_epoch_is_a_new_permutation():
    dataset = make_dataset(config(), global_batch_size=4, source=NumberedClips(12))
    iterator = iter(dataset)
    order = [i for _ in range(6) for i in indices(next(iterator))]
    first, second = order[:12], order[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second and first != list(range(12))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_round_trips_to_the_same_next_batch(num_workers):
    def batches():
        return make_dataset(config(num_workers=num_workers), global_batch_size=4, source=NumberedClips(10))

    iterator = iter(batches())
    for _ in range(4):  # into the second epoch
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]

    restored = iter(batches())
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        chex.assert_trees_all_equal(got, want)


def test_caption_dropout_is_seeded_and_empties_the_caption():
    tokenizer = ByteTokenizer(16)

    def empty_fraction(dropout):
        dataset = make_dataset(config(caption_dropout=dropout), global_batch_size=100, source=NumberedClips(100))
        batch = next(iter(dataset))
        empty = batch["text_mask"].sum(axis=1) == 2  # BOS EOS only
        for tokens, is_empty, i in zip(batch["text_tokens"], empty, indices(batch), strict=True):
            assert tokenizer.decode(tokens) == ("" if is_empty else f"clip {i}")
        return empty.mean(), empty

    assert empty_fraction(0.0)[0] == 0.0
    fraction, empty = empty_fraction(0.5)
    assert 0.3 < fraction < 0.7
    np.testing.assert_array_equal(empty_fraction(0.5)[1], empty)  # same seed, same drops


def test_global_batch_must_divide_over_processes():
    with pytest.raises(ValueError, match="divide evenly over 3 processes"):
        make_dataset(config(), global_batch_size=4, process_count=3, source=NumberedClips(8))


@pytest.mark.parametrize(
    "field, value, message",
    [("source", "web", "data.source"), ("num_frames", 0, "data.num_frames"), ("caption_dropout", 1.0, "caption_dropout"),
     ("fps", -1.0, "data.fps")],
)
def test_bad_data_config_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        jaxdit.DataConfig(**{field: value})


def test_folder_source_needs_a_manifest():
    with pytest.raises(ValueError, match="data.manifest"):
        jaxdit.DataConfig(source="folder")


def test_a_video_folder_config_gives_batches_and_a_preview(tmp_path):
    from PIL import Image

    from jaxdit.data import preview
    from tests.test_video_folder import ramp, write_manifest, write_video

    for name, size in [("a.mp4", (48, 64)), ("b.mp4", (64, 40))]:
        write_video(tmp_path / name, ramp(*size))
    (tmp_path / "broken.mp4").write_bytes(b"")
    manifest = write_manifest(tmp_path / "clips.csv", [("a.mp4", "first"), ("b.mp4", "second"), ("broken.mp4", "x")])
    folder = config(source="folder", manifest=str(manifest), num_frames=4, size=16, frame_stride=2, caption_dropout=0.0)

    batch = next(iter(make_dataset(folder, global_batch_size=2)))
    chex.assert_shape(batch["video"], (2, 4, 16, 16, 3))
    assert {ByteTokenizer(16).decode(t) for t in batch["text_tokens"]} == {"first", "second"}

    config_file = tmp_path / "folder_config.py"
    config_file.write_text(
        "import dataclasses, jaxdit\n"
        f"def get_config():\n    return dataclasses.replace(jaxdit.Config(name='folder_config'), data=jaxdit.DataConfig("
        f"source='folder', manifest={str(manifest)!r}, num_frames=4, size=16, frame_stride=2))\n"
    )
    preview.main(["--config", str(config_file), "--out", str(tmp_path / "grid.png"), "--num-clips", "5"])
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[0] == 2 * (video_io.TEXT_HEIGHT + 96)  # the two usable clips, one row each
    preview.main(["--config", str(config_file), "--out", str(tmp_path / "clips.gif")])
    assert Image.open(tmp_path / "clips.gif").n_frames == 4
