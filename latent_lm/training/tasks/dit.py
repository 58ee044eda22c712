"""Class-conditional whole-image diffusion: the DiT twin generator task (docs/method.md §9)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from data_pipelines.latent_cache import make_split_dataset
from latent_lm.diffusion import NoiseSchedule, make_schedule
from latent_lm.latents import LatentNormalization, LatentPosterior, training_latents
from latent_lm.models.dit import DiT, DiTConfig
from latent_lm.sampling import SamplerSettings, make_dit_sampler
from latent_lm.training.flops import dit_train_flops_per_step
from latent_lm.training.generator_losses import dit_loss
from latent_lm.training.tasks.registry import DataPaths, one_image_sequence_checks, register_generator


@register_generator("dit")
@dataclasses.dataclass(frozen=True)
class DiTTask:
    """Class-conditional whole-image diffusion with the DiT twin on cached σ-VAE means (docs/method.md §9).

    The same σ-sampled, normalised latents as LatentLMTask (docs/method.md §3.1); then the official DiT branch: one
    uniform t per image, plain MSE, no batch multiplier (`diffusion.batch_mul` and `config.head` do not apply).
    """

    model: DiT
    schedule: NoiseSchedule
    prediction_type: str
    class_dropout: float
    posterior: LatentPosterior
    norm: LatentNormalization

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "DiTTask":
        d = config.diffusion
        return cls(model=DiT(DiTConfig.from_config(config)),
                   schedule=make_schedule(d.schedule, d.num_train_steps), prediction_type=d.prediction_type,
                   class_dropout=config.model.class_dropout,
                   posterior=LatentPosterior.from_vae_config(config.vae), norm=norm)

    @property
    def num_tokens(self) -> int:
        return self.model.config.max_len

    config_checks = staticmethod(one_image_sequence_checks)

    def make_dataset(self, paths: DataPaths, split: str, batch_size: int, seed: int, num_workers: int = 0):
        """{"latents": cached μ [b, N, C], "label": [b]} batches of the σ-VAE latent cache."""
        shape = (self.num_tokens, self.posterior.cache_dim(self.model.config.latent_dim))
        return make_split_dataset(paths.latents, split, batch_size, seed, shape, num_workers)

    def init_params(self, rng):
        cfg = self.model.config
        labels = jnp.zeros((1,), jnp.int32)
        return self.model.init(rng, jnp.zeros((1, cfg.max_len, cfg.latent_dim)), labels, labels)

    def make_sampler(self, settings: SamplerSettings):
        """Jitted `sample(params, labels [B], rng) -> normalised latents [B, N, C]` (whole-image DPM-Solver++)."""
        return make_dit_sampler(self.model, self.schedule, settings)

    def train_flops_per_example(self) -> float:
        """Exact training FLOPs of one image (training.flops, same conventions as LatentLM)."""
        return dit_train_flops_per_step(self.model.config, 1)["total"]

    def loss(self, params, batch, rng, train: bool = True):
        rng_vae, rng_loss = jax.random.split(rng)
        return dit_loss(self.model, params, training_latents(rng_vae, batch["latents"], self.posterior, self.norm),
                        batch["label"], rng_loss, schedule=self.schedule, prediction_type=self.prediction_type,
                        class_dropout=self.class_dropout, train=train)
