"""The train step: it learns, it is the same on 1 and 8 devices and with FSDP, it skips
non-finite updates, and it compiles for a large model from shapes alone."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdit
from jaxdit.codec import IdentityCodec
from jaxdit.config import apply_overrides, load_config
from jaxdit.data.pipeline import make_dataset
from jaxdit.sharding import global_batch, is_stacked, make_mesh, param_axes
from jaxdit.train_step import (
    abstract_train_state,
    create_train_state,
    frozen_codec_state,
    make_optimizer,
    make_train_step,
    model_graphdef,
)

TINY = load_config("configs/tiny.py")


@functools.cache
def jitted_step(config, mesh):
    """One jitted step per (config, mesh), shared by the tests that use the same: compiling dominates."""
    abstract = abstract_train_state(config, mesh)
    codec = IdentityCodec()
    jitted = make_train_step(config, model_graphdef(config), codec, mesh, abstract)
    codec_state = frozen_codec_state(codec, mesh)
    return abstract, lambda state, batch, rng: jitted(state, batch, rng, codec_state, nnx.State({}), nnx.State({}))


def setup(config, mesh):
    """A fresh train state (the step donates it) and the step."""
    abstract, step = jitted_step(config, mesh)
    return create_train_state(config, abstract), step


def first_batch(config, mesh):
    return global_batch(next(iter(make_dataset(config, global_batch_size=config.train.batch_size))), mesh)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loss_decreases_when_overfitting_a_few_clips():
    config = apply_overrides(TINY, ["--train.learning_rate", "3e-3", "--train.batch_size", "4"])
    mesh = make_mesh(devices=jax.devices()[:1])
    state, step = setup(config, mesh)
    batch = first_batch(config, mesh)
    rng = jax.random.key(0)  # the same noise and steps every time: pure overfitting
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch, rng)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.3 * losses[0], losses
    assert int(state.step) == 40


@pytest.mark.parametrize("fsdp", [1, 4])
def test_eight_devices_match_one_device(fsdp):
    config = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, fsdp=fsdp))
    one = make_mesh(devices=jax.devices()[:1])
    eight = make_mesh(fsdp=fsdp)
    state_1, step_1 = setup(config, one)
    state_8, step_8 = setup(config, eight)
    if fsdp > 1:  # the big matrices and their Adam moments really are split
        specs = [x.sharding.spec for x in jax.tree.leaves(state_8.opt_state)]
        assert any("fsdp" in str(spec) for spec in specs)
    rng = jax.random.key(1)
    new_1, metrics_1 = step_1(state_1, first_batch(config, one), rng)
    new_8, metrics_8 = step_8(state_8, first_batch(config, eight), rng)
    np.testing.assert_allclose(metrics_8["loss"], metrics_1["loss"], rtol=1e-6)
    for a, b in zip(leaves(new_1.params), leaves(new_8.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_a_non_finite_batch_is_skipped_and_counted():
    mesh = make_mesh()  # every device: the step of test_eight_devices_match_one_device[1], compiled once
    state, step = setup(TINY, mesh)
    batch = first_batch(TINY, mesh)
    bad = dict(batch, video=jnp.full(batch["video"].shape, jnp.nan, jnp.float32))
    before = leaves((state.params, state.ema, state.opt_state.inner_state))
    state, metrics = step(state, jax.device_put(bad, batch["video"].sharding), jax.random.key(0))
    assert bool(metrics["skipped"]) and int(metrics["bad_steps"]) == 1 and int(metrics["skipped_total"]) == 1
    assert not np.isfinite(float(metrics["loss"]))
    after = leaves((state.params, state.ema, state.opt_state.inner_state))
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))  # nothing moved, not even the EMA
    state, metrics = step(state, batch, jax.random.key(1))
    assert not bool(metrics["skipped"]) and int(metrics["bad_steps"]) == 0 and int(metrics["skipped_total"]) == 1
    assert int(state.step) == 2


def test_ema_follows_the_parameters_at_its_decay():
    mesh = make_mesh(devices=jax.devices()[:1])
    state, step = setup(TINY, mesh)
    old_ema = leaves(state.ema)
    state, _ = step(state, first_batch(TINY, mesh), jax.random.key(0))
    decay = TINY.train.ema_decay
    for e0, p, e in zip(old_ema, leaves(state.params), leaves(state.ema), strict=True):
        np.testing.assert_allclose(e, decay * e0 + (1 - decay) * p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_only_on_matrices(scan_layers):
    config = apply_overrides(TINY, ["--train.weight_decay", "0.5", "--train.learning_rate", "1e-2",
                                    "--model.scan_layers", str(scan_layers)])
    shapes = abstract_train_state(config, make_mesh(devices=jax.devices()[:1])).params
    draw = np.random.default_rng(0)  # nonzero parameters made on the host: nothing to compile
    params = jax.tree.map(lambda x: draw.standard_normal(x.shape).astype(x.dtype), shapes)
    tx = make_optimizer(config.train)
    # With zero gradients only weight decay can move a parameter.
    updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(params)
    for (path, p), u in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(updates), strict=True):
        matrix = p.ndim >= 3 if is_stacked(path) else p.ndim >= 2  # stacked blocks: a leading layer axis
        assert np.any(np.asarray(u) != 0) == matrix, jax.tree_util.keystr(path)


def test_fsdp_rule_splits_the_largest_divisible_dimension():
    assert param_axes((256, 1024), fsdp=4) == (None, "param_shard")
    assert param_axes((1024, 6), fsdp=4) == ("param_shard", None)
    assert param_axes((7, 1021), fsdp=4) == (None, None)  # nothing divides: stays whole
    assert param_axes((64,), fsdp=4) == (None,)  # small: stays whole
    assert param_axes((256, 1024), fsdp=1) == (None, None)


def test_train_step_lowers_for_xl_from_shapes_alone():
    """DiT-XL width over 16x32x32 inputs with text, scanned layers, FSDP over 8 devices: traced
    and lowered from shapes alone, no parameter allocated. (XLA's compile of the unrolled program
    takes 82 s on a 2-core CPU, too long for the suite; `benchmarks/` compiles it.)"""
    config = dataclasses.replace(
        TINY,
        model=jaxdit.ModelConfig.from_variant(
            "XL/1x2x2", in_channels=3, text_dim=256, dtype="bfloat16", remat="full", scan_layers=True
        ),
        data=dataclasses.replace(TINY.data, num_frames=16, size=32),
        train=dataclasses.replace(TINY.train, batch_size=8, fsdp=8),
    )
    mesh = make_mesh(fsdp=8)
    abstract = abstract_train_state(config, mesh)
    step = make_train_step(config, model_graphdef(config), IdentityCodec(), mesh, abstract)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    length = config.text.max_length
    batch = {
        "video": jax.ShapeDtypeStruct((8, 16, 32, 32, 3), jnp.uint8, sharding=sharding),
        "text_tokens": jax.ShapeDtypeStruct((8, length), jnp.int32, sharding=sharding),
        "text_mask": jax.ShapeDtypeStruct((8, length), jnp.bool_, sharding=sharding),
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))
    lowered = step.lower(abstract, batch, rng, nnx.state(IdentityCodec()), nnx.State({}), nnx.State({}))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    assert count > 600_000_000  # DiT-XL with a text encoder
    text = lowered.as_text()
    assert "fsdp" in text  # the parameters enter the program split over the fsdp axis
    assert "while" in text  # the 28 blocks are one loop (scan_layers)


def test_class_conditional_step_on_latents():
    """DiT's image setting (class labels, learned variance) on latents from a cache: label dropout
    reseeds the model's RNG streams inside the gradient trace, and no codec runs in the step."""
    config = apply_overrides(
        TINY,
        ["--model.variant", "tiny/1x2x2", "--model.in_channels", "4", "--model.text_dim", "0",
         "--model.num_classes", "10", "--model.learn_sigma", "true", "--train.batch_size", "4"],
    )
    mesh = make_mesh(devices=jax.devices()[:1])
    state, step = setup(config, mesh)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.normal(size=(4, 1, 8, 8, 4)).astype(np.float32), "label": np.arange(4, dtype=np.int32)}
    state, metrics = step(state, global_batch(batch, mesh), jax.random.key(0))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])) and float(metrics["vb"]) > 0
