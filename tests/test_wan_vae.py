"""Wan 2.1's VAE as a jaxdit codec: parity with diffusers' AutoencoderKLWan on a tiny random model
(tests/fixtures/wan_vae, made by its make_fixture.py in a side environment; diffusers' reference run in
float64), causality in time, the chunked decode against the whole-clip one, the codec directory, and the
converter's checks."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdit import codec as codecs
from jaxdit.codec.wan_vae import DECODE_CHUNK
from jaxdit.convert import read_tensors
from jaxdit.convert.wan_vae import convert, wan_vae

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "wan_vae"
CONFIG = json.loads((FIXTURE / "config.json").read_text())


def channels_last(video: np.ndarray) -> np.ndarray:
    return video.transpose(0, 2, 3, 4, 1)  # diffusers' (B, C, T, H, W) -> (B, T, H, W, C)


@pytest.fixture(scope="module")
def vae_and_reference():
    tensors = read_tensors(FIXTURE / "vae.safetensors", what="a Wan VAE's weights")
    reference = {name: channels_last(value) for name, value in np.load(FIXTURE / "reference.npz").items()
                 if value.ndim == 5}
    return wan_vae(CONFIG, tensors), tensors, reference


def test_encode_and_decode_match_diffusers(vae_and_reference):
    vae, _, ref = vae_and_reference
    video = jnp.asarray(ref["video"])  # (2, 9, 16, 24, 3): 1 + 4 * 2 frames, non-square
    assert vae.latent_shape(video.shape) == (2, 3, 2, 3, 4) and vae.factors == (4, 8, 8)
    mean, logvar = vae.encode_moments(video)
    np.testing.assert_allclose(mean, ref["mean"], atol=1e-5)
    np.testing.assert_allclose(logvar, ref["logvar"], atol=1e-5)
    np.testing.assert_allclose(vae.encode(video), ref["latents"], atol=1e-5)  # (mean - latents_mean) / latents_std
    np.testing.assert_allclose(vae.decode_z(jnp.asarray(ref["mean"]), chunk=0), ref["decoded"], atol=2e-5)  # whole
    assert vae.decode_chunk == DECODE_CHUNK == 1  # decode: one latent frame at a time after frame 0, as diffusers
    decode = codecs.jitted(vae, "decode")  # as the sampler runs it: one compiled scan over the chunks
    np.testing.assert_allclose(decode(jnp.asarray(ref["latents"])), ref["decoded"], atol=2e-5)


def test_it_is_causal_in_time(vae_and_reference):
    vae, _, ref = vae_and_reference
    video = jnp.asarray(ref["video"][:1])  # the first clip: causality does not depend on the batch
    first, _ = vae.encode_moments(video[:, :1])  # the first frame alone: the first latent frame
    np.testing.assert_allclose(first, ref["mean"][:1, :1], atol=1e-5)
    five, _ = vae.encode_moments(video[:, :5])  # 1 + 4 frames: the first two latent frames
    np.testing.assert_allclose(five, ref["mean"][:1, :2], atol=1e-5)
    head = vae.decode_z(jnp.asarray(ref["mean"][:1, :2]), chunk=0)  # two latent frames: the first 5 frames
    np.testing.assert_allclose(head, ref["decoded"][:1, :5], atol=2e-5)
    with pytest.raises(ValueError, match="use 1 \\+ 4k frames"):
        vae.encode(video[:, :8])


def test_the_chunked_decode_is_the_whole_clip_decode(vae_and_reference):
    """In float64, so that only the order of the sums differs: carrying each causal convolution's last frames
    from chunk to chunk gives the whole clip's video (float32 differs by its rounding, about 1e-5 here)."""
    vae, _, ref = vae_and_reference
    mean = ref["mean"][:1]  # (1, 3, 2, 3, 4): one clip, as the chunks do not depend on the batch
    with jax.enable_x64(True):
        graphdef, state = nnx.split(vae)
        vae64 = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float64), state))
        z = jnp.asarray(np.concatenate([mean, mean[:, 1:]], axis=1), jnp.float64)  # (1, 5, 2, 3, 4)
        whole = vae64.decode_z(z, chunk=0)  # (1, 17, 16, 24, 3)
        chunked = vae64.decode_z(z, chunk=3)  # 3 does not divide the 4 latent frames after frame 0: the last is padded
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)
        np.testing.assert_allclose(vae64.decode_z(z[:, :1], chunk=1), whole[:, :1], rtol=0, atol=1e-12)  # frame 0
    with pytest.raises(ValueError, match="decode_chunk=-1: latent frames decoded at a time"):
        vae.decode_z(jnp.asarray(mean), chunk=-1)


def test_a_converted_folder_is_a_codec_directory(vae_and_reference, tmp_path):
    vae, _, ref = vae_and_reference
    folder = tmp_path / "Wan2.1-T2V-tiny" / "vae"  # a pipeline folder: its vae/ is read
    folder.mkdir(parents=True)
    shutil.copy(FIXTURE / "config.json", folder / "config.json")
    shutil.copy(FIXTURE / "vae.safetensors", folder / "diffusion_pytorch_model.safetensors")
    out = convert(folder.parent, tmp_path / "codec", decode_chunk=0)
    loaded = codecs.load(out)
    spec = codecs.describe(out)["spec"]
    assert loaded.kind == "wan_vae" and spec["latents_std"] == CONFIG["latents_std"]
    assert spec["decode_chunk"] == loaded.decode_chunk == 0  # the whole clip at once
    video = jnp.asarray(ref["video"])
    np.testing.assert_array_equal(codecs.jitted(loaded)(video), codecs.jitted(vae)(video))
    del spec["decode_chunk"]  # a codec.json without the option: the default, chunked
    (out / codecs.SPEC_FILE).write_text(json.dumps({**codecs.describe(out), "spec": spec}))
    assert codecs.load(out).decode_chunk == DECODE_CHUNK
    codecs.check_unchanged(out, {**codecs.describe(out), "spec": {**spec, "decode_chunk": 4}}, "a run")  # same latents
    with pytest.raises(ValueError, match="decode_chunk=-1"):
        convert(folder.parent, tmp_path / "other", decode_chunk=-1)


def test_the_converter_names_what_does_not_fit(vae_and_reference):
    _, tensors, _ = vae_and_reference
    broken = dict(tensors)
    del broken["decoder.up_blocks.1.upsamplers.0.time_conv.bias"]
    broken["encoder.extra.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    broken["quant_conv.weight"] = np.zeros((8, 8, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"lacks 1: decoder\.up_blocks\.1\.upsamplers\.0\.time_conv\.bias.*does not "
                                         r"expect: encoder\.extra\.weight.*quant_conv\.weight \(8, 8, 3, 1, 1\)"):
        wan_vae(CONFIG, broken)
    with pytest.raises(ValueError, match="is_residual=True.*not Wan 2.2's"):
        wan_vae({**CONFIG, "is_residual": True}, tensors)
