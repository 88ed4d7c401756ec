"""Wan 2.1's transformer as VideoDiT options: numeric parity with diffusers' WanTransformer3DModel on a
tiny random model (tests/fixtures/wan, made by its make_fixture.py in a side environment), Wan's
parameter counts, and the converter's checks of a state_dict."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdit.attention import apply_rope
from jaxdit.convert import read_tensors
from jaxdit.convert.wan import transformer_params, wan_model_config
from jaxdit.model import VideoDiT
from jaxdit.model_config import WAN_LAYOUT, WAN_MLP_WIDTHS, ModelConfig
from jaxdit.patch import rope_3d

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "wan"


def channels_last(video: np.ndarray) -> np.ndarray:
    return video.transpose(0, 2, 3, 4, 1)  # diffusers' (B, C, T, H, W) -> (B, T, H, W, C)


@pytest.fixture(scope="module")
def imported():
    """The fixture's tiny Wan transformer as a VideoDiT, its config and its reference outputs."""
    config = wan_model_config(json.loads((FIXTURE / "transformer_config.json").read_text()))
    tensors = read_tensors(FIXTURE / "transformer.safetensors", what="a Wan transformer's state_dict")
    model = VideoDiT(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, transformer_params(tensors, config))
    nnx.update(model, params)
    return model, config, tensors, dict(np.load(FIXTURE / "reference.npz"))


def test_the_transformer_matches_diffusers(imported):
    model, config, _, ref = imported
    assert (config.width, config.depth, config.heads, config.patch) == (24, 2, 2, (1, 2, 2))
    t = jnp.asarray(ref["timestep"])
    np.testing.assert_allclose(model.t_embed(t), ref["temb"], atol=1e-6)
    text = jnp.asarray(ref["encoder_hidden_states"])  # the second caption zero-padded, every token attended
    np.testing.assert_allclose(model.text_proj(text), ref["text_embeds"], atol=1e-6)
    # Non-square and multi-frame: 3 latent frames of 4x6, 18 tokens.
    x = jnp.asarray(channels_last(ref["hidden_states"]))
    # The caption's mask marks the second one's last 3 tokens as padding: Wan attends them (as zeros) all the same.
    mask = jnp.asarray([[True] * 7, [True] * 4 + [False] * 3])
    assert config.text_padding == "attended"
    out = model(x, t, text=text, text_mask=mask)  # (B, T, H, W, C)
    expected = channels_last(ref["output"])
    assert out.shape == expected.shape
    assert np.abs(np.asarray(out) - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_array_equal(out, model(x, t, text=text))  # the padding's features are zeros already
    noisy = text.at[1, 4:].set(1.0)  # what sits under the padding is replaced by zeros, never read
    np.testing.assert_array_equal(out, model(x, t, text=noisy, text_mask=mask))


def test_interleaved_rope_is_wans_table(imported):
    _, config, _, ref = imported
    cos, sin = rope_3d(config.width // config.heads, (3, 2, 3))  # (N, Dh/2): one angle per pair
    np.testing.assert_allclose(np.repeat(cos, 2, axis=1), ref["rope_cos"], atol=1e-6)  # Wan repeats each for (2j, 2j+1)
    np.testing.assert_allclose(np.repeat(sin, 2, axis=1), ref["rope_sin"], atol=1e-6)
    x = jax.random.normal(jax.random.key(0), (1, 18, 1, 12))
    rotated = np.asarray(apply_rope(x, cos, sin, pairs="interleaved"))[0, :, 0]  # (N, Dh)
    x = np.asarray(x)[0, :, 0]
    even, odd = x[:, 0::2], x[:, 1::2]
    np.testing.assert_allclose(rotated[:, 0::2], even * cos - odd * sin, atol=1e-6)
    np.testing.assert_allclose(rotated[:, 1::2], even * sin + odd * cos, atol=1e-6)


@pytest.mark.parametrize("size", ["1.3B", "14B"])
def test_parameter_counts_equal_diffusers(size):
    counts = json.loads((FIXTURE / "param_counts.json").read_text())[f"Wan2.1-T2V-{size}"]
    config = wan_model_config(counts["config"])
    assert config.variant == f"wan{size}/1x2x2" and config.hidden_width == WAN_MLP_WIDTHS[f"wan{size}"]
    # Counted with the blocks stacked (the same parameters): tracing one block instead of 30 or 40 is quicker.
    stacked = dataclasses.replace(config, scan_layers=True)
    model = nnx.eval_shape(lambda: VideoDiT(stacked, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) == counts["total"]
    # The modulation really is shared: one (D, 6D) projection, and a (6, D) table in each block.
    assert state["shared_modulation"]["kernel"].shape == (config.width, 6 * config.width)
    blocks = state["stacked_blocks"]
    assert blocks["table"].shape == (config.depth, 6, config.width) and "modulation" not in blocks


def test_the_wan_layout_trains_under_scan_layers_as_unrolled(imported):
    model, config, _, ref = imported
    from jaxdit.model import stack_blocks

    scanned = VideoDiT(ModelConfig(**{**config.__dict__, "scan_layers": True}), rngs=nnx.Rngs(1))
    nnx.update(scanned, stack_blocks(nnx.state(model)))
    x, t, text = jnp.asarray(channels_last(ref["hidden_states"])), jnp.asarray(ref["timestep"]), ref["encoder_hidden_states"]
    np.testing.assert_allclose(scanned(x, t, text=jnp.asarray(text)), model(x, t, text=jnp.asarray(text)), atol=1e-5)


def test_masked_padding_is_another_model(imported):
    model, config, _, ref = imported
    masked = VideoDiT(ModelConfig(**{**config.__dict__, "text_padding": "masked"}), rngs=nnx.Rngs(1))
    nnx.update(masked, nnx.state(model))
    x, t, text = (jnp.asarray(a) for a in (channels_last(ref["hidden_states"]), ref["timestep"], ref["encoder_hidden_states"]))
    mask = jnp.asarray([[True] * 7, [True] * 4 + [False] * 3])
    out, wan = masked(x, t, text=text, text_mask=mask), model(x, t, text=text, text_mask=mask)
    np.testing.assert_allclose(out[0], wan[0], atol=1e-6)  # the full caption: the same
    assert not np.allclose(out[1], wan[1], atol=1e-4)  # the padded one: Wan attends its zeros, masked skips them


def test_a_state_dict_that_does_not_fit_is_refused_naming_each_tensor(imported):
    _, config, tensors, _ = imported
    broken = dict(tensors)
    del broken["blocks.1.attn2.norm_k.weight"]
    broken["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    broken["proj_out.weight"] = np.zeros((16, 25), np.float32)
    with pytest.raises(ValueError, match=r"lacks 1 tensors: blocks\.1\.attn2\.norm_k\.weight.*does not expect: "
                                         r"blocks\.0\.extra\.weight.*proj_out\.weight \(16, 25\) \(expected \(16, 24\)\)"):
        transformer_params(broken, config)
    with pytest.raises(ValueError, match="image_dim"):
        wan_model_config({**json.loads((FIXTURE / "transformer_config.json").read_text()), "image_dim": 1280})


def test_wan_layout_options_are_checked():
    with pytest.raises(ValueError, match="model.modulation must be one of per_block, shared"):
        ModelConfig(variant="tiny/1x2x2", modulation="global")
    with pytest.raises(ValueError, match="leave the text unused"):
        ModelConfig(variant="tiny/1x2x2", text_dim=8, pooled_text=False, cross_attention=False)
    with pytest.raises(ValueError, match="WIDTHxDEPTHxHEADS"):
        ModelConfig(variant="24x2/1x2x2")
    assert ModelConfig(variant="24x2x2/1x2x2", **WAN_LAYOUT).width == 24
