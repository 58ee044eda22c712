"""Latents: how tokenizer outputs become the vectors the generators read (docs/method.md §2.2, §2.4, §3.1).

One place for the posterior (σ-VAE: z = μ + σ_b·ε with one σ_b per example; KL-VAE: z = μ + σ ⊙ ε from the cached
sigma points; FSQ: the cached grid vector itself, §2.5), the LM-space normalisation z' = (z + bias)·scale, and the
latent cache's row shape. The σ-VAE module samples with `sample_latent`; training tasks, the latent cache, sampling
and export use the rest.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_DIVISOR = 0.8  # official GaussianDistribution.sample: σ_b = N(0,1)·std/0.8 (docs/method.md §2.2)
VAE_KINDS = ("sigma", "kl", "fsq")


def sample_latent(rng: jax.Array, mu: jax.Array, std: float, sampling_std: float | None = None,
                  example_ids: jax.Array | None = None) -> jax.Array:
    """z = μ + σ_b·ε with one σ_b ~ N(0, (std/0.8)²) per example, ε ~ N(0, I) (docs/method.md §2.2).

    σ_b is shared by all positions and channels of example b and may be negative (harmless: ε is symmetric);
    E|σ_b| = std·√(2/π)/0.8 ≈ 0.997·std. `sampling_std` replaces the draw by a fixed σ (official `sample`).
    `example_ids` [B, T] (values in [0, T)) splits each row of a packed mu [B, T, C] into several images, each with
    its own σ_b (docs/method.md §7.3).
    """
    k_sigma, k_eps = jax.random.split(rng)
    batch = mu.shape[0]
    if sampling_std is None:
        sigma = jax.random.normal(k_sigma, (batch,) if example_ids is None else mu.shape[:2], jnp.float32)
        sigma = sigma * (std / SIGMA_DIVISOR)
    else:
        sigma = jnp.full((batch,) if example_ids is None else mu.shape[:2], sampling_std, jnp.float32)
    eps = jax.random.normal(k_eps, mu.shape, jnp.float32)
    if example_ids is None:
        sigma = sigma.reshape((batch,) + (1,) * (mu.ndim - 1))
    else:  # one draw per (row, example id)
        sigma = jnp.take_along_axis(sigma, example_ids, axis=1)[..., None]
    return (mu.astype(jnp.float32) + sigma * eps).astype(mu.dtype)



@dataclasses.dataclass(frozen=True)
class LatentPosterior:
    """How cached tokenizer outputs become the sampled latents z the generators train on
    (docs/method.md §2.2, §2.4, §3.1).

    kind "sigma": the cache holds μ [T, C]; z = μ + σ_b·ε with σ_b ~ N(0, (std/0.8)²) per example.
    kind "kl": the cache holds the posterior's two sigma points [T, 2C] = (μ + σ, μ − σ) (see `sigma_points`);
    z = μ + σ ⊙ ε with the learned σ, as MAR/LDM train on posterior samples.
    kind "fsq": the cache holds the quantized grid vector [T, C] (docs/method.md §2.5); z is that vector, no noise.
    """

    kind: str = "sigma"
    std: float = 0.75

    def __post_init__(self):
        if self.kind not in VAE_KINDS:
            raise ValueError(f"vae.kind={self.kind!r} must be one of {list(VAE_KINDS)}")

    @classmethod
    def from_vae_config(cls, vae_config) -> "LatentPosterior":
        return cls(kind=vae_config.get("kind", "sigma"), std=float(vae_config.std))

    def cache_dim(self, latent_dim: int) -> int:
        """Channels per cached token: C for the σ-VAE and FSQ, 2C for the KL-VAE."""
        return latent_dim * (2 if self.kind == "kl" else 1)

    def sample(self, rng: jax.Array, cached: jax.Array, example_ids: jax.Array | None = None,
               sampling_std: float | None = None) -> jax.Array:
        """Cached rows [B, T, cache_dim] → sampled latents z [B, T, C] (fp32); `example_ids` and `sampling_std` as in
        `sample_latent` (packed rows of several images; a fixed σ, 0 for the mean μ; σ-VAE only)."""
        cached = cached.astype(jnp.float32)
        if self.kind == "sigma":
            return sample_latent(rng, cached, self.std, sampling_std=sampling_std, example_ids=example_ids)
        if self.kind == "fsq":  # a deterministic tokenizer: the cached grid vector is z
            return cached
        mu, sigma = from_sigma_points(cached)
        return mu + sigma * jax.random.normal(rng, mu.shape, jnp.float32)

    def latent_variance(self, cache_std: float) -> float:
        """Var z from the std of all cached values (closed form; `encode` normalises with it).

        σ-VAE: Var z = Var μ + E σ_b², E σ_b² = (std/0.8)². KL-VAE: the cached sigma points μ ± σ have mean E μ and
        second moment E μ² + E σ² over all values, so their variance is already Var z = Var μ + E σ². FSQ: the cached
        grid vectors are z, Var z = Var(cache).
        """
        extra = (self.std / SIGMA_DIVISOR) ** 2 if self.kind == "sigma" else 0.0
        return cache_std ** 2 + extra


def sigma_points(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """A diagonal Gaussian posterior as its two sigma points concat(μ + σ, μ − σ) on the last axis [.., 2C].

    This is what the KL-VAE's latent cache stores, instead of (μ, log σ²): the same information, and the points'
    mean and second moment over all values are exactly E z and E z² of z = μ + σ·ε, so the cache's running moments
    give the closed-form latent normalisation without another pass. σ is recovered as half the difference, to
    about 1e-7·|μ| (fp32), far below any σ that matters for sampling.
    """
    sigma = jnp.exp(0.5 * logvar.astype(jnp.float32))
    mu = mu.astype(jnp.float32)
    return jnp.concatenate([mu + sigma, mu - sigma], axis=-1)


def from_sigma_points(points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `sigma_points`: [.., 2C] → (μ, σ), each [.., C]."""
    upper, lower = jnp.split(points.astype(jnp.float32), 2, axis=-1)
    return 0.5 * (upper + lower), 0.5 * jnp.abs(upper - lower)


@dataclasses.dataclass(frozen=True)
class LatentNormalization:
    """LM-space latents z' = (z + bias)·scale (docs/method.md §3.1); the encode stage computes it in closed form from
    the cache's moments (`LatentPosterior.latent_variance`)."""

    scale: float
    bias: float

    def normalize(self, z):
        return (z + self.bias) * self.scale

    def denormalize(self, z):
        return z / self.scale - self.bias

    @classmethod
    def estimate(cls, sampled_latents: np.ndarray) -> "LatentNormalization":
        z = np.asarray(sampled_latents, np.float64)
        return cls(scale=float(1.0 / z.std()), bias=float(-z.mean()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def training_latents(rng: jax.Array, cached: jax.Array, posterior: LatentPosterior,
                     norm: LatentNormalization) -> jax.Array:
    """Cached tokenizer outputs → the normalised *sampled* latents the generators train on (docs/method.md §2.2, §3.1):
    z = μ + σ_b·ε for the σ-VAE, z = μ + σ ⊙ ε with the learned σ for the KL-VAE control (§2.4), the cached grid
    vector for FSQ (§2.5)."""
    return norm.normalize(posterior.sample(rng, cached))


def cache_shape(config) -> tuple[int, int]:
    """(T, channels) of a latent-cache row for `config`: (max_len, C) for the σ-VAE and FSQ, (max_len, 2C) for the
    KL-VAE (its posterior's sigma points, `sigma_points`)."""
    return config.model.max_len, LatentPosterior.from_vae_config(config.vae).cache_dim(config.vae.latent_dim)
