import dataclasses
import pathlib

import jax
import pytest
from flax import nnx

import jaxdit
from jaxdit.model_config import parse_variant

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("S/2", ((384, 12, 6), (1, 2, 2))),
        ("B/1x2x2", ((768, 12, 12), (1, 2, 2))),
        ("L/2x4x4", ((1024, 24, 16), (2, 4, 4))),
        ("XL/1x2x3", ((1152, 28, 16), (1, 2, 3))),
        ("tiny/4", ((64, 2, 4), (1, 4, 4))),
    ],
)
def test_variant_table(variant, expected):
    assert parse_variant(variant) == expected
    config = jaxdit.ModelConfig.from_variant(variant)
    assert (config.width, config.depth, config.heads) == expected[0]
    assert config.patch == expected[1]


@pytest.mark.parametrize("variant", ["XXL/2", "XL", "XL/2x2", "xl/2", "XL/2x2x2x2"])
def test_bad_variant_names_the_choices(variant):
    with pytest.raises(ValueError, match="XL/1x2x2"):
        jaxdit.ModelConfig.from_variant(variant)


def test_zero_patch_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        jaxdit.ModelConfig.from_variant("XL/0x2x2")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dtype", "float64", "model.dtype"),
        ("attention", "flash", "model.attention"),
        ("remat", "some", "model.remat"),
        ("in_channels", 0, "model.in_channels"),
        ("num_classes", -1, "model.num_classes"),
        ("class_dropout_prob", 1.0, "model.class_dropout_prob"),
        ("mlp_ratio", 0.0, "model.mlp_ratio"),
    ],
)
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        jaxdit.ModelConfig(**{field: value})


def test_guidance_channels_must_fit_the_latents():
    model = jaxdit.ModelConfig(in_channels=4)
    assert jaxdit.Config(model=model, sample=jaxdit.SampleConfig(guidance_channels=3)).sample.guidance_channels == 3
    with pytest.raises(ValueError, match=r"sample.guidance_channels=5 exceeds the model's 4 latent channels"):
        jaxdit.Config(model=model, sample=jaxdit.SampleConfig(guidance_channels=5))


def test_overrides_and_derived_fields():
    config = jaxdit.ModelConfig.from_variant("XL/1x2x2", in_channels=8, learn_sigma=True, num_classes=1000)
    assert config.out_channels == 16
    assert not config.has_text
    assert jaxdit.ModelConfig.from_variant("S/2", text_dim=512).has_text
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.in_channels = 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_files_build_a_model(path):
    config = jaxdit.load_config(path)
    assert config.name == path.stem
    model = nnx.eval_shape(lambda: jaxdit.VideoDiT(config.model, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert all(leaf.dtype == jax.numpy.float32 for leaf in jax.tree.leaves(params))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) > 0


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxdit.load_config(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        jaxdit.load_config(tmp_path / "empty.py")
    (tmp_path / "wrong.py").write_text("def get_config():\n    return {}\n")
    with pytest.raises(TypeError, match="not jaxdit.Config"):
        jaxdit.load_config(tmp_path / "wrong.py")


def test_sample_prompts_from_the_command_line_and_through_json():
    import json

    config = jaxdit.config.apply_overrides(
        jaxdit.Config(), ["--sample.prompts", "a red circle moving left; a blue square moving up;", "--sample.cfg_scale", "2"]
    )
    assert config.sample.prompts == ("a red circle moving left", "a blue square moving up")
    assert config.sample.cfg_scale == 2.0
    assert jaxdit.Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for field, value in [("sampler", "rk4"), ("steps", 0), ("eta", -1.0), ("fps", 0.0)]:
        with pytest.raises(ValueError, match="sample"):
            jaxdit.SampleConfig(**{field: value})


def test_jaxdit_config_still_exports_what_moved_to_options_and_model_config():
    from jaxdit import config, model_config, options

    moved = {
        options: ["DTYPES", "DATA_SOURCES", "ATTENTION_IMPLEMENTATIONS", "POSITIONS", "CONTEXT_ATTENTION", "CONTEXT_AXIS",
                  "REMAT_POLICIES", "NOISE_SCHEDULES", "PROCESSES", "PREDICTIONS", "TIME_SAMPLINGS", "LR_SCHEDULES",
                  "CODECS", "RECONSTRUCTION_LOSSES", "TEXT_ENCODERS", "TASKS", "SAMPLERS", "resolve_sampler",
                  "context_degrees"],
        model_config: ["VARIANTS", "parse_variant", "ModelConfig"],
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(config, name) is getattr(module, name), name
            assert name in config.__all__, name
    assert set(config.__all__) <= set(dir(config))
    assert jaxdit.ModelConfig is config.ModelConfig and jaxdit.VARIANTS is config.VARIANTS
