"""The samplers against an oracle network that knows x0: every sampler must land on x0."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit import diffusion, sampling

NUM_TRAIN_STEPS = 1000
SHAPE = (2, 4, 4, 3)  # one sample's latents (T, H, W, C)


def _x0(batch=3):
    return jax.random.uniform(jax.random.key(7), (batch, *SHAPE), minval=-1.0, maxval=1.0)  # (B, T, H, W, C)


def oracle(x0, kind="linear", prediction="epsilon", learn_sigma=False):
    """A perfect network: from (x_t, t) it returns the exact target for the known x0."""
    schedule = diffusion.make_schedule(kind, NUM_TRAIN_STEPS)

    def denoise(x_t, t):
        signal = diffusion.gather(schedule.sqrt_alphas_cumprod, t, x_t.shape)
        sigma = diffusion.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        eps = (x_t - signal * x0) / sigma
        out = {"epsilon": eps, "x0": x0, "v": signal * eps - sigma * x0}[prediction]
        return jnp.concatenate([out, jnp.zeros_like(out)], -1) if learn_sigma else out

    return denoise


def run(denoise, *, batch=3, seed=0, **kwargs):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(batch))
    kwargs = {"schedule_kind": "linear", "num_train_steps": NUM_TRAIN_STEPS, **kwargs}
    return jax.jit(lambda keys: sampling.sample(denoise, keys, SHAPE, **kwargs))(keys)


@pytest.mark.parametrize(
    "prediction, steps", [("epsilon", 1), ("epsilon", 7), ("epsilon", 1000), ("v", 50), ("x0", 50), ("x0", 1)]
)
def test_ddim_with_an_oracle_recovers_x0_from_any_step_count(steps, prediction):
    x0 = _x0()
    out = run(oracle(x0, prediction=prediction), steps=steps, sampler="ddim", prediction=prediction)
    # One step jumps from t=999, where float32 rounding of x_t is amplified 1/sqrt(ac) = 158 times.
    np.testing.assert_allclose(out, x0, atol=1e-4 if steps == 1 else 2e-5)


@pytest.mark.parametrize("sampler, eta", [("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_stochastic_samplers_with_an_oracle_converge_to_x0(sampler, eta, learn_sigma):
    x0 = _x0()
    out = run(oracle(x0, learn_sigma=learn_sigma), steps=25, sampler=sampler, eta=eta, learn_sigma=learn_sigma)
    np.testing.assert_allclose(out, x0, atol=2e-5)


def test_a_respaced_chain_keeps_the_original_noise_levels():
    timesteps = sampling.timestep_subset(NUM_TRAIN_STEPS, 50)
    assert timesteps[0] == 0 and timesteps[-1] == NUM_TRAIN_STEPS - 1 and len(set(timesteps)) == 50
    full = diffusion.make_schedule("linear", NUM_TRAIN_STEPS)
    spaced = diffusion.respace("linear", NUM_TRAIN_STEPS, timesteps)
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[timesteps], rtol=1e-6)
    every = diffusion.respace("linear", NUM_TRAIN_STEPS, np.arange(NUM_TRAIN_STEPS))
    for name in ("betas", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(every, name), getattr(full, name), rtol=1e-5, err_msg=name)


def test_a_ddpm_step_draws_around_the_posterior_mean_with_its_spread_and_ends_without_noise():
    spaced = diffusion.respace("linear", NUM_TRAIN_STEPS, sampling.timestep_subset(NUM_TRAIN_STEPS, 3))
    x_t, x0 = jnp.full((4096, 1), 0.5), jnp.full((4096, 1), -0.25)  # (B, C)
    noise = jax.random.normal(jax.random.key(0), x_t.shape)
    for i in (1, 0):
        index = jnp.full(4096, i, jnp.int32)
        log_variance = diffusion.gather(spaced.posterior_log_variance_clipped, index, x_t.shape)
        out = sampling.ddpm_step(spaced, x_t, x0, log_variance, index, noise)
        mean = spaced.posterior_mean_coef1[i] * -0.25 + spaced.posterior_mean_coef2[i] * 0.5
        assert float(out.mean()) == pytest.approx(float(mean), abs=0.02)
        expected_std = float(jnp.sqrt(spaced.posterior_variance[1])) if i else 0.0
        assert float(out.std()) == pytest.approx(expected_std, rel=0.05, abs=1e-6)


def test_guidance_is_one_batched_pass_with_the_variance_from_the_conditional_half():
    calls = []

    def pair(x2, t2):  # conditional half predicts +1, unconditional -1; variance channels 5 and 7
        calls.append(x2.shape[0])
        half = x2.shape[0] // 2
        mean = jnp.concatenate([jnp.ones((half, *x2.shape[1:])), -jnp.ones((half, *x2.shape[1:]))])
        var = jnp.concatenate([jnp.full((half, *x2.shape[1:]), 5.0), jnp.full((half, *x2.shape[1:]), 7.0)])
        return jnp.concatenate([mean, var], -1)

    x, t = jnp.zeros((2, *SHAPE)), jnp.zeros(2, jnp.int32)
    for g, expected in [(0.0, -1.0), (1.0, 1.0), (4.0, 7.0)]:
        out = sampling.guide(pair, g, SHAPE[-1])(x, t)
        np.testing.assert_allclose(out[..., :3], expected)
        np.testing.assert_allclose(out[..., 3:], 5.0)
    assert calls == [4, 4, 4]  # one pass over [cond; uncond] per step


def test_each_sample_has_its_own_noise_whatever_the_batch():
    x0 = _x0(batch=4)
    denoise = lambda x, t: jnp.zeros_like(x)  # x0 = 0 prediction: the output is pure DDPM noise from the keys
    both = run(denoise, batch=4, steps=5, sampler="ddpm", prediction="epsilon", eta=0.0)
    assert both.shape == x0.shape
    alone = run(denoise, batch=2, steps=5, sampler="ddpm", prediction="epsilon", eta=0.0)
    np.testing.assert_array_equal(both[:2], alone)
    assert not np.allclose(both[0], both[1])


def test_progress_is_reported_once_per_step():
    seen = []
    run(lambda x, t: jnp.zeros_like(x), steps=6, sampler="ddim", progress=seen.append)
    jax.effects_barrier()
    assert sorted(int(i) for i in seen) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "rk4"}, "unknown sampler 'rk4'"),
        ({"sampler": "euler"}, "sampler 'euler' does not sample a ddpm run; use one of ddim, ddpm"),
        ({"steps": 0}, "between 1 and the 1000 training steps"),
        ({"steps": 1001}, "between 1 and the 1000 training steps"),
    ],
)
def test_bad_sampler_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(lambda x, t: x, **{"steps": 10, **kwargs})


def test_the_whole_reverse_process_is_one_scan():
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2))
    fn = functools.partial(
        sampling.sample, lambda x, t: x, shape=SHAPE, schedule_kind="linear", num_train_steps=1000, steps=50,
    )
    jaxpr = jax.make_jaxpr(fn)(keys)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 50


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_sdedit_starts_from_the_clip_on_the_path_and_runs_the_steps_left(process):
    x0, init = _x0(), _x0() * 0.5  # the oracle's target, and the clip being edited
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
    calls = []

    def counted(denoise):
        def wrapped(x, t):
            jax.debug.callback(lambda: calls.append(1))
            return denoise(x, t)
        return wrapped

    if process == "ddpm":
        denoise = counted(oracle(x0))
        go = lambda **kw: sampling.sample(denoise, keys, SHAPE, schedule_kind="linear",
                                          num_train_steps=NUM_TRAIN_STEPS, steps=10, **kw)
    else:  # the oracle of the straight path: velocity eps - x0 with eps = (x - (1 - t) x0) / t
        def velocity(x, t):
            t = (t / 1000.0).reshape(-1, 1, 1, 1, 1)
            return (x - (1 - t) * x0) / t - x0
        denoise = counted(velocity)
        go = lambda **kw: sampling.sample_flow(denoise, keys, SHAPE, steps=10, shift=3.0, **kw)
    plain = jax.jit(lambda: go())()
    np.testing.assert_array_equal(jax.jit(lambda: go(init=init, start=0))(), plain)  # start 0: plain sampling
    calls.clear()
    np.testing.assert_allclose(jax.jit(lambda: go(init=init, start=6))(), x0, atol=1e-4)  # the oracle still lands on x0
    assert len(calls) == 4  # the 4 steps left, one pass each
    np.testing.assert_array_equal(jax.jit(lambda: go(init=init, start=10))(), init)  # no step left: the clip itself
    assert [sampling.sdedit_start(10, s) for s in (1.0, 0.61, 0.5, 0.09)] == [0, 4, 5, 10]
    with pytest.raises(ValueError, match="needs init of shape"):
        go(start=3)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        sampling.sdedit_start(10, 0.0)
