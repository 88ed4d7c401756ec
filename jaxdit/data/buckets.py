"""Buckets: clips of several shapes in one run, one shape per global step.

A bucket is a clip shape (frames, height, width) with its global batch. Every device of a step gets the
same shape (the step is one SPMD program, compiled once per bucket); the run moves between buckets from
step to step. Images are one-frame clips in one-frame buckets.

- `bucket_for(native, shapes)`: where a clip of native (frames, height, width) goes. A video goes to
  the buckets of more than one frame and at most its frames (if there are none, to the one-frame
  buckets: its first frame), a still to the one-frame buckets; of those, to the ones of the nearest
  aspect ratio; of those, to the largest whose area the clip covers within AREA_TOLERANCE (it may be
  upscaled by 1 / AREA_TOLERANCE in area), else to the smallest; of equal area, to the one of most
  frames. It is then resized to cover the bucket and centre-cropped, and its first frames taken. None
  when no bucket fits: a still with no one-frame bucket, a video shorter than every video bucket and
  no one-frame bucket.
- `Plan`: the deterministic sequence of global batches, each (bucket, clip indices). Every epoch, each
  bucket's clips are thinned by its keep probability, shuffled, and cut into whole batches; the batches
  of all buckets are then shuffled together, all from (seed, epoch). An endless source (the built-in
  shapes) gives every epoch ENDLESS_EPOCH fresh clips, each drawn for a bucket uniformly.
"""

import bisect
import dataclasses
import math
import threading

import numpy as np

AREA_TOLERANCE = 0.8  # a clip covers a bucket when its area is at least this fraction of the bucket's
ENDLESS_EPOCH = 2**16  # clips an epoch of an endless source

Shape = tuple[int, int, int]  # (frames, height, width)


def shape_name(shape: Shape) -> str:
    """(8, 32, 64) -> '8x32x64' (frames x height x width)."""
    return "x".join(map(str, shape))


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A clip shape and its global batch; `keep`: the probability that a clip assigned to it is used in an epoch."""

    shape: Shape
    batch: int
    keep: float = 1.0

    @property
    def name(self) -> str:
        return shape_name(self.shape)


def bucket_for(native: Shape, shapes: list[Shape]) -> int | None:
    """The index in `shapes` of the bucket a clip of `native` (frames, height, width) goes to (module
    docstring), or None when none fits."""
    frames, height, width = native
    fits = [i for i, (f, _, _) in enumerate(shapes) if (f == 1) == (frames == 1) and f <= frames]
    if not fits:  # a video shorter than every video bucket: its first frame as an image, if images are trained
        fits = [i for i, (f, _, _) in enumerate(shapes) if f == 1]
    if not fits:
        return None
    aspect = lambda i: abs(math.log(shapes[i][1] / shapes[i][2]) - math.log(height / width))
    nearest = min(aspect(i) for i in fits)
    fits = [i for i in fits if math.isclose(aspect(i), nearest, abs_tol=1e-9)]
    area = lambda i: shapes[i][1] * shapes[i][2]
    covered = [i for i in fits if height * width >= AREA_TOLERANCE * area(i)]
    if covered:
        return max(covered, key=lambda i: (area(i), shapes[i][0]))
    return min(fits, key=lambda i: (area(i), -shapes[i][0]))


class Plan:
    """Global batch k -> (bucket index, clip indices (B,) of that bucket's global batch B).

    assignment: each clip's bucket index (-1: none) for a finite source whose clips keep their buckets;
    None for an endless source. A pure function of (buckets, assignment, seed, shuffle): every process
    and every resumed run builds the same plan.
    """

    def __init__(self, buckets: list[Bucket], assignment: np.ndarray | None, *, seed: int, shuffle: bool = True):
        self.buckets, self.seed, self.shuffle = list(buckets), seed, shuffle
        self.assignment = None if assignment is None else np.asarray(assignment, np.int64)
        # Epochs are built on demand, in order, by whichever of grain's reading threads needs one first.
        self._lock = threading.Lock()
        self._epochs: list[list[tuple[int, np.ndarray]]] = []
        self._ends: list[int] = []  # per epoch built: the index of the global batch after its last
        empty = [b.name for b, batches in zip(self.buckets, self.batches_per_bucket(0), strict=True) if not batches]
        if empty:
            raise ValueError(
                f"bucket(s) {', '.join(empty)} get no whole global batch in an epoch: too few clips fit them "
                f"({self.report()}). Remove them from data.buckets, lower their batch, or add clips of their shape."
            )

    @property
    def endless(self) -> bool:
        return self.assignment is None

    def clips(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The clip indices an epoch draws from and the bucket of each."""
        if self.endless:
            ids = epoch * ENDLESS_EPOCH + np.arange(ENDLESS_EPOCH)
            return ids, np.random.default_rng([self.seed, epoch, 0]).integers(len(self.buckets), size=ENDLESS_EPOCH)
        return np.arange(len(self.assignment)), self.assignment

    def __getstate__(self) -> dict:  # pickled into grain's worker processes: without the lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _grow(self, done) -> None:
        """Builds epochs in order until `done()`."""
        with self._lock:
            while not done():
                self._epochs.append(self._build(len(self._epochs)))
                self._ends.append((self._ends[-1] if self._ends else 0) + len(self._epochs[-1]))

    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The global batches of one epoch, in order."""
        self._grow(lambda: len(self._epochs) > epoch)
        return self._epochs[epoch]

    def _build(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        ids, of = self.clips(epoch)
        batches = []
        for b, bucket in enumerate(self.buckets):
            rng = np.random.default_rng([self.seed, epoch, 1, b])
            members = ids[of == b]
            if bucket.keep < 1:
                members = members[rng.random(len(members)) < bucket.keep]
            if self.shuffle:
                members = rng.permutation(members)
            whole = len(members) // bucket.batch * bucket.batch
            batches += [(b, chunk) for chunk in np.split(members[:whole], whole // bucket.batch)] if whole else []
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 2]).permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def __getitem__(self, k: int) -> tuple[int, np.ndarray]:
        self._grow(lambda: self._ends and self._ends[-1] > k)
        epoch = bisect.bisect_right(self._ends, k)
        return self._epochs[epoch][k - (self._ends[epoch - 1] if epoch else 0)]

    def batches_per_bucket(self, epoch: int) -> list[int]:
        counts = [0] * len(self.buckets)
        for b, _ in self.epoch(epoch):
            counts[b] += 1
        return counts

    def report(self) -> str:
        """Clips and whole global batches per bucket in the first epoch: '8x32x64: 96 clips, 12 batches of 8; ...'."""
        _, of = self.clips(0)
        batches = self.batches_per_bucket(0)
        parts = [
            f"{bucket.name}: {int((of == b).sum())} clips"
            + (f" (keep {bucket.keep:g})" if bucket.keep < 1 else "")
            + f", {batches[b]} batches of {bucket.batch}"
            for b, bucket in enumerate(self.buckets)
        ]
        skipped = 0 if self.endless else int((of < 0).sum())
        return "; ".join(parts) + (f"; {skipped} clips fit no bucket" if skipped else "")


def make_buckets(data, *, batch_size: int, devices: int, tokens=None) -> list[Bucket]:
    """The run's buckets (`data.shapes`) with their global batches and keep probabilities.

    data: the run's DataConfig. The batches are `data.bucket_batches`; or the token budget
    `data.bucket_tokens` over each bucket's video tokens (`tokens(shape)`), rounded down to a multiple
    of the data-parallel `devices`; or `batch_size` (train.batch_size) for every bucket.
    """
    shapes = list(data.shapes)
    if data.bucket_batches:
        batches = list(data.bucket_batches)
    elif data.bucket_tokens:
        if tokens is None:
            raise ValueError("data.bucket_tokens needs the tokens of each bucket: give `tokens`.")
        batches = [data.bucket_tokens // tokens(shape) // devices * devices for shape in shapes]
        small = [shape_name(s) for s, b in zip(shapes, batches, strict=True) if b < 1]
        if small:
            raise ValueError(
                f"data.bucket_tokens={data.bucket_tokens} gives bucket(s) {', '.join(small)} no batch: their "
                f"{', '.join(str(tokens(s)) for s in shapes if shape_name(s) in small)} tokens a clip on {devices} "
                "devices need a larger budget."
            )
    else:
        batches = [batch_size] * len(shapes)
    keep = list(data.bucket_keep) or [1.0] * len(shapes)
    return [Bucket(shape, batch, k) for shape, batch, k in zip(shapes, batches, keep, strict=True)]
