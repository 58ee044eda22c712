"""Reference samplers for tests and benchmarks (not part of the installed package).

- `make_reference_sampler`: LatentLM sampling without a KV cache — a Python loop over positions that recomputes the
  whole prefix each time; the compiled sampler must match it.
- `ddpm_sample`: the ancestral DDPM sampler as the official `schedule/ddpm.py` configures it (variance_type
  "fixed_large": the noise variance is the step's β_t = 1 − ᾱ_t/ᾱ_prev; clip_sample=False; "leading" spacing), a
  stochastic reference for the schedule and targets.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.diffusion import NoiseSchedule, dpm_solver_sample
from latent_lm.diffusion.dpm_solver import ModelFn
from latent_lm.diffusion.schedule import check_prediction_type
from latent_lm.models.latent_lm import LatentLM
from latent_lm.sampling import SamplerSettings


def make_reference_sampler(model: LatentLM, schedule: NoiseSchedule, settings: SamplerSettings) -> Callable:
    """No-cache reference `sample(params, prefix [B,P], noise [N,B,C], null_prefix=None) -> [B,N,C]`: a Python loop
    over positions that recomputes the whole prefix every time (for tests and benchmarks only; compiles once per
    length). With CFG the unconditional rows start from `null_prefix` [B,P] (None: the null class everywhere), as
    `sampling.sample_latents` does."""

    @jax.jit
    def last_condition(params, toks, lats, is_lat):
        cond, _ = model.apply(params, toks, lats, is_lat)
        return cond[:, -1]

    @jax.jit
    def solve(params, cond, x_T):
        def head(x, t, cond):
            return model.apply(params, x, t, cond, method=LatentLM.diffuse)

        def guided(x, t):  # written out here, not sampling.guided_head: CFG's u + s·(c − u) on [cond; uncond] rows
            if settings.cfg_scale is None:
                return head(x, t, cond)
            c, u = (head(x, t, half) for half in jnp.split(cond, 2))
            return u + settings.cfg_scale * (c - u)

        return dpm_solver_sample(guided, x_T, schedule, settings.num_steps, settings.prediction_type,
                                 settings.x0_clip)

    def sample(params, prefix, noise, null_prefix=None):
        n, _, c = noise.shape
        if settings.cfg_scale is not None:  # conditional rows, then unconditional rows (the null class by default)
            null = jnp.full_like(prefix, model.config.null_class) if null_prefix is None else null_prefix
            prefix = jnp.concatenate([prefix, null.astype(prefix.dtype)])
        toks = prefix
        rows, p = toks.shape
        lats, is_lat = jnp.zeros((rows, p, c)), jnp.zeros((rows, p), bool)
        out = []
        for i in range(n):
            x0 = solve(params, last_condition(params, toks, lats, is_lat), noise[i])
            out.append(x0)
            feed = x0 if settings.cfg_scale is None else jnp.concatenate([x0, x0])
            toks = jnp.concatenate([toks, jnp.zeros((rows, 1), jnp.int32)], 1)
            lats = jnp.concatenate([lats, feed[:, None]], 1)
            is_lat = jnp.concatenate([is_lat, jnp.ones((rows, 1), bool)], 1)
        return jnp.stack(out, axis=1)

    return sample


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
