"""The input pipeline on grain: a random-access source -> shuffle -> per-process shard ->
caption dropout and tokenisation -> batches -> prefetch (in worker processes when asked).

A batch is {"video": uint8 (B, T, H, W, 3), "text_tokens": int32 (B, L), "text_mask": bool (B, L)}
(plus "label" (B,) when the source has class labels), B being this process's share of the
global batch. From a latent cache (data.source="cache", `jaxdit.data.latent_cache`) the clips
are already encoded: the batch has "latents" float32 (B, t, h, w, c) in place of "video", and
the captions' cached tokens (and, with a frozen T5, its cached "text_features" (B, L, E) bfloat16).
The iterator's state (`get_state` / `set_state`) is small and
exact: a restored iterator yields the same next batch, so training resumes mid-epoch.
"""

import logging

import grain
import numpy as np

from jaxdit.config import Config, DataConfig
from jaxdit.text import make_tokenizer

log = logging.getLogger(__name__)

_READ_THREADS = 2  # threads decoding clips when there are no worker processes


def make_source(data: DataConfig):
    """The random-access clip source the config names: `source[i] -> {"video", "caption"}`
    (a latent cache: `{"latents", "caption", "text_tokens", "text_mask"}`)."""
    if data.source == "cache":
        from jaxdit.data.cache_format import LatentCache

        return LatentCache(data.cache)
    if data.source == "shapes":
        from jaxdit.data.shapes import ShapesDataset

        return ShapesDataset(num_frames=data.num_frames, size=data.size, seed=data.seed, max_objects=data.max_objects)
    from jaxdit.data.video_folder import VideoFolder

    folder = VideoFolder(
        data.manifest, num_frames=data.num_frames, size=data.size, frame_stride=data.frame_stride,
        fps=data.fps or None,
    )
    log.info("%s", folder.summary())
    return folder


class PrepareClip(grain.transforms.RandomMap):
    """Drops the caption to the empty caption with probability `dropout`, then tokenises it
    (or takes the tokens a latent cache stored, and the frozen text encoder's features: `null_text`
    holds the empty caption's). One random draw per clip either way, so a cache drops the same
    captions as the videos it was written from."""

    def __init__(self, tokenizer, dropout: float, null_text: dict | None = None):
        self.tokenizer, self.dropout, self.null_text = tokenizer, dropout, null_text

    def random_map(self, clip: dict, rng: np.random.Generator) -> dict:
        dropped = rng.random() < self.dropout
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


def make_dataset(
    config: Config,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    source=None,
) -> grain.IterDataset:
    """Batches for this process. `num_epochs=None` repeats forever, each epoch shuffled anew.

    Every process builds the same shuffled (and caption-dropped) order, cut into global
    batches; process i reads the i-th slice of every global batch. So the global batch, and
    the noise each example gets in training, is the same whatever the number of processes.
    """
    data = config.data
    if global_batch_size % process_count:
        raise ValueError(
            f"the global batch size {global_batch_size} must divide evenly over {process_count} processes."
        )
    source = make_source(data) if source is None else source
    from jaxdit.data.cache_format import LatentCache

    null_text = None
    if isinstance(source, LatentCache):  # written with this run's codec and tokenizer?
        source.check(config)
        null_text = source.null_text
    dataset = grain.MapDataset.source(source)
    if data.shuffle:
        dataset = dataset.shuffle(seed=data.seed)
    if num_epochs != 1:
        dataset = dataset.repeat(num_epochs)
    prepare = PrepareClip(make_tokenizer(config.text), data.caption_dropout, null_text)
    dataset = dataset.random_map(prepare, seed=data.seed)
    dataset = dataset.batch(global_batch_size // process_count, drop_remainder=True)  # one process's slice
    whole_batches = len(dataset) // process_count * process_count  # every process gets as many batches
    dataset = dataset[:whole_batches][process_index::process_count]
    read = grain.ReadOptions(num_threads=1 if data.num_workers else _READ_THREADS, prefetch_buffer_size=data.prefetch)
    iterable = dataset.to_iter_dataset(read)
    if data.num_workers:
        _parse_absl_flags()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return iterable


def _parse_absl_flags() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
