"""DPM-Solver++(2M), midpoint, as the official sampler configures diffusers' `DPMSolverMultistepScheduler`
(docs/method.md §8.2).

Settings reproduced: solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
final_sigmas_type="zero", timestep_spacing="linspace", lambda_min_clipped=−inf, thresholding off. So step 0 and the
last step are 1st order (DDIM), the steps between are 2nd-order multistep, and the last step returns x̂₀.

Unlike diffusers the solver is stateless: the K per-step coefficients are precomputed (numpy when the schedule is
concrete) and the K steps run in one `lax.scan`, so the whole solve nests inside the sampler's scan over tokens.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.diffusion.schedule import NoiseSchedule, check_prediction_type

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def solver_timesteps(num_inference_steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """linspace(0, T−1, K+1).round()[::-1][:-1]: K=20 → 999, 949, …, 50 (docs/method.md §6.1, §8.2)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    return np.linspace(0, num_train_steps - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)


class SolverCoefficients(NamedTuple):
    """Per-step constants (each [K]): x̂₀ = (x − sigma_s·ε̂)/alpha_s or alpha_s·x − sigma_s·v̂ at `timesteps`, then
    x ← x_coef·x + x0_coef·m₀ + diff_coef·(m₀ − m₋₁) with m the x̂₀ history (diff_coef = 0 on 1st-order steps)."""

    timesteps: np.ndarray
    alpha_s: np.ndarray | jax.Array
    sigma_s: np.ndarray | jax.Array
    x_coef: np.ndarray | jax.Array
    x0_coef: np.ndarray | jax.Array
    diff_coef: np.ndarray | jax.Array


def dpm_solver_coefficients(schedule: NoiseSchedule, num_inference_steps: int) -> SolverCoefficients:
    """Coefficients with diffusers' float32 formulas: σ = √((1−ᾱ)/ᾱ) (final σ = 0), α_t = 1/√(σ²+1), σ_t = σ·α_t,
    λ = log α_t − log σ_t, h = λ_next − λ_cur; midpoint 2nd order adds ½·(h/h_prev)·(m₀ − m₋₁) to the x̂₀ term."""
    ab = schedule.alphas_cumprod
    # Numpy constants when the table is concrete (the usual case); jnp when the schedule itself is traced.
    xp = jnp if isinstance(ab, jax.core.Tracer) else np
    ab = xp.asarray(ab, dtype=xp.float32)
    k = num_inference_steps
    ts = solver_timesteps(k, ab.shape[0])
    table = ((1 - ab) / ab) ** 0.5
    sig = xp.concatenate([table[ts], xp.zeros((1,), xp.float32)])  # [K+1], final sigma "zero"
    alpha = 1 / (sig**2 + 1) ** 0.5
    sigma_t = sig * alpha
    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = −inf at the final σ = 0 is intended
        lam = xp.log(alpha) - xp.log(sigma_t)  # λ_K = +inf ⇒ exp(−h) = 0 ⇒ the last step returns x̂₀ exactly
        h = lam[1:] - lam[:-1]  # [K]
        h_prev = xp.concatenate([xp.ones((1,), xp.float32), h[:-1]])  # placeholder at step 0 (1st order there)
        x_coef = sigma_t[1:] / sigma_t[:-1]
        x0_coef = -(alpha[1:] * (xp.exp(-h) - 1))
        step = np.arange(k)
        second = (step >= 1) & (step <= k - 2)  # lower_order_final + final σ = 0: first and last steps 1st order
        diff_coef = xp.where(second, 0.5 * x0_coef * (1 / (h_prev / h)), 0.0).astype(xp.float32)
    return SolverCoefficients(ts, alpha[:-1], sigma_t[:-1], x_coef, x0_coef, diff_coef)


def dpm_solver_sample(model_fn: ModelFn, x_T: jax.Array, schedule: NoiseSchedule, num_inference_steps: int,
                      prediction_type: str = "epsilon", x0_clip: float | None = None) -> jax.Array:
    """Runs K DPM-Solver++(2M) steps from x_T (docs/method.md §8.2); returns x̂₀ with x_T's shape and dtype.

    model_fn(x, t) gets x [..., C] (fp32) and t an int32 scalar: every row is at the same timestep, so what depends
    on t alone (the head's timestep embedding) is computed once per step, not once per row. `x0_clip` clamps x̂₀ to
    ±x0_clip before every update: a deviation from the official sampler (default None = off) that tames ε-prediction,
    whose x̂₀ = (x − σ·ε̂)/α amplifies ε̂ errors by 1/α ≈ 2·10⁴ at t = 999 (docs/design.md §4).
    """
    check_prediction_type(prediction_type)
    c = dpm_solver_coefficients(schedule, num_inference_steps)
    xs = (jnp.asarray(c.timesteps, jnp.int32),) + tuple(jnp.asarray(a, jnp.float32) for a in c[1:])
    x = x_T.astype(jnp.float32)

    def step(carry, coef):
        x, m_prev = carry
        t, alpha_s, sigma_s, x_coef, x0_coef, diff_coef = coef
        out = model_fn(x, t).astype(jnp.float32)
        m0 = (x - sigma_s * out) / alpha_s if prediction_type == "epsilon" else alpha_s * x - sigma_s * out
        if x0_clip is not None:
            m0 = jnp.clip(m0, -x0_clip, x0_clip)
        # diff_coef is 0 on 1st-order steps, so the zero-initialised history never leaks into step 0.
        x = x_coef * x + x0_coef * m0 + diff_coef * (m0 - m_prev)
        return (x, m0), None

    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
    return x.astype(x_T.dtype)
