"""Imported facebookresearch/DiT checkpoints compute what DiT computes, and sample as DiT samples.

The fixture (tests/fixtures/dit, written once by its make_fixture.py with torch and diffusers) is a
tiny random-weight DiT under DiT's key names, with the reference's outputs: its forward pass, its
guided forward pass (DiT's forward_with_cfg) and a whole guided 10-step DDIM run.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdit import codec, sampling
from jaxdit.codec.sd_vae import SDVAE
from jaxdit.convert import read_tensors
from jaxdit.convert.dit import check_tensors, dit_config, to_videodit
from jaxdit.convert.dit import main as convert_main
from jaxdit.model import VideoDiT
from tests.helpers import pure_forward

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "dit"
WEIGHTS = FIXTURE / "dit_tiny.safetensors"
VARIANT, IMAGE_SIZE, CLASSES = "tiny/2", 64, 10  # the fixture's DiT: 8x8x4 latents of 64x64 images
PARITY_TOL = 1e-5  # float32, as the issue asks
ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE / "reference.npz") as archive:
        return dict(archive)


@pytest.fixture(scope="module")
def tensors():
    return read_tensors(WEIGHTS, what="the fixture")


@pytest.fixture(scope="module")
def config():
    return dit_config(VARIANT, IMAGE_SIZE, num_classes=CLASSES)


@pytest.fixture(scope="module")
def model(tensors, config):
    abstract = nnx.eval_shape(lambda: VideoDiT(config.model, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, to_videodit(tensors, config)))
    rest = jax.jit(lambda: nnx.split(VideoDiT(config.model, rngs=nnx.Rngs(0)), nnx.Param, ...)[2])()  # RNG streams
    return nnx.merge(graphdef, params, rest)


def nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x).transpose(0, 2, 3, 1)[:, None]  # DiT's (B, C, H, W) -> one-frame (B, 1, H, W, C)


def nchw(x: jax.Array) -> np.ndarray:
    return np.asarray(x[:, 0]).transpose(0, 3, 1, 2)


def guided(model, labels: np.ndarray, cfg_scale: float, channels: int):
    """`denoise(x, t)` with DiT's guidance: conditional and null labels in one batch, `channels` guided."""
    both = jnp.concatenate([jnp.asarray(labels), jnp.full(len(labels), CLASSES)])  # (2B,) [labels; null]
    return sampling.guide(lambda x, t: model(x, t, label=both), cfg_scale, channels)


def test_noise_and_variance_match_dit(model, reference):
    out = pure_forward(model)(nhwc(reference["x"]), jnp.asarray(reference["t"]), label=jnp.asarray(reference["y"]))
    assert out.shape == (5, 1, 8, 8, 8)  # noise (4 channels) then variance values (4)
    assert np.abs(reference["out"]).max() > 1  # random weights: not a comparison of zeros
    np.testing.assert_allclose(nchw(out), reference["out"], rtol=0, atol=PARITY_TOL)


def test_guided_prediction_matches_dit_forward_with_cfg(model, reference, config):
    denoise = guided(model, reference["cfg_y"], float(reference["cfg_scale"]), config.sample.guidance_channels)
    out = jax.jit(denoise)(nhwc(reference["x"]), jnp.asarray(reference["t"]))  # (5, 1, 8, 8, 8)
    np.testing.assert_allclose(nchw(out), reference["cfg_out"], rtol=0, atol=PARITY_TOL)


def test_ddim_run_matches_dit_sampler(model, reference, config):
    x_T = nhwc(reference["ddim_x_T"])  # (2, 1, 8, 8, 4)
    denoise = guided(model, reference["ddim_y"], float(reference["cfg_scale"]), config.sample.guidance_channels)
    run = jax.jit(lambda x_T: sampling.sample(
        denoise, jax.random.split(jax.random.key(0), 2), x_T.shape[1:], schedule_kind=config.diffusion.schedule,
        num_train_steps=config.diffusion.num_steps, steps=int(reference["ddim_steps"]), sampler="ddim",
        learn_sigma=True, x_T=x_T,
    ))
    x0, expected = nchw(run(x_T)), reference["ddim_x0"]
    # Early steps divide by sqrt(alpha_bar) ~ 0.006, so random weights end far from [-1, 1]: compare to that scale.
    scale = np.abs(expected).max()
    assert np.abs(x0 - expected).max() <= PARITY_TOL * scale, (np.abs(x0 - expected).max(), scale)


def test_timesteps_are_dits_spacing():
    def dit_spacing(count):  # DiT's space_timesteps for one section: a float stride summed, then rounded
        stride, taken, position = 999 / (count - 1), [], 0.0
        for _ in range(count):
            taken.append(round(position))
            position += stride
        return taken

    for count in (2, 10, 21, 25, 50, 100, 250, 1000):  # 21 is one that evenly rounded linspace got wrong
        assert sampling.timestep_subset(1000, count).tolist() == dit_spacing(count)


def test_mismatched_checkpoints_are_named(tensors, config):
    with pytest.raises(ValueError, match=r"width 64, 2 blocks, patch 2, 4 input channels: --variant tiny/2\) is not DiT-S/2.*lacks 100 weights: blocks\.10\."):
        check_tensors(tensors, dit_config("S/2", IMAGE_SIZE, num_classes=CLASSES))
    with pytest.raises(ValueError, match=r"pos_embed has 16 positions: the checkpoint is for 64x64 images.*--image-size 64"):
        check_tensors(tensors, dit_config(VARIANT, 128, num_classes=CLASSES))
    with pytest.raises(ValueError, match=r"has 1 weights it does not: ema\.extra"):
        check_tensors({**tensors, "ema.extra": np.zeros(1)}, config)
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight has shape \(16, 64\).*but \(32, 64\)"):
        check_tensors({**tensors, "final_layer.linear.weight": tensors["final_layer.linear.weight"][:16]}, config)
    with pytest.raises(ValueError, match=r"y_embedder\.embedding_table\.weight has shape \(11, 64\).*\(1001, 64\)"):
        check_tensors(tensors, dit_config(VARIANT, IMAGE_SIZE))  # 1000 classes
    with pytest.raises(ValueError, match="not DiT's fixed 2-D sin-cos"):
        check_tensors({**tensors, "pos_embed": tensors["pos_embed"] + 0.01}, config)


def test_checkpoint_formats(tensors, tmp_path):
    np.savez(tmp_path / "dit.npz", **tensors)
    assert read_tensors(tmp_path / "dit.npz", what="x").keys() == tensors.keys()
    (tmp_path / "dit.pt").write_bytes(b"not a torch file")
    try:
        import torch
    except ImportError:
        with pytest.raises(ValueError, match=r"needs PyTorch: pip install 'jaxdit\[torch\]'"):
            read_tensors(tmp_path / "dit.pt", what="x")
        return
    torch.save({"ema": {k: torch.from_numpy(v) for k, v in tensors.items()}, "model": {}}, tmp_path / "train.pt")
    loaded = read_tensors(tmp_path / "train.pt", what="x")  # a DiT training checkpoint: its EMA weights
    assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
    """The converter's command on the fixture, with a random SD-VAE of 8x downsampling as the codec."""
    root = tmp_path_factory.mktemp("dit")
    abstract = nnx.eval_shape(lambda: SDVAE(block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4,
                                            rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    draw = np.random.default_rng(0)  # random weights without compiling an initialiser
    params = jax.tree.map(lambda p: jnp.asarray(0.1 * draw.standard_normal(p.shape), p.dtype), params)
    codec.save(nnx.merge(graphdef, params, rest), root / "vae")
    command = [sys.executable, "-m", "jaxdit.convert.dit", str(WEIGHTS), "--variant", VARIANT,
               "--image-size", str(IMAGE_SIZE), "--vae", str(root / "vae"), "--out", str(root / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return root / "run"


def test_imported_run_samples_class_grids(imported_run, tmp_path):
    from PIL import Image

    from jaxdit.pipeline import Pipeline

    record = json.loads((imported_run / "imported.json").read_text())
    assert record["variant"] == VARIANT and record["format"] == "facebookresearch/DiT"
    command = [sys.executable, "sample.py", "--workdir", str(imported_run), "--class-label", "3", "7", "1",
               "--steps", "4", "--sampler", "ddim", "--out", str(tmp_path / "grid.npy")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    images = np.load(tmp_path / "grid.npy")
    assert images.shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8

    pipe = Pipeline.load(imported_run)
    assert pipe.config.sample.guidance_channels == 3 and pipe.config.model.num_classes == CLASSES
    # The run's parameters are the checkpoint's: loaded by Pipeline, VideoDiT still computes DiT's output.
    with np.load(FIXTURE / "reference.npz") as ref:
        out = pure_forward(pipe.model)(nhwc(ref["x"]), jnp.asarray(ref["t"]), label=jnp.asarray(ref["y"]))
        np.testing.assert_allclose(nchw(out), ref["out"], rtol=0, atol=PARITY_TOL)

    from jaxdit.video_io import GAP, TEXT_HEIGHT, write_videos

    write_videos(tmp_path / "grid.png", np.concatenate([images, images]), ["class 3", "class 7", "class 1"] * 2)
    cell = 2 * IMAGE_SIZE  # upscaled to at least CELL pixels
    assert Image.open(tmp_path / "grid.png").size == (4 * cell + 3 * GAP, 2 * (TEXT_HEIGHT + cell) + GAP)  # 4 across


def test_imported_runs_refuse_what_they_cannot_do(imported_run, tmp_path, capsys):
    from jaxdit.train_loop import train

    config = dit_config(VARIANT, IMAGE_SIZE, num_classes=CLASSES)
    with pytest.raises(ValueError, match="holds imported weights.*train into another --workdir"):
        train(config, imported_run)
    sys.path.insert(0, str(ROOT))
    import sample

    with pytest.raises(SystemExit) as exit:
        sample.main(["--workdir", str(imported_run), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 2 and "prompts must be class indices" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="error: pos_embed has 16 positions.*Pass --image-size 64"):
        convert_main([str(WEIGHTS), "--variant", VARIANT, "--image-size", "128", "--vae", str(tmp_path),
                      "--out", str(tmp_path / "run")])
