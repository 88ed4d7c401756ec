"""model.scan_layers: the stacked, scanned blocks compute what the unrolled ones do with the same
weights (copied by `stack_blocks`), remat still applies per block, and FSDP never splits the layer
axis. (tests/test_train_step.py lowers a scanned DiT-XL train step over FSDP and checks weight decay.)"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdit
from jaxdit.config import load_config
from jaxdit.model import stack_blocks
from jaxdit.sharding import STACKED_BLOCKS, make_mesh, param_axes
from jaxdit.train_step import abstract_train_state
from tests.helpers import inputs, tiny_config

# Both conditioning paths in one model: cross-attention to text (plus pooled text) and class labels.
CONDITIONS = {"text_dim": 16, "num_classes": 10, "learn_sigma": True}


@functools.cache
def unrolled_weights() -> tuple[nnx.State, nnx.State]:
    """(params, rest) of an unrolled model with every parameter random, the zero-initialised ones
    too: initialised in one compiled call, redrawn with NumPy (much faster than op by op)."""
    config = tiny_config(**CONDITIONS)
    params, rest = jax.jit(lambda: nnx.split(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)), nnx.Param, ...)[1:])()
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype), params), rest


def model(*, scan_layers: bool, **overrides) -> jaxdit.VideoDiT:
    """The model of that layout holding `unrolled_weights`; its structure comes from eval_shape."""
    config = tiny_config(**CONDITIONS, scan_layers=scan_layers, **overrides)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: jaxdit.VideoDiT(config, rngs=nnx.Rngs(0))))
    params, rest = unrolled_weights()
    return nnx.merge(graphdef, stack_blocks(params) if scan_layers else params, rest)


def test_scanned_forward_and_gradients_with_remat_equal_unrolled():
    unrolled, scanned = model(scan_layers=False, remat="full"), model(scan_layers=True, remat="full")
    assert scanned.stacked_blocks.attn.qkv.kernel.shape == (2, 64, 192)  # (depth, D, 3D)
    x, t, cond = inputs(unrolled.config)

    def grads_and_prediction(model):  # one compiled program gives both
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            prediction = nnx.merge(graphdef, params, rest)(x, t, **cond)  # (B, T, H, W, 2C)
            return jnp.mean(prediction**2), prediction

        return jax.jit(jax.grad(loss, has_aux=True))(params), jax.make_jaxpr(loss)(params)

    (grads, reference), _ = grads_and_prediction(unrolled)
    (scanned_grads, prediction), jaxpr = grads_and_prediction(scanned)
    assert np.abs(reference).max() > 0.1  # random weights: not a comparison of zeros
    np.testing.assert_array_equal(prediction, reference)
    # The remat policy wraps each block inside the scan body, not the scan as a whole.
    (scan,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    assert any(eqn.primitive.name.startswith("remat") for eqn in scan.params["jaxpr"].eqns)  # jax.checkpoint
    expected = stack_blocks(grads)
    stacked = (jax.tree.leaves(expected[STACKED_BLOCKS]), jax.tree.leaves(scanned_grads[STACKED_BLOCKS]))
    for want, got in zip(*stacked, strict=True):
        np.testing.assert_array_equal(got, want)
    # Every block adds to the gradient of the condition c; the backward scan sums those in another
    # order than unrolled XLA does, so what lies before c (timestep, label, pooled-text embedders)
    # agrees to float32 rounding (about 2e-7 of its largest entry), not bitwise.
    leaves = (jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(scanned_grads))
    for (path, want), got in zip(*leaves, strict=True):
        atol = 1e-6 * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_fsdp_never_splits_the_layer_axis():
    # (64, 48, 90): as one array its largest divisible axis (64) would be split; stacked, the layer
    # axis stays whole and each (48, 90) layer splits as it would unrolled.
    assert param_axes((64, 48, 90), fsdp=4) == ("param_shard", None, None)
    assert param_axes((64, 48, 90), fsdp=4, stacked=True) == (None, "param_shard", None)
    tiny = load_config("configs/tiny.py")  # text-to-video: a text encoder whose own `blocks` stay a list
    scanned = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, scan_layers=True))
    mesh = make_mesh(fsdp=4)
    abstract = abstract_train_state(scanned, mesh)

    def specs(state):  # "opt_state/.../mu/dit/stacked_blocks/attn/qkv/kernel/value" -> its PartitionSpec
        return {jax.tree_util.keystr(p, simple=True, separator="/"): x.sharding.spec for p, x in
                jax.tree_util.tree_leaves_with_path(state)}

    unrolled = specs(abstract_train_state(tiny, mesh))
    stacked = {path: spec for path, spec in specs(abstract).items() if f"/{STACKED_BLOCKS}/" in path}
    assert any(path.startswith("opt_state/") for path in stacked)  # Adam's moments follow the rule too
    assert any("fsdp" in str(spec) for spec in stacked.values())
    for path, spec in stacked.items():
        assert spec[0] is None, path
        # ... and each layer is split exactly as the unrolled model splits its blocks.
        assert tuple(spec)[1:] == tuple(unrolled[path.replace(STACKED_BLOCKS, "blocks/0")]), path
