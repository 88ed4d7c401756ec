"""The latent cache: a data set encoded once by the frozen codec, so that training reads latents
instead of decoding and encoding every video at every step.

    python -m jaxdit.data.latent_cache --config configs/shapes.py --out caches/shapes --num-clips 50000
    python train.py --config configs/shapes.py --data.source cache --data.cache caches/shapes

The layout on disk and the reader, `LatentCache`, are in `jaxdit.data.cache_format`.

A shard is written into a temporary folder and renamed when complete, so a shard folder that
exists is a complete shard: an interrupted writer loses nothing, and running the same command
again writes only the missing shards. Several processes split the shards (process p writes
shard k when k % process_count == p); any process count gives the same cache.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import shlex
import shutil
import sys

import jax
import numpy as np
from flax import nnx

from jaxdit import frozen_text
from jaxdit.config import Config, ConfigError
from jaxdit.data.cache_format import (  # noqa: F401 (LatentCache: the reader of what this module writes)
    ASSIGNMENT,
    CAPTIONS,
    FEATURES,
    FORMAT,
    HEADER,
    LABELS,
    LATENT_DTYPE,
    LATENTS,
    MASK,
    NULL_TEXT,
    TOKENS,
    WRITE_COMMAND,
    LatentCache,
    bucket_folder,
    codec_record,
    shard_name,
    to_bfloat16_bits,
)
from jaxdit.data.pipeline import make_source
from jaxdit.text import make_tokenizer

DEFAULT_SHARD_SIZE = 1000  # clips per shard: ~256 MB of 16x32x32x4 latents, few enough files for any file system
DEFAULT_BATCH_SIZE = 32  # clips per jitted encode call
_TMP_SUFFIX = ".tmp"  # a shard being written; renamed to its final name when complete
_READ_THREADS = 4  # threads reading (decoding, drawing) clips while the codec encodes
# Data fields that only change how clips are batched, not what clip i is: not part of a cache's identity.
_LOADER_FIELDS = ("caption_dropout", "shuffle", "num_workers", "prefetch", "cache", "eval_manifest")


def _shards_of(process_index: int, process_count: int, *, num_clips: int, shard_size: int) -> range:
    """The shards one process writes: every process_count-th, from its index."""
    return range(process_index, math.ceil(num_clips / max(shard_size, 1)), process_count)


def _header(config: Config, *, num_clips: int, shard_size: int, **layout) -> dict:
    """cache.json: what was encoded, and how (`layout`: a cache's shards, or a bucketed cache's buckets)."""
    data = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in _LOADER_FIELDS}
    header = {
        "format": FORMAT,
        "num_clips": num_clips,
        "shard_size": shard_size,
        "latent_dtype": np.dtype(LATENT_DTYPE).name,
        "codec": codec_record(config),
        "data": data,
        "text_max_length": config.text.max_length,
        "text_encoder": frozen_text.record(config.text),  # None: byte tokens, encoded in training
        **layout,
    }
    return json.loads(json.dumps(header))  # as it reads back: tuples become lists


def _write_json_atomically(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _check_resume(directory: pathlib.Path, header: dict) -> None:
    """An existing cache.json must describe the cache this call would write."""
    path = directory / HEADER
    if not path.is_file():
        return
    old, new = _flat(json.loads(path.read_text())), _flat(header)
    differences = [
        f"{key}: {old.get(key)!r} there, {new.get(key)!r} now" for key in {**old, **new} if old.get(key) != new.get(key)
    ]
    if differences:
        raise ConfigError(
            f"{directory} already holds a latent cache written with different settings ({'; '.join(differences)}). "
            "Resuming must use the same config, codec, --num-clips and --shard-size: write to a new --out "
            "directory, or delete this one to rewrite it."
        )


def _flat(header: dict) -> dict:
    """{"data": {"seed": 0}} -> {"data.seed": 0}, so a difference names the field."""
    flat = {}
    for key, value in header.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            flat[key] = value
    return flat


def _encoder(codec, batch_size: int):
    """uint8 videos (B, T, H, W, 3) -> latents (B, t, h, w, c), one jitted program; the batch is split over
    this process's devices when it divides evenly (the codec's state replicated on each)."""
    from jaxdit.codec import frozen_codec_state, jitted
    from jaxdit.sharding import batch_sharding, make_mesh

    devices = jax.local_devices()
    if len(devices) == 1 or batch_size % len(devices):
        return jitted(codec)
    mesh = make_mesh(1, devices=devices)
    nnx.update(codec, frozen_codec_state(codec, mesh))
    encode, split = jitted(codec), batch_sharding(mesh)
    return lambda videos: encode(jax.device_put(videos, split))


def _text_features(config: Config, batch_size: int):
    """(n, L) tokens and mask -> bfloat16 bits (n, L, E) of the frozen text encoder, in jitted batches of
    `batch_size` (padded: one compile); None for the byte encoder, whose tokens are encoded in training."""
    graphdef, state = frozen_text.load(config)
    if graphdef is None:
        return None
    encode = jax.jit(lambda state, tokens, mask: nnx.merge(graphdef, state)(tokens, mask))

    def features(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(tokens), batch_size):
            chunk = slice(start, start + batch_size)
            pad = batch_size - len(tokens[chunk])
            padded = [np.concatenate([a[chunk], np.repeat(a[:1], pad, axis=0)]) for a in (tokens, mask)]
            out.append(to_bfloat16_bits(encode(state, *padded))[: batch_size - pad])  # (b, L, E)
        return np.concatenate(out)

    return features


def _encode_clips(source, indices: range, encode, batch_size: int, readers) -> tuple[np.ndarray, list[dict]]:
    """Clips `indices` of `source` -> float32 latents (n, t, h, w, c) and the clips without their videos.

    Batch by batch, so a shard's videos are never all in memory at once; the next batch is read
    while the codec encodes the last one. Every batch is padded to `batch_size`: one shape, one compile.
    """
    latents, rest, in_flight = [], [], None  # in_flight: (clips in the last batch, its latents being computed)
    for start in range(0, len(indices), batch_size):
        clips = list(readers.map(source.__getitem__, indices[start:start + batch_size]))
        videos = np.stack([clip["video"] for clip in clips])  # (b, T, H, W, 3), b <= batch_size
        padding = np.zeros((batch_size - len(clips), *videos.shape[1:]), videos.dtype)
        if in_flight is not None:
            latents.append(_fetch(*in_flight))
        in_flight = len(clips), encode(np.concatenate([videos, padding]))  # dispatched, not awaited
        rest += [{key: value for key, value in clip.items() if key != "video"} for clip in clips]
    latents.append(_fetch(*in_flight))
    return np.concatenate(latents), rest  # (n, t, h, w, c)


def _fetch(count: int, latents: jax.Array) -> np.ndarray:
    """(batch_size, t, h, w, c) on the device -> the first `count` (the rest is padding) as float32 on the host."""
    return np.asarray(latents, LATENT_DTYPE)[:count]


def _write_shard(directory: pathlib.Path, k: int, arrays: dict[str, np.ndarray], captions: list[str]) -> None:
    """Writes shard k into a temporary folder, then renames it: a shard folder that exists is complete."""
    tmp = directory / (shard_name(k) + _TMP_SUFFIX)
    if tmp.exists():  # left by an interrupted run
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, array in arrays.items():
        np.save(tmp / name, array)
    (tmp / CAPTIONS).write_text(json.dumps(captions, ensure_ascii=False))
    os.rename(tmp, directory / shard_name(k))


def write_cache(
    config: Config,
    out,
    *,
    num_clips: int,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = False,
) -> pathlib.Path:
    """Encodes clips 0..num_clips-1 of the config's data source with its frozen codec into `out`.

    Resumable: shards already in `out` are skipped. This process writes the shards k with
    k % process_count == process_index; process 0 also writes cache.json. `progress` shows a bar.
    """
    from jaxdit.codec import make_codec

    if config.data.source == "cache":
        raise ConfigError(
            "data.source is 'cache': a latent cache is written from videos; set --data.source shapes or folder."
        )
    config = frozen_text.resolve(config)
    if min(num_clips, shard_size, batch_size, process_count) < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"num_clips, shard_size, batch_size and process_count must be positive and 0 <= process_index < "
            f"process_count; got {num_clips}, {shard_size}, {batch_size}, {process_count} and {process_index}."
        )
    source = make_source(config.data)
    if num_clips > len(source):
        raise ValueError(f"--num-clips {num_clips} is more than the {len(source)} clips of the data source; lower it.")
    codec = make_codec(config.codec)
    shards = dict(shard_size=shard_size, batch_size=batch_size, process_index=process_index,
                  process_count=process_count, progress=progress)
    if config.data.buckets:
        return _write_buckets(config, source, codec, pathlib.Path(out), num_clips=num_clips, **shards)
    return _write_clips(config, source, codec, pathlib.Path(out), num_clips=num_clips, **shards)


class _BucketClips:
    """Clips `indices` of a source, drawn at one bucket's `shape`: what one bucket's cache encodes."""

    def __init__(self, source, indices: np.ndarray, shape: tuple[int, int, int]):
        self.source, self.indices, self.shape = source, indices, shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        return self.source.clip(int(self.indices[j]), self.shape)


def _write_buckets(config: Config, source, codec, directory: pathlib.Path, *, num_clips: int, **shards) -> pathlib.Path:
    """A cache of several clip shapes: each clip's bucket as a data plan assigns it, then one cache a bucket
    of its clips (cache_format's layout). Every process computes the same assignment."""
    from jaxdit.data.buckets import Bucket
    from jaxdit.data.pipeline import assignment

    shapes = list(config.data.shapes)
    buckets = [Bucket(shape, 1) for shape in shapes]
    assigned = assignment(source, buckets, config.data.seed, count=num_clips)[:num_clips].astype(np.int32)  # (N,)
    latent_shapes = [codec.latent_shape((*shape, 3)) for shape in shapes]  # a shape the codec rejects fails here
    header = _header(config, num_clips=num_clips, shard_size=shards["shard_size"], bucket_shapes=shapes,
                     latent_shapes=latent_shapes)  # (F, H, W) and (t, h, w, c) of each bucket
    directory.mkdir(parents=True, exist_ok=True)
    _check_resume(directory, header)
    if shards["process_index"] == 0:
        if not (directory / ASSIGNMENT).is_file():
            with open(directory / (ASSIGNMENT + _TMP_SUFFIX), "wb") as file:
                np.save(file, assigned)
            os.replace(directory / (ASSIGNMENT + _TMP_SUFFIX), directory / ASSIGNMENT)
        if not (directory / HEADER).is_file():
            _write_json_atomically(directory / HEADER, header)
    for b, shape in enumerate(shapes):
        indices = np.flatnonzero(assigned == b)
        if len(indices):
            _write_clips(config, _BucketClips(source, indices, shape), codec, directory / bucket_folder(shape),
                         num_clips=len(indices), bucket=shape, **shards)
    return directory


def _write_clips(
    config: Config, source, codec, directory: pathlib.Path, *, num_clips: int, shard_size: int, batch_size: int,
    process_index: int, process_count: int, progress: bool, bucket: tuple[int, int, int] | None = None,
) -> pathlib.Path:
    """Clips 0..num_clips-1 of `source` (all of one shape) into the shards of one cache in `directory`."""
    batch_size = min(batch_size, shard_size, num_clips)
    first = source[0]
    videos = jax.ShapeDtypeStruct((batch_size, *first["video"].shape), first["video"].dtype)  # (B, T, H, W, 3)
    latents = jax.eval_shape(codec.encode, videos)  # (B, t, h, w, c): a clip shape the codec rejects fails here
    header = _header(
        config, num_clips=num_clips, shard_size=shard_size, num_shards=math.ceil(num_clips / shard_size),
        latent_shape=latents.shape[1:], has_labels="label" in first,  # (t, h, w, c) of one clip
        **({} if bucket is None else {"bucket": bucket}),
    )
    directory.mkdir(parents=True, exist_ok=True)
    _check_resume(directory, header)
    if process_index == 0 and not (directory / HEADER).is_file():
        _write_json_atomically(directory / HEADER, header)

    mine = _shards_of(process_index, process_count, num_clips=num_clips, shard_size=shard_size)
    todo = [k for k in mine if not (directory / shard_name(k)).is_dir()]
    encode = _encoder(codec, batch_size) if todo else None
    tokenizer = make_tokenizer(config.text)
    write_null = process_index == 0 and not (directory / NULL_TEXT).is_file()  # one process writes it
    text_features = _text_features(config, batch_size) if todo or write_null else None
    if text_features is not None and write_null:
        null = tokenizer.encode_batch([""])  # what a dropped caption becomes in training
        null["text_features"] = text_features(null["text_tokens"], null["text_mask"])
        with open(directory / (NULL_TEXT + _TMP_SUFFIX), "wb") as file:
            np.savez(file, **{name: value[0] for name, value in null.items()})
        os.replace(directory / (NULL_TEXT + _TMP_SUFFIX), directory / NULL_TEXT)
    from tqdm import tqdm

    bar = tqdm(todo, desc=f"encoding {directory}", unit="shard", disable=not (progress and todo))
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as readers:
        for k in bar:
            indices = range(k * shard_size, min((k + 1) * shard_size, num_clips))
            latents, clips = _encode_clips(source, indices, encode, batch_size, readers)
            captions = [clip["caption"] for clip in clips]
            tokens = tokenizer.encode_batch(captions)  # (n, L) each
            arrays = {LATENTS: latents, TOKENS: tokens["text_tokens"], MASK: tokens["text_mask"]}
            if text_features is not None:
                arrays[FEATURES] = text_features(tokens["text_tokens"], tokens["text_mask"])  # (n, L, E) bits
            if header["has_labels"]:
                arrays[LABELS] = np.array([clip["label"] for clip in clips], np.int32)  # (n,)
            _write_shard(directory, k, arrays, captions)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Encode a config's clips once with its frozen codec into a latent cache to train from.",
        epilog="Override any config field with --section.field VALUE, as train.py takes them. Running the same "
        "command again resumes an interrupted cache.",
    )
    parser.add_argument("--config", required=True, help="a configs/*.py file; its data, codec and text sections")
    parser.add_argument("--out", required=True, help="the cache directory")
    parser.add_argument("--num-clips", type=int, required=True, help="clips 0..N-1 of the data source are encoded")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="clips per shard (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="clips per encode (%(default)s)")
    args, overrides = parser.parse_known_args(argv)

    from jaxdit.config import apply_overrides, load_config
    from jaxdit.sharding import initialize_distributed

    initialize_distributed()  # a multi-host run splits the shards over its processes
    try:
        config = apply_overrides(load_config(args.config), overrides)
        process_index, process_count = jax.process_index(), jax.process_count()
        mine = _shards_of(process_index, process_count, num_clips=args.num_clips, shard_size=args.shard_size)
        there = [k for k in mine if (pathlib.Path(args.out) / shard_name(k)).is_dir()]
        directory = write_cache(
            config, args.out, num_clips=args.num_clips, shard_size=args.shard_size, batch_size=args.batch_size,
            process_index=process_index, process_count=process_count, progress=True,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    header = json.loads((directory / HEADER).read_text()) if (directory / HEADER).is_file() else None
    if header is not None and "bucket_shapes" in header:
        print(f"wrote this process's shards of {args.num_clips} clips in {len(header['bucket_shapes'])} buckets to "
              f"{directory} (shards already there were kept)")
    else:
        written = [k for k in mine if k not in there]
        clips = sum(min(args.shard_size, args.num_clips - k * args.shard_size) for k in written)
        print(f"wrote {clips} clips in {len(written)} shards to {directory} ({len(there)} shards were already there)")
    if process_index == 0 and header is not None:
        train = ["python", "train.py", "--config", args.config, *overrides]  # the same clips: the same overrides
        train += ["--data.source", "cache", "--data.cache", str(directory)]
        shapes = header.get("latent_shapes", [header.get("latent_shape")])
        print(f"latents {', '.join(str(tuple(s)) for s in shapes)} per clip; train from them with:\n  {shlex.join(train)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
