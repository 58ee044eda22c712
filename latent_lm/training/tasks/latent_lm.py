"""Class-conditional next-token diffusion: the LatentLM generator task (docs/method.md §5–8)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from data_pipelines.latent_cache import make_split_dataset
from latent_lm.diffusion import NoiseSchedule, make_schedule
from latent_lm.latents import LatentNormalization, LatentPosterior, training_latents
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.sampling import SamplerSettings, make_sampler
from latent_lm.training.batches import class_conditional_batch
from latent_lm.training.flops import train_flops_per_step
from latent_lm.training.generator_losses import latent_lm_loss
from latent_lm.training.tasks.registry import DataPaths, one_image_sequence_checks, register_generator


@register_generator("latent_lm")
@dataclasses.dataclass(frozen=True)
class LatentLMTask:
    """Class-conditional next-token diffusion on cached σ-VAE means.

    The σ-VAE noise is applied on device every step (the LM trains on *sampled* latents, docs/method.md §3.1), then the
    latents are normalised and laid out as [class][z0..z_{N-2}].
    """

    model: LatentLM
    schedule: NoiseSchedule
    prediction_type: str
    batch_mul: int
    class_dropout: float
    diffusion_weight: float
    posterior: LatentPosterior
    norm: LatentNormalization
    num_tokens: int

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "LatentLMTask":
        d = config.diffusion
        return cls(model=LatentLM(LatentLMConfig.from_config(config)),
                   schedule=make_schedule(d.schedule, d.num_train_steps), prediction_type=d.prediction_type,
                   batch_mul=d.batch_mul, class_dropout=config.model.class_dropout,
                   diffusion_weight=d.diffusion_weight, posterior=LatentPosterior.from_vae_config(config.vae),
                   norm=norm,
                   num_tokens=config.model.max_len)

    config_checks = staticmethod(one_image_sequence_checks)

    def make_dataset(self, paths: DataPaths, split: str, batch_size: int, seed: int, num_workers: int = 0):
        """{"latents": cached μ [b, N, C], "label": [b]} batches of the σ-VAE latent cache."""
        shape = (self.num_tokens, self.posterior.cache_dim(self.model.config.latent_dim))
        return make_split_dataset(paths.latents, split, batch_size, seed, shape, num_workers)

    def init_params(self, rng):
        n, c = self.num_tokens, self.model.config.latent_dim
        return self.model.init(rng, jnp.zeros((1, n), jnp.int32), jnp.zeros((1, n, c)), jnp.zeros((1, n), bool))

    def make_batch(self, batch, rng):
        return class_conditional_batch(training_latents(rng, batch["latents"], self.posterior, self.norm),
                                       batch["label"])

    def make_sampler(self, settings: SamplerSettings):
        """Jitted `sample(params, labels [B], rng) -> normalised latents [B, N, C]` (docs/method.md §8)."""
        return make_sampler(self.model, self.schedule, settings, self.num_tokens)

    def train_flops_per_example(self) -> float:
        """Exact training FLOPs of one example (backbone + head × batch_mul, training.flops)."""
        return train_flops_per_step(self.model.config, 1, self.num_tokens, self.batch_mul)["total"]

    def loss(self, params, batch, rng, train: bool = True):
        rng_vae, rng_loss = jax.random.split(rng)
        return latent_lm_loss(self.model, params, self.make_batch(batch, rng_vae), rng_loss,
                              schedule=self.schedule, prediction_type=self.prediction_type,
                              batch_mul=self.batch_mul, class_dropout=self.class_dropout,
                              diffusion_weight=self.diffusion_weight, train=train)
