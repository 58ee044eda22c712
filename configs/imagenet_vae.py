"""The ImageNet 256×256 σ-VAE tokenizer (docs/method.md §2.1–2.3): train it, then encode ImageNet to latents.

  --config=configs/imagenet_vae.py                 σ-VAE, C_σ = 0.75: stages train_vae → encode
  --config=configs/imagenet_vae.py:std=0.5         another C_σ (tokenizer variance, docs/method.md §2.2, Fig. 6)
  --config=configs/imagenet_vae.py:kind=kl         the learned-variance KL-VAE control (docs/method.md §2.4)
  --config=configs/imagenet_vae.py:tiny            the same recipe (LPIPS with random weights, GAN) on embedded MNIST
Generator configs (`configs/imagenet.py`) read its vae/ and latents/ through `data.tokenizer_workdir`.

Architecture (docs/method.md §2.1, [code]): ViT-B encoder and decoder (12 layers, width 768, 12 heads), patch 16 → 16×16
latent tokens of 16 channels, σ-VAE std C_σ = 0.75 (the official class default; the paper value is not recovered).
Loss (docs/method.md §2.3): L1 + 1.0·LPIPS(VGG16) + λ·PatchGAN hinge (VQGAN adaptive λ, disc_weight 0.5,
after a 50k-step warm-up) + 0.01·mean(μ²). LPIPS needs the user's weight files: `vae_loss.perceptual_weights`
(see latent_lm/models/perceptual.py for where to get them).

Optimisation: not recovered (no σ-VAE training code was released, docs/method.md §1.3). Our defaults follow the
ViT/VQGAN tokenizer recipes of LlamaGen and ViT-VQGAN: global batch 256, AdamW lr 1e-4, β (0.9, 0.95), weight decay
0.05, 5k warm-up steps then cosine to 0.1·lr, 200k steps (40 epochs), global-norm clip 1.0, bf16 compute with fp32
params; the discriminator (64 channels, 3 layers, as LDM) trains with the same optimizer (training.tasks.VAETask).
"""

import ml_collections

from configs import args, imagenet
from latent_lm.training.vae_losses import ldm_equivalent_kl_weight

ARGS = dict(kind="sigma", std=0.75, tiny=False)
BATCH = 256
STEPS = 200_000  # ≈ 40 epochs of the 1.28 M training images at batch 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = args.parse("tiny=1" if (arg or "").strip() == "tiny" else arg, ARGS)
    # The generator config fixes data, tokenizer architecture (patch 16, ViT-B, 16 channels) and the latent count.
    c = imagenet.get_config()
    c.vae.update(dict(std=a.std, kind=a.kind, dtype="bfloat16"))
    if a.kind == "kl":
        # LDM KL-16's 1e-6 on summed KL and pixel losses, rescaled to our mean-reduced terms (≈ 2.1e-8).
        num_tokens = (c.data.image_size // c.vae.patch_size) ** 2
        c.vae.kl_weight = ldm_equivalent_kl_weight(num_tokens * c.vae.latent_dim,
                                                   c.data.image_size ** 2 * c.data.channels)
    c.vae_loss.update(dict(l1_weight=1.0, perceptual_weight=1.0, disc_weight=0.5, disc_start=50_000,
                           disc_channels=64, disc_layers=3, adaptive_weight=True))
    c.vae_train.update(dict(steps=STEPS, batch_size=BATCH, log_every=100, seed=0))
    c.vae_optim.update(dict(lr=1e-4, warmup_steps=5000, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                            weight_decay=0.05, clip_norm=1.0, ema_decay=0.0))
    c.checkpoint.update(dict(every=5000, max_to_keep=3))
    c.stages = ("train_vae", "encode")
    if a.tiny:
        c = args.shrink_to_embedded(c)
        # The ImageNet data settings are wrong for 5,000 embedded images: no grain workers, few cache shards.
        c.data.update(dict(num_workers=0, cache_shards=4, encode_batch_size=500))
        c.vae.dtype = "float32"
        # Random LPIPS weights (no download in tests); a small discriminator that switches on mid-run.
        c.vae_loss.update(dict(perceptual_random_init=True, perceptual_weights="", disc_channels=16, disc_layers=2,
                               disc_start=c.vae_train.steps // 2))
        if a.kind == "kl":
            c.vae.kl_weight = ldm_equivalent_kl_weight(49 * c.vae.latent_dim, 28 * 28)
        c.stages = ("train_vae", "encode")
    return c
