"""Class-conditional ImageNet generation (docs/method.md §4.6, §6.4, §10.2): LatentLM or its DiT twin on σ-VAE latents.

  --config=configs/imagenet.py:size=L                    LatentLM-L, paper Table 1 (FID 2.24 at 400 epochs)
  --config=configs/imagenet.py:size=L,arch=dit           its DiT twin (docs/method.md §9)
  --config=configs/imagenet.py:size=XL,resolution=384    Table 2 (576 latent tokens; needs a 384² tokenizer)
  --config=configs/imagenet.py:size=L,tiny=1             the same recipe on the embedded MNIST data (smoke runs)
Sizes: B, L, H (the ImageNet models) and the scaling family Base…13B (`latent_lm/models/presets.py`). A bare word
is the size (`imagenet.py:L`).

The generator trains on the latents of a σ-VAE trained with `configs/imagenet_vae.py` (`--mode=all` there trains
and encodes): point `data.tokenizer_workdir` at that run. `--mode=all` here runs train → sample → eval (FID/IS).
Recipe (docs/method.md §6.4; the exact LatentLM-L recipe is not recovered, these are the MAR-like defaults the spec
recommends): batch 2048, AdamW lr 8e-4 (1e-4 × 2048/256), β (0.9, 0.98), weight decay 0.01, 100-epoch warm-up then
cosine over 400 epochs, EMA 0.9999, ε-prediction, 4× diffusion batch, DPM-Solver++ 20 steps, CFG 4.0.
"""

import ml_collections

from configs import args, default
from latent_lm.models.presets import DIT_MLP_RATIO, apply_preset

IMAGENET_TRAIN_IMAGES = 1_281_167

ARGS = dict(size="L", arch="latent_lm", resolution=256, epochs=400, tiny=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = args.parse(arg, ARGS)
    c = default.get_config()
    c.data.update(dict(dataset="imagenet2012", image_size=a.resolution, channels=3, num_classes=1000,
                       num_workers=8, cache_shards=256, encode_batch_size=1024))
    # The tokenizer of configs/imagenet_vae.py: ViT-B encoder/decoder, patch 16, 16 latent channels
    # (docs/method.md §2.1).
    c.vae.update(dict(patch_size=16, width=768, depth=12, num_heads=12, latent_dim=16, std=0.75))
    num_tokens = (c.data.image_size // c.vae.patch_size) ** 2
    apply_preset(c.model, c.head, a.size)
    c.model.update(dict(arch=a.arch, latent_dim=c.vae.latent_dim, num_classes=1000, max_len=num_tokens,
                        dtype="bfloat16", remat="full"))
    if a.arch == "dit":  # the official DiT presets; LatentLM's scaling family uses 6 to match the twin's params
        c.model.mlp_ratio = DIT_MLP_RATIO
    c.diffusion.update(dict(prediction_type="epsilon", num_sampling_steps=20, cfg_scale=4.0))

    batch = 2048
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
    c.train.update(dict(steps=a.epochs * steps_per_epoch, batch_size=batch, log_every=100))
    c.optim.update(dict(lr=1e-4 * batch / 256, warmup_steps=100 * steps_per_epoch, final_lr_ratio=0.0,
                        weight_decay=0.01, ema_decay=0.9999))
    c.checkpoint.update(dict(every=5000, max_to_keep=3))
    # FID-50k (docs/method.md §10.2): 50 per class, Inception weights and ADM reference statistics supplied by the user.
    c.eval.update(dict(samples_per_class=50, sample_batch=256, loss_batch=1024))
    c.stages = ("train", "sample", "eval")
    return args.shrink_to_embedded(c) if a.tiny else c
