"""The diffusion objective against independent float64 NumPy formulas (DiT's gaussian_diffusion.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdit.diffusion import (
    PREDICTIONS,
    loss,
    make_schedule,
    model_log_variance,
    predict_epsilon,
    predict_x0,
    q_posterior_mean,
    q_sample,
    sample_timesteps,
    training_target,
)

STEPS = 1000
# Per-example steps covering the decoder step 0, the first KL step and the noisy end.
T = np.array([0, 1, 2, 17, 500, 999], np.int32)
SHAPE = (len(T), 2, 3, 4, 2)  # (B, T, H, W, C): a tiny video latent


# ---- float64 reference, written from the formulas (Ho et al.; Nichol & Dhariwal; DiT) ----


def reference_betas(kind, n):
    if kind == "linear":
        return np.linspace(1e-4 * 1000 / n, 0.02 * 1000 / n, n)
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])


def reference_schedule(kind, n):
    betas = reference_betas(kind, n)
    ac = np.cumprod(1 - betas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    return dict(
        betas=betas,
        log_betas=np.log(betas),
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ac),
        sqrt_recip_alphas_cumprod=1 / np.sqrt(ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1 / ac - 1),
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1 - ac),
        posterior_mean_coef2=(1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
    )


REF = reference_schedule("linear", STEPS)


def ref_at(name, t):
    return REF[name][t].reshape((-1,) + (1,) * (len(SHAPE) - 1))


def ref_vb_bits(x0, x_t, t, model_out, var_values, prediction):
    """DiT's _vb_terms_bpd with clip_denoised=False, term by term in float64."""
    a, s = ref_at("sqrt_alphas_cumprod", t), ref_at("sqrt_one_minus_alphas_cumprod", t)
    if prediction == "epsilon":
        x0_hat = x_t / a - np.sqrt(1 / a**2 - 1) * model_out
    elif prediction == "x0":  # ADM's START_X: the output is x0
        x0_hat = model_out
    else:
        x0_hat = a * x_t - s * model_out
    coef1, coef2 = ref_at("posterior_mean_coef1", t), ref_at("posterior_mean_coef2", t)
    frac = (var_values + 1) / 2
    log_var = frac * ref_at("log_betas", t) + (1 - frac) * ref_at("posterior_log_variance_clipped", t)
    true_log_var = ref_at("posterior_log_variance_clipped", t)
    mean1, mean2 = coef1 * x0 + coef2 * x_t, coef1 * x0_hat + coef2 * x_t
    kl = 0.5 * (-1 + log_var - true_log_var + np.exp(true_log_var - log_var) + (mean1 - mean2) ** 2 * np.exp(-log_var))

    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    inv_std = np.exp(-0.5 * log_var)
    cdf_plus, cdf_min = cdf(inv_std * (x0 - mean2 + 1 / 255)), cdf(inv_std * (x0 - mean2 - 1 / 255))
    log_probs = np.where(
        x0 < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(x0 > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))),
    )
    flat = lambda v: v.reshape(len(t), -1).mean(axis=1) / np.log(2.0)  # noqa: E731
    return np.where(t == 0, flat(-log_probs), flat(kl))


def random_batch(seed, prediction, output_noise=0.3):
    """x0 on the uint8 grid in [-1, 1] (edges included), x_t, and a model output near the true target."""
    rng = np.random.default_rng(seed)
    x0 = (rng.integers(0, 256, SHAPE) / 127.5 - 1).astype(np.float32)
    x0.flat[:2] = -1.0, 1.0  # both edge bins of the decoder likelihood, at t = 0
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    schedule = make_schedule("linear", STEPS)
    x_t = np.asarray(q_sample(schedule, x0, T, noise))
    target = np.asarray(training_target(schedule, x0, noise, T, prediction))
    model_out = (target + output_noise * rng.standard_normal(SHAPE)).astype(np.float32)
    var_values = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    return schedule, x0, noise, x_t, target, model_out, var_values


# ---- schedules ----


@pytest.mark.parametrize("kind, n", [("linear", 1000), ("linear", 250), ("cosine", 1000), ("cosine", 50)])
def test_schedule_matches_float64_formulas(kind, n):
    schedule = make_schedule(kind, n)
    reference = reference_schedule(kind, n)
    assert schedule.num_steps == n
    for name, expected in reference.items():
        value = getattr(schedule, name)
        assert value.dtype == jnp.float32 and value.shape == (n,), name
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=0, err_msg=name)
    betas, ac = np.asarray(schedule.betas), np.asarray(schedule.alphas_cumprod)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all(np.diff(ac) < 0)


def test_linear_schedule_endpoints_and_cosine_clip():
    betas = np.asarray(make_schedule("linear", 1000).betas)
    assert betas[0] == np.float32(1e-4) and betas[-1] == np.float32(0.02)
    assert np.asarray(make_schedule("cosine", 1000).betas)[-1] == np.float32(0.999)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_one_step_schedule_is_finite(kind):
    schedule = make_schedule(kind, 1)
    for name in ("betas", "posterior_log_variance_clipped", "posterior_mean_coef1", "sqrt_recipm1_alphas_cumprod"):
        assert np.all(np.isfinite(getattr(schedule, name))), name
    # No step 1 to borrow from: the clipped posterior log variance is log(beta_0).
    np.testing.assert_allclose(schedule.posterior_log_variance_clipped, np.log(reference_betas(kind, 1)), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="quadratic"), "linear, cosine"),
        (dict(kind="linear", num_steps=0), "num_steps"),
        (dict(kind="linear", num_steps=10), "betas outside"),  # linear betas reach 1000/n * 0.02 >= 1
    ],
)
def test_bad_schedule_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_schedule(**kwargs)


def test_sample_timesteps_uniform_int32():
    t = sample_timesteps(jax.random.key(0), 2000, 5)
    assert t.shape == (2000,) and t.dtype == jnp.int32
    counts = np.bincount(np.asarray(t), minlength=5)
    assert counts.shape == (5,) and np.all(np.abs(counts - 400) < 80)  # every step, none outside [0, 5)


# ---- forward process and parameterisations ----


def test_q_sample_statistics():
    schedule = make_schedule("linear", STEPS)
    t = np.array([0, 10, 500, 999])
    x0 = np.full((4, 20_000), 0.7, np.float32)
    noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)
    x_t = np.asarray(q_sample(schedule, x0, t, noise))
    ac = REF["alphas_cumprod"][t]
    np.testing.assert_allclose(x_t.mean(axis=1), np.sqrt(ac) * 0.7, atol=0.03)
    np.testing.assert_allclose(x_t.var(axis=1), 1 - ac, rtol=0.05)
    np.testing.assert_allclose(x_t[0], x0[0], atol=0.06)  # t = 0 keeps the data (noise std 0.01)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("t_dtype", [np.int32, np.int16, np.uint16])
def test_predictions_invert_q_sample(prediction, t_dtype):
    schedule, x0, noise, x_t, target, _, _ = random_batch(0, prediction)
    t = T.astype(t_dtype)
    np.testing.assert_allclose(predict_x0(schedule, x_t, t, target, prediction), x0, atol=2e-4)
    np.testing.assert_allclose(predict_epsilon(schedule, x_t, t, target, prediction), noise, atol=2e-4)
    expected_x_t = ref_at("sqrt_alphas_cumprod", T) * x0 + ref_at("sqrt_one_minus_alphas_cumprod", T) * noise
    np.testing.assert_allclose(x_t, expected_x_t, atol=1e-6)


def test_training_targets():
    schedule, x0, noise, _, _, _, _ = random_batch(0, "v")
    v = ref_at("sqrt_alphas_cumprod", T) * noise - ref_at("sqrt_one_minus_alphas_cumprod", T) * x0
    np.testing.assert_allclose(training_target(schedule, x0, noise, T, "v"), v, atol=1e-6)
    np.testing.assert_array_equal(training_target(schedule, x0, noise, T, "epsilon"), noise)


def test_posterior_mean_and_learned_range_variance():
    schedule, x0, _, x_t, _, _, var_values = random_batch(0, "epsilon")
    mean = ref_at("posterior_mean_coef1", T) * x0 + ref_at("posterior_mean_coef2", T) * x_t
    np.testing.assert_allclose(q_posterior_mean(schedule, x0, x_t, T), mean, atol=1e-5)
    low, high = ref_at("posterior_log_variance_clipped", T), ref_at("log_betas", T)
    np.testing.assert_allclose(model_log_variance(schedule, T, -np.ones(SHAPE)), np.broadcast_to(low, SHAPE), rtol=1e-5)
    np.testing.assert_allclose(model_log_variance(schedule, T, np.ones(SHAPE)), np.broadcast_to(high, SHAPE), rtol=1e-5)


@pytest.mark.parametrize(
    "t, error, message",
    [
        (np.array([0.0, 1.0]), TypeError, "integer diffusion steps"),
        (np.array([0, 1, 2]), ValueError, r"one step per example, shape \(2,\)"),
        (np.array([[0, 1]]), ValueError, r"one step per example, shape \(2,\)"),
    ],
)
def test_timesteps_must_be_one_integer_per_example(t, error, message):
    with pytest.raises(error, match=message):
        q_sample(make_schedule("linear", STEPS), np.zeros((2, 3)), t, np.zeros((2, 3)))


# ---- loss ----


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_mse_is_zero_for_exact_target_and_known_for_an_offset(prediction):
    schedule, x0, noise, x_t, target, _, var_values = random_batch(0, prediction)
    offset = np.arange(len(T), dtype=np.float32).reshape(-1, 1, 1, 1, 1) / 4  # (B, 1, 1, 1, 1)
    per_example, terms = loss(schedule, target, x0, x_t, noise, T, prediction=prediction)
    assert set(terms) == {"mse"}
    np.testing.assert_allclose(per_example, 0.0, atol=1e-10)
    per_example, terms = loss(schedule, target + offset, x0, x_t, noise, T, prediction=prediction)
    np.testing.assert_allclose(per_example, offset.ravel() ** 2, rtol=1e-5)
    # The variance half never changes the MSE.
    _, terms = loss(schedule, np.concatenate([target + offset, var_values], -1), x0, x_t, noise, T,
                    prediction=prediction, learn_sigma=True)
    np.testing.assert_allclose(terms["mse"], offset.ravel() ** 2, rtol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vb_is_a_kl_that_vanishes_at_the_true_posterior(prediction):
    schedule, x0, noise, x_t, target, model_out, var_values = random_batch(1, prediction)
    per_example, terms = loss(schedule, np.concatenate([model_out, var_values], -1), x0, x_t, noise, T,
                              prediction=prediction, learn_sigma=True)
    assert set(terms) == {"mse", "vb"}
    assert np.all(np.asarray(terms["vb"])[T > 0] > 0)
    np.testing.assert_allclose(per_example, terms["mse"] + terms["vb"], rtol=1e-6)
    # The true mean with the posterior variance (var values -1) is q itself: KL = 0.
    exact = np.concatenate([target, -np.ones(SHAPE, np.float32)], -1)
    _, terms = loss(schedule, exact, x0, x_t, noise, T, prediction=prediction, learn_sigma=True)
    np.testing.assert_allclose(np.asarray(terms["vb"])[T > 0], 0.0, atol=1e-4)


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    schedule, x0, noise, x_t, _, model_out, var_values = random_batch(2, "epsilon")
    output = np.concatenate([model_out, var_values], -1)

    @jax.jit
    def grads(out):  # d(sum of vb)/d(output), d(sum of mse)/d(output)
        terms = lambda o: loss(schedule, o, x0, x_t, noise, T, learn_sigma=True)[1]  # noqa: E731
        return jax.grad(lambda o: terms(o)["vb"].sum())(out), jax.grad(lambda o: terms(o)["mse"].sum())(out)

    grad_vb, grad_mse = map(np.asarray, grads(output))
    channels = SHAPE[-1]
    assert np.all(grad_vb[..., :channels] == 0)  # stop_gradient on the prediction half
    assert np.all(np.abs(grad_vb[..., channels:]).reshape(len(T), -1).max(axis=1) > 0)  # every example, t = 0 too
    assert np.all(grad_mse[..., channels:] == 0)
    assert np.all(grad_mse[..., :channels] != 0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vb_matches_dit_float64_reference(prediction):
    # An x0 output error lands on x0 undamped: keep it within a few uint8 bins so that, as for the
    # others, the t = 0 decoder term is a real likelihood rather than float32 tail round-off.
    output_noise = 0.002 if prediction == "x0" else 0.05
    schedule, x0, noise, x_t, target, model_out, var_values = random_batch(3, prediction, output_noise=output_noise)
    model_out[0].flat[:4] += 20  # at t = 0 these bins (two of them the edge bins) get the 1e-12 probability floor
    _, terms = loss(schedule, np.concatenate([model_out, var_values], -1), x0, x_t, noise, T,
                    prediction=prediction, learn_sigma=True)
    expected = ref_vb_bits(*(a.astype(np.float64) for a in (x0, x_t)), T, model_out.astype(np.float64),
                           var_values.astype(np.float64), prediction)
    # atol: float32 KLs of ~1e-6 bits at the noisy end cancel to ~1e-8 (in DiT's float32 as here).
    np.testing.assert_allclose(terms["vb"], expected, rtol=1e-4, atol=1e-6)
    assert 0 < expected[0] < 5  # the decoder term is mostly a real likelihood here, not the 1e-12 floor


@pytest.mark.parametrize(
    "call",
    [
        lambda s, x, t: training_target(s, x, x, t, "sample"),
        lambda s, x, t: predict_x0(s, x, t, x, "sample"),
        lambda s, x, t: predict_epsilon(s, x, t, x, "sample"),
        lambda s, x, t: loss(s, x, x, x, x, t, prediction="sample"),
    ],
)
def test_bad_prediction_names_the_choices(call):
    with pytest.raises(ValueError, match="prediction must be one of epsilon, v, x0"):
        call(make_schedule("cosine", 10), np.zeros((2, 3)), np.array([0, 1]))


def test_wrong_output_channels_raise():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(2, 3, 8\) with learn_sigma=True"):
        loss(make_schedule("cosine", 10), x, x, x, x, np.array([0, 1]), learn_sigma=True)


def test_loss_jits_and_computes_in_float32():
    schedule, x0, noise, x_t, _, model_out, var_values = random_batch(1, "v")
    output = np.concatenate([model_out, var_values], -1)
    kwargs = dict(prediction="v", learn_sigma=True)
    jitted = jax.jit(loss, static_argnames=("prediction", "learn_sigma"))
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (output, x0, x_t, noise)]
    per_example, terms = jitted(schedule, *bf16, jnp.asarray(T), **kwargs)
    assert per_example.dtype == jnp.float32 and per_example.shape == (len(T),)
    eager, _ = loss(schedule, *(np.asarray(a, np.float32) for a in bf16), T, **kwargs)
    np.testing.assert_allclose(per_example, eager, rtol=1e-5)
