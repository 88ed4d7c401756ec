"""The input pipeline on grain: a random-access source -> a plan of global batches, one clip shape
each (`jaxdit.data.buckets`) -> this process's share of each, its captions dropped and tokenised ->
prefetch (in worker processes when asked).

A batch is {"video": uint8 (B, T, H, W, 3), "text_tokens": int32 (B, L), "text_mask": bool (B, L)}
(plus "label" (B,) when the source has class labels), B being this process's share of the
global batch of that step's bucket. From a latent cache (data.source="cache", `jaxdit.data.latent_cache`)
the clips are already encoded: the batch has "latents" float32 (B, t, h, w, c) in place of "video", and
the captions' cached tokens (and, with a frozen T5, its cached "text_features" (B, L, E) bfloat16).
Every process builds the same plan and reads its slice of every global batch, so the global batch, its
caption dropout, and the noise each example gets in training are the same whatever the number of
processes. The iterator's state (`get_state` / `set_state`) is small and exact: a restored iterator
yields the same next batch, so training resumes mid-epoch.
"""

import logging

import grain
import numpy as np

from jaxdit.config import Config, DataConfig
from jaxdit.data.buckets import Bucket, Plan, make_buckets
from jaxdit.text import make_tokenizer

log = logging.getLogger(__name__)

_READ_THREADS = 2  # threads reading batches when there are no worker processes
_ENDLESS = 2**62  # the number of batches of a pipeline that repeats forever
_ASSIGN_STREAM = 7  # seeds the bucket drawn for each clip of a finite drawable source (fixed across epochs)
_DROPOUT_STREAM = 3  # seeds the caption dropout of each global batch


def make_source(data: DataConfig):
    """The random-access clip source the config names: `source[i] -> {"video", "caption"}`
    (a latent cache: `{"latents", "caption", "text_tokens", "text_mask"}`); the shapes and a video
    folder also give `source.clip(i, shape)` at any bucket's shape."""
    if data.source == "cache":
        from jaxdit.data.cache_format import open_cache

        return open_cache(data.cache)
    if data.source == "shapes":
        from jaxdit.data.shapes import ShapesDataset

        return ShapesDataset(num_frames=data.num_frames, size=data.size, seed=data.seed, max_objects=data.max_objects)
    from jaxdit.data.video_folder import VideoFolder

    folder = VideoFolder(
        data.manifest, num_frames=data.num_frames, size=data.size, frame_stride=data.frame_stride,
        fps=data.fps or None, shapes=data.shapes,
    )
    log.info("%s", folder.summary())
    return folder


class PrepareClip:
    """A clip -> a training example: its caption dropped to the empty caption when `dropped`, then
    tokenised (or the tokens a latent cache stored, and the frozen text encoder's features: `null_text`
    holds the empty caption's)."""

    def __init__(self, tokenizer, null_text: dict | None = None):
        self.tokenizer, self.null_text = tokenizer, null_text

    def __call__(self, clip: dict, dropped: bool) -> dict:
        pixels = "latents" if "latents" in clip else "video"
        if "text_features" in clip:  # a cache of a frozen encoder's features
            text = self.null_text if dropped else clip
            example = {pixels: clip[pixels], **{k: text[k] for k in ("text_tokens", "text_mask", "text_features")}}
        else:
            if "text_tokens" in clip and not dropped:
                tokens, mask = clip["text_tokens"], clip["text_mask"]  # (L,), (L,)
            else:
                tokens, mask = self.tokenizer.encode("" if dropped else clip["caption"])  # (L,), (L,)
            example = {pixels: clip[pixels], "text_tokens": tokens, "text_mask": mask}
        if "label" in clip:
            example["label"] = np.int32(clip["label"])
        return example


class PlannedBatches:
    """A random-access source of batches for grain: element k is this process's share of global batch k
    of the plan, stacked. Plain data only, so it pickles into worker processes."""

    def __init__(self, plan: Plan, source, prepare: PrepareClip, *, dropout: float, seed: int,
                 process_index: int = 0, process_count: int = 1, length: int = _ENDLESS):
        for bucket in plan.buckets:
            if bucket.batch % process_count:
                raise ValueError(
                    f"the global batch {bucket.batch} of bucket {bucket.name} must divide evenly over "
                    f"{process_count} processes."
                )
        self.plan, self.source, self.prepare = plan, source, prepare
        self.dropout, self.seed, self.length = dropout, seed, length
        self.process_index, self.process_count = process_index, process_count

    @property
    def buckets(self) -> list[Bucket]:
        return self.plan.buckets

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict:
        b, ids = self.plan[k]
        bucket = self.plan.buckets[b]
        # One draw per example of the global batch, so every process drops the same captions.
        dropped = np.random.default_rng([self.seed, _DROPOUT_STREAM, k]).random(len(ids)) < self.dropout  # (B,)
        share = bucket.batch // self.process_count
        mine = slice(self.process_index * share, (self.process_index + 1) * share)
        examples = [self.prepare(self._read(i, bucket), d) for i, d in zip(ids[mine], dropped[mine], strict=True)]
        return {name: np.stack([e[name] for e in examples]) for name in examples[0]}

    def _read(self, i: int, bucket: Bucket) -> dict:
        if hasattr(self.source, "clip"):
            return self.source.clip(int(i), bucket.shape)
        return self.source[int(i)]  # a source of one shape (checked by `assignment`)

    def example(self, b: int) -> dict:
        """This process's share of the first global batch of bucket `b` (for the step's input shapes)."""
        k = next(k for k, (bucket, _) in enumerate(self.plan.epoch(0)) if bucket == b)
        return self[k]


def assignment(source, buckets: list[Bucket], seed: int, count: int | None = None) -> np.ndarray | None:
    """Each clip's bucket for the plan (None: an endless source, whose clips are drawn per epoch).

    A video folder (or a latent cache of several shapes) assigns its clips by their native shapes; the
    built-in shapes, drawn at any shape, get a bucket drawn for each clip; any other source gives clips of
    one shape: one bucket. `count`: the first `count` clips of an endless source get a bucket each (what a
    latent cache of it stores).
    """
    if getattr(source, "endless", False):
        return None if count is None else np.random.default_rng([seed, _ASSIGN_STREAM]).integers(len(buckets), size=count)
    if hasattr(source, "assignment"):
        if [tuple(s) for s in source.shapes] != [b.shape for b in buckets]:
            raise ValueError(f"the source's shapes {source.shapes} are not the buckets {[b.shape for b in buckets]}.")
        return np.asarray(source.assignment, np.int64)
    if hasattr(source, "clip"):
        return np.random.default_rng([seed, _ASSIGN_STREAM]).integers(len(buckets), size=len(source))
    if len(buckets) > 1:
        raise ValueError(
            f"data.buckets lists {len(buckets)} shapes, but this source gives clips of one shape: buckets need "
            "the built-in shapes (data.source='shapes') or a video folder (data.source='folder')."
        )
    return np.zeros(len(source), np.int64)


def plan_batches(
    config: Config,
    *,
    global_batch_size: int | None = None,
    buckets: list[Bucket] | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    source=None,
) -> PlannedBatches:
    """The plan of a run's batches (`PlannedBatches`), before grain reads it.

    buckets: the run's buckets with their global batches (`jaxdit.data.buckets.make_buckets`); without
    them, `data.shapes` with `data.bucket_batches`, or `global_batch_size` for every shape.
    `num_epochs=None` repeats forever, each epoch shuffled anew.
    """
    data = config.data
    if buckets is None:
        if global_batch_size is None and not data.bucket_batches:
            raise ValueError("give the global batch size, or the buckets with their batches.")
        buckets = make_buckets(data, batch_size=global_batch_size or 0, devices=1)
    source = make_source(data) if source is None else source
    from jaxdit.data.cache_format import BucketedLatentCache, LatentCache

    null_text = None
    if isinstance(source, LatentCache | BucketedLatentCache):  # written with this run's codec and tokenizer?
        source.check(config)
        null_text = source.null_text
    plan = Plan(buckets, assignment(source, buckets, data.seed), seed=data.seed, shuffle=data.shuffle)
    length = _ENDLESS if num_epochs is None else sum(len(plan.epoch(e)) for e in range(num_epochs))
    prepare = PrepareClip(make_tokenizer(config.text), null_text)
    return PlannedBatches(
        plan, source, prepare, dropout=data.caption_dropout, seed=data.seed, process_index=process_index,
        process_count=process_count, length=length,
    )


def make_dataset(config: Config, *, batches: PlannedBatches | None = None, **plan) -> grain.IterDataset:
    """Batches for this process, read by grain: `batches` from `plan_batches`, or made here from `plan`
    (its arguments: global_batch_size or buckets, process_index, process_count, num_epochs, source)."""
    data = config.data
    batches = plan_batches(config, **plan) if batches is None else batches
    read = grain.ReadOptions(num_threads=1 if data.num_workers else _READ_THREADS, prefetch_buffer_size=data.prefetch)
    iterable = grain.MapDataset.source(batches).to_iter_dataset(read)
    if data.num_workers:
        _parse_absl_flags()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return iterable


def _parse_absl_flags() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
