"""Reverse diffusion: DDIM and DDPM samplers over any subset of the training steps, and the
Euler and Heun ODE samplers of flow matching.

The samplers are pure functions of arrays. `sample` runs the whole reverse process as one
`lax.scan` inside whatever `jit` calls it: pure noise x_T -> x_0, with `denoise(x, t)` the
network (already guided, see `guide`). Each step turns the network's output into an estimate
of x0 (optionally clipped to the data range) and of the noise, then
- DDIM (Song et al.) moves to the previous visited step deterministically (`eta=0`), or with
  noise of scale eta * sigma_t (`eta=1` is DDPM-like);
- DDPM (Ho et al.) draws from the posterior q(x_prev | x_t, x0_hat), whose variance is the
  network's learned one (DiT's `learn_sigma`) or else the posterior variance.
Visiting a subset of steps respaces the chain (`diffusion.respace`): coefficients are gathered
with the index i of the visited step, the network sees the original step timesteps[i].

`sample_flow` integrates the flow's velocity from t = 1 (noise) to t = 0 on the shifted time
grid of `flow.time_grid`: Euler, x <- (1 - t') x0 + t' eps with the (x0, eps) the network implies
at t (the same as x + (t' - t) v, and like DDIM exact for straight paths), or Heun, which averages
that velocity with the one at the Euler point (two network passes a step, one on the last).

Randomness is per sample: sample b draws x_T from fold_in(keys[b], 0) and step i's noise
from fold_in(keys[b], i + 1), so a sample's pixels do not depend on the batch it is in.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdit import diffusion, flow, frames, unipc
from jaxdit.options import resolve_sampler

Denoise = Callable[[jax.Array, jax.Array], jax.Array]  # (x (B, ...), t (B,)) -> output (B, ..., C or 2C)


def check_sampler(sampler: str, steps: int, num_train_steps: int, process: str = "ddpm") -> str:
    """The sampler that runs ("": the process's default), after checking it and the step count."""
    sampler = resolve_sampler(sampler, process)
    if process == "flow":
        flow.time_grid(steps)  # checks the step count
    else:
        timestep_subset(num_train_steps, steps)
    return sampler


def evaluations(sampler: str, steps: int) -> int:
    """Network passes per sample (before guidance doubles them): Heun's corrector adds one on every step but the last."""
    return 2 * steps - 1 if sampler == "heun" else steps


def timestep_subset(num_train_steps: int, steps: int) -> np.ndarray:
    """`steps` training steps, evenly spaced from 0 to num_train_steps - 1, increasing (S,) int32.

    The spacing is DiT's (and guided-diffusion's) `space_timesteps`: a float stride added up
    step by step, then rounded half to even, so that imported DiT models visit the same steps
    for every step count. One step visits the last training step (DiT's would visit step 0).
    """
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"sampling steps must be between 1 and the {num_train_steps} training steps; got {steps}.")
    if steps == 1:
        return np.array([num_train_steps - 1], np.int32)
    stride = (num_train_steps - 1) / (steps - 1)
    return np.round(np.cumsum(np.r_[0.0, np.full(steps - 1, stride)])).astype(np.int32)  # (S,)


def guide(denoise_pair: Denoise, cfg_scale: jax.Array, channels: int) -> Denoise:
    """Classifier-free guidance from one batched pass over [conditional; unconditional] inputs.

    `denoise_pair(x2, t2)` takes the batch twice, conditional halves first. The first
    `channels` output channels (the prediction) become u + g * (c - u); a learned variance
    (the rest) is the conditional one. Guiding x0 or v is the same as guiding eps: at a fixed
    (x_t, t) each is an affine function of the others.
    """

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        out = denoise_pair(jnp.concatenate([x, x]), jnp.concatenate([t, t]))  # (2B, ..., C or 2C)
        cond, uncond = jnp.split(out, 2)  # (B, ..., C or 2C) each
        guided = uncond[..., :channels] + cfg_scale * (cond[..., :channels] - uncond[..., :channels])
        return jnp.concatenate([guided, cond[..., channels:]], axis=-1)

    return denoise


def _normal(keys: jax.Array, index, shape: tuple[int, ...]) -> jax.Array:
    """One standard normal draw per sample from fold_in(keys[b], index) -> (B, *shape) float32."""
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32))(keys)


def ddim_step(schedule: diffusion.Schedule, x_t, x0, eps, i, eta, noise) -> jax.Array:
    """x at visited step i -> x at step i - 1 (x0 itself at i = 0)."""
    ac = diffusion.gather(schedule.alphas_cumprod, i, x_t.shape)
    ac_prev = diffusion.gather(schedule.alphas_cumprod_prev, i, x_t.shape)
    sigma = eta * jnp.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev))
    mean = jnp.sqrt(ac_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ac_prev - sigma**2, 0.0)) * eps
    return mean + sigma * noise  # at i = 0: ac_prev = 1, sigma = 0, so x0 exactly


def ddpm_step(schedule: diffusion.Schedule, x_t, x0, log_variance, i, noise) -> jax.Array:
    """A draw from q(x_{i-1} | x_i, x0) with the given log variance; the mean alone at i = 0."""
    mean = diffusion.q_posterior_mean(schedule, x0, x_t, i)
    nonzero = (i > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))  # (B, 1, ..., 1)
    return mean + nonzero * jnp.exp(0.5 * log_variance) * noise


def sample(
    denoise: Denoise,
    keys: jax.Array,
    shape: tuple[int, ...],
    *,
    schedule_kind: str,
    num_train_steps: int,
    steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    prediction: str = "epsilon",
    learn_sigma: bool = False,
    clip_x0: bool = False,
    progress: Callable[[int], None] | None = None,
    x_T: jax.Array | None = None,
    init: jax.Array | None = None,
    start: int = 0,
    given: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """keys (B,) typed keys, shape (T, H, W, C) of one sample -> x0 (B, T, H, W, C) float32.

    `progress(i)` is called from the device after each step (jax.debug.callback), i = 1..steps.
    `x_T` (B, T, H, W, C), when given, is the starting noise instead of the keys' draw (e.g. to
    reproduce another implementation's sample from its noise). SDEdit: with `start` > 0 the first
    `start` of the `steps` are skipped, and the chain starts from `init` (B, T, H, W, C) noised to the
    step it starts at (`sdedit_start`); at `start == steps` it returns `init`. Frame conditioning: `given`
    = (latents (B, T, H, W, C), mask (B, T) bool): the masked frames are those latents from the start and
    again after every step (`reset`), bitwise.
    """
    sampler = check_sampler(sampler, steps, num_train_steps)
    timesteps = timestep_subset(num_train_steps, steps)  # (S,) increasing
    schedule = diffusion.respace(schedule_kind, num_train_steps, timesteps)
    channels = shape[-1]
    batch = keys.shape[0]
    remaining = steps - _check_start(start, steps, init, batch, shape)

    def step(x: jax.Array, i: jax.Array):
        index = jnp.full((batch,), i, jnp.int32)  # (B,) visited-step index
        out = denoise(x, jnp.full((batch,), jnp.asarray(timesteps)[i], jnp.int32))  # (B, T, H, W, C or 2C)
        mean_out = out[..., :channels]
        x0 = diffusion.predict_x0(schedule, x, index, mean_out, prediction)  # (B, T, H, W, C)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
        noise = _normal(keys, i + 1, shape)  # (B, T, H, W, C)
        if sampler == "ddim":
            eps = diffusion.predict_epsilon(schedule, x, index, x0, "x0")  # consistent with the clipped x0
            x = ddim_step(schedule, x, x0, eps, index, eta, noise)
        else:
            if learn_sigma:
                log_variance = diffusion.model_log_variance(schedule, index, out[..., channels:])
            else:
                log_variance = diffusion.gather(schedule.posterior_log_variance_clipped, index, x.shape)
            x = ddpm_step(schedule, x, x0, log_variance, index, noise)
        if progress is not None:
            jax.debug.callback(progress, steps - i)
        return reset(x, given), None

    x_T = _start_noise(keys, shape, x_T)  # (B, T, H, W, C)
    if remaining == 0:
        return init.astype(jnp.float32)
    if start:  # the edited clip noised to the first step run, remaining - 1 of the respaced chain
        x_T = diffusion.q_sample(schedule, init, jnp.full((batch,), remaining - 1, jnp.int32), x_T)
    x0, _ = jax.lax.scan(step, reset(x_T, given), jnp.arange(remaining - 1, -1, -1))
    return x0


def sample_flow(
    denoise: Denoise,
    keys: jax.Array,
    shape: tuple[int, ...],
    *,
    steps: int,
    sampler: str = "euler",
    prediction: str = "v",
    shift: float = 1.0,
    clip_x0: bool = False,
    progress: Callable[[int], None] | None = None,
    x_T: jax.Array | None = None,
    init: jax.Array | None = None,
    start: int = 0,
    given: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Flow matching's reverse ODE from x_1 = noise: keys (B,), shape (T, H, W, C) -> x0 (B, T, H, W, C) float32.

    `denoise(x, t)` sees t * flow.TIME_SCALE. `progress(i)` is called after each step, i = 1..steps.
    SDEdit: with `start` > 0 the ODE starts at time t = times[start] of the grid from `init`
    (B, T, H, W, C) on the straight path, (1 - t) init + t noise, and runs the steps left. `given`: frame
    conditioning as `sample` takes it (Heun's corrector also sees the given frames at the Euler point).
    """
    sampler = check_sampler(sampler, steps, 0, "flow")
    times = jnp.asarray(flow.time_grid(steps, shift))  # (S + 1,) from 1 down to 0
    batch = keys.shape[0]
    _check_start(start, steps, init, batch, shape)

    def predict(x, t, network_t=None):  # (x0, eps) the network implies at time t (a scalar)
        t = jnp.full((batch,), t, jnp.float32)  # (B,)
        network_t = t * flow.TIME_SCALE if network_t is None else jnp.full((batch,), network_t, jnp.float32)
        x0, eps = flow.split(x, t, denoise(x, network_t), prediction)  # 2x (B, T, H, W, C)
        if clip_x0:  # the sample clipped to the data range, and the noise that with it still makes x
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = flow.split(x, t, x0, "x0")[1]
        return x0, eps

    if sampler == "unipc":
        return _sample_unipc(predict, keys, shape, steps, shift, x_T, init, start, given, progress)

    def step(x: jax.Array, i: jax.Array):
        t, t_next = times[i], times[i + 1]
        x0, eps = predict(x, t)
        x_euler = reset((1 - t_next) * x0 + t_next * eps, given)  # = x + (t_next - t) (eps - x0)
        if sampler == "heun":
            def corrected(x_euler):
                x0_next, eps_next = predict(x_euler, t_next)
                return x + (t_next - t) * 0.5 * ((eps - x0) + (eps_next - x0_next))

            # The last step lands on t = 0, where the velocity of x0 and eps predictions is singular: Euler.
            x_euler = reset(jax.lax.cond(t_next > 0, corrected, lambda x_euler: x_euler, x_euler), given)
        if progress is not None:
            jax.debug.callback(progress, i + 1)
        return x_euler, None

    x_T = _start_noise(keys, shape, x_T)  # (B, T, H, W, C)
    if start:  # the edited clip on the straight path at the first time run
        x_T = (1 - times[start]) * init.astype(jnp.float32) + times[start] * x_T
    x0, _ = jax.lax.scan(step, reset(x_T, given), jnp.arange(start, steps))
    return x0


def _sample_unipc(predict, keys, shape, steps, shift, x_T, init, start, given, progress) -> jax.Array:
    """UniPC (`jaxdit.unipc`) on diffusers' flow sigma grid, one network evaluation a step, in one scan.
    SDEdit starts from the grid's step `start` as from a first step (order 1)."""
    sigmas, timesteps = unipc.sigma_grid(steps, shift)  # (S + 1,), (S,)
    constants = {k: jnp.asarray(v) for k, v in unipc.step_constants(sigmas[start:]).items()}  # each (S - start,)

    def step(carry, xs):
        x, last, x0_prev, x0_prev2 = carry  # each (B, T, H, W, C)
        i, c = xs
        x0, _ = predict(x, sigmas_j[i], timesteps_j[i])
        x_next, corrected = unipc.update(x, last, x0, x0_prev, x0_prev2, c)
        if progress is not None:
            jax.debug.callback(progress, i + 1)
        return (reset(x_next, given), corrected, x0, x0_prev), None

    sigmas_j, timesteps_j = jnp.asarray(sigmas), jnp.asarray(timesteps)
    x = _start_noise(keys, shape, x_T)  # (B, T, H, W, C)
    if start:  # the edited clip on the straight path at the first sigma run
        x = (1 - sigmas_j[start]) * init.astype(jnp.float32) + sigmas_j[start] * x
    x = reset(x, given)
    zeros = jnp.zeros_like(x)
    (x, *_), _ = jax.lax.scan(step, (x, x, zeros, zeros), (jnp.arange(start, steps), constants))
    return x


def reset(x: jax.Array, given: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """x (B, T, H, W, C) with the given frames put back: given = (latents (B, T, H, W, C), mask (B, T)), or None."""
    return x if given is None else frames.keep_given(x, *given)


def sdedit_start(steps: int, strength: float) -> int:
    """The steps SDEdit skips: of `steps`, it runs the last int(steps * strength), so strength 1 is plain
    sampling from noise and a strength under 1 / steps returns the clip it edits."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]: the share of the denoising path that is rerun; got {strength}.")
    return steps - min(int(steps * strength), steps)


def _check_start(start: int, steps: int, init, batch: int, shape: tuple[int, ...]) -> int:
    if not 0 <= start <= steps:
        raise ValueError(f"start must be in 0..{steps} (the steps SDEdit skips); got {start}.")
    if start and (init is None or init.shape != (batch, *shape)):
        raise ValueError(f"SDEdit (start > 0) needs init of shape {(batch, *shape)}; got "
                         f"{None if init is None else tuple(init.shape)}.")
    return start


def _start_noise(keys: jax.Array, shape: tuple[int, ...], x_T: jax.Array | None) -> jax.Array:
    """The starting noise: the keys' draw, or the given x_T (B, T, H, W, C)."""
    batch = keys.shape[0]
    if x_T is None:
        return _normal(keys, 0, shape)  # (B, T, H, W, C)
    if x_T.shape != (batch, *shape):
        raise ValueError(f"x_T must have shape {(batch, *shape)} (keys x sample shape); got {tuple(x_T.shape)}.")
    return x_T
