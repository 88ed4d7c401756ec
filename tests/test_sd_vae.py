"""The SD-VAE codec against diffusers' AutoencoderKL, and its converter.

The fixture (tests/fixtures/sd_vae, written once by its make_fixture.py with torch and diffusers) is a
tiny random-weight AutoencoderKL and its outputs; here it is converted and the codec compared with them.
Compiling dominates on CPU, so every forward pass comes from three programs, each compiled once.
"""

import functools
import json
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from jaxdit import codec
from jaxdit.codec.base import to_float
from jaxdit.codec.sd_vae import SDVAE
from jaxdit.convert import sd_vae as convert_sd_vae

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd_vae"
WEIGHTS, CONFIG = FIXTURE / "vae.safetensors", FIXTURE / "config.json"
PARITY_TOL = 1e-4  # float32, diffusers on torch vs jaxdit on XLA
BATCH, FRAMES, SIZE = 2, 3, 16
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # programs this small compile in half the time, run as fast
CLI = [sys.executable, "-m", "jaxdit.convert.sd_vae"]


@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory):
    """The CLI converts the fixture in its own process, started first so that it runs while this one compiles."""
    out = tmp_path_factory.mktemp("cli") / "codec"
    process = subprocess.Popen(
        [*CLI, str(WEIGHTS), "--out", str(out), "--config", str(CONFIG)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    yield process, out
    process.kill()  # a no-op once test_cli has waited for it


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE / "reference.npz") as archive:
        return dict(archive)


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    return convert_sd_vae.convert(WEIGHTS, tmp_path_factory.mktemp("sd_vae"), config=CONFIG)


@pytest.fixture(scope="module")
def vae(codec_dir):
    return codec.load(codec_dir)


@pytest.fixture(scope="module")
def outputs(vae, reference):
    """Everything the tests compare."""
    graphdef, state = nnx.split(vae)
    jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    moments = jit(lambda state, images: nnx.merge(graphdef, state).encode_moments(images))
    decode_images = jit(lambda state, z: nnx.merge(graphdef, state).decode_images(z))

    @jit
    def codec_run(state, video, rng):
        vae = nnx.merge(graphdef, state)
        latents = vae.encode(video)  # (B, T, h, w, c)
        return latents, vae.encode(video, rng=rng), vae.decode(latents)

    video = np.random.default_rng(0).integers(0, 256, (BATCH, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    latents, sample, decoded_video = codec_run(state, video, jax.random.key(1))
    return jax.device_get(dict(
        moments=moments(state, reference["images"]),
        decoded=decode_images(state, reference["mean"]),
        latents=latents,
        frame_means=[moments(state, to_float(video[:, t]))[0] for t in range(FRAMES)],  # each (B, h, w, c)
        video=decoded_video,
        frames=[decode_images(state, latents[:, t] / vae.scale) for t in range(FRAMES)],  # each (B, H, W, 3)
        samples=[sample, codec_run(state, video, jax.random.key(1))[1], codec_run(state, video, jax.random.key(2))[1]],
    ))


def test_parity_with_diffusers(outputs, reference):
    mean, logvar = outputs["moments"]
    for name, ours in (("mean", mean), ("logvar", logvar), ("decoded", outputs["decoded"])):
        np.testing.assert_allclose(ours, reference[name], atol=PARITY_TOL, rtol=0, err_msg=name)


def test_video_is_coded_frame_by_frame(vae, outputs):
    latent_shape = vae.latent_shape((BATCH, FRAMES, SIZE, SIZE, 3))
    assert latent_shape == (BATCH, FRAMES, SIZE // 2, SIZE // 2, 4)
    chex.assert_shape(outputs["latents"], latent_shape)
    chex.assert_shape(outputs["video"], (BATCH, FRAMES, SIZE, SIZE, 3))
    for t in range(FRAMES):
        np.testing.assert_allclose(outputs["latents"][:, t], vae.scale * outputs["frame_means"][t], atol=1e-6)
        np.testing.assert_allclose(outputs["video"][:, t], outputs["frames"][t], atol=1e-5)
    with pytest.raises(ValueError, match="divide"):
        vae.latent_shape((BATCH, FRAMES, SIZE + 1, SIZE, 3))


def test_sampling_is_random_but_deterministic_per_key(outputs):
    same_a, same_b, other = outputs["samples"]
    np.testing.assert_array_equal(same_a, same_b)
    assert np.abs(same_a - outputs["latents"]).max() > 1e-3  # not the mean
    assert np.abs(same_a - other).max() > 1e-3


def test_codec_directory(vae, codec_dir):
    info = codec.describe(codec_dir)
    assert info["kind"] == "sd_vae" and info["source"] == str(WEIGHTS)
    assert isinstance(vae, SDVAE) and vae.factors == (1, 2, 2) and not vae.clip_latents
    assert vae.spec() == dict(
        block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
        in_channels=3, out_channels=3, scale=json.loads(CONFIG.read_text())["scaling_factor"], shift=0.0,
    )
    rebuilt = nnx.eval_shape(lambda: SDVAE(**json.loads(json.dumps(vae.spec())), rngs=nnx.Rngs(0)))
    chex.assert_trees_all_equal_shapes(params(rebuilt), params(vae))


def test_defaults_are_sd_vae():
    vae = nnx.eval_shape(lambda: SDVAE(rngs=nnx.Rngs(0)))
    sd_vae_parameters = 83_653_863  # diffusers' AutoencoderKL of Stable Diffusion 1.x/2.x
    assert sum(p.size for p in jax.tree.leaves(params(vae))) == sd_vae_parameters
    assert vae.latent_shape((1, 5, 256, 256, 3)) == (1, 5, 32, 32, 4)
    assert (vae.scale, vae.shift) == (0.18215, 0.0)


def params(vae) -> dict:
    return nnx.to_pure_dict(nnx.state(vae, nnx.Param))


def test_old_attention_names_and_npz(vae, tmp_path):
    """Older checkpoints name attention query/key/value/proj_attn; .npz files hold the same keys."""
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in convert_sd_vae.read_tensors(WEIGHTS).items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    np.savez(tmp_path / "vae.npz", **renamed)
    config = json.loads(CONFIG.read_text())
    converted = convert_sd_vae.from_diffusers(convert_sd_vae.read_tensors(tmp_path / "vae.npz"), config)
    chex.assert_trees_all_equal(params(converted), params(vae))


def test_converter_errors(tmp_path):
    tensors = convert_sd_vae.read_tensors(WEIGHTS)
    config = json.loads(CONFIG.read_text())

    lacking = {k: v for k, v in tensors.items() if k != "encoder.mid_block.attentions.0.to_q.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 .*: encoder\.mid_block\.attentions\.0\.to_q\.weight\."):
        convert_sd_vae.from_diffusers(lacking, config)

    extra = {**tensors, "text_encoder.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"does not: text_encoder\.weight\."):
        convert_sd_vae.from_diffusers(extra, config)

    conv_style = {**tensors, "decoder.mid_block.attentions.0.to_q.weight": np.zeros((16, 16, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"to_q\.weight has shape \(16, 16, 1, 1\) .* but shape \(16, 16\)"):
        convert_sd_vae.from_diffusers(conv_style, config)

    with pytest.raises(ValueError, match=r"norm_num_groups=32 does not divide .*--config"):  # the default groups
        convert_sd_vae.from_diffusers(tensors)

    with pytest.raises(ValueError, match=r"config says layers_per_block=2 but the weights have layers_per_block=1"):
        convert_sd_vae.from_diffusers(tensors, {**config, "layers_per_block": 2})

    with pytest.raises(ValueError, match="not a diffusers AutoencoderKL.*original"):
        convert_sd_vae.from_diffusers({"encoder.down.0.block.0.conv1.weight": np.zeros(1, np.float32)})

    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        convert_sd_vae.read_tensors(tmp_path / "missing.safetensors")

    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        convert_sd_vae.read_tensors(tmp_path / "junk.safetensors")


def test_cli(cli_run, vae, tmp_path):
    process, out = cli_run
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    chex.assert_trees_all_equal(params(codec.load(out)), params(vae))
    with pytest.raises(SystemExit, match="error: no checkpoint file"):  # errors end the CLI with their message
        convert_sd_vae.main([str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "codec")])
