"""Codecs: the video autoencoder's shapes and causality, codec directories, training one with
train.py, and a DiT trained on its frozen latents."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdit import codec as codecs
from jaxdit.codec.autoencoder import VideoAutoencoder
from jaxdit.codec.linear import fit
from jaxdit.codec.train import HELD_OUT_SEED_OFFSET, psnr
from jaxdit.config import (
    AutoencoderConfig,
    CodecConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TextConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)
from jaxdit.data.latent_cache import write_cache
from jaxdit.data.shapes import ShapesDataset
from jaxdit.pipeline import Pipeline, VideoSampler
from jaxdit.sharding import make_mesh
from jaxdit.train_loop import check_config, train

# Held-out 2-frame 16x16 moving shapes after the 300 steps below: black frames score 17.1 dB, the
# codec 19.6 dB (its loss leaves the all-black plateau after ~250 steps).
PSNR_THRESHOLD_DB = 18.5
LINEAR_PSNR_THRESHOLD_DB = 24.0  # the linear codec of the test below scores 30.0 dB
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "channels, temporal, patch, frames, latent",
    [
        ((8, 8), 0, 1, 4, (4, 8, 8)),  # 2x spatial
        ((8, 8), 1, 2, 5, (3, 4, 4)),  # 4x spatial, 2x time, causal: 1 + 2k frames -> 1 + k
        ((8, 8, 8), 2, 1, 9, (3, 4, 4)),  # 4x spatial, 4x time
        ((8, 8, 8), 2, 1, 1, (1, 4, 4)),  # a single image is a 1-frame video
    ],
)
def test_autoencoder_shapes(channels, temporal, patch, frames, latent):
    make = lambda: VideoAutoencoder(channels=channels, temporal_downsample=temporal, patch=patch, latent_channels=3,
                                    rngs=nnx.Rngs(0))
    video = jax.ShapeDtypeStruct((2, frames, 16, 16, 3), jnp.uint8)
    # Shapes only: built and traced inside eval_shape, nothing computed.
    latents = jax.eval_shape(lambda v: make().encode(v), video)
    chex.assert_shape(latents, (2, *latent, 3))
    assert nnx.eval_shape(make).latent_shape(video.shape) == latents.shape
    chex.assert_shape(jax.eval_shape(lambda z: make().decode(z), latents), video.shape)
    reconstruction, mean, logvar = jax.eval_shape(lambda v: make()(v, rng=jax.random.key(0)), video)
    chex.assert_shape(reconstruction, video.shape)
    chex.assert_equal_shape([mean, logvar, latents])


def test_autoencoder_is_causal_in_time():
    """Changing video frames 5.. changes neither the latents of frames 0..4 nor their reconstruction."""
    video = np.random.default_rng(0).uniform(-1, 1, (1, 9, 4, 4, 3)).astype(np.float32)
    changed = video.copy()
    changed[:, 5:] = 0.5

    @jax.jit  # the model is built inside: one compile, no eager initialisation
    def round_trip(videos):
        model = VideoAutoencoder(channels=(4, 4), temporal_downsample=1, rngs=nnx.Rngs(0))
        latents = model.encode(videos)
        return latents, model.decode(latents)

    latents, videos = round_trip(np.concatenate([video, changed]))  # (2, 5, 2, 2, 4), (2, 9, 4, 4, 3)
    # Latent frame j sees video frames <= 2j: frames 5.. reach latent frames 3.. only.
    np.testing.assert_array_equal(latents[0, :3], latents[1, :3])
    assert not np.allclose(latents[0, 3:], latents[1, 3:])
    # Video frame i is decoded from latent frames <= ceil(i / 2): frames 0..4 from latents 0..2.
    np.testing.assert_array_equal(videos[0, :5], videos[1, :5])
    assert not np.allclose(videos[0, 5:], videos[1, 5:])


def test_latent_shape_names_what_does_not_fit():
    model = nnx.eval_shape(lambda: VideoAutoencoder(channels=(8, 8), temporal_downsample=1, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"8 frames do not fit .* use 1 \+ 2k frames \(e\.g\. 7\)"):
        model.latent_shape((8, 16, 16, 3))
    with pytest.raises(ValueError, match="multiple of 2"):
        model.latent_shape((5, 15, 15, 3))


def random_codec(directory, *, step: int, **kwargs) -> VideoAutoencoder:
    """A saved VideoAutoencoder with random weights, made without eager initialisation (fast)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoAutoencoder(**kwargs, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(step)
    state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), state)
    model = nnx.merge(graphdef, state)
    codecs.save(model, directory, step=step)
    return model


def test_codec_directory_round_trip(tmp_path):
    model = random_codec(tmp_path / "codec", step=7, channels=(8,), patch=2, scale=0.5, shift=0.25)
    loaded = codecs.load(tmp_path)  # a run's workdir: its codec/ folder is found
    assert (loaded.kind, loaded.scale, loaded.shift, loaded.factors) == ("autoencoder", 0.5, 0.25, (1, 2, 2))
    assert codecs.describe(tmp_path)["step"] == 7
    video = jax.random.randint(jax.random.key(0), (1, 2, 8, 8, 3), 0, 256).astype(jnp.uint8)
    np.testing.assert_array_equal(codecs.jitted(loaded)(video), codecs.jitted(model)(video))
    with pytest.raises(FileNotFoundError, match="no codec in .* give a directory written by a codec training run"):
        codecs.load(tmp_path / "missing")
    for f in (tmp_path / "codec" / "params").glob("ocdbt.process_*/d/*"):
        f.write_bytes(f.read_bytes()[:10])  # a copy that stopped part-way
    with pytest.raises(ValueError, match=r"the codec's parameters in .*params do not read: ValueError: .*Copy the codec"):
        codecs.load(tmp_path)


def test_codec_config_errors():
    with pytest.raises(ValueError, match="codec.kind='saved' needs codec.path"):
        CodecConfig(kind="saved")
    with pytest.raises(ValueError, match="autoencoder.temporal_downsample=2 must be in 0..1"):
        AutoencoderConfig(channels=(8, 8), temporal_downsample=2)
    with pytest.raises(ValueError, match="task must be one of"):
        Config(task="vae")


# configs/codec_shapes.py made tiny: 2-frame 16x16 clips, 2x spatial compression, 300 steps.
CODEC_OVERRIDES = [
    "--autoencoder.patch", "2", "--autoencoder.latent_channels", "4", "--autoencoder.eval_clips", "16",
    "--data.num_frames", "2", "--data.size", "16", "--train.steps", "300", "--train.batch_size", "16",
    "--train.warmup_steps", "10", "--train.ema_decay", "0.9", "--train.checkpoint_every", "300",
    "--train.log_every", "100", "--sample.every", "0",
]
CODEC_CONFIG = apply_overrides(load_config(ROOT / "configs" / "codec_shapes.py"), CODEC_OVERRIDES)


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory):
    """A codec trained by `python train.py --config configs/codec_shapes.py ...` on one CPU device."""
    workdir = tmp_path_factory.mktemp("codec_run")
    command = [sys.executable, "train.py", "--config", "configs/codec_shapes.py", "--workdir", str(workdir), *CODEC_OVERRIDES]
    one_device = {**os.environ, "XLA_FLAGS": ""}  # 300 small steps: faster without 8 simulated devices
    result = subprocess.run(command, cwd=ROOT, env=one_device, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def test_training_a_codec_writes_previews_metrics_and_the_frozen_codec(codec_run):
    info = codecs.describe(codec_run)
    assert info["kind"] == "autoencoder" and info["step"] == 300 and info["held_out_clips"] == 16
    records = [json.loads(line) for line in (codec_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_psnr"] for r in records if "eval_psnr" in r] == [info["eval_psnr_db"]]
    assert all(np.isfinite(r["kl"]) for r in records if "kl" in r)
    assert (codec_run / "samples" / "step_0000300.png").is_file()
    assert (codec_run / "samples" / "step_0000300.mp4").is_file()
    # Run again (here with 8 devices and fewer eval clips): it resumes, finds nothing left to do.
    assert train(apply_overrides(CODEC_CONFIG, ["--autoencoder.eval_clips", "8"]), codec_run) == {}
    with pytest.raises(ConfigError, match="holds a run whose autoencoder config differs"):
        train(apply_overrides(CODEC_CONFIG, ["--autoencoder.latent_channels", "8"]), codec_run)


def test_a_trained_codec_reconstructs_held_out_clips_with_unit_variance_latents(codec_run):
    codec = codecs.load(codec_run)
    clips = ShapesDataset(num_frames=2, size=16, seed=HELD_OUT_SEED_OFFSET + 1)  # never seen in training
    video = np.stack([clips[i]["video"] for i in range(32)])  # (32, 2, 16, 16, 3)
    latents = codecs.jitted(codec)(video)  # (32, 2, 8, 8, 4)
    chex.assert_shape(latents, (32, 2, 8, 8, 4))
    assert 0.7 < float(latents.std()) < 1.3 and abs(float(latents.mean())) < 0.3  # the measured scale and shift
    reconstruction = codecs.jitted(codec, "decode")(latents)
    score = float(psnr(reconstruction, codecs.to_float(video)).mean())
    assert score > PSNR_THRESHOLD_DB, f"held-out PSNR {score:.2f} dB"


def test_a_dit_trains_on_the_frozen_codec_and_samples_decoded_videos(tmp_path):
    codec_dir = tmp_path / "codec"
    random_codec(codec_dir, step=300, channels=(8,), patch=2, latent_channels=4)
    config = Config(
        name="latent_tiny",
        codec=CodecConfig(kind="saved", path=str(codec_dir)),
        model=ModelConfig(variant="tiny/1x2x2", in_channels=4, text_dim=32),
        text=TextConfig(max_length=48, depth=1, heads=2),
        data=DataConfig(source="shapes", num_frames=2, size=16),
        train=TrainConfig(steps=2, batch_size=8, learning_rate=1e-3, checkpoint_every=2, log_every=1),
    )
    before = nnx.to_pure_dict(nnx.state(codecs.load(codec_dir), nnx.Param))
    train(config, tmp_path / "dit")
    after = nnx.to_pure_dict(nnx.state(codecs.load(codec_dir), nnx.Param))
    chex.assert_trees_all_equal(before, after)  # bit-identical: the codec is frozen
    pipe = Pipeline.load(tmp_path / "dit")
    assert pipe.config.codec.path == str(codec_dir.absolute())  # recorded, absolute
    assert pipe.codec.kind == "autoencoder"
    # The DiT's parameters are the Denoiser's only: no codec array among them.
    codec_shapes = {x.shape for x in jax.tree.leaves(before)}
    assert not any(x.shape in codec_shapes and x.ndim == 5 for x in jax.tree.leaves(nnx.state(pipe.denoiser)))
    videos = pipe.generate(["a large red circle moving left"], steps=2, cfg_scale=1.0)
    assert videos.shape == (1, 2, 16, 16, 3) and videos.dtype == np.uint8
    # A latent cache of this config fits it (training from one: tests/test_latent_cache.py, test_train_step.py).
    cache = write_cache(config, tmp_path / "cache", num_clips=16, shard_size=8, batch_size=8)
    cached = apply_overrides(config, ["--data.source", "cache", "--data.cache", str(cache)])
    check_config(cached, make_mesh(), pipe.codec)
    with pytest.raises(ConfigError, match="model.variant's patch"):
        check_config(apply_overrides(cached, ["--model.variant", "tiny/1x3x3"]), make_mesh(), pipe.codec)
    # A codec trained further (here: its codec.json rewritten) is not the one the DiT learned.
    info = codecs.describe(codec_dir)
    (codec_dir / codecs.SPEC_FILE).write_text(json.dumps({**info, "step": info["step"] + 100}))
    with pytest.raises(ValueError, match="changed since the run in .* used it \\(step: 300 then, 400 now\\)"):
        Pipeline.load(tmp_path / "dit")
    with pytest.raises(ConfigError, match="changed since"):
        train(apply_overrides(config, ["--train.steps", "3"]), tmp_path / "dit")


def test_configs_that_do_not_fit_the_codec_are_refused_before_training(tmp_path):
    random_codec(tmp_path / "codec", step=1, channels=(8,), patch=2, latent_channels=4)
    base = Config(
        codec=CodecConfig(kind="saved", path=str(tmp_path / "codec")),
        model=ModelConfig(variant="tiny/1x2x2", in_channels=4, text_dim=32),
        data=DataConfig(source="shapes", num_frames=2, size=16),
        train=TrainConfig(steps=1, batch_size=8),
    )
    with pytest.raises(ConfigError, match="do not divide by the codec's 2x2 spatial compression"):
        train(dataclasses.replace(base, data=DataConfig(num_frames=2, size=17)), tmp_path / "a")
    with pytest.raises(ConfigError, match="set --model.in_channels 4"):
        train(apply_overrides(base, ["--model.in_channels", "3"]), tmp_path / "b")
    with pytest.raises(ConfigError, match="a codec trains on videos, not on a latent cache"):
        train(apply_overrides(CODEC_CONFIG, ["--data.source", "cache", "--data.cache", "x"]), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no codec in"):
        train(apply_overrides(base, ["--codec.path", str(pathlib.Path(tmp_path) / "nothing")]), tmp_path / "d")


def test_a_linear_codec_is_fitted_in_closed_form(tmp_path):
    """PCA of 2x2 patches (12 values -> 6 channels): unit-variance latents, a projection as its
    round trip, a held-out PSNR well above the black frames' 17.1 dB, and a command that saves it."""
    train_clips = ShapesDataset(num_frames=2, size=16, seed=0)
    codec = fit(np.stack([train_clips[i]["video"] for i in range(64)]), patch=2, channels=6)
    held_out = ShapesDataset(num_frames=2, size=16, seed=HELD_OUT_SEED_OFFSET)
    video = np.stack([held_out[i]["video"] for i in range(32)])  # (32, 2, 16, 16, 3)
    latents = codecs.jitted(codec)(video)
    chex.assert_shape(latents, (32, 2, 8, 8, 6))
    assert 0.8 < float(latents.std()) < 1.2
    decode = codecs.jitted(codec, "decode")
    reconstruction = decode(latents)
    np.testing.assert_allclose(decode(codecs.jitted(codec)(reconstruction)), reconstruction, atol=1e-4)  # a projection
    score = float(psnr(jnp.clip(reconstruction, -1, 1), codecs.to_float(video)).mean())
    assert score > LINEAR_PSNR_THRESHOLD_DB, f"held-out PSNR {score:.2f} dB"
    command = [sys.executable, "-m", "jaxdit.codec.linear", "--config", "configs/tiny.py", "--out", str(tmp_path / "pca"),
               "--patch", "2", "--channels", "6", "--num-clips", "16"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--codec.kind saved --codec.path" in result.stdout
    loaded = codecs.load(tmp_path / "pca")
    assert (loaded.kind, loaded.factors, loaded.channels) == ("linear", (1, 2, 2), 6)


def test_sampling_takes_the_frame_counts_of_a_causal_codec(tmp_path):
    """1 + 2n frames for a codec that halves time causally: 9 frames are 5 latent frames, 8 are refused."""
    codec = random_codec(tmp_path / "codec", step=1, channels=(8, 8), temporal_downsample=1, latent_channels=4)
    config = Config(model=ModelConfig(variant="tiny/1x2x2", in_channels=4, text_dim=32))
    sampler = VideoSampler(config, None, codec, make_mesh(devices=jax.devices()[:1]), None)
    assert sampler.latent_shape(9, 16, 16) == (5, 8, 8, 4)
    assert sampler.latent_shape(1, 16, 32) == (1, 8, 16, 4)  # an image: one latent frame
    with pytest.raises(ValueError, match=r"8 frames do not fit .* use 1 \+ 2k frames"):
        sampler.latent_shape(8, 16, 16)
    with pytest.raises(ValueError, match="cannot make videos of 18 width: width must be a positive multiple of 4"):
        sampler.latent_shape(9, 16, 18)  # 8x9 latents: the 2x2 patch does not fit
