"""The model's recipe switches: 3-D rotary positions, QK-norm and token masking in training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdit
from jaxdit.attention import apply_rope
from jaxdit.blocks import QKNorm
from jaxdit.patch import rope_3d, rope_axes
from tests.helpers import inputs, pure_forward, randomized, tiny_config


def test_rotary_scores_depend_only_on_the_offset_between_tokens():
    head_dim, grid = 12, (3, 4, 5)
    cos, sin = rope_3d(head_dim, grid)
    assert cos.shape == sin.shape == (60, 6) and rope_axes(head_dim) == (2, 2, 2)
    index = lambda t, h, w: (t * grid[1] + h) * grid[2] + w  # token order: w fastest
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 60, 1, head_dim))  # (B, N, K, Dh) each
    q, k = (jnp.broadcast_to(a, (1, 60, 1, head_dim)) for a in (q[:, :1], k[:, :1]))  # one vector at every token
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    score = lambda a, b: float(jnp.dot(rq[0, index(*a), 0], rk[0, index(*b), 0]))
    # the same (t, h, w) offset from different places scores the same; another offset differently
    assert score((0, 0, 0), (1, 2, 3)) == pytest.approx(score((1, 1, 1), (2, 3, 4)), abs=1e-5)
    assert score((0, 1, 0), (0, 1, 2)) == pytest.approx(score((2, 3, 2), (2, 3, 4)), abs=1e-5)
    assert score((0, 0, 0), (1, 2, 3)) != pytest.approx(score((0, 0, 0), (1, 2, 4)), abs=1e-3)
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)  # rotations
    np.testing.assert_allclose(apply_rope(q[:, :1], *rope_3d(head_dim, (1, 1, 1))), q[:, :1])  # position 0: unrotated
    with pytest.raises(ValueError, match="even head width of at least 6"):
        rope_axes(5)


def test_qk_norm_gives_each_head_unit_rms_queries_and_keys():
    norm = QKNorm(8, dtype=jnp.float32, rngs=nnx.Rngs(0))
    q, k = 50.0 * jax.random.normal(jax.random.key(1), (2, 2, 3, 4, 8))
    nq, nk = norm(q, k)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(nq**2, -1)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(nk**2, -1)), 1.0, rtol=1e-4)


def test_a_rotary_model_has_no_position_table_and_runs_on_any_grid_scanned_or_not():
    config = tiny_config(text_dim=16, positions="rope", qk_norm=True)
    model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)))
    x, t, cond = inputs(config)
    out = pure_forward(model)(x, t, **cond)
    chex.assert_shape(out, x.shape)
    assert not np.allclose(out, pure_forward(model)(jnp.roll(x, 2, axis=2), t, **cond), atol=1e-4)
    x_long, _, _ = inputs(config, frames=6, size=12)  # another grid: new angles, same parameters
    chex.assert_shape(pure_forward(model)(x_long, t, **cond), x_long.shape)
    scanned = jaxdit.VideoDiT(tiny_config(text_dim=16, positions="rope", qk_norm=True, scan_layers=True),
                              rngs=nnx.Rngs(0))
    nnx.update(scanned, jaxdit.model.stack_blocks(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(pure_forward(scanned)(x, t, **cond), out, atol=1e-5)


def test_rope_plus_sincos_uses_both_the_rotations_and_the_absolute_positions():
    both = randomized(jaxdit.VideoDiT(tiny_config(text_dim=16, positions="rope+sincos", qk_norm=True), rngs=nnx.Rngs(0)))
    params = nnx.state(both, nnx.Param)
    x, t, cond = inputs(both.config)
    out = pure_forward(both)(x, t, **cond)
    for positions in ("rope", "sincos"):  # the same parameters (neither has a table): each alone gives another output
        one = jaxdit.VideoDiT(tiny_config(text_dim=16, positions=positions, qk_norm=True), rngs=nnx.Rngs(1))
        nnx.update(one, params)
        assert not np.allclose(pure_forward(one)(x, t, **cond), out, atol=1e-4)


def test_flow_input_scale_shows_the_network_x_t_times_its_signal_share():
    scaled = randomized(jaxdit.VideoDiT(tiny_config(text_dim=16, flow_input_scale=True), rngs=nnx.Rngs(0)))
    plain = jaxdit.VideoDiT(tiny_config(text_dim=16), rngs=nnx.Rngs(1))
    nnx.update(plain, nnx.state(scaled, nnx.Param))
    x, _, cond = inputs(scaled.config)
    t = jnp.array([250.0, 750.0])  # flow times 0.25 and 0.75, as the network sees them
    share = (1 - t / 1000)[:, None, None, None, None]
    np.testing.assert_allclose(pure_forward(scaled)(x, t, **cond), pure_forward(plain)(share * x, t, **cond), atol=1e-5)
    pure_noise = jnp.full((2,), 1000.0)  # t = 1: the input carries nothing, and the network sees none of it
    np.testing.assert_allclose(
        pure_forward(scaled)(x, pure_noise, **cond), pure_forward(scaled)(jnp.zeros_like(x), pure_noise, **cond),
        rtol=1e-5, atol=1e-4,  # outputs of up to ~20: float32 rounding, however XLA fuses x * 0
    )
    with pytest.raises(ValueError, match="flow_input_scale .* needs diffusion.process='flow'"):
        jaxdit.Config(model=tiny_config(flow_input_scale=True), diffusion=jaxdit.DiffusionConfig(process="ddpm"))


def test_token_masking_hides_a_random_share_of_tokens_in_training_only():
    config = tiny_config(text_dim=16, token_mask_ratio=0.6)
    model = randomized(jaxdit.VideoDiT(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.normal(jax.random.key(2), (512, 32, config.width))
    nnx.reseed(model, dropout=jax.random.key(3))
    hidden_tokens = model._hide_tokens(tokens)
    hidden = np.all(np.asarray(hidden_tokens) == np.asarray(model.mask_token[...]), axis=-1)  # (B, N)
    np.testing.assert_array_equal(np.asarray(hidden_tokens)[~hidden], np.asarray(tokens)[~hidden])  # others kept
    share = hidden.mean(axis=1)  # per sample: U(0, 0.6) on average 0.3
    assert 0.25 < share.mean() < 0.35 and share.max() < 0.9 and share.min() < 0.1
    nnx.reseed(model, dropout=jax.random.key(3))
    np.testing.assert_array_equal(model._hide_tokens(tokens), hidden_tokens)  # reseeded: the same draw

    x, t, cond = inputs(config)
    evaluation = pure_forward(model)(x, t, **cond)  # train=False: nothing hidden, deterministic
    np.testing.assert_array_equal(evaluation, pure_forward(model)(x, t, **cond))
    plain = jaxdit.VideoDiT(tiny_config(text_dim=16), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.State({k: v for k, v in nnx.state(model, nnx.Param).items() if k != "mask_token"}))
    np.testing.assert_array_equal(pure_forward(plain)(x, t, **cond), evaluation)
    nnx.reseed(model, dropout=jax.random.key(4))
    assert not np.allclose(model(x, t, **cond, train=True), evaluation, atol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("positions", "learned", "model.positions must be one of sincos, rope"),
    ("token_mask_ratio", 1.0, r"token_mask_ratio must be in \[0, 1\)"),
])
def test_bad_switch_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})
