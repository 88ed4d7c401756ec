"""Context parallelism: with video tokens split over the mesh's `context` axis, attention, the
model, the train step and the sampler give what one device gives, to float32 rounding.

The broad mode x mesh matrix runs at the attention-function level (cheap to compile). At the
model level, one forward + gradient check covers text cross-attention, class labels, an odd token
count (padding), RoPE, QK-norm and scanned blocks under USP; the train step covers unrolled blocks
and text without padding. Compiling dominates: each test compiles as few programs as it can.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdit
from jaxdit import context_parallel
from jaxdit.attention import attention
from jaxdit.config import Config, ModelConfig, TrainConfig, context_degrees, load_config
from jaxdit.pipeline import Pipeline
from jaxdit.sharding import make_mesh
from jaxdit.train_step import create_train_state
from tests.helpers import inputs, randomized
from tests.test_train_step import first_batch, leaves, setup

TINY = load_config("configs/tiny.py")
MESHES = [(1, 1, 8), (2, 1, 4), (2, 2, 2), (1, 2, 4)]  # (data, fsdp, context)
MODES = [("ulysses", 0), ("ring", 0), ("ulysses_ring", 2)]  # ulysses_ring: groups of 2, a ring across them
TOLERANCE = 1e-5  # relative, and absolute relative to the largest entry: float32 rounding in a reordered sum


def replicated(mesh, tree):
    return jax.device_put(tree, jax.NamedSharding(mesh, jax.P()))


def assert_trees_close(actual, expected, what=""):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=TOLERANCE, atol=TOLERANCE * np.abs(b).max(), err_msg=what)


# --- attention ------------------------------------------------------------------------------

B, N, K, DH = 4, 13, 8, 8  # 13 tokens: padded to 16 over 8, 4 or 2 devices


@pytest.fixture(scope="module")
def qkvw():
    return tuple(jax.random.normal(key, (B, N, K, DH)) for key in jax.random.split(jax.random.key(0), 4))


def attention_value_and_grads(attend, q, k, v, w):
    """attend(q, k, v) and the gradients of sum(attend(q, k, v) * w) in q, k and v."""
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(w)


@pytest.fixture(scope="module")
def reference(qkvw):
    """One device's attention of the 13 tokens, with no padding, and its gradients."""
    plain = lambda q, k, v: attention(q, k, v, implementation="xla")
    return jax.jit(lambda *a: attention_value_and_grads(plain, *a))(*qkvw)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_self_attention_over_the_context_axis_equals_one_device(qkvw, reference, mesh_shape):
    _, fsdp, context = mesh_shape
    mesh = make_mesh(fsdp, context=context)
    n = N + (-N % context)  # as the model does: pad to a multiple of the context size, mask, cut back
    mask = jnp.broadcast_to(jnp.arange(n) < N, (B, n))  # (B, N')

    def every_mode(q, k, v, w):  # one program for the three modes: one compile per mesh
        pad = lambda x: jnp.pad(x, ((0, 0), (0, n - N), (0, 0), (0, 0)))
        attend = lambda mode, degree: lambda q, k, v: context_parallel.self_attention(
            pad(q), pad(k), pad(v), mask=mask, mode=mode, implementation="xla", ulysses_degree=degree
        )[:, :N]
        return [attention_value_and_grads(attend(mode, degree), q, k, v, w) for mode, degree in MODES]

    results = jax.jit(context_parallel.traced_on(mesh, every_mode))(*replicated(mesh, qkvw))
    for (mode, _), (out, grads) in zip(MODES, results, strict=True):
        assert_trees_close((out, grads), reference, mode)
        assert np.abs(np.asarray(grads[1])).max() > 0  # the keys' gradients are not trivially zero


def test_cross_attention_and_unsplit_calls_need_no_context_axis(qkvw):
    q, k, v, _ = qkvw
    text_mask = jnp.arange(N)[None] < jnp.array([[13], [9], [4], [1]])  # (B, L): captions of other lengths
    expected = attention(q[:, :8], k, v, mask=text_mask)
    mesh = make_mesh(1, context=8)
    run = jax.jit(context_parallel.traced_on(mesh, lambda q, k, v: context_parallel.cross_attention(q, k, v, mask=text_mask)))
    assert_trees_close(run(*replicated(mesh, (q[:, :8], k, v))), expected)
    # Off a context axis (the default) the functions are the plain attention, bit for bit.
    plain = context_parallel.self_attention(q, k, v, mode="ring")
    np.testing.assert_array_equal(plain, attention(q, k, v))


def test_degrees_of_each_mode():
    assert context_degrees("ulysses", 16, 8) == (8, 1)
    assert context_degrees("ring", 6, 4) == (1, 4)
    assert context_degrees("ulysses_ring", 16, 32) == (16, 2)  # as much Ulysses as the heads allow
    assert context_degrees("ulysses_ring", 6, 8) == (2, 4)
    assert context_degrees("ulysses_ring", 8, 8, ulysses_degree=2) == (2, 4)
    assert context_degrees("ulysses", 6, 1) == (1, 1)


# --- the model --------------------------------------------------------------------------------

MODEL_CASES = {
    # text cross-attention and class labels, RoPE + QK-norm, scanned blocks, 27 tokens over 8 devices
    # (5 padding tokens), Ulysses 4 x ring 2. Unrolled blocks and text over a context axis without
    # padding: the train step below.
    "text-labels-usp-scan": (
        dict(text_dim=16, num_classes=10, positions="rope", qk_norm=True, scan_layers=True), (1, 1, 8),
    ),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_output_and_gradients_over_the_context_axis_equal_one_device(case):
    overrides, (_, fsdp, context) = MODEL_CASES[case]
    config = ModelConfig.from_variant("tiny/1x2x2", in_channels=3, **overrides)  # width 64, 4 heads, 2 blocks
    # Random weights at a scale where the output is O(1-10); larger ones make attention so sharp that
    # float32 rounding of any reordered sum (more devices) is amplified past 1e-5.
    model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)), scale=0.1)
    x, t, cond = inputs(config, batch=2, frames=3, size=6)  # 3 x 3 x 3 = 27 tokens, an odd count
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert context_parallel.context_size() == 1

    def value_and_grads(params, x, t, cond):  # the output and the gradients of sum(output * weights)
        out, pullback = jax.vjp(lambda params: nnx.merge(graphdef, params, rest)(x, t, **cond), params)
        return out, pullback(jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    one = make_mesh(devices=jax.devices()[:1])
    many = make_mesh(fsdp, context=context)
    expected = jax.jit(context_parallel.traced_on(one, value_and_grads))(*replicated(one, (params, x, t, cond)))
    got = jax.jit(context_parallel.traced_on(many, value_and_grads))(*replicated(many, (params, x, t, cond)))
    assert np.abs(np.asarray(expected[0])).max() > 0.1  # a randomised model: a real output to compare
    assert_trees_close(got, expected)


# --- training and sampling ------------------------------------------------------------------

def test_a_train_step_over_data_2_context_4_equals_data_8():
    # The 8-device step is test_train_step's own (shared through the compilation cache).
    config = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, context=4))
    eight, context_4 = make_mesh(), make_mesh(context=4)
    assert dict(context_4.shape) == {"data": 2, "fsdp": 1, "context": 4}
    state_8, step_8 = setup(TINY, eight)
    state_c, step_c = setup(config, context_4)
    rng = jax.random.key(1)
    new_8, metrics_8 = step_8(state_8, first_batch(TINY, eight), rng)
    new_c, metrics_c = step_c(state_c, first_batch(config, context_4), rng)
    np.testing.assert_allclose(metrics_c["loss"], metrics_8["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_c["grad_norm"], metrics_8["grad_norm"], rtol=1e-5)
    for a, b in zip(leaves(new_8.params), leaves(new_c.params), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_sampling_over_context_4_gives_the_pixels_of_one_device():
    config = dataclasses.replace(TINY, sample=dataclasses.replace(TINY.sample, steps=2, cfg_scale=3.0))
    abstract = jaxdit.train_step.abstract_train_state(config, make_mesh(devices=jax.devices()[:1]))
    state = create_train_state(config, abstract)
    denoiser = nnx.merge(jaxdit.train_step.model_graphdef(config), state.params, state.model_rngs)
    _, params, model_rngs = nnx.split(randomized(denoiser, scale=0.1), nnx.Param, ...)
    prompts = ["a large red circle moving left", "a small blue square moving up"]
    one = Pipeline(config, params, model_rngs, devices=jax.devices()[:1])
    split = Pipeline(config, params, model_rngs, devices=jax.devices()[:4], context=4)
    assert dict(split._sampler.mesh.shape) == {"data": 1, "fsdp": 1, "context": 4}
    expected, got = one.generate(prompts, seed=3), split.generate(prompts, seed=3)
    assert expected.std() > 1  # not a blank video
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999  # float32 rounding may flip a pixel


# --- errors ---------------------------------------------------------------------------------

def test_a_context_size_that_does_not_divide_the_devices_is_named():
    with pytest.raises(ValueError, match="train.context=3"):
        make_mesh(context=3)
    with pytest.raises(ValueError, match="train.context=8 x train.fsdp=2 = 16 does not divide the 8 devices"):
        make_mesh(2, context=8)


def test_heads_that_ulysses_cannot_split_are_named_with_the_alternatives():
    with pytest.raises(ValueError, match=r"6 heads must be divisible by 4.*'ring'"):
        Config(model=ModelConfig(variant="S/2", context_attention="ulysses"), train=TrainConfig(context=4))
    with pytest.raises(ValueError, match="ulysses_degree=4 must divide both the 4 heads and train.context=2"):
        Config(model=ModelConfig(variant="tiny/2", ulysses_degree=4), train=TrainConfig(context=2))
    q = jnp.zeros((2, 8, 4, 8))  # 4 heads over a context axis of 8
    mesh = make_mesh(context=8)
    run = jax.jit(context_parallel.traced_on(mesh, lambda q: context_parallel.self_attention(q, q, q, mode="ulysses")))
    with pytest.raises(ValueError, match="4 heads must be divisible by 8"):
        run(replicated(mesh, q))
