"""UniPC against diffusers' UniPCMultistepScheduler as Wan 2.1 configures it (flow sigmas, shift, bh2, order
2, lower order at the ends): the sigma grid and network timesteps exactly, every step's corrected and
predicted sample, and whole runs inside jaxdit's scan, with and without guidance. The reference is
tests/fixtures/wan_unipc, made by its make_fixture.py (torch, diffusers 0.42.1) in a side environment,
on a toy network that is not linear in x."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import unipc
from jaxdit.sampling import sample_flow

REFERENCE = dict(np.load(pathlib.Path(__file__).parent / "fixtures" / "wan_unipc" / "reference.npz"))
SETTINGS = [(3.0, 10), (3.0, 50), (5.0, 10), (5.0, 50)]
ATOL = 2e-6  # float32 samples and step constants against diffusers' float64 samples


def cond(x, t):  # the fixture's toy network: a flow (velocity) prediction at integer timestep t
    return 0.7 * jnp.tanh(x) - 0.3 * x * t / 1000 + 0.1


def uncond(x, t):
    return 0.5 * jnp.sin(x) + 0.2 * x * t / 1000 - 0.05


def guided(x, t):
    return uncond(x, t) + 5.0 * (cond(x, t) - uncond(x, t))


@pytest.mark.parametrize("shift, steps", SETTINGS)
def test_the_grid_and_every_step_equal_diffusers(shift, steps):
    name = f"s{shift}_n{steps}"
    sigmas, timesteps = unipc.sigma_grid(steps, shift)
    np.testing.assert_array_equal(sigmas, REFERENCE[f"{name}_sigmas"].astype(np.float32))
    np.testing.assert_array_equal(timesteps, REFERENCE[f"{name}_timesteps"])
    constants = unipc.step_constants(sigmas)
    latents = REFERENCE[f"{name}_latents"]  # (S + 1, 2, 3, 4)
    x = last = jnp.asarray(latents[0], jnp.float32)
    x0_prev = x0_prev2 = jnp.zeros_like(x)
    for i in range(steps):
        x0 = x - sigmas[i] * cond(x, timesteps[i])  # the flow prediction's clean sample
        row = {k: v[i] for k, v in constants.items()}
        x, last = unipc.update(x, last, x0, x0_prev, x0_prev2, row)
        x0_prev, x0_prev2 = x0, x0_prev
        np.testing.assert_allclose(last, REFERENCE[f"{name}_corrected"][i], atol=ATOL, err_msg=f"corrector, step {i}")
        np.testing.assert_allclose(x, latents[i + 1], atol=ATOL, err_msg=f"predictor, step {i}")


@pytest.mark.parametrize("shift, steps, network, name", [
    (3.0, 10, cond, "s3.0_n10"), (5.0, 50, cond, "s5.0_n50"), (3.0, 10, guided, "s3.0_n10_guided"),
])
def test_the_scanned_sampler_equals_diffusers(shift, steps, network, name):
    start = REFERENCE[f"{name}_latents"][0]  # (2, 3, 4): a batch of 2, each a (3, 4, 1, 1) "video"
    denoise = lambda x, t: network(x, t.reshape(-1, 1, 1, 1, 1))
    out = sample_flow(denoise, jax.random.split(jax.random.key(0), 2), (3, 4, 1, 1), steps=steps, sampler="unipc",
                      prediction="v", shift=shift, x_T=jnp.asarray(start, jnp.float32).reshape(2, 3, 4, 1, 1))
    np.testing.assert_allclose(np.asarray(out).reshape(2, 3, 4), REFERENCE[f"{name}_latents"][-1], atol=ATOL)


def test_the_last_step_lands_on_the_clean_prediction():
    sigmas, _ = unipc.sigma_grid(10, 3.0)
    last = {k: v[-1] for k, v in unipc.step_constants(sigmas).items()}
    assert (last["p_ratio"], last["p_scale"], last["p_rho"]) == (0.0, -1.0, 0.0)  # x_S = x0 of the last evaluation
    with pytest.raises(ValueError, match="at least 1"):
        unipc.sigma_grid(0, 3.0)
