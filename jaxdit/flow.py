"""Flow matching (rectified flow, as in SD3, Flux and Open-Sora 2.0): the straight path from data to noise.

A noisy sample at continuous time t in [0, 1] is
    x_t = (1 - t) x0 + t eps,   eps ~ N(0, I),
so t = 0 is data, t = 1 pure noise, and the path's velocity dx_t/dt = eps - x0 is what an ODE
sampler integrates from t = 1 down to 0. The network sees t * TIME_SCALE, the range of DDPM's
steps, so the same timestep embedder serves both processes.

The network predicts one of three things; at a fixed (x_t, t) each implies the others:
- "v": the velocity eps - x0 (SD3, SiT);
- "x0": the clean sample (JiT, "Back to Basics", 2025: what pixel-space models with patches of
  more dimensions than their width need), with v = (x_t - x0) / t;
- "epsilon": the noise, with v = (eps - x_t) / (1 - t).
The loss is always the MSE of the implied velocity (JiT), so the parametrisations differ only in
what the network's output layer must carry; the divisions by t and 1 - t are clamped at
MIN_DENOMINATOR, where the implied velocity is singular.

Training times are uniform or logit-normal (SD3's "logit_normal(mean, std)": sigmoid of a normal
draw, which spends the steps on the middle of the path), then shifted toward noise by
t' = s t / (1 + (s - 1) t); larger videos need more noise to hide their layout (SD3 / Open-Sora 2.0
take s from the token count: `resolve_shift`). Samplers use the same shift on their time grid.
All functions are pure; every computation is float32; `t` is a float array (B,).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.frames import masked_mean
from jaxdit.options import PREDICTIONS, TIME_SAMPLINGS

TIME_SCALE = 1000.0  # the network sees t * 1000: the range of DDPM's steps
MIN_DENOMINATOR = 0.05  # JiT's clamp of t (x0) and 1 - t (epsilon) when turning a prediction into a velocity


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"flow prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}.")


def _per_example(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(B,) times -> (B, 1, ..., 1), to broadcast over an x of `shape`."""
    t = jnp.asarray(t, jnp.float32)
    if t.shape != shape[:1]:
        raise ValueError(f"t must hold one time per example, shape {shape[:1]}; got {t.shape}.")
    return t.reshape((-1,) + (1,) * (len(shape) - 1))


def shift_time(t, shift: float):
    """t -> s t / (1 + (s - 1) t): s > 1 moves times toward noise (t = 1); 0 and 1 stay fixed."""
    return shift * t / (1 + (shift - 1) * t)


def resolve_shift(shift: float, reference_tokens: int, tokens: int) -> float:
    """The shift for a video of `tokens` tokens: `shift` itself, or with a reference token count
    (> 0) `shift * sqrt(tokens / reference_tokens)`, SD3's rule for keeping the signal-to-noise
    ratio of a larger image's patches the same."""
    if shift <= 0:
        raise ValueError(f"the time shift must be positive, got {shift}.")
    return shift * math.sqrt(tokens / reference_tokens) if reference_tokens else shift


def sample_time(
    rng: jax.Array, batch_size: int, *, sampling: str = "uniform", mean: float = 0.0, std: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """(B,) float32 training times in (0, 1): uniform or logit-normal, then shifted."""
    if sampling == "uniform":
        t = jax.random.uniform(rng, (batch_size,), jnp.float32)
    elif sampling == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch_size,), jnp.float32))
    else:
        raise ValueError(f"time sampling must be one of {', '.join(TIME_SAMPLINGS)}; got {sampling!r}.")
    return shift_time(t, shift)  # (B,)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t noise, the point at time t on the straight path."""
    t = _per_example(t, x0.shape)
    return (1 - t) * jnp.asarray(x0, jnp.float32) + t * jnp.asarray(noise, jnp.float32)


def target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The velocity of the path, eps - x0: what the loss compares every prediction with."""
    return jnp.asarray(noise, jnp.float32) - jnp.asarray(x0, jnp.float32)


def velocity(x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction: str, *, floor: float = MIN_DENOMINATOR):
    """The velocity eps - x0 that the network's output implies at (x_t, t).

    "x0": (x_t - x0) / t and "epsilon": (eps - x_t) / (1 - t), each divisor clamped at `floor`
    (JiT), so the velocity stays finite where it is singular; exact wherever the divisor is larger.
    """
    _check_prediction(prediction)
    x_t, out = (jnp.asarray(a, jnp.float32) for a in (x_t, model_output))
    t = _per_example(t, x_t.shape)  # (B, 1, ..., 1)
    if prediction == "v":
        return out
    if prediction == "x0":
        return (x_t - out) / jnp.maximum(t, floor)
    return (out - x_t) / jnp.maximum(1 - t, floor)


def split(
    x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction: str, *, floor: float = MIN_DENOMINATOR
) -> tuple[jax.Array, jax.Array]:
    """The clean sample and the noise (x0, eps) that the network's output implies at (x_t, t), with
    eps - x0 the clamped `velocity`: exact (x_t = (1 - t) x0 + t eps) wherever that is."""
    v = velocity(x_t, t, model_output, prediction, floor=floor)
    if prediction == "x0":
        return model_output, model_output + v
    if prediction == "epsilon":
        return model_output - v, model_output
    t = _per_example(t, v.shape)
    x_t = jnp.asarray(x_t, jnp.float32)
    return x_t - t * v, x_t + (1 - t) * v  # x_t = x0 + t v = eps - (1 - t) v


def loss(
    model_output: jax.Array, x0: jax.Array, x_t: jax.Array, noise: jax.Array, t: jax.Array, *, prediction: str = "v",
    keep: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example loss (B,): the MSE between the velocities implied by the output and by the truth, {"mse": (B,)}.

    keep (B, T) bool: the frames in the mean (frame conditioning leaves the given ones out); None: all.

    For "x0" that is the x0 error weighted by 1 / max(t, floor)^2 (JiT), for "epsilon" the noise
    error by 1 / max(1 - t, floor)^2; both are the velocity error wherever the clamp is inactive.
    """
    if model_output.shape != x0.shape:
        raise ValueError(f"model_output must have the latents' shape {x0.shape}; got {model_output.shape}.")
    exact = {"v": target(x0, noise), "x0": x0, "epsilon": noise}[prediction]
    error = velocity(x_t, t, model_output, prediction) - velocity(x_t, t, exact, prediction)  # (B, ...)
    if keep is None:
        mse = jnp.mean(error**2, axis=tuple(range(1, error.ndim)))  # (B,)
    else:
        mse = masked_mean(error**2, keep)  # (B,)
    return mse, {"mse": mse}


def time_grid(steps: int, shift: float = 1.0) -> np.ndarray:
    """The sampler's times from 1 (noise) down to 0 (data): (steps + 1,) float32, shifted as in training."""
    if steps < 1:
        raise ValueError(f"sampling steps must be at least 1, got {steps}.")
    return shift_time(np.linspace(1.0, 0.0, steps + 1), shift).astype(np.float32)
