import dataclasses
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxdit
from jaxdit import codec as codecs
from jaxdit.config import ConfigError
from jaxdit.data import latent_cache
from jaxdit.data.latent_cache import LatentCache, write_cache
from jaxdit.data.pipeline import make_dataset
from jaxdit.data.shapes import ShapesDataset

REPO = pathlib.Path(__file__).parent.parent
NUM_CLIPS, SHARD_SIZE = 12, 5  # three shards, the last one short


def config(codec=None, *, max_length=48, **data) -> jaxdit.Config:
    return jaxdit.Config(
        model=jaxdit.ModelConfig(variant="tiny/1x4x4", in_channels=3, text_dim=32),
        text=jaxdit.TextConfig(max_length=max_length),
        data=jaxdit.DataConfig(**{"num_frames": 4, "size": 16, "seed": 1, **data}),
        codec=codec or jaxdit.CodecConfig(),
    )


def write(directory, cfg=None, **kwargs) -> pathlib.Path:
    kwargs = {"num_clips": NUM_CLIPS, "shard_size": SHARD_SIZE, "batch_size": 4, **kwargs}
    return write_cache(cfg or config(), directory, **kwargs)


def files(directory) -> dict[str, bytes]:
    """Every file under `directory`, by relative path: two caches are the same when these are."""
    root = pathlib.Path(directory)
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def mtime(directory, shard: int) -> int:
    return (pathlib.Path(directory) / latent_cache.shard_name(shard) / latent_cache.LATENTS).stat().st_mtime_ns


@pytest.fixture
def saved_codec(tmp_path) -> jaxdit.CodecConfig:
    return jaxdit.CodecConfig(kind="saved", path=str(codecs.save(codecs.IdentityCodec(), tmp_path / "codec")))


def test_the_cache_gives_the_batches_of_live_encoding(tmp_path, saved_codec):
    live = config(saved_codec, caption_dropout=0.3)
    directory = write(tmp_path / "cache", live)
    cached = dataclasses.replace(live, data=dataclasses.replace(live.data, source="cache", cache=str(directory)))

    source = ShapesDataset(num_frames=4, size=16, seed=1, length=NUM_CLIPS)
    live_batches = list(make_dataset(live, global_batch_size=4, num_epochs=1, source=source))
    cached_batches = list(make_dataset(cached, global_batch_size=4, num_epochs=1))
    codec = codecs.make_codec(saved_codec)
    encode = codecs.jitted(codec)  # as training encodes: XLA's fused pixel scaling can differ from eager's by an ulp
    assert len(cached_batches) == len(live_batches) == NUM_CLIPS // 4
    dropped = 0
    for want, got in zip(live_batches, cached_batches, strict=True):
        assert "video" not in got and got["latents"].dtype == np.float32
        np.testing.assert_array_equal(got["latents"], encode(want["video"]))
        np.testing.assert_allclose(got["latents"], codec.encode(want["video"]), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got["text_tokens"], want["text_tokens"])
        np.testing.assert_array_equal(got["text_mask"], want["text_mask"])
        dropped += int((got["text_mask"].sum(axis=1) == 2).sum())  # BOS EOS: the caption was dropped
    assert 0 < dropped < NUM_CLIPS  # both paths of caption dropout were compared

    cache = LatentCache(directory)
    assert len(cache) == NUM_CLIPS and cache.latent_shape == (4, 16, 16, 3)
    assert cache[7]["caption"] == source[7]["caption"]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(cache))[7]["latents"], cache[7]["latents"])  # grain workers


def test_a_cache_of_several_buckets_gives_the_batches_of_live_encoding(tmp_path):
    from jaxdit.data.cache_format import BucketedLatentCache, open_cache
    from jaxdit.train_loop import latent_shape

    buckets = ((4, 16, 16), (2, 16, 24), (1, 16, 16))
    live = config(buckets=buckets, bucket_batches=(2, 2, 2), caption_dropout=0.3)
    directory = write(tmp_path / "cache", live, num_clips=18)
    cached = dataclasses.replace(live, data=dataclasses.replace(live.data, source="cache", cache=str(directory)))
    source = ShapesDataset(num_frames=4, size=16, seed=1, length=18)  # the clips the cache drew, and their buckets
    live_batches = list(make_dataset(live, num_epochs=1, source=source))
    cached_batches = list(make_dataset(cached, num_epochs=1))
    encode = codecs.jitted(codecs.make_codec(live.codec))
    assert len(cached_batches) == len(live_batches) >= 6
    assert {got["latents"].shape[1:4] for got in cached_batches} == {(4, 16, 16), (2, 16, 24), (1, 16, 16)}
    for want, got in zip(live_batches, cached_batches, strict=True):
        np.testing.assert_array_equal(got["latents"], encode(want["video"]))
        np.testing.assert_array_equal(got["text_tokens"], want["text_tokens"])

    cache = open_cache(directory)
    assert isinstance(cache, BucketedLatentCache) and len(cache) == 18 and cache.shapes == list(buckets)
    assert sorted(set(cache.assignment.tolist())) == [0, 1, 2]
    i = int(np.flatnonzero(cache.assignment == 1)[0])
    assert cache[i]["caption"] == source.clip(i, (2, 16, 24))["caption"]
    assert latent_shape(cached, None, (2, 16, 24)) == (2, 16, 24, 3)
    assert files(write(tmp_path / "cache", live, num_clips=18)) == files(directory)  # rerun: nothing rewritten

    other = dataclasses.replace(cached, data=dataclasses.replace(cached.data, buckets=buckets[:2], bucket_batches=(2, 2)))
    with pytest.raises(ConfigError, match="holds the buckets 4x16x16;2x16x24;1x16x16 but this config has"):
        list(make_dataset(other, num_epochs=1))
    single = write(tmp_path / "single")
    one_shape = dataclasses.replace(cached, data=dataclasses.replace(cached.data, cache=str(single)))
    with pytest.raises(ConfigError, match="holds clips of one shape"):
        list(make_dataset(one_shape, num_epochs=1))


class Interrupted:
    """The shapes data, but reading clip `at` fails, as a killed writer would stop."""

    def __init__(self, at: int):
        self.shapes, self.at = ShapesDataset(num_frames=4, size=16, seed=1), at

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        if i == self.at:
            raise RuntimeError("interrupted")
        return self.shapes[i]


def test_an_interrupted_cache_resumes_without_rewriting_its_shards(tmp_path, monkeypatch):
    whole = write(tmp_path / "whole")
    directory = tmp_path / "resumed"
    monkeypatch.setattr(latent_cache, "make_source", lambda data: Interrupted(at=7))
    with pytest.raises(RuntimeError, match="interrupted"):
        write(directory)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="2 of its 3 shards are missing.*Rerun"):
        LatentCache(directory)
    (directory / "shard_00001.tmp").mkdir()  # a half-written shard, as a kill during np.save leaves
    (directory / "shard_00001.tmp" / "latents.npy").write_bytes(b"partial")
    first = mtime(directory, 0)

    write(directory)
    assert mtime(directory, 0) == first  # skipped, not rewritten
    assert files(directory) == files(whole)  # the stale temporary folder is gone too

    shutil.rmtree(directory / "shard_00002")
    kept = mtime(directory, 0), mtime(directory, 1)
    write(directory)
    assert (mtime(directory, 0), mtime(directory, 1)) == kept
    assert files(directory) == files(whole)


def test_resuming_with_other_settings_is_an_error(tmp_path, saved_codec):
    directory = write(tmp_path / "cache")
    with pytest.raises(ConfigError, match="num_clips: 12 there, 10 now"):
        write(directory, num_clips=10)
    with pytest.raises(ConfigError, match="codec.config.kind: 'identity' there, 'saved' now"):
        write(directory, config(saved_codec))
    with pytest.raises(ConfigError, match="data.seed: 1 there, 2 now"):
        write(directory, config(seed=2))
    with pytest.raises(ConfigError, match="text_max_length: 48 there, 32 now"):
        write(directory, config(max_length=32))
    write(directory, config(caption_dropout=0.5, shuffle=False), batch_size=3)  # loader settings are not the cache's


def test_two_processes_write_the_cache_of_one(tmp_path):
    one = write(tmp_path / "one")
    two = tmp_path / "two"
    write(two, process_index=1, process_count=2)  # shard 1; process 0 writes cache.json
    assert sorted(p.name for p in two.iterdir()) == ["shard_00001"]
    with pytest.raises(FileNotFoundError, match="not a latent cache.*python -m jaxdit.data.latent_cache"):
        LatentCache(two)
    write(two, process_index=0, process_count=2)  # shards 0 and 2
    assert files(two) == files(one)


class Labelled:
    """Moving shapes with a class label: clip i has label i % 3."""

    def __init__(self):
        self.shapes = ShapesDataset(num_frames=4, size=16, seed=1)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        return {**self.shapes[i], "label": i % 3}


def test_labels_are_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(latent_cache, "make_source", lambda data: Labelled())
    cache = LatentCache(write(tmp_path / "cache", num_clips=6))
    assert [cache[i]["label"] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    batch = next(iter(make_dataset(config(shuffle=False), global_batch_size=6, source=cache)))
    assert batch["label"].tolist() == [0, 1, 2, 0, 1, 2]


def test_errors_name_the_problem(tmp_path, saved_codec, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a latent cache.*python -m jaxdit.data.latent_cache"):
        LatentCache(tmp_path)
    with pytest.raises(ConfigError, match="written from videos"):
        write(tmp_path / "x", config(source="cache", cache=str(tmp_path)))
    with monkeypatch.context() as patch:
        patch.setattr(latent_cache, "make_source", lambda data: ShapesDataset(num_frames=4, size=16, length=3))
        with pytest.raises(ValueError, match="--num-clips 4 is more than the 3 clips"):
            write(tmp_path / "x", num_clips=4)
    cache = LatentCache(write(tmp_path / "cache"))
    with pytest.raises(IndexError, match="index 12 is out of range.*clips 0..11"):
        cache[NUM_CLIPS]
    cache.check(config())
    with pytest.raises(ConfigError, match="codec.*'identity'.*'saved'.*--codec.kind"):
        cache.check(config(saved_codec))
    with pytest.raises(ConfigError, match="text.max_length=48.*text.max_length=32.*--text.max_length 48"):
        cache.check(config(max_length=32))
    four = dataclasses.replace(config(), model=jaxdit.ModelConfig(variant="tiny/1x4x4", in_channels=4))
    with pytest.raises(ConfigError, match="3 channels.*model.in_channels=4.*--model.in_channels 3"):
        cache.check(four)
    with pytest.raises(ConfigError, match="4 frames of 16x16.*--data.num_frames 4 --data.size 16"):
        cache.check(config(size=32))
    with pytest.raises(ConfigError, match="--model.in_channels 3"):  # make_dataset checks a cache source
        make_dataset(four, global_batch_size=4, source=cache)


def test_the_command_line_writes_a_cache_to_train_from(tmp_path):
    out = tmp_path / "cache"
    command = [
        sys.executable, "-m", "jaxdit.data.latent_cache", "--config", "configs/tiny.py", "--out", str(out),
        "--num-clips", "10", "--shard-size", "8", "--batch-size", "8", "--data.seed", "3",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 10 clips in 2 shards" in result.stdout
    train = f"python train.py --config configs/tiny.py --data.seed 3 --data.source cache --data.cache {out}"
    assert train in result.stdout
    cache = LatentCache(out)
    tiny = jaxdit.config.apply_overrides(jaxdit.load_config(REPO / "configs" / "tiny.py"), ["--data.seed", "3"])
    cache.check(tiny)
    video = ShapesDataset(num_frames=2, size=16, seed=3)[9]["video"]  # in the short, padded last batch
    np.testing.assert_allclose(cache[9]["latents"], codecs.to_float(video), rtol=0, atol=1e-6)
