"""UniPC (Zhao et al., 2023) on flow matching's path, as diffusers' `UniPCMultistepScheduler` runs it for
Wan 2.1: `prediction_type="flow_prediction"`, `use_flow_sigmas=True`, `flow_shift`, `solver_order=2`,
`solver_type="bh2"`, `predict_x0=True`, `lower_order_final=True`.

A multistep predictor-corrector: each step's network evaluation gives x0_i, which first corrects the
previous step (redoing it from the corrected sample before it, with x0_i as a second point) and then
predicts the next sample from x0_i and x0_{i-1}. Order 1 at the first and the last step, 2 in between;
one network evaluation a step. The step's constants depend on the time grid alone, so they are
computed here on the host, as diffusers computes them (float32 scalars), and the update that runs
inside the sampler's `lax.scan` is a few multiply-adds.

The grid is diffusers' flow sigma grid, not `flow.time_grid`: sigmas shift(linspace(1, 1/1000, S + 1))
without the last, the first moved off 1 by 1e-6, then 0 appended; the network sees int(1000 sigma).
"""

import math

import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def sigma_grid(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (S + 1,) float32 from about 1 down to 0, network timesteps (S,) float32 integers)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be at least 1, got {steps}.")
    sigmas = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1]  # float64
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if abs(sigmas[0] - 1) < 1e-6:  # log(0) would follow at alpha = 1 - sigma
        sigmas[0] -= 1e-6
    timesteps = np.trunc(sigmas * NUM_TRAIN_TIMESTEPS)  # diffusers casts the float64 values to int64
    return np.append(sigmas, 0.0).astype(np.float32), timesteps.astype(np.float32)


def step_constants(sigmas: np.ndarray) -> dict[str, np.ndarray]:
    """Each step's predictor and corrector coefficients, (S,) float32 arrays, for `update`.

    Step i corrects the step i-1 -> i (from i >= 1) and predicts i -> i + 1. With lambda = log(alpha /
    sigma), alpha = 1 - sigma, h the step in lambda and E = expm1(-h), a step of order 1 is
    x' = (sigma'/sigma) x - alpha' E x0 (the Euler step), and order 2 adds -alpha' E rho D1 with
    D1 = (x0_prev - x0) / r, r = (lambda_prev - lambda) / h; bh2's rho is 1/2 for the predictor and
    the solution of [[1, 1], [r, 1]] rho = [b1, b2] for the corrector.
    """
    s = sigmas.astype(np.float32)
    steps = len(s) - 1
    with np.errstate(divide="ignore"):  # the last sigma is 0: lambda = +inf, which the formulas absorb
        lam = (np.log(1 - s) - np.log(s)).astype(np.float32)  # (S + 1,)
    names = ("p_ratio", "p_scale", "p_rho", "p_r", "c_ratio", "c_scale", "c_rho0", "c_rho1", "c_r")
    out = {name: np.zeros(steps, np.float32) for name in names}
    out["p_r"][:], out["c_r"][:] = 1.0, 1.0  # placeholders where no D1 term is used (its rho is 0)
    for i in range(steps):
        order = min(2, steps - i, min(i, 2) + 1)  # lower order at the first and at the last step
        ratio, scale, _, _ = _coefficients(s, lam, i, i + 1)
        out["p_ratio"][i], out["p_scale"][i] = ratio, scale
        if order == 2:
            out["p_rho"][i], out["p_r"][i] = 0.5, (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
        if i == 0:
            continue
        corrector_order = min(2, steps - (i - 1), min(i - 1, 2) + 1)  # the order the previous step predicted with
        ratio, scale, b1, b2 = _coefficients(s, lam, i - 1, i)
        out["c_ratio"][i], out["c_scale"][i] = ratio, scale
        if corrector_order == 1:
            out["c_rho1"][i] = 0.5
        else:
            r = (lam[i - 2] - lam[i - 1]) / (lam[i] - lam[i - 1])
            rho0 = (b1 - b2) / (1 - r)
            out["c_rho0"][i], out["c_rho1"][i], out["c_r"][i] = rho0, b1 - rho0, r
    return out


def _coefficients(s: np.ndarray, lam: np.ndarray, source: int, target: int) -> tuple[float, float, float, float]:
    """(sigma_t / sigma_s, alpha_t E, b1, b2) of the step source -> target, in float32 as diffusers'."""
    h = np.float32(lam[target] - lam[source])
    hh = -h
    e = np.float32(math.expm1(hh)) if np.isfinite(hh) else np.float32(-1.0)
    ratio = np.float32(s[target] / s[source])
    scale = np.float32((1 - s[target]) * e)
    if not np.isfinite(h):  # the step to sigma = 0
        return ratio, scale, 1.0, 0.0
    b1 = (e / hh - 1) / e
    b2 = 2 * ((e / hh - 1) / hh - 0.5) / e
    return ratio, scale, np.float32(b1), np.float32(b2)


def update(x, last, x0, x0_prev, x0_prev2, c: dict):
    """One UniPC step inside the scan: x (the sample the network saw), last (the corrected sample before
    it), x0 its network's clean-sample prediction, x0_prev and x0_prev2 the two before; c: this step's
    row of `step_constants`. Returns (the next sample, the corrected x). All (B, ...) float32."""
    d1 = (x0_prev2 - x0_prev) / c["c_r"]
    corrected = c["c_ratio"] * last - c["c_scale"] * x0_prev - c["c_scale"] * (c["c_rho0"] * d1 + c["c_rho1"] * (x0 - x0_prev))
    corrected = jnp.where(c["c_ratio"] > 0, corrected, x)  # the first step has nothing to correct
    d1 = (x0_prev - x0) / c["p_r"]
    return c["p_ratio"] * corrected - c["p_scale"] * x0 - c["p_scale"] * (c["p_rho"] * d1), corrected
