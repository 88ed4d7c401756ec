"""A latent cache on disk (written by `jaxdit.data.latent_cache`) and `LatentCache`, its reader.

Layout of a cache directory (clip i lives in shard i // shard_size):

    cache.json            what was encoded: num_clips, shard_size, latent shape and dtype, the codec
                          (config section and codec.json), the data section, text.max_length
    shard_00000/          clips 0 .. shard_size - 1
        latents.npy       float32 (n, t, h, w, c): codec.encode of the videos (the posterior mean)
        text_tokens.npy   int32 (n, L): the captions, tokenised (caption dropout happens in training)
        text_mask.npy     bool (n, L)
        text_features.npy with a frozen text encoder (text.encoder="t5"): its bfloat16 features (n, L, E) of
                          the captions, stored as their uint16 bit patterns, so that training never runs it
        captions.json     the n captions
        labels.npy        int32 (n,), when the source has class labels
    shard_00001/ ...
    null_text.npz         with a frozen text encoder: tokens, mask and features of the empty caption (what a
                          dropped caption becomes)

A cache of several clip shapes (data.buckets) holds one such cache per bucket, each a folder of its own,
and which bucket each clip went to:

    cache.json            num_clips, the bucket shapes, the codec, data and text as above
    assignment.npy        int32 (num_clips,): each clip's bucket (-1: it fit none and was skipped)
    bucket_8x32x48/       a cache as above of that bucket's clips, in order (its cache.json records the bucket)
    bucket_1x32x32/ ...

`open_cache` opens either kind; `BucketedLatentCache` reads the second.

The reader checks a run's config against what the cache records (its codec, tokenizer, clip
shape) and names what to change when they differ.
"""

import collections
import dataclasses
import json
import os
import pathlib

import numpy as np

from jaxdit.codec.directory import describe
from jaxdit.config import Config, ConfigError

HEADER = "cache.json"
ASSIGNMENT = "assignment.npy"
LATENTS, TOKENS, MASK, LABELS = "latents.npy", "text_tokens.npy", "text_mask.npy", "labels.npy"
CAPTIONS = "captions.json"
FEATURES, NULL_TEXT = "text_features.npy", "null_text.npz"
FORMAT = 1  # bumped when the layout changes
LATENT_DTYPE = np.float32  # latents are stored in float32 whatever the codec computes in
WRITE_COMMAND = "python -m jaxdit.data.latent_cache --config CONFIG --out DIR --num-clips N"
_OPEN_SHARDS = 32  # shards a LatentCache keeps memory-mapped (each holds a few file descriptors)


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def bucket_folder(shape) -> str:
    """(8, 32, 48) -> 'bucket_8x32x48', where a bucketed cache keeps that bucket's clips."""
    return "bucket_" + "x".join(str(int(n)) for n in shape)


def open_cache(directory):
    """The cache written in `directory`: a `LatentCache` of one clip shape or a `BucketedLatentCache`."""
    path = pathlib.Path(directory) / HEADER
    if path.is_file() and "bucket_shapes" in json.loads(path.read_text()):
        return BucketedLatentCache(directory)
    return LatentCache(directory)


def codec_record(config: Config) -> dict:
    """The codec as the cache records it: its config section and, for a saved codec, its codec.json."""
    section = dataclasses.asdict(config.codec)
    if config.codec.kind == "saved":  # as train.py records it: absolute, so it names one codec from anywhere
        section["path"] = os.path.abspath(config.codec.path)
    return {"config": section, "description": describe(config.codec.path) if config.codec.kind == "saved" else None}


def to_bfloat16_bits(features: np.ndarray) -> np.ndarray:
    """Features -> their bfloat16 bit patterns as uint16 (a .npy of bfloat16 needs ml_dtypes to read back)."""
    import ml_dtypes

    return np.asarray(features).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.asarray(bits).view(ml_dtypes.bfloat16)


class LatentCache:
    """Random access to a written cache: `cache[i]` -> {"latents": float32 (t, h, w, c), "caption": str,
    "text_tokens": int32 (L,), "text_mask": bool (L,)} (+ "text_features": bfloat16 (L, E) of a frozen
    text encoder, + "label": int); `null_text` holds the empty caption's. Like `ShapesDataset`, it is a
    grain source. Shards are memory-mapped when first read; the open maps are not pickled, so the
    cache travels to data-loader worker processes as its directory name and header.
    """

    def __init__(self, directory):
        self.directory = str(directory)
        path = pathlib.Path(directory)
        if not (path / HEADER).is_file():
            raise FileNotFoundError(
                f"{self.directory!r} is not a latent cache (no {HEADER}): write one with `{WRITE_COMMAND}`."
            )
        self.info = json.loads((path / HEADER).read_text())
        self.num_clips, self.shard_size = self.info["num_clips"], self.info["shard_size"]
        self.latent_shape = tuple(self.info["latent_shape"])  # (t, h, w, c)
        self.bucket = tuple(self.info["bucket"]) if self.info.get("bucket") else None  # (F, H, W): a bucket's clips
        missing = [shard_name(k) for k in range(self.info["num_shards"]) if not (path / shard_name(k)).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"the latent cache {self.directory!r} is incomplete: {len(missing)} of its {self.info['num_shards']} "
                f"shards are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). Rerun the "
                f"command that wrote it (`{WRITE_COMMAND}` with --num-clips {self.num_clips}): it writes only the "
                "missing shards."
            )
        self._open = collections.OrderedDict()  # shard -> its arrays, least recently used first
        self.text_encoder = self.info.get("text_encoder")  # a frozen encoder's record, or None (bytes)
        self.null_text = None  # {"text_tokens", "text_mask", "text_features"} of the empty caption
        if self.text_encoder is not None:
            if not (path / NULL_TEXT).is_file():
                raise FileNotFoundError(
                    f"the latent cache {self.directory!r} holds text features but not {NULL_TEXT}, the empty caption's "
                    f"(what a dropped caption becomes): rerun the command that wrote it (`{WRITE_COMMAND}`), which "
                    "writes only what is missing."
                )
            with np.load(path / NULL_TEXT) as null:
                self.null_text = {"text_tokens": null["text_tokens"], "text_mask": null["text_mask"],
                                  "text_features": from_bfloat16_bits(null["text_features"])}

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.num_clips:
            raise IndexError(
                f"latent cache index {i} is out of range: {self.directory!r} holds clips 0..{self.num_clips - 1}."
            )
        shard, j = self._shard(i // self.shard_size), i % self.shard_size
        clip = {
            "latents": np.array(shard[LATENTS][j]),  # (t, h, w, c), copied out of the memory map
            "caption": shard[CAPTIONS][j],
            "text_tokens": np.array(shard[TOKENS][j]),  # (L,)
            "text_mask": np.array(shard[MASK][j]),  # (L,)
        }
        if FEATURES in shard:
            clip["text_features"] = from_bfloat16_bits(np.array(shard[FEATURES][j]))  # (L, E)
        if LABELS in shard:
            clip["label"] = int(shard[LABELS][j])
        return clip

    def _shard(self, k: int) -> dict:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        path = pathlib.Path(self.directory) / shard_name(k)
        names = [LATENTS, TOKENS, MASK] + [LABELS] * self.info["has_labels"] + [FEATURES] * bool(self.text_encoder)
        shard = {name: np.load(path / name, mmap_mode="r") for name in names}
        shard[CAPTIONS] = json.loads((path / CAPTIONS).read_text())
        expected = min(self.shard_size, self.num_clips - k * self.shard_size)
        if len(shard[LATENTS]) != expected or len(shard[CAPTIONS]) != expected:
            raise ValueError(
                f"{path} holds {len(shard[LATENTS])} clips, not {expected}: the shard is damaged. Delete that folder "
                "and rerun the command that wrote the cache to write it again."
            )
        self._open[k] = shard
        if len(self._open) > _OPEN_SHARDS:
            self._open.popitem(last=False)
        return shard

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": collections.OrderedDict()}  # memory maps stay in their process

    def check(self, config: Config) -> None:
        """A ConfigError unless a run of `config` can train on these latents."""
        where, write = self._check_encoding(config)
        rewrite = f"or {write}"
        data = self.info["data"]
        if config.data.buckets:
            raise ConfigError(
                f"{where} holds clips of one shape, {data['num_frames']} frames of {data['size']}x{data['size']} "
                f"pixels, but this config lists data.buckets: train on it without them, or {write} (with the buckets)."
            )
        if (data["num_frames"], data["size"]) != (config.data.num_frames, config.data.size):
            raise ConfigError(
                f"{where} holds clips of {data['num_frames']} frames of {data['size']}x{data['size']} pixels but this "
                f"config has data.num_frames={config.data.num_frames}, data.size={config.data.size}: set "
                f"--data.num_frames {data['num_frames']} --data.size {data['size']}, {rewrite}."
            )

    def _check_encoding(self, config: Config) -> tuple[str, str]:
        """A ConfigError unless these latents were made as `config` makes them (codec, text, channels);
        returns the phrases its messages use: where the cache is, and how to write another."""
        where = f"the latent cache {self.directory!r}"
        write = f"write a cache for this config with `{WRITE_COMMAND}`"
        rewrite = f"or {write}"
        recorded, current = self.info["codec"], codec_record(config)
        if recorded["config"] != current["config"]:
            raise ConfigError(
                f"{where} was encoded with codec {recorded['config']} but this config has codec {current['config']}: "
                f"train with the cache's codec (--codec.kind, --codec.path), {rewrite}."
            )
        if recorded["description"] != current["description"]:
            raise ConfigError(
                f"the codec at {config.codec.path!r} is not the one {where} was encoded with (its codec.json was "
                f"{recorded['description']}, it is now {current['description']}): {write}."
            )
        self._check_text_encoder(config, where, write)
        if self.info["text_max_length"] != config.text.max_length:
            raise ConfigError(
                f"{where} holds captions tokenised to text.max_length={self.info['text_max_length']} but this config "
                f"has text.max_length={config.text.max_length}: set --text.max_length "
                f"{self.info['text_max_length']}, {rewrite}."
            )
        channels = self.latent_shape[-1]
        if channels != config.model.in_channels:
            raise ConfigError(
                f"{where} holds latents of {channels} channels but this config has model.in_channels="
                f"{config.model.in_channels}: set --model.in_channels {channels}, {rewrite}."
            )
        return where, write

    def latent_shape_of(self, shape) -> tuple[int, ...]:
        """The latents (t, h, w, c) of the clips of `shape` (frames, height, width): this cache's one shape."""
        return self.latent_shape

    def _check_text_encoder(self, config: Config, where: str, write: str) -> None:
        from jaxdit import frozen_text

        recorded = self.text_encoder
        if config.text.encoder == "byte":
            if recorded is not None:
                raise ConfigError(
                    f"{where} holds the features of a frozen {recorded['config'].get('model_type', 't5')} text encoder "
                    f"but this config trains a byte text encoder: set --text.encoder t5 --text.path DIR (the encoder "
                    f"it was written with), or {write}."
                )
            return
        if recorded is None:
            raise ConfigError(
                f"{where} holds byte tokens, not the features of a frozen text encoder, and this config has "
                f"text.encoder='t5': {write}."
            )
        frozen_text.check_unchanged(config.text, recorded, where)

    def __repr__(self) -> str:
        return f"LatentCache({self.directory!r}: {self.num_clips} clips of latents {self.latent_shape})"


class BucketedLatentCache:
    """A cache of several clip shapes (module docstring): `cache.clip(i, shape)` -> clip i as `LatentCache`
    gives it, from its bucket's cache. `shapes` and `assignment` (each clip's bucket, -1: none) are what a
    data plan assigns clips by (`jaxdit.data.pipeline.assignment`), as for a video folder."""

    def __init__(self, directory):
        self.directory = str(directory)
        path = pathlib.Path(directory)
        self.info = json.loads((path / HEADER).read_text())
        self.num_clips = self.info["num_clips"]
        self.shapes = [tuple(shape) for shape in self.info["bucket_shapes"]]
        if not (path / ASSIGNMENT).is_file():
            raise FileNotFoundError(
                f"the latent cache {self.directory!r} is incomplete: {ASSIGNMENT} (each clip's bucket) is missing. "
                f"Rerun the command that wrote it (`{WRITE_COMMAND}`): it writes only what is missing."
            )
        self.assignment = np.load(path / ASSIGNMENT)  # (num_clips,) int32
        counts = np.bincount(self.assignment[self.assignment >= 0], minlength=len(self.shapes))
        self.buckets = [LatentCache(path / bucket_folder(shape)) if count else None
                        for shape, count in zip(self.shapes, counts, strict=True)]
        # Clip i is clip rank[i] of its bucket's cache: the clips keep their order within a bucket.
        self._rank = np.zeros(self.num_clips, np.int64)
        for b in range(len(self.shapes)):
            where = self.assignment == b
            self._rank[where] = np.arange(where.sum())
        opened = [cache for cache in self.buckets if cache is not None]
        self.text_encoder = opened[0].text_encoder if opened else None
        self.null_text = opened[0].null_text if opened else None

    def __len__(self) -> int:
        return self.num_clips

    def clip(self, i: int, shape) -> dict:
        b = int(self.assignment[i])
        if b < 0 or self.shapes[b] != tuple(shape):
            raise IndexError(f"clip {i} of the latent cache {self.directory!r} is not in bucket {tuple(shape)}.")
        return self.buckets[b][int(self._rank[i])]

    def __getitem__(self, i: int) -> dict:
        return self.clip(i, self.shapes[int(self.assignment[i])])

    def latent_shape_of(self, shape) -> tuple[int, ...]:
        """The latents (t, h, w, c) of the clips of `shape` (frames, height, width), one of the buckets."""
        shape = tuple(shape)
        if shape not in self.shapes:
            raise ConfigError(
                f"the latent cache {self.directory!r} holds the buckets {', '.join(map(str, self.shapes))}, not "
                f"{shape}: set data.buckets to its shapes, or write a cache for this config with `{WRITE_COMMAND}`."
            )
        cache = self.buckets[self.shapes.index(shape)]
        return tuple(self.info["latent_shapes"][self.shapes.index(shape)]) if cache is None else cache.latent_shape

    def check(self, config: Config) -> None:
        """A ConfigError unless a run of `config` can train on these latents: the run's buckets are the
        cache's, and every bucket's latents were made as the run makes them."""
        where = f"the latent cache {self.directory!r}"
        if [tuple(shape) for shape in config.data.shapes] != self.shapes:
            raise ConfigError(
                f"{where} holds the buckets {';'.join('x'.join(map(str, s)) for s in self.shapes)} but this config has "
                f"{';'.join('x'.join(map(str, s)) for s in config.data.shapes)}: set --data.buckets to the cache's, "
                f"or write a cache for this config with `{WRITE_COMMAND}`."
            )
        for cache in self.buckets:
            if cache is not None:
                cache._check_encoding(config)

    def __repr__(self) -> str:
        counts = np.bincount(self.assignment[self.assignment >= 0], minlength=len(self.shapes))
        parts = ", ".join(f"{'x'.join(map(str, s))}: {n}" for s, n in zip(self.shapes, counts, strict=True))
        return f"BucketedLatentCache({self.directory!r}: {self.num_clips} clips; {parts})"
