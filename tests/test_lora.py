"""LoRA fine-tuning (`train.lora_rank`, jaxdit.lora) of the tiny Wan 2.1 import: fresh adapters compute the base
model exactly; training changes and checkpoints only the adapters, never the base; a resume is bitwise; a LoRA
run samples with its adapters applied or merged into the base weights."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdit import init_from, lora
from jaxdit.checkpoint import Checkpointer
from jaxdit.config import Config, ConfigError, apply_overrides, load_config
from jaxdit.pipeline import Pipeline
from jaxdit.sharding import make_mesh
from jaxdit.train_loop import train
from jaxdit.train_step import abstract_base, abstract_train_state, make_model, model_graphdef, split_model

# 5 frames of 32x32 (latents 2x4x4x4 through the fixture's Wan VAE), one clip per simulated device, a checkpoint
# after each of 2 steps; a learning rate high enough, and an EMA short enough, that 2 steps move the adapters
# visibly; a sample at the end.
LORA = ("--data.num_frames", "5", "--data.size", "32", "--train.batch_size", "8", "--train.steps", "2",
        "--train.checkpoint_every", "1", "--train.log_every", "1", "--train.learning_rate", "0.01",
        "--train.lora_rank", "4", "--train.lora_alpha", "8", "--train.lora_targets", "attn,cross,mlp", "--train.ema_decay", "0.5",
        "--model.scan_layers", "true", "--sample.prompts", "a red circle", "--sample.steps", "2")
ROOT = pathlib.Path(__file__).parent.parent
SAMPLE = dict(num_frames=5, height=32, width=32, steps=2, cfg_scale=5.0, seed=0)


def lora_config(imported, *overrides: str) -> Config:
    return apply_overrides(Config(name="wan_tiny_lora"), [*LORA, "--train.init_from", str(imported), *overrides])


def checkpoint(run, step=None):
    """The config and the whole train state of a checkpoint of `run`."""
    with Checkpointer(pathlib.Path(run) / "checkpoints", read_only=True) as checkpointer:
        config = Config.from_dict(checkpointer.restore_config(step))
        return config, checkpointer.restore(abstract_train_state(config, make_mesh()), step=step)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


def losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (pathlib.Path(run) / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def imported(wan_tiny_run):
    return wan_tiny_run


@pytest.fixture(scope="module")
def adapted(imported, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "lora"
    train(lora_config(imported), workdir)
    return workdir


def test_fresh_adapters_compute_the_base_model_exactly(imported, tmp_path):
    config, source = init_from.starting_config(lora_config(imported), tmp_path / "fresh")
    mesh = make_mesh()
    base = init_from.base_params(config, source, mesh)
    graphdef, adapters, _, rngs = split_model(make_model(config, rngs=nnx.Rngs(0)), config)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)]
    assert len(paths) == 7 * 2 and all("'lora'" in p for p in paths)  # 7 projections per block, A and B each
    x = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 4))
    t, text = jnp.array([100.0, 900.0]), jax.random.normal(jax.random.key(2), (2, 24, 32))
    mask = jnp.arange(24)[None] < jnp.array([[5], [24]])
    forward = jax.jit(lambda graphdef, *states: nnx.merge(graphdef, *states).dit(x, t, text=text, text_mask=mask),
                      static_argnums=0)
    got = forward(graphdef, base, adapters, rngs)
    want = forward(model_graphdef(lora.base_config(config)), base, rngs)
    assert np.array_equal(got, want) and np.abs(want).max() > 0
    # train.lora_base_dtype: the same base weights, kept in bfloat16, as the step's frozen argument expects them.
    halved = init_from.base_params(config, source, mesh, "bfloat16")
    expected = abstract_base(apply_overrides(config, ["--train.lora_base_dtype", "bfloat16"]), mesh)
    for array, full, target in zip(jax.tree.leaves(halved), jax.tree.leaves(base), jax.tree.leaves(expected), strict=True):
        assert array.dtype == target.dtype == jnp.bfloat16 and array.sharding == target.sharding
        assert np.array_equal(array, full.astype(jnp.bfloat16))


def test_only_the_adapters_train_and_are_checkpointed(imported, adapted):
    config, state = checkpoint(adapted)
    assert int(state.step) == 2 and config.train.lora_rank == 4
    for name in ("params", "ema", "opt_state"):  # the adapters, their EMA and their Adam moments: nothing more
        shapes = {x.shape for x in jax.tree.leaves(getattr(state, name)) if x.ndim}
        # width 24, 2 stacked blocks, rank 4: q, k and v each an adapter (qkv), k and v each (kv); MLP width 40
        assert shapes == {(2, 24, 12), (2, 3, 4, 24), (2, 24, 4), (2, 1, 4, 24), (2, 24, 8), (2, 2, 4, 24),
                          (2, 1, 4, 40), (2, 40, 4)}, name
    ups = [x for p, x in jax.tree_util.tree_leaves_with_path(state.params) if "'up'" in jax.tree_util.keystr(p)]
    assert all(np.abs(np.asarray(up)).max() > 0 for up in ups)  # every adapter moved away from the identity
    # The base weights a LoRA run reads at every start are the import's, bit for bit.
    with Checkpointer(imported / "checkpoints", read_only=True) as checkpointer:
        stored = checkpointer.restore_weights(abstract_train_state(init_from.read_source(imported).config, make_mesh()))
    base = init_from.base_params(config, init_from.recorded_source(adapted), make_mesh())
    stacked = init_from._stacked(stored["ema"], layout=abstract_train_state(lora.base_config(config), make_mesh()).params)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(base), leaves(stacked), strict=True))
    assert json.loads((adapted / init_from.RECORD).read_text())["init_from"] == str(imported)
    assert (adapted / "samples" / "step_0000002.png").is_file()  # sampled from the base and the EMA adapters


def test_a_resumed_lora_run_is_bitwise_the_straight_one(imported, adapted, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(adapted, resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")
    train(lora_config(imported), resumed)
    assert losses(resumed) == losses(adapted)
    (_, straight), (_, restarted) = checkpoint(adapted, 2), checkpoint(resumed, 2)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(straight), leaves(restarted), strict=True))
    with pytest.raises(ConfigError, match="train.lora_rank"):  # the adapters in its checkpoints are rank 4
        train(lora_config(imported, "--train.lora_rank", "8", "--train.steps", "3"), resumed)


def test_merged_and_applied_adapters_sample_the_same_videos(imported, adapted):
    applied, merged = Pipeline.load(adapted), Pipeline.load(adapted, merge_lora=True)
    assert applied.config.train.lora_rank == 4 and merged.config.train.lora_rank == 0
    kernels = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(merged.model))}
    assert not any("lora" in path for path in kernels)
    # The merged kernels are the base's plus alpha/r A B: they moved away from the import's.
    base = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(applied.model, nnx.Not(nnx.LoRAParam)))}
    qkv = next(path for path in kernels if "stacked_blocks" in path and "qkv" in path and "kernel" in path)
    assert np.abs(np.asarray(kernels[qkv]) - np.asarray(base[qkv])).max() > 1e-4
    prompts = ["a red circle moving left", "a blue square"]
    a, b = (p.generate(prompts, pixels="float", **SAMPLE) for p in (applied, merged))
    assert np.abs(a - b).max() < 1e-4 and np.abs(a - b).max() > 0  # the same videos, computed otherwise
    with pytest.raises(ValueError, match="not a LoRA run"):
        Pipeline.load(imported, merge_lora=True)


def test_sample_py_passes_merge_lora_on(imported, tmp_path, capsys):
    import sample

    with pytest.raises(SystemExit):
        sample.main(["--workdir", str(imported), "--prompt", "a red circle", "--merge-lora", "--out", str(tmp_path / "v.npy")])
    assert "is not a LoRA run (train.lora_rank=0)" in capsys.readouterr().err


def test_lora_settings_are_checked(imported, tmp_path):
    with pytest.raises(ValueError, match=r"unknown 'attention'.*attn, cross, mlp"):
        lora_config(imported, "--train.lora_targets", "attention")
    with pytest.raises(ConfigError, match="train.init_from"):
        train(apply_overrides(Config(name="x"), ["--train.lora_rank", "4"]), tmp_path / "no_base")
    with pytest.raises(ConfigError, match="base weights of the LoRA run.*are gone"):
        (tmp_path / "moved").mkdir()
        (tmp_path / "moved" / init_from.RECORD).write_text(json.dumps({"init_from": str(tmp_path / "gone"), "step": 0}))
        init_from.recorded_source(tmp_path / "moved")


def test_the_wan_lora_config_adapts_the_import(imported):
    config = load_config(ROOT / "configs" / "wan_lora.py")  # without the converted folder
    assert (config.train.lora_rank, config.train.lora_targets, config.train.lora_base_dtype) == (32, "attn,cross", "bfloat16")
    assert config.data == load_config(ROOT / "configs" / "wan_finetune.py").data
    merged = init_from.merge(config, init_from.read_source(imported).config, "the import")
    assert merged.train.lora_rank == 32 and merged.model.qk_norm_scope == "all_heads"
