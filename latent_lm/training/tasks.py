"""Tasks for the one train loop: what to initialise and which loss to minimise. Configs pick the task."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.diffusion import NoiseSchedule, make_schedule
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig, class_conditional_batch, latent_lm_loss
from latent_lm.models.sigma_vae import SigmaVAE, sample_latent, vae_loss


def make_vae(config) -> SigmaVAE:
    v = config.vae
    return SigmaVAE(image_size=config.data.image_size, in_channels=config.data.channels, patch_size=v.patch_size,
                    width=v.width, depth=v.depth, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                    latent_dim=v.latent_dim, std=v.std)


@dataclasses.dataclass(frozen=True)
class VAETask:
    """σ-VAE reconstruction training on images in [-1, 1] (spec §1.4)."""

    model: SigmaVAE
    kl_weight: float
    image_shape: tuple[int, int, int]

    @classmethod
    def from_config(cls, config) -> "VAETask":
        d = config.data
        return cls(make_vae(config), config.vae.kl_weight, (d.image_size, d.image_size, d.channels))

    def init_params(self, rng):
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        return self.model.init({"params": rng}, x, rng=rng)

    def loss(self, params, batch, rng):
        out = self.model.apply(params, batch["image"], rng=rng)
        return vae_loss(batch["image"], out, kl_weight=self.kl_weight)


@dataclasses.dataclass(frozen=True)
class LatentNormalization:
    """LM-space latents z' = (z + bias)·scale (spec §1.7); estimated once from σ-sampled latents."""

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


@dataclasses.dataclass(frozen=True)
class LatentLMTask:
    """Class-conditional next-token diffusion on cached σ-VAE means.

    The σ-VAE noise is applied on device every step (the LM trains on *sampled* latents, spec §1.7), then the
    latents are normalised and laid out as [class][z0..z_{N-2}].
    """

    model: LatentLM
    schedule: NoiseSchedule
    prediction_type: str
    batch_mul: int
    class_dropout: float
    diffusion_weight: float
    vae_std: float
    norm: LatentNormalization
    num_tokens: int

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "LatentLMTask":
        d = config.diffusion
        return cls(model=LatentLM(LatentLMConfig.from_config(config)),
                   schedule=make_schedule(d.schedule, d.num_train_steps), prediction_type=d.prediction_type,
                   batch_mul=d.batch_mul, class_dropout=config.model.class_dropout,
                   diffusion_weight=d.diffusion_weight, vae_std=config.vae.std, norm=norm,
                   num_tokens=config.model.max_len)

    def init_params(self, rng):
        n, c = self.num_tokens, self.model.config.latent_dim
        return self.model.init(rng, jnp.zeros((1, n), jnp.int32), jnp.zeros((1, n, c)), jnp.zeros((1, n), bool))

    def make_batch(self, batch, rng):
        z = sample_latent(rng, batch["latents"].astype(jnp.float32), self.vae_std)
        return class_conditional_batch(self.norm.normalize(z), batch["label"])

    def loss(self, params, batch, rng):
        rng_vae, rng_loss = jax.random.split(rng)
        return latent_lm_loss(self.model, params, self.make_batch(batch, rng_vae), rng_loss,
                              schedule=self.schedule, prediction_type=self.prediction_type,
                              batch_mul=self.batch_mul, class_dropout=self.class_dropout,
                              diffusion_weight=self.diffusion_weight)
