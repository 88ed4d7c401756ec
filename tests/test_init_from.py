"""train.init_from: a new run starts from another run's weights (the tiny Wan 2.1 pipeline, converted), takes
its model, diffusion, codec and text settings, refuses a config that contradicts them, and, once it has a
checkpoint, resumes from that bit for bit without reading the other run again."""

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxdit import frozen_text, init_from, sharding
from jaxdit.checkpoint import Checkpointer
from jaxdit.codec import make_codec
from jaxdit.config import Config, ConfigError, apply_overrides, load_config
from jaxdit.data.pipeline import make_dataset, plan_batches
from jaxdit.model import stack_blocks
from jaxdit.sharding import global_batch, make_mesh
from jaxdit.train_loop import run_buckets, train
from jaxdit.train_step import abstract_train_state, diffusion_loss, model_graphdef

ROOT = pathlib.Path(__file__).parent.parent

# 5 frames of 32x32 through the fixture's Wan VAE (8x spatial, 4x temporal, 4 channels): latents 2x4x4x4,
# 8 tokens of 1x2x2 patches; one clip per simulated device; a checkpoint after each of 2 steps.
FINETUNE = ("--data.num_frames", "5", "--data.size", "32", "--train.batch_size", "8", "--train.steps", "2",
            "--train.checkpoint_every", "1", "--train.log_every", "1")


def finetune_config(imported, *overrides: str) -> Config:
    return apply_overrides(Config(name="wan_tiny_finetune"), [*FINETUNE, "--train.init_from", str(imported), *overrides])


def saved_config(run, step=None) -> Config:
    with Checkpointer(pathlib.Path(run) / "checkpoints", read_only=True) as checkpointer:
        return Config.from_dict(checkpointer.restore_config(step))


def weights(run, config: Config, mesh) -> dict:
    with Checkpointer(pathlib.Path(run) / "checkpoints", read_only=True) as checkpointer:
        return checkpointer.restore_weights(abstract_train_state(config, mesh))


def losses(run) -> dict[int, float]:
    lines = (pathlib.Path(run) / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def arrays(tree) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def imported(wan_tiny_run):
    return wan_tiny_run


@pytest.fixture(scope="module")
def finetuned(imported, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "finetuned"
    train(finetune_config(imported), workdir)
    return workdir


def test_the_first_loss_is_the_imported_weights_loss(imported, finetuned):
    config, imported_config = saved_config(finetuned), saved_config(imported)
    for section in ("model", "diffusion", "codec", "text"):  # the import's, the data and training this test's
        assert getattr(config, section) == getattr(imported_config, section), section
    assert config.data.shapes == ((5, 32, 32),) and config.train.init_from == str(imported)
    # The train step's loss of the first batch, from the import's EMA weights as they are stored.
    mesh = make_mesh()
    stored = weights(imported, imported_config, mesh)
    codec, (text_graphdef, text_state) = make_codec(config.codec), frozen_text.load(config, mesh)
    batches = plan_batches(config, buckets=run_buckets(config, mesh, codec), process_index=0, process_count=1)
    batch = global_batch(next(iter(make_dataset(config, batches=batches))), mesh)
    graphdef, rng = model_graphdef(config), jax.random.fold_in(jax.random.key(config.train.seed), 0)

    @jax.jit
    def loss(params, model_rngs, batch, text_state):
        model = nnx.merge(graphdef, params, model_rngs)
        text_encoder = nnx.merge(text_graphdef, text_state)
        return diffusion_loss(model, batch, rng, config=config, codec=codec, text_encoder=text_encoder)[0]

    expected = float(loss(stored["ema"], stored["model_rngs"], batch, text_state))
    assert losses(finetuned)[1] == pytest.approx(expected, rel=1e-6)  # equal to the last bit here


def test_the_run_starts_from_the_import_with_a_fresh_optimizer_and_records_it(imported, finetuned):
    config, mesh = saved_config(finetuned), make_mesh()
    start = weights(imported, config, mesh)["ema"]
    with Checkpointer(finetuned / "checkpoints", read_only=True) as checkpointer:
        state = checkpointer.restore(abstract_train_state(config, mesh), step=1)  # params, ema, opt_state
    assert int(state.step) == 1 and jax.tree.leaves(state.opt_state)
    decay = config.train.ema_decay  # the EMA started at the imported weights, as the parameters did
    for w0, p1, e1 in zip(arrays(start), arrays(state.params), arrays(state.ema), strict=True):
        np.testing.assert_allclose(e1, decay * w0 + (1 - decay) * p1, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(w0, p1) for w0, p1 in zip(arrays(start), arrays(state.params), strict=True))
    record = json.loads((finetuned / init_from.RECORD).read_text())
    imported_record = json.loads((imported / "imported.json").read_text())
    assert record == {"init_from": str(imported), "step": 0, "imported": imported_record}


def test_a_resumed_run_reads_its_own_checkpoint_bit_for_bit(imported, finetuned, tmp_path, monkeypatch):
    resumed = tmp_path / "resumed"
    shutil.copytree(finetuned, resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")  # it resumes from step 1

    def read_source(directory):
        raise AssertionError(f"a resumed run read {directory}")

    monkeypatch.setattr(init_from, "read_source", read_source)
    train(finetune_config(imported), resumed)
    assert losses(resumed) == losses(finetuned)
    config, mesh = saved_config(finetuned), make_mesh()
    with Checkpointer(finetuned / "checkpoints", read_only=True) as straight, \
            Checkpointer(resumed / "checkpoints", read_only=True) as restarted:
        a, b = (c.restore(abstract_train_state(config, mesh), step=2) for c in (straight, restarted))
    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b), strict=True))


def test_scan_layers_stacks_the_imported_blocks_onto_the_runs_mesh(imported, tmp_path, monkeypatch):
    monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 64)  # the tiny model's larger kernels split over fsdp
    config, source = init_from.starting_config(
        finetune_config(imported, "--model.scan_layers", "true", "--train.fsdp", "2"), tmp_path / "scanned"
    )
    assert config.model.scan_layers and not source.config.model.scan_layers
    mesh = make_mesh(fsdp=2)
    abstract = abstract_train_state(config, mesh)
    params = init_from.initial_params(config, source, mesh, abstract)
    assert jax.tree.structure(params) == jax.tree.structure(abstract.params)
    for array, target in zip(jax.tree.leaves(params), jax.tree.leaves(abstract.params), strict=True):
        assert array.shape == target.shape and array.dtype == target.dtype and array.sharding == target.sharding
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(params["dit"]["stacked_blocks"]))
    unrolled = weights(imported, source.config, make_mesh())["ema"]
    expected = nnx.to_pure_dict(nnx.State({**unrolled, "dit": stack_blocks(unrolled["dit"])}))
    assert all(np.array_equal(x, y) for x, y in zip(arrays(nnx.to_pure_dict(params)), arrays(expected), strict=True))
    stacked_source = dataclasses.replace(
        source.config, model=dataclasses.replace(source.config.model, scan_layers=True)
    )
    with pytest.raises(ConfigError, match="--model.scan_layers true"):
        init_from.merge(finetune_config(imported), stacked_source, "the stacked run")


def test_settings_that_contradict_the_import_are_refused_by_name(imported, tmp_path):
    contradicting = finetune_config(
        imported, "--model.variant", "tiny/1x2x2", "--model.in_channels", "16", "--diffusion.shift", "5"
    )
    with pytest.raises(ConfigError) as refused:
        train(contradicting, tmp_path / "refused")
    message = str(refused.value)
    for named in ("model.variant is '24x2x2/1x2x2' there, 'tiny/1x2x2' in this config",
                  "model.in_channels is 4 there, 16 in this config", "diffusion.shift is 3.0 there, 5.0 in this config",
                  f"train.init_from={str(imported)!r} fixes", "train from scratch without train.init_from"):
        assert named in message
    assert not (tmp_path / "refused" / "checkpoints").exists()
    # How the model computes and how training draws its times stay the config's; the rest is the import's.
    config, _ = init_from.starting_config(
        finetune_config(imported, "--model.dtype", "bfloat16", "--model.remat", "full", "--diffusion.time_sampling",
                        "logit_normal", "--diffusion.prediction", "v"), tmp_path / "free"
    )
    assert (config.model.dtype, config.model.remat, config.diffusion.time_sampling) == ("bfloat16", "full", "logit_normal")
    assert (config.model.variant, config.diffusion.shift, config.text.encoder) == ("24x2x2/1x2x2", 3.0, "t5")


def test_init_from_needs_a_dit_run_with_a_checkpoint(imported, tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoints"):
        train(finetune_config(tmp_path / "missing"), tmp_path / "a")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(finetune_config(tmp_path / "empty"), tmp_path / "b")
    with Checkpointer(tmp_path / "codec_run" / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(0, {"x": np.zeros(2)}, config=Config(task="codec").to_dict(), force=True)
    with pytest.raises(ConfigError, match="trained a codec, not a DiT"):
        train(finetune_config(tmp_path / "codec_run"), tmp_path / "c")
    with pytest.raises(ConfigError, match="the run's own --workdir"):
        train(finetune_config(tmp_path / "d"), tmp_path / "d")
    with pytest.raises(ValueError, match="--train.init_from"):  # training into the import itself
        train(finetune_config(tmp_path / "e"), imported)


def test_the_wan_finetune_config_loads_and_takes_the_import(imported):
    config = load_config(ROOT / "configs" / "wan_finetune.py")  # without the converted folder
    assert config.train.init_from == "runs/wan21_t2v_1.3b" and config.train.learning_rate == 1e-5
    assert config.data.source == "folder" and config.data.shapes == ((81, 480, 832), (33, 480, 832))
    merged = init_from.merge(config, saved_config(imported), "the tiny import")
    assert merged.model == dataclasses.replace(
        saved_config(imported).model, dtype="bfloat16", remat="full", scan_layers=True
    )
    assert merged.sample.sampler == "unipc" and merged.train == config.train and merged.data == config.data
