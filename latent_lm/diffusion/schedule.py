"""DDPM noise schedules, forward process and prediction targets (docs/method.md §6.1, §8.2).

The ᾱ table replicates the official (diffusers-derived) `DDPMScheduler` bit for bit: betas are computed in float64
and stored as float32, and ᾱ = cumprod(1 − β) as torch computes it on CPU (float64 accumulation, float32 result).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")


def cosine_betas(num_train_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """GLIDE "squaredcos_cap_v2": β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta), ᾱ(s) = cos²((s+0.008)/1.008·π/2)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    t = num_train_steps
    return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)],
                    dtype=np.float64).astype(np.float32)


def linear_betas(num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM (Ho et al.) linear β schedule."""
    return np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float64).astype(np.float32)


@flax.struct.dataclass
class NoiseSchedule:
    """ᾱ_t for t = 0…T−1 (float32 [T]); a pytree, so it may be closed over or passed through `jit`."""

    alphas_cumprod: jax.Array

    @property
    def num_train_steps(self) -> int:
        return self.alphas_cumprod.shape[0]


def make_schedule(name: str = "cosine", num_train_steps: int = 1000) -> NoiseSchedule:
    """"cosine" (alias "squaredcos_cap_v2", the official default) or "linear"."""
    if name in ("cosine", "squaredcos_cap_v2"):
        betas = cosine_betas(num_train_steps)
    elif name == "linear":
        betas = linear_betas(num_train_steps)
    else:
        raise ValueError(f"unknown noise schedule {name!r}; expected 'cosine' or 'linear'")
    # 1 − β in float32, product accumulated in float64 then rounded: bit-identical to torch.cumprod on CPU.
    alphas = (np.float32(1.0) - betas).astype(np.float64)
    return NoiseSchedule(alphas_cumprod=jnp.asarray(np.cumprod(alphas).astype(np.float32)))


def _coeffs(schedule: NoiseSchedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(√ᾱ_t, √(1−ᾱ_t)) with a trailing axis so they broadcast over the channel dim of x [..., C]."""
    ab = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[jnp.asarray(t)][..., None]
    return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε in fp32; t is an int array broadcastable against x0.shape[:-1]."""
    a, s = _coeffs(schedule, t)
    return a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (fp32)."""
    a, s = _coeffs(schedule, t)
    return a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def training_target(prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    schedule: NoiseSchedule) -> jax.Array:
    """The regression target of the head: ε ("epsilon", official default) or v ("v_prediction")
    (docs/method.md §6.1)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise.astype(jnp.float32)
    return velocity(schedule, x0, noise, t)


def predict_x0(prediction_type: str, model_output: jax.Array, x_t: jax.Array, t: jax.Array,
               schedule: NoiseSchedule) -> jax.Array:
    """x̂₀ from a model output at timestep t: (x − √(1−ᾱ)ε̂)/√ᾱ or √ᾱ·x − √(1−ᾱ)·v̂ (fp32)."""
    check_prediction_type(prediction_type)
    a, s = _coeffs(schedule, t)
    x, out = x_t.astype(jnp.float32), model_output.astype(jnp.float32)
    return (x - s * out) / a if prediction_type == "epsilon" else a * x - s * out
