"""Ancestral DDPM sampler as the official `schedule/ddpm.py` configures it (spec §5.2; official_code_facts §5).

Official defaults reproduced: variance_type="fixed_large" (the noise variance is the step's β_t = 1 − ᾱ_t/ᾱ_prev,
not the posterior variance), clip_sample=False, timestep_spacing="leading". Used for training utilities and as a
stochastic reference; generation uses DPM-Solver++.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.diffusion.dpm_solver import ModelFn
from latent_lm.diffusion.schedule import NoiseSchedule, check_prediction_type


def ddpm_timesteps(num_inference_steps: int | None = None, num_train_steps: int = 1000) -> np.ndarray:
    """"leading" spacing: arange(K)·(T//K) reversed (K=None → all T steps, T−1 … 0); the previous step is t − T//K."""
    k = num_train_steps if num_inference_steps is None else num_inference_steps
    if not 1 <= k <= num_train_steps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_steps}], got {k}")
    return (np.arange(k) * (num_train_steps // k))[::-1].astype(np.int64)


def ddpm_sample(model_fn: ModelFn, x_T: jax.Array, schedule: NoiseSchedule, rng: jax.Array,
                num_inference_steps: int | None = None, prediction_type: str = "epsilon") -> jax.Array:
    """Ancestral sampling x_t → μ(x̂₀, x_t) + √β_t·z (no noise at the final t = 0); returns the sample x₀.

    Step i draws z from `jax.random.split(rng, K)[i]` with x_T's shape, so a run is deterministic given rng.
    model_fn(x, t) gets x [..., C] (fp32) and t int32 [...]. Internals in fp32.
    """
    check_prediction_type(prediction_type)
    ab = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    t_total = ab.shape[0]
    ts = ddpm_timesteps(num_inference_steps, t_total)
    ratio = t_total // len(ts)
    x = x_T.astype(jnp.float32)

    def step(x, inp):
        t, key = inp
        prev = t - ratio
        ab_t = ab[t]
        ab_prev = jnp.where(prev >= 0, ab[jnp.maximum(prev, 0)], 1.0)
        beta_prod, beta_prod_prev = 1 - ab_t, 1 - ab_prev
        cur_alpha = ab_t / ab_prev
        cur_beta = 1 - cur_alpha
        out = model_fn(x, jnp.full(x.shape[:-1], t, jnp.int32)).astype(jnp.float32)
        if prediction_type == "epsilon":
            x0 = (x - beta_prod**0.5 * out) / ab_t**0.5
        else:
            x0 = ab_t**0.5 * x - beta_prod**0.5 * out
        # DDPM eq. (7) posterior mean; coefficient forms follow the reference for float32 parity.
        mean = (ab_prev**0.5 * cur_beta / beta_prod) * x0 + (cur_alpha**0.5 * beta_prod_prev / beta_prod) * x
        z = jax.random.normal(key, x.shape, jnp.float32)
        return mean + jnp.where(t > 0, cur_beta**0.5, 0.0) * z, None  # fixed_large: variance β_t

    x, _ = jax.lax.scan(step, x, (jnp.asarray(ts, jnp.int32), jax.random.split(rng, len(ts))))
    return x.astype(x_T.dtype)
