"""LatentLM on ImageNet 256×256 (spec §2.4, §6.1, §6.4): `--config=configs/imagenet.py:L` (B, L, H or a
scaling-family size Base…13B). σ-VAE patch 16 → 16×16 = 256 latent tokens of 16 channels.

The data pipeline for ImageNet (tfds ArrayRecord, ADM center crop) and the ImageNet σ-VAE recipe are the next
issues' work; this config pins the model, diffusion and optimisation settings of the paper.
"""

import ml_collections

from configs import default
from latent_lm.models.presets import apply_preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = arg or "L"
    c = default.get_config()
    c.data.update(dict(dataset="imagenet2012", image_size=256, channels=3, num_classes=1000))
    c.vae.update(dict(patch_size=16, width=768, depth=12, num_heads=12, latent_dim=16, std=0.75))
    num_tokens = (c.data.image_size // c.vae.patch_size) ** 2
    apply_preset(c.model, c.head, size)
    c.model.update(dict(latent_dim=c.vae.latent_dim, num_classes=1000, max_len=num_tokens, dtype="bfloat16",
                        remat="full"))
    c.diffusion.update(dict(prediction_type="epsilon", num_sampling_steps=20, cfg_scale=4.0))
    c.train.update(dict(steps=250_000, batch_size=2048, log_every=100))
    c.optim.update(dict(lr=8e-4, warmup_steps=5000, final_lr_ratio=0.0, weight_decay=0.01, ema_decay=0.9999))
    c.checkpoint.update(dict(every=5000, max_to_keep=3))
    c.eval.update(dict(samples_per_class=50, sample_batch=256))
    return c
