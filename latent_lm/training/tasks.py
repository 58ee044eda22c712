"""Tasks for the one train loop: what to initialise and which loss to minimise. Configs pick the task."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.diffusion import NoiseSchedule, make_schedule
from latent_lm.errors import ConfigError
from latent_lm.models.discriminator import PatchDiscriminator, generator_adversarial_loss, hinge_discriminator_loss
from latent_lm.models.dit import DiT, DiTConfig, dit_loss
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig, class_conditional_batch, latent_lm_loss
from latent_lm.models.perceptual import LPIPS, init_lpips_params, load_lpips_params
from latent_lm.models.sigma_vae import (VAE_KINDS, LatentPosterior, SigmaVAE, adaptive_gan_weight,
                                        decoder_last_layer_grad, pixel_loss, posterior_regularizer)
from latent_lm.sampling import SamplerSettings, make_dit_sampler, make_sampler
from latent_lm.training.flops import dit_train_flops_per_step, train_flops_per_step


def make_vae(config) -> SigmaVAE:
    v = config.vae
    # `.get`: configs saved before `kind`/`dtype` existed (checkpoint metadata, exports) mean a float32 σ-VAE.
    return SigmaVAE(image_size=config.data.image_size, in_channels=config.data.channels, patch_size=v.patch_size,
                    width=v.width, depth=v.depth, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                    latent_dim=v.latent_dim, std=v.std, kind=v.get("kind", "sigma"),
                    dtype=jnp.dtype(v.get("dtype", "float32")))


@dataclasses.dataclass(frozen=True)
class VAETask:
    """σ-VAE (or KL-VAE control) training on images in [-1, 1] (spec §1.4, §1.5):

        L = l1·L1 + l2·MSE + w_p·LPIPS + λ·L_G + kl_weight·(mean(μ²) | KL)   for the σ-VAE,
          + L_D                                                              for the discriminator.

    Param tree: the σ-VAE's Flax variables {"params": …}, exactly as without the GAN (so `encode`, `sample` and the
    exporters read it unchanged: Flax ignores collections a module does not use); with the GAN on
    (`disc_weight > 0`) it also holds "disc", the PatchGAN's params. The LPIPS network is not in it: its frozen
    weights are constants of the loss, loaded on first use (`perceptual_params`).

    One optimizer step trains both players: the loss is L_G(vae; disc stopped) + L_D(disc; x̂ stopped), so each
    parameter set receives only its own player's gradient (`stop_gradient` cuts the other paths) and one backward
    pass serves both. Adam normalises every parameter's step by its own gradient scale, so one learning rate for
    both (as LDM's two Adams with the same lr) is fine.

    GAN term (LDM/VQGAN recipe): λ = disc_weight·clip(‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-4), 0, 1e4) with W the decoder's
    last layer (`adaptive_weight`), or λ = disc_weight; both GAN losses are gated off until `batch["step"]` (the
    train loop adds it) reaches `disc_start`. How λ is computed without a second backward pass through the VAE:
    ∇_W L = hᵀ·∂L/∂x̂ for the last layer's input h, so the loss takes ∂L_rec/∂x̂ and ∂L_G/∂x̂ by differentiating
    only the loss networks (LPIPS, discriminator) at x̂, and then enters the VAE's objective as its value plus
    ⟨stop_gradient(∂L_rec/∂x̂ + λ·∂L_G/∂x̂), x̂⟩ (a zero-valued linear term with exactly that gradient): the outer
    backward pass runs through decoder and encoder once and never again through LPIPS or the discriminator.
    """

    model: SigmaVAE
    kl_weight: float
    image_shape: tuple[int, int, int]
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0
    perceptual_weights: str = ""  # comma-separated weight files (perceptual.load_lpips_params)
    perceptual_random_init: bool = False  # tests only: random VGG/lin weights
    disc: PatchDiscriminator | None = None  # None: no GAN term
    disc_weight: float = 0.0
    disc_start: int = 0
    adaptive_weight: bool = True

    @classmethod
    def from_config(cls, config) -> "VAETask":
        """The task of `config.vae` / `config.vae_loss` (a missing `vae_loss` section: pixel and μ terms only)."""
        d, v = config.data, config.vae
        get = (config.get("vae_loss") or {}).get
        kind = v.get("kind", "sigma")
        if kind not in VAE_KINDS:
            raise ConfigError(f"vae.kind={kind!r} must be one of {list(VAE_KINDS)}")
        perceptual_weight, paths = float(get("perceptual_weight", 0.0)), get("perceptual_weights", "")
        random_init = bool(get("perceptual_random_init", False))
        disc_weight = float(get("disc_weight", 0.0))
        if perceptual_weight < 0 or disc_weight < 0 or get("disc_start", 0) < 0:
            raise ConfigError("vae_loss.perceptual_weight, disc_weight and disc_start must be ≥ 0")
        disc = None
        if disc_weight > 0:
            disc = PatchDiscriminator(channels=int(get("disc_channels", 64)), num_layers=int(get("disc_layers", 3)),
                                      dtype=jnp.dtype(v.get("dtype", "float32")))
        return cls(make_vae(config), float(v.kl_weight), (d.image_size, d.image_size, d.channels),
                   l1_weight=float(get("l1_weight", 1.0)), l2_weight=float(get("l2_weight", 0.0)),
                   perceptual_weight=perceptual_weight, perceptual_weights=paths, perceptual_random_init=random_init,
                   disc=disc, disc_weight=disc_weight, disc_start=int(get("disc_start", 0)),
                   adaptive_weight=bool(get("adaptive_weight", True)))

    @functools.cached_property
    def perceptual_params(self):
        """The frozen LPIPS weights (numpy: constants of whatever program traces the loss), read on first use: the
        first trace of the loss in `train_vae`. Readers of a trained σ-VAE (encode, eval, export) never need them."""
        if self.perceptual_weights:
            return load_lpips_params(self.perceptual_weights)
        if self.perceptual_random_init:
            return init_lpips_params(0)
        if self.perceptual_weight > 0:
            raise ConfigError("vae_loss.perceptual_weight > 0 needs vae_loss.perceptual_weights (the LPIPS VGG16 "
                              "weight files; see latent_lm/models/perceptual.py) or, for tests only, "
                              "vae_loss.perceptual_random_init=True")
        return None

    def init_params(self, rng):
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        k_vae, k_disc = jax.random.split(rng)
        variables = self.model.init({"params": k_vae}, x, rng=k_vae)
        return self.add_discriminator(variables, k_disc)

    def add_discriminator(self, vae_variables, rng):
        """σ-VAE variables → this task's param tree (a fresh discriminator added when the GAN is on)."""
        if self.disc is None:
            return vae_variables
        x = jnp.zeros((1, *self.image_shape), jnp.float32)
        return dict(vae_variables, disc=self.disc.init(rng, x)["params"])

    @staticmethod
    def vae_variables(params):
        """The σ-VAE's Flax variables {"params": …} of this task's param tree."""
        return {"params": params["params"]}

    def _reconstruction(self, images, recon):
        """l1·L1 + l2·MSE + w_p·LPIPS of x̂ against x (fp32), the VQGAN `nll_loss` of the adaptive weight."""
        rec, metrics = pixel_loss(images, recon, self.l1_weight, self.l2_weight)
        if self.perceptual_weight > 0:
            # The barrier keeps XLA from constant-folding through the 15 M frozen weights (compile ≈ 1.3× faster).
            weights = jax.lax.optimization_barrier(self.perceptual_params)
            lpips = jnp.mean(LPIPS(dtype=self.model.dtype).apply(weights, images, recon))
            rec = rec + self.perceptual_weight * lpips
            metrics = dict(metrics, lpips=lpips)
        return rec, dict(metrics, rec_loss=rec)

    def loss(self, params, batch, rng):
        images = batch["image"]
        out = self.model.apply(self.vae_variables(params), images, rng=rng)
        reg, reg_metrics = posterior_regularizer(out)
        if self.disc is None:
            rec, metrics = self._reconstruction(images, out["recon"])
            loss = rec + self.kl_weight * reg
            return loss, {"loss": loss, **metrics, **reg_metrics}
        if "step" not in batch:
            raise ValueError("VAETask with the GAN on needs batch['step'] (the train loop adds the step count) "
                             "for vae_loss.disc_start")
        gate = (batch["step"] >= self.disc_start).astype(jnp.float32)
        x_hat = jax.lax.stop_gradient(out["recon"]).astype(jnp.float32)
        frozen_disc = {"params": jax.lax.stop_gradient(params["disc"])}
        (rec, metrics), rec_grad = jax.value_and_grad(
            lambda r: self._reconstruction(images, r), has_aux=True)(x_hat)
        g_loss, gan_grad = jax.value_and_grad(
            lambda r: generator_adversarial_loss(self.disc.apply(frozen_disc, r)))(x_hat)
        if self.adaptive_weight:
            h = jax.lax.stop_gradient(out["head_input"])
            p = self.model.patch_size
            weight = adaptive_gan_weight(decoder_last_layer_grad(h, rec_grad, p),
                                         decoder_last_layer_grad(h, gan_grad, p), self.disc_weight)
        else:
            weight = jnp.float32(self.disc_weight)
        weight = gate * weight
        image_grad = jax.lax.stop_gradient(rec_grad + weight * gan_grad)
        generator = rec + weight * g_loss + jnp.sum(image_grad * (out["recon"].astype(jnp.float32) - x_hat))
        logits_real = self.disc.apply({"params": params["disc"]}, images)
        logits_fake = self.disc.apply({"params": params["disc"]}, x_hat)
        d_loss = hinge_discriminator_loss(logits_real, logits_fake)
        loss = generator + self.kl_weight * reg + gate * d_loss
        return loss, {"loss": loss, **metrics, **reg_metrics, "g_loss": g_loss, "d_loss": d_loss,
                      "gan_weight": weight, "logits_real": jnp.mean(logits_real),
                      "logits_fake": jnp.mean(logits_fake)}


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


def training_latents(rng: jax.Array, cached: jax.Array, posterior: LatentPosterior,
                     norm: LatentNormalization) -> jax.Array:
    """Cached tokenizer outputs → the normalised *sampled* latents the generators train on (spec §1.1, §1.7):
    z = μ + σ_b·ε for the σ-VAE, z = μ + σ ⊙ ε with the learned σ for the KL-VAE control (§1.5)."""
    return norm.normalize(posterior.sample(rng, cached))


def cache_shape(config) -> tuple[int, int]:
    """(T, channels) of a latent-cache row for `config`: (max_len, C) for the σ-VAE, (max_len, 2C) for the KL-VAE
    (its posterior's sigma points, `sigma_vae.sigma_points`)."""
    return config.model.max_len, LatentPosterior.from_vae_config(config.vae).cache_dim(config.vae.latent_dim)


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

    def init_params(self, rng):
        n, c = self.num_tokens, self.model.config.latent_dim
        return self.model.init(rng, jnp.zeros((1, n), jnp.int32), jnp.zeros((1, n, c)), jnp.zeros((1, n), bool))

    def make_batch(self, batch, rng):
        return class_conditional_batch(training_latents(rng, batch["latents"], self.posterior, self.norm),
                                       batch["label"])

    def make_sampler(self, settings: SamplerSettings):
        """Jitted `sample(params, labels [B], rng) -> normalised latents [B, N, C]` (spec §5)."""
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


@dataclasses.dataclass(frozen=True)
class DiTTask:
    """Class-conditional whole-image diffusion with the DiT twin on cached σ-VAE means (spec §2.5).

    The same σ-sampled, normalised latents as LatentLMTask (spec §1.7); then the official DiT branch: one uniform
    t per image, plain MSE, no batch multiplier (`diffusion.batch_mul` and `config.head` do not apply).
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


ARCHS = ("latent_lm", "dit")


def make_generator_task(config, norm: LatentNormalization):
    """The class-conditional latent generator that `config.model.arch` names: LatentLM or its DiT twin (spec §2.5).

    Both share one interface: init_params, loss, make_sampler, train_flops_per_example.
    """
    arch = config.model.get("arch", "latent_lm")
    if arch == "latent_lm":
        return LatentLMTask.from_config(config, norm)
    if arch == "dit":
        return DiTTask.from_config(config, norm)
    raise ValueError(f"unknown model.arch {arch!r}; choose one of {list(ARCHS)}")
