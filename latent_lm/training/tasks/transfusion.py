"""The Transfusion baseline on the multimodal LatentLM's data (docs/method.md §9.3).

Same packed rows as `MultimodalTask` (its data path, unchanged), same backbone. Each image of a row is noised whole
at one t ~ U{0…T−1} and denoised in place by the backbone (bidirectional attention inside the image); text keeps
next-token CE. L = CE + λ·MSE, each averaged over its own targets, λ = 5 (Transfusion's value).

Config (`config.transfusion`, optional; defaults below): `diffusion_weight` λ, `caption_noise_limit` the largest t of
an image that begins its document (`<bos> <boi> z… <eoi> caption…`, Transfusion's "noise limiting" of image-first
pairs; None: no limit). `diffusion.batch_mul` and `config.head` do not apply: the backbone is the denoiser.
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.diffusion import NoiseSchedule, add_noise, make_schedule, training_target
from latent_lm.latents import LatentNormalization, LatentPosterior
from latent_lm.models.transfusion import Transfusion, TransfusionConfig
from latent_lm.text.tokenizer import SPECIAL_TOKENS
from latent_lm.training.batches import document_targets, image_span_ids
from latent_lm.training.flops import transfusion_train_flops_per_step
from latent_lm.training.tasks.mllm import MultimodalTask
from latent_lm.training.tasks.registry import latent_grid_tokens, register_generator

PAD_ID, NULL_ID = SPECIAL_TOKENS.index("<pad>"), SPECIAL_TOKENS.index("<null>")
DIFFUSION_WEIGHT = 5.0  # Transfusion's λ
CAPTION_NOISE_LIMIT = 500  # Transfusion's noise limit for images that precede their caption
IMAGE_FIRST_POSITION = 2  # an image-first document starts <bos> <boi> z_1: its first latent is at position 2


def image_slots(is_latent: jax.Array, capacity: int) -> jax.Array:
    """Image slot of every position, int32 [B, T]: 1…capacity for the row's images in order, 0 at tokens; images past
    `capacity` share the last slot (the packer never makes them, the loss counts them as `image_overflow`)."""
    return jnp.minimum(image_span_ids(is_latent), capacity)


def draw_timesteps(rng: jax.Array, is_latent: jax.Array, positions: jax.Array, capacity: int, num_train_steps: int,
                   noise_limit: int | None) -> jax.Array:
    """One t per image slot, int32 [B, capacity]: U{0…T−1}, or U{0…noise_limit} for an image that begins its
    document (the caption conditions on it; Transfusion's noise limiting). Unused slots draw too (ignored)."""
    b = is_latent.shape[0]
    high = jnp.full((b, capacity), num_train_steps, jnp.int32)
    if noise_limit is not None:
        ids = image_span_ids(is_latent)
        first = is_latent & (positions == IMAGE_FIRST_POSITION) & (ids <= capacity)
        slot = jnp.where(first, ids, 0)  # slot 0 collects every other position
        limited = jnp.zeros((b, capacity + 1), jnp.int32).at[jnp.arange(b)[:, None], slot].max(
            first.astype(jnp.int32))[:, 1:] > 0
        high = jnp.where(limited, min(noise_limit + 1, num_train_steps), high)
    return jax.random.randint(rng, (b, capacity), 0, high).astype(jnp.int32)


def transfusion_loss(model: Transfusion, params, batch: dict[str, jax.Array], *, schedule: NoiseSchedule,
                     prediction_type: str, diffusion_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = CE (text targets) + λ·MSE (latent positions, same-position targets), each averaged over its own targets
    (docs/method.md §6.3, §9.3). `batch` is `TransfusionTask.make_batch`'s: the draws are in it, so this is
    deterministic. The MSE is in fp32, mean over channels, no SNR weighting."""
    chex.assert_rank([batch["tokens"], batch["latents"], batch["timesteps"]], [2, 3, 2])
    hidden = model.apply(params, batch["tokens"], batch["latents"], batch["is_latent"], batch["timesteps"],
                         batch["image_ids"], batch["positions"], batch["segment_ids"])
    t_pos = jnp.take_along_axis(jnp.pad(batch["timesteps"], ((0, 0), (1, 0))), batch["image_ids"], axis=1)
    target = training_target(prediction_type, batch["x0"], batch["noise"], t_pos, schedule)
    out = model.apply(params, hidden, method=Transfusion.denoise)
    err = jnp.mean(jnp.square(out - target), axis=-1)
    dmask = batch["diffusion_mask"].astype(jnp.float32)
    mse = jnp.sum(err * dmask) / jnp.maximum(jnp.sum(dmask), 1.0)

    logits = model.apply(params, hidden, method=Transfusion.lm_logits)
    tmask = batch["text_mask"].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["text_targets"][..., None], axis=-1)[..., 0]
    ce = jnp.sum(nll * tmask) / jnp.maximum(jnp.sum(tmask), 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == batch["text_targets"]) * tmask) / jnp.maximum(jnp.sum(tmask), 1.0)
    loss = ce + diffusion_weight * mse
    overflow = jnp.sum(jnp.max(image_span_ids(batch["is_latent"]), axis=1)
                       - jnp.max(batch["image_ids"], axis=1))
    return loss, dict(loss=loss, ce_loss=ce, diffusion_loss=mse, text_accuracy=acc, image_overflow=overflow)


@register_generator("transfusion")
@dataclasses.dataclass(frozen=True)
class TransfusionTask:
    """Transfusion on the multimodal documents of `MultimodalTask` (docs/method.md §9.3)."""

    model: Transfusion
    schedule: NoiseSchedule
    prediction_type: str
    diffusion_weight: float
    caption_noise_limit: int | None
    posterior: LatentPosterior
    norm: LatentNormalization
    seq_len: int
    head_capacity: int  # latents per row the packer allows (MultimodalTask's data path); a whole number of images
    num_latents: int  # latent vectors per image
    dataset: str
    documents: dict  # config.documents, as MultimodalTask

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "TransfusionTask":
        d = config.diffusion
        tf = dict(diffusion_weight=DIFFUSION_WEIGHT, caption_noise_limit=CAPTION_NOISE_LIMIT)
        tf.update(config.get("transfusion", {}) or {})
        return cls(model=Transfusion(TransfusionConfig.from_config(config)),
                   schedule=make_schedule(d.schedule, d.num_train_steps), prediction_type=d.prediction_type,
                   diffusion_weight=float(tf["diffusion_weight"]), caption_noise_limit=tf["caption_noise_limit"],
                   posterior=LatentPosterior.from_vae_config(config.vae), norm=norm, seq_len=config.model.max_len,
                   head_capacity=config.model.head_capacity, num_latents=latent_grid_tokens(config),
                   dataset=config.data.dataset, documents=config.documents.to_dict())

    @classmethod
    def config_checks(cls, config) -> list[tuple[bool, str]]:
        limit = (config.get("transfusion", {}) or {}).get("caption_noise_limit", CAPTION_NOISE_LIMIT)
        return MultimodalTask.config_checks(config) + [
            (limit is None or 0 <= limit < config.diffusion.num_train_steps,
             f"transfusion.caption_noise_limit={limit} must be None or in [0, "
             f"diffusion.num_train_steps={config.diffusion.num_train_steps})")]

    @property
    def max_images(self) -> int:
        """Image slots per row: the packer's latent capacity in whole images."""
        return max(1, self.head_capacity // self.num_latents)

    def init_params(self, rng):
        t, c = self.seq_len, self.model.config.latent_dim
        zeros = jnp.zeros((1, t), jnp.int32)
        return self.model.init(rng, zeros, jnp.zeros((1, t, c)), zeros.astype(bool),
                               jnp.zeros((1, self.max_images), jnp.int32), zeros)

    # The same data and the same clean latents as the LatentLM arm: MultimodalTask's methods read only the fields
    # both tasks share. `model_latents`: cached μ → z = μ + σ·ε (one σ per image), normalised; also for prompts.
    make_dataset = MultimodalTask.make_dataset
    model_latents = MultimodalTask.model_latents

    def make_batch(self, batch, rng):
        """Packed rows → model inputs, targets and the draws: each image's μ becomes z (`model_latents`, as
        MultimodalTask), then x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε with one t per image."""
        rng_vae, rng_t, rng_eps = jax.random.split(rng, 3)
        is_latent, segment_ids = batch["is_latent"], batch["segment_ids"]
        z = self.model_latents(rng_vae, batch["latents"], is_latent)
        image_ids = image_slots(is_latent, self.max_images)
        timesteps = draw_timesteps(rng_t, is_latent, batch["positions"], self.max_images,
                                   self.schedule.num_train_steps, self.caption_noise_limit)
        t_pos = jnp.take_along_axis(jnp.pad(timesteps, ((0, 0), (1, 0))), image_ids, axis=1)
        # Pinned to the batch sharding, so each device draws only its rows (as generator_losses.latent_lm_loss).
        noise = nn.with_logical_constraint(jax.random.normal(rng_eps, z.shape, jnp.float32),
                                           ("batch", "length", "latent"))
        noise = jnp.where(is_latent[..., None], noise, 0.0)
        x_t = jnp.where(is_latent[..., None], add_noise(self.schedule, z, noise, t_pos), 0.0)
        # Text targets as LatentLM's (position i predicts i+1 in its document; z_N predicts <eoi>); the latent
        # targets of `document_targets` (next position) are not Transfusion's: each latent is its own target.
        targets = document_targets(batch["tokens"], is_latent, z, segment_ids, (PAD_ID, NULL_ID))
        return dict(tokens=batch["tokens"], latents=x_t, is_latent=is_latent, positions=batch["positions"],
                    segment_ids=segment_ids, image_ids=image_ids, timesteps=timesteps, x0=z, noise=noise,
                    diffusion_mask=is_latent & (segment_ids > 0), text_targets=targets["text_targets"],
                    text_mask=targets["text_mask"])

    def train_flops_per_example(self) -> float:
        """Exact training FLOPs of one packed row: the backbone and both projections on every position, the
        timestep MLP once per image slot (training.flops)."""
        return transfusion_train_flops_per_step(self.model.config, 1, self.seq_len, self.max_images)["total"]

    def loss(self, params, batch, rng, train: bool = True):
        """Condition dropout is data-side (captions dropped to `<null>`), so `train` changes nothing."""
        del train
        return transfusion_loss(self.model, params, self.make_batch(batch, rng), schedule=self.schedule,
                                prediction_type=self.prediction_type, diffusion_weight=self.diffusion_weight)
