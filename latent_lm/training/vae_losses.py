"""The σ-VAE's loss terms (docs/method.md §2.3–2.4); `training.tasks.vae.VAETask.loss` combines them into the one σ-VAE
loss: l1·L1 + l2·MSE + w_p·LPIPS + λ·L_G + kl_weight·(mean(μ²) | KL), plus the discriminator's hinge loss.

All terms are computed in fp32 whatever the model's compute dtype.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp


def mu_regularizer(mu: jax.Array) -> jax.Array:
    """Official `kl()`: MSE(μ, 0) with mean reduction, an L2 pull on μ since σ is fixed (docs/method.md §2.3)."""
    return jnp.mean(jnp.square(mu.astype(jnp.float32)))


def kl_divergence(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(μ, σ²) ‖ N(0, I)) per latent value, averaged: ½·mean(μ² + σ² − 1 − log σ²) (docs/method.md §2.4 KL-VAE).

    LDM sums it over latent values (and sums the reconstruction over pixels); with both terms mean-reduced here,
    LDM's weight w corresponds to w·(latent values)/(pixel values) (see `ldm_equivalent_kl_weight`).
    """
    mu, logvar = mu.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.mean(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)


def ldm_equivalent_kl_weight(num_latent_values: int, num_pixel_values: int, ldm_weight: float = 1e-6) -> float:
    """LDM KL-f16's `kl_weight` (1e-6 on the KL summed per image, next to the summed pixel loss) as a weight of
    `kl_divergence` next to our mean-reduced pixel loss: e.g. 2.5e-7 on MNIST 28×28 with 7×7×4 latents."""
    return ldm_weight * num_latent_values / num_pixel_values


def posterior_regularizer(out: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The σ-VAE's μ penalty mean(μ²), or the KL-VAE's KL when `out` carries "logvar" (docs/method.md §2.3–2.4)."""
    if "logvar" in out:
        kl = kl_divergence(out["mu"], out["logvar"])
        return kl, {"kl": kl, "posterior_std": jnp.mean(jnp.exp(0.5 * out["logvar"].astype(jnp.float32)))}
    reg = mu_regularizer(out["mu"])
    return reg, {"mu_reg": reg}


def pixel_loss(batch_images: jax.Array, recon: jax.Array, l1_weight: float = 1.0,
               l2_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """l1_weight·L1(x, x̂) + l2_weight·MSE(x, x̂) in fp32, with PSNR (data in [-1, 1], range 2)."""
    err = recon.astype(jnp.float32) - batch_images.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(err))
    mse = jnp.mean(jnp.square(err))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
    return l1_weight * l1 + l2_weight * mse, {"l1": l1, "mse": mse, "psnr": psnr}


def decoder_last_layer_grad(head_input: jax.Array, image_grad: jax.Array, patch_size: int) -> jax.Array:
    """∂L/∂W of the decoder's last layer (`head_fc2` kernel [width, p²·C]) from ∂L/∂x̂ [B, H, W, C].

    x̂ = unpatchify(h·W + b), so ∂L/∂W = hᵀ·patchify(∂L/∂x̂) with h = `head_input` [B, T, width], the layer's
    input. This gives VQGAN's adaptive-weight gradients from image-space gradients alone: no backward pass
    through the decoder and encoder.
    """
    p = patch_size
    g = einops.rearrange(image_grad.astype(jnp.float32), "b (h i) (w j) c -> b (h w) (i j c)", i=p, j=p)
    return jnp.einsum("btw,btp->wp", head_input.astype(jnp.float32), g)


def adaptive_gan_weight(rec_grad: jax.Array, gan_grad: jax.Array, disc_weight: float,
                        max_weight: float = 1e4) -> jax.Array:
    """VQGAN `calculate_adaptive_weight`: clip(‖∇_W L_rec‖ / (‖∇_W L_GAN‖ + 1e-4), 0, 1e4)·disc_weight, with W
    the decoder's last layer; a constant of the loss (no gradient flows through it)."""
    ratio = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight) * disc_weight)


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """taming `hinge_d_loss`: ½·(mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))))."""
    real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
    return 0.5 * (real + fake)


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    """The generator's hinge-GAN loss −mean(D(x̂)) (taming/LDM `g_loss`)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))
