"""The diffusion objective (DDPM, as in DiT): noise schedules, q_sample, targets and the loss.

The forward process adds Gaussian noise over `num_steps` steps with variances `betas`; with
`alphas_cumprod` (ac) their running product of (1 - beta), a noisy sample at step t is
    x_t = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * eps,   eps ~ N(0, I).
The network sees (x_t, t) and predicts eps ("epsilon", DiT), the velocity
v = sqrt(ac_t) * eps - sqrt(1 - ac_t) * x0 ("v"), or the clean sample itself ("x0", ADM's
START_X: what a pixel-space model with large patches needs, since the noise of a patch has more
dimensions than the model's width can carry); the loss is the mean squared error to that target. With `learn_sigma` (DiT, after Nichol & Dhariwal's improved DDPM) the network also outputs
per-element values in [-1, 1] that interpolate the log variance of p(x_{t-1} | x_t) between the
posterior variance and beta_t; those are trained with the variational bound ("vb", in bits):
KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the discretized decoder NLL at t = 0.
The mean is frozen inside vb, so the mean is learned by the MSE alone.

All functions are pure; every computation is float32. `t` is an integer array (B,) of steps in
[0, num_steps); per-step coefficients are gathered and broadcast over x's non-batch axes.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.frames import masked_mean

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("epsilon", "v", "x0")  # what the network predicts

# Ho et al.'s linear betas for 1000 steps, stretched to any step count (ADM's named "linear").
_LINEAR_REFERENCE_STEPS = 1000
_LINEAR_BETA_START = 1e-4
_LINEAR_BETA_END = 0.02
_COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta_0 from being vanishingly small
_COSINE_MAX_BETA = 0.999  # clip so the last steps do not become singular
# The data are uint8 levels scaled to [-1, 1]: 256 bins of width 2/255, half a bin each side.
_BIN_HALF_WIDTH = 1.0 / 255.0
_EDGE = 0.999  # beyond this the first / last bin extends to -inf / +inf
_LOG_FLOOR = 1e-12  # keeps log() of a vanishing probability finite
_GELU_CUBIC = 0.044715  # the tanh approximation of the normal CDF (as in GELU)


@flax.struct.dataclass
class Schedule:
    """Per-step float32 coefficients, each of shape (num_steps,); a jax pytree."""

    betas: jax.Array
    log_betas: jax.Array  # the learned variance's upper end; float64 log, since cosine betas near 1
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array  # ac_{t-1}, with ac_{-1} = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array  # 1 / sqrt(ac), precomputed in float64
    sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1/ac - 1): in float32 it would cancel near t=0
    posterior_variance: jax.Array  # of q(x_{t-1} | x_t, x0)
    posterior_log_variance_clipped: jax.Array  # log of it, step 0 (variance 0) clipped to step 1
    posterior_mean_coef1: jax.Array  # multiplies x0
    posterior_mean_coef2: jax.Array  # multiplies x_t

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def _betas(kind: str, num_steps: int) -> np.ndarray:
    if kind == "linear":
        scale = _LINEAR_REFERENCE_STEPS / num_steps
        return np.linspace(scale * _LINEAR_BETA_START, scale * _LINEAR_BETA_END, num_steps, dtype=np.float64)
    # cosine: ac(s) = cos^2((s + offset) / (1 + offset) * pi/2) for s in [0, 1]; beta_i = 1 - ac(s_{i+1}) / ac(s_i)
    s = np.arange(num_steps + 1, dtype=np.float64) / num_steps  # (num_steps + 1,)
    alpha_bar = np.cos((s + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], _COSINE_MAX_BETA)  # (num_steps,)


def make_schedule(kind: str = "linear", num_steps: int = 1000) -> Schedule:
    """The named beta schedule and everything derived from it, computed in float64 then cast."""
    return _schedule_from_betas(_checked_betas(kind, num_steps))


def _checked_betas(kind: str, num_steps: int) -> np.ndarray:
    """The named schedule's float64 betas (num_steps,), or an error naming the bad setting."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {', '.join(SCHEDULES)}; got {kind!r}.")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    betas = _betas(kind, num_steps)
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError(
            f"the {kind} schedule with num_steps={num_steps} has betas outside (0, 1) "
            f"(max {betas.max():.3g}); use more steps or the cosine schedule."
        )
    return betas


def respace(kind: str, num_steps: int, timesteps: np.ndarray) -> Schedule:
    """The chain that visits only `timesteps` (increasing) of the `num_steps`-step schedule.

    Its step i goes from timesteps[i] to timesteps[i - 1] with beta_i = 1 - ac[t_i] / ac[t_{i-1}],
    so alphas_cumprod are the original ones at those steps (DiT's SpacedDiffusion). Gather with
    the index i; the network still sees the original step timesteps[i].
    """
    timesteps = np.asarray(timesteps)
    if timesteps.ndim != 1 or timesteps.size < 1 or np.any(np.diff(timesteps) <= 0):
        raise ValueError(f"timesteps must be a non-empty increasing 1-D array; got {timesteps}.")
    if timesteps[0] < 0 or timesteps[-1] >= num_steps:
        raise ValueError(f"timesteps must lie in [0, {num_steps}); got {timesteps[0]}..{timesteps[-1]}.")
    ac = np.cumprod(1.0 - _checked_betas(kind, num_steps))[timesteps]  # float64 (S,)
    return _schedule_from_betas(1.0 - ac / np.append(1.0, ac[:-1]))


def _schedule_from_betas(betas: np.ndarray) -> Schedule:
    """float64 betas (S,) -> the float32 Schedule of everything derived from them."""
    num_steps = betas.shape[0]
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    # Step 0's posterior variance is 0; borrow step 1's (a one-step chain has only beta_0).
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if num_steps > 1 else betas
    fields = dict(
        betas=betas,
        log_betas=np.log(betas),
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    )
    return Schedule(**{name: jnp.asarray(value.astype(np.float32)) for name, value in fields.items()})


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}.")


def gather(values: jax.Array, t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """values[t] shaped (B, 1, ..., 1) to broadcast over the non-batch axes of an x of `shape`."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"t must hold integer diffusion steps, got dtype {t.dtype}.")
    if t.shape != shape[:1]:
        raise ValueError(f"t must hold one step per example, shape {shape[:1]}; got {t.shape}.")
    return values[t].reshape((-1,) + (1,) * (len(shape) - 1))  # (B, 1, ..., 1)


def _f32(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _mean_flat(x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """The mean of each example's values (B,); with keep (B, T) bool, of its kept frames' only (masked,
    so the left-out frames get exactly zero gradient)."""
    if keep is None:
        return x.mean(axis=tuple(range(1, x.ndim)))  # (B,)
    return masked_mean(x, keep)


def sample_timesteps(rng: jax.Array, batch_size: int, num_steps: int) -> jax.Array:
    """(B,) int32 steps drawn uniformly from [0, num_steps)."""
    return jax.random.randint(rng, (batch_size,), 0, num_steps, dtype=jnp.int32)


def _signal_noise(schedule: Schedule, t: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(sqrt(ac_t), sqrt(1 - ac_t)), each (B, 1, ..., 1): the weights of x0 and of the noise in x_t."""
    return gather(schedule.sqrt_alphas_cumprod, t, shape), gather(schedule.sqrt_one_minus_alphas_cumprod, t, shape)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) noise: a draw from q(x_t | x0)."""
    x0, noise = _f32(x0, noise)
    signal, sigma = _signal_noise(schedule, t, x0.shape)
    return signal * x0 + sigma * noise


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction: str) -> jax.Array:
    """What the network should output: the noise, v = sqrt(ac) noise - sqrt(1 - ac) x0, or x0."""
    _check_prediction(prediction)
    x0, noise = _f32(x0, noise)
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    signal, sigma = _signal_noise(schedule, t, x0.shape)
    return signal * noise - sigma * x0


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction: str) -> jax.Array:
    """The clean sample implied by the network's output at (x_t, t)."""
    _check_prediction(prediction)
    x_t, out = _f32(x_t, model_output)
    if prediction == "epsilon":  # x0 = (x_t - sqrt(1 - ac) eps) / sqrt(ac), with float64-precomputed ratios
        recip = gather(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape)
        return recip * x_t - gather(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * out
    if prediction == "x0":
        return out
    signal, sigma = _signal_noise(schedule, t, x_t.shape)
    return signal * x_t - sigma * out


def predict_epsilon(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction: str
) -> jax.Array:
    """The noise implied by the network's output at (x_t, t)."""
    _check_prediction(prediction)
    x_t, out = _f32(x_t, model_output)
    if prediction == "epsilon":
        return out
    signal, sigma = _signal_noise(schedule, t, x_t.shape)
    if prediction == "x0":
        return (x_t - signal * out) / sigma
    return sigma * x_t + signal * out


def q_posterior_mean(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Mean of q(x_{t-1} | x_t, x0)."""
    x0, x_t = _f32(x0, x_t)
    coef1, coef2 = gather(schedule.posterior_mean_coef1, t, x_t.shape), gather(schedule.posterior_mean_coef2, t, x_t.shape)
    return coef1 * x0 + coef2 * x_t


def model_log_variance(schedule: Schedule, t: jax.Array, var_values: jax.Array) -> jax.Array:
    """DiT's learned range: var_values -1 -> the posterior log variance, +1 -> log(beta_t)."""
    (var_values,) = _f32(var_values)
    min_log = gather(schedule.posterior_log_variance_clipped, t, var_values.shape)
    max_log = gather(schedule.log_betas, t, var_values.shape)
    frac = (var_values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF that DiT (and ADM) use."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + _GELU_CUBIC * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Log probability (nats) of the uint8 bin holding each x in [-1, 1] under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + _BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - _BIN_HALF_WIDTH))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _LOG_FLOOR))  # the lowest bin: everything below it
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _LOG_FLOOR))  # the highest bin
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _LOG_FLOOR))
    return jnp.where(x < -_EDGE, log_cdf_plus, jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta))


def _vb_bits(schedule, x0, x_t, t, model_output, var_values, prediction, keep=None) -> jax.Array:
    """One term of the variational bound in bits per dimension, (B,): KL for t > 0, decoder NLL at t = 0."""
    model_mean = q_posterior_mean(schedule, predict_x0(schedule, x_t, t, model_output, prediction), x_t, t)
    log_variance = model_log_variance(schedule, t, var_values)
    true_mean = q_posterior_mean(schedule, x0, x_t, t)
    true_log_variance = gather(schedule.posterior_log_variance_clipped, t, x_t.shape)
    kl = normal_kl(true_mean, true_log_variance, model_mean, log_variance)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_variance)  # log std = log var / 2
    return jnp.where(t == 0, _mean_flat(decoder_nll, keep), _mean_flat(kl, keep)) / math.log(2.0)  # (B,) nats -> bits


def loss(
    schedule: Schedule,
    model_output: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    *,
    prediction: str = "epsilon",
    learn_sigma: bool = False,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example loss (B,) and its terms {"mse": (B,), "vb": (B,) with learn_sigma}.

    model_output is (B, ..., C), or (B, ..., 2C) with `learn_sigma`: the prediction, then the
    variance values, on the last (channel) axis. keep (B, T) bool: the frames in the loss (frame
    conditioning leaves the given ones out); None: all.
    """
    _check_prediction(prediction)
    model_output, x0, x_t, noise = _f32(model_output, x0, x_t, noise)
    channels = x0.shape[-1]
    expected = (*x0.shape[:-1], 2 * channels if learn_sigma else channels)
    if model_output.shape != expected:
        raise ValueError(f"model_output must be {expected} with learn_sigma={learn_sigma}; got {model_output.shape}.")
    terms = {}
    if learn_sigma:
        model_output, var_values = jnp.split(model_output, 2, axis=-1)  # 2 x (B, ..., C)
        # vb trains only the variance: the mean it sees is frozen, so the MSE alone shapes it.
        frozen = jax.lax.stop_gradient(model_output)
        terms["vb"] = _vb_bits(schedule, x0, x_t, t, frozen, var_values, prediction, keep)  # (B,)
    target = training_target(schedule, x0, noise, t, prediction)
    terms["mse"] = _mean_flat((target - model_output) ** 2, keep)  # (B,)
    return terms["mse"] + terms.get("vb", 0.0), terms
