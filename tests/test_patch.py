import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.patch import grid_shape, patchify, sincos_3d, unpatchify
from tests.dit_reference import sincos_2d


@pytest.mark.parametrize("seed", range(6))
def test_patchify_round_trip_random_shapes(seed):
    rng = np.random.default_rng(seed)
    patch = tuple(int(p) for p in rng.integers(1, 4, size=3))
    grid = tuple(int(g) for g in rng.integers(1, 5, size=3))
    batch, channels = int(rng.integers(1, 3)), int(rng.integers(1, 5))
    shape = (batch, *(g * p for g, p in zip(grid, patch, strict=True)), channels)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    tokens = patchify(x, patch)

    chex.assert_shape(tokens, (batch, int(np.prod(grid)), int(np.prod(patch)) * channels))
    assert grid_shape(x.shape, patch) == grid
    np.testing.assert_array_equal(unpatchify(tokens, patch, grid), x)  # exact: a pure permutation


def test_patch_layout_is_t_h_w_tokens_and_pt_ph_pw_c_features():
    x = jnp.arange(1 * 4 * 4 * 6 * 2).reshape(1, 4, 4, 6, 2)  # (B, T, H, W, C)
    tokens = patchify(x, (2, 2, 3))  # grid (2, 2, 2)
    # token (t=1, h=0, w=1) is index 1*4 + 0*2 + 1 = 5; feature (pt=1, ph=0, pw=2, c=1) = ((1*2+0)*3+2)*2+1
    assert tokens[0, 5, ((1 * 2 + 0) * 3 + 2) * 2 + 1] == x[0, 2 + 1, 0 + 0, 3 + 2, 1]


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 8, 8, 4), "frames 3 by 2"),
        ((1, 4, 7, 8, 4), "height 7 by 2"),
        ((1, 4, 8, 9, 4), "width 9 by 2"),
        ((1, 8, 8, 4), r"\(B, T, H, W, C\)"),
    ],
)
def test_indivisible_video_names_the_axis(shape, message):
    with pytest.raises(ValueError, match=message):
        patchify(jnp.zeros(shape), (2, 2, 2))


def test_unpatchify_checks_the_grid():
    with pytest.raises(ValueError, match="do not fit grid"):
        unpatchify(jnp.zeros((1, 10, 8)), (1, 2, 2), (1, 3, 3))


def test_one_frame_positions_are_dits_2d_embedding():
    np.testing.assert_allclose(sincos_3d(64, (1, 5, 5)), sincos_2d(64, 5), atol=1e-6)


@pytest.mark.parametrize("grid", [(1, 2, 3), (4, 3, 5), (7, 1, 1), (16, 16, 16)])
def test_positions_for_any_grid_are_distinct_and_bounded(grid):
    pos = sincos_3d(32, grid)
    chex.assert_shape(pos, (int(np.prod(grid)), 32))
    assert pos.dtype == np.float32
    assert np.unique(pos.round(5), axis=0).shape[0] == pos.shape[0]  # every token has its own position
    assert np.abs(pos).max() <= 3.0  # space in [-1, 1], time shift in [-2, 2]
    # A grid's positions restricted to the first frames are the positions of the shorter grid.
    shorter = sincos_3d(32, (1, *grid[1:]))
    np.testing.assert_array_equal(pos[: shorter.shape[0]], shorter)


def test_positions_need_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_3d(30, (1, 2, 2))


def test_patchify_jits():
    x = jnp.ones((2, 4, 8, 8, 3))
    chex.assert_shape(jax.jit(patchify, static_argnums=1)(x, (2, 4, 4)), (2, 8, 96))
