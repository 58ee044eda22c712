"""The σ-VAE tokenizer's training task (docs/method.md §2.3–2.5): the one σ-VAE loss, with the optional LPIPS and
PatchGAN terms; the same task trains the KL-VAE control and the FSQ tokenizer."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from latent_lm.errors import ConfigError
from latent_lm.latents import VAE_KINDS
from latent_lm.models import fsq
from latent_lm.models.discriminator import PatchDiscriminator
from latent_lm.models.perceptual import LPIPS, init_lpips_params, load_lpips_params
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.training.vae_losses import (adaptive_gan_weight, decoder_last_layer_grad, generator_adversarial_loss,
                                           hinge_discriminator_loss, pixel_loss, posterior_regularizer)


def make_vae(config) -> SigmaVAE:
    v = config.vae
    # `.get`: configs saved before `kind`/`dtype` existed (checkpoint metadata, exports) mean a float32 σ-VAE.
    kind = v.get("kind", "sigma")
    return SigmaVAE(image_size=config.data.image_size, in_channels=config.data.channels, patch_size=v.patch_size,
                    width=v.width, depth=v.depth, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
                    latent_dim=v.latent_dim, std=v.std, kind=kind, dtype=jnp.dtype(v.get("dtype", "float32")),
                    fsq_levels=fsq_levels(config) if kind == "fsq" else ())


def fsq_levels(config) -> tuple[int, ...]:
    """`vae.fsq_levels` as a tuple of ints (a JSON round trip makes it a list; absent: no levels); a fractional
    value stays as it is, for `fsq.levels_problem` to reject."""
    return tuple(int(n) if float(n).is_integer() else n for n in (config.vae.get("fsq_levels") or ()))


@dataclasses.dataclass(frozen=True)
class VAETask:
    """σ-VAE (or KL-VAE control, or FSQ tokenizer) training on images in [-1, 1] (docs/method.md §2.3–2.5):

        L = l1·L1 + l2·MSE + w_p·LPIPS + λ·L_G + kl_weight·(mean(μ²) | KL)   for the σ-VAE,
          + L_D                                                              for the discriminator.

    FSQ (`vae.kind="fsq"`, §2.5) has no posterior to regularise: the kl_weight term is dropped (`kl_weight` is
    unused) and the metrics report the batch's codebook usage and perplexity instead.

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
        if kind == "fsq" and (problem := fsq.levels_problem(fsq_levels(config), v.latent_dim)):
            raise ConfigError(f"vae.kind='fsq': {problem}")
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

    def _regularizer(self, out):
        """(the kl_weight term, its metrics): mean(μ²) or the KL (§2.3–2.4); for FSQ none, and the batch's codebook
        usage and perplexity (§2.5): a deterministic grid has no posterior to pull towards a prior."""
        if self.model.kind == "fsq":
            return jnp.float32(0.0), fsq.codebook_usage(out["codes"], self.model.fsq_levels)
        return posterior_regularizer(out)

    def loss(self, params, batch, rng):
        images = batch["image"]
        out = self.model.apply(self.vae_variables(params), images, rng=rng)
        reg, reg_metrics = self._regularizer(out)
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
