"""Training a video autoencoder as a codec (`task="codec"`): held-out PSNR, previews, freezing.

train.py runs the same loop as for the DiT (checkpoints, resume, logging); what differs is
the loss (`jaxdit.codec.autoencoder.codec_loss`) and what is written at each preview:
`CodecPreviews.write` reconstructs held-out clips with the EMA weights, logs their PSNR, writes original-vs-reconstruction videos to
workdir/samples/, measures the latent scale on those clips and saves the frozen codec to
workdir/codec/, which `jaxdit.codec.load(workdir)` reads and a DiT config names as
`CodecConfig(kind="saved", path=workdir)`.
"""

import dataclasses
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdit.codec.base import psnr, to_float, to_uint8
from jaxdit.config import Config

log = logging.getLogger(__name__)

HELD_OUT_SEED_OFFSET = 1_000_003  # moving shapes drawn with data.seed + this are never trained on
PREVIEW_CLIPS = 4  # held-out clips shown as original | reconstruction
_MIN_LATENT_STD = 1e-6  # below this the latents carry nothing: the scale 1/std would be meaningless


def held_out_source(config: Config):
    """Clips never trained on: other moving shapes, or the folder of `data.eval_manifest`."""
    from jaxdit.data.pipeline import make_source

    data = config.data
    if data.source == "shapes":
        return make_source(dataclasses.replace(data, seed=data.seed + HELD_OUT_SEED_OFFSET))
    if data.eval_manifest:
        return make_source(dataclasses.replace(data, manifest=data.eval_manifest))
    log.warning("no data.eval_manifest: the codec's PSNR is measured on the first training clips, not held-out ones")
    return make_source(data)


class CodecPreviews:
    """At each preview step: held-out PSNR, original | reconstruction videos, the frozen codec in workdir/codec/."""

    def __init__(self, config: Config, graphdef, mesh, abstract_state, workdir: pathlib.Path, *, writer, enabled: bool):
        self.config, self.graphdef, self.writer, self.enabled = config, graphdef, writer, enabled
        self.workdir = pathlib.Path(workdir)
        self.directory = self.workdir / "samples"
        source = held_out_source(config)
        count = min(config.autoencoder.eval_clips, len(source))
        self.clips = np.stack([source[i]["video"] for i in range(count)])  # (N, T, H, W, 3) uint8
        self.replicated = replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.tree.map(lambda x: x.sharding, abstract_state.ema)

        def reconstruct(ema, model_rngs, video):
            model = nnx.merge(graphdef, ema, model_rngs)
            x = to_float(video)  # (b, T, H, W, 3)
            mean, _ = model.moments(x)  # (b, t, h, w, c)
            out = jnp.clip(model.decoder(mean), -1.0, 1.0)  # (b, T, H, W, 3): what the videos show
            stats = jnp.stack([mean.mean(), jnp.square(mean).mean()])  # for the latent scale
            return to_uint8(out), psnr(out, x), stats

        self._reconstruct = jax.jit(reconstruct, in_shardings=(params, replicated, replicated), out_shardings=replicated)

    def _path(self, step: int, suffix: str) -> pathlib.Path:
        return self.directory / f"step_{step:07d}{suffix}"

    def written(self, step: int) -> bool:
        return self._path(step, ".mp4").exists()

    def evaluate(self, state) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Reconstructions (N, T, H, W, 3) uint8, PSNR per clip (N,), and the latents' mean and std."""
        batch = self.config.train.batch_size
        videos, scores, stats = [], [], []
        for start in range(0, len(self.clips), batch):
            chunk = self.clips[start : start + batch]
            chunk = jax.make_array_from_callback(chunk.shape, self.replicated, lambda i, c=chunk: c[i])
            out, score, moment = (_host(x) for x in self._reconstruct(state.ema, state.model_rngs, chunk))
            videos.append(out), scores.append(score), stats.append(moment * len(score))
        first, second = np.sum(stats, axis=0) / len(self.clips)
        std = float(np.sqrt(max(second - first**2, 0.0)))  # float cancellation may dip below 0
        if not np.isfinite(std) or std < _MIN_LATENT_STD:
            raise FloatingPointError(
                f"the codec's latents have std {std} on the held-out clips: the encoder has collapsed or diverged, "
                "so no latent scale can be measured. Lower train.learning_rate or autoencoder.kl_weight and retrain."
            )
        return np.concatenate(videos), np.concatenate(scores), float(first), std

    def write(self, step: int, state) -> None:
        from jaxdit import codec as codecs
        from jaxdit.video_io import write_videos

        reconstructions, scores, mean, std = self.evaluate(state)
        metrics = {"eval_psnr": float(scores.mean()), "latent_mean": mean, "latent_std": std}
        self.writer.write(step, metrics)
        # Freeze: the EMA weights, latents scaled to unit variance (as measured here), into workdir/codec/.
        model = nnx.merge(self.graphdef, state.ema, state.model_rngs)
        model.scale, model.shift = 1.0 / std, mean
        notes = dict(
            step=step, eval_psnr_db=metrics["eval_psnr"], held_out_clips=len(self.clips),
            scale_measured_on=f"the posterior means of {len(self.clips)} held-out clips",
        )
        _replace_directory(self.workdir / codecs.RUN_CODEC_DIR, lambda path: codecs.save(model, path, **notes))
        if self.enabled:
            shown = min(PREVIEW_CLIPS, len(self.clips))
            pairs = np.concatenate([self.clips[:shown], reconstructions[:shown]], axis=3)  # (n, T, H, 2W, 3)
            labels = [f"original | reconstruction, {s:.1f} dB" for s in scores[:shown]]
            for suffix in (".png", ".mp4"):  # the mp4 last: its presence marks the step as done
                write_videos(self._path(step, suffix), pairs, labels, fps=self.config.sample.fps, num_samples=1)
        log.info(
            "step %d: held-out PSNR %.2f dB on %d clips; latents mean %.3f std %.3f; frozen codec in %s",
            step, metrics["eval_psnr"], len(self.clips), mean, std, self.workdir / codecs.RUN_CODEC_DIR,
        )


def _replace_directory(target: pathlib.Path, write) -> None:
    """`write(tmp)`, then swap it in for `target` by renames: a reader sees the old codec or the new one,
    never a half-written one, and a kill at any moment leaves one of them in place (or in `.old`)."""
    tmp, old = (target.with_name(target.name + suffix) for suffix in (".tmp", ".old"))
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if primary:
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxdit frozen codec written")


def _host(array: jax.Array) -> np.ndarray:
    """A replicated array's value, readable on every process."""
    return np.asarray(array.addressable_data(0))
