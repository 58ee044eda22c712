"""Embedded default (`make run`): σ-VAE on MNIST → cached latents → class-conditional LatentLM → CFG samples.

Sized to finish end to end in ≤15 minutes on a 2-core CPU. `get_config("animal_mnist")` runs the same pipeline
on the embedded animal silhouettes. Derived values (token count, cache paths) are computed here.
"""

import ml_collections

DATASETS = {"mnist": 10, "animal_mnist": 10}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    dataset = arg or "mnist"
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0

    # tfds datasets (ImageNet): `data_dir` of the prepared ArrayRecord files ("" = tfds default), σ-VAE training
    # `mixture` of (tfds name, weight) pairs, ADM `random_flip`; latent caches have `cache_shards` shard files.
    c.data = ml_collections.ConfigDict(dict(
        dataset=dataset, image_size=28, channels=1, num_classes=DATASETS[dataset], num_workers=0, data_dir="",
        mixture=(), random_flip=True, cache_shards=4, encode_batch_size=500))

    # σ-VAE (spec §1): ViT encoder/decoder, patch 4 → a 7×7 grid of latent vectors.
    c.vae = ml_collections.ConfigDict(dict(
        patch_size=4, width=96, depth=2, num_heads=4, mlp_ratio=4.0, latent_dim=4, std=0.5, kl_weight=0.01))
    c.vae_train = ml_collections.ConfigDict(dict(steps=1000, batch_size=64, log_every=100, seed=0))
    c.vae_optim = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=100, final_lr_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
        clip_norm=1.0, ema_decay=0.0))

    grid = c.data.image_size // c.vae.patch_size
    num_tokens = grid * grid

    # LatentLM backbone (spec §2) and diffusion head (spec §3).
    c.model = ml_collections.ConfigDict(dict(
        width=96, depth=4, num_heads=4, num_kv_heads=None, mlp_ratio=4.0, posi_scale=1.0,
        latent_dim=c.vae.latent_dim, num_classes=c.data.num_classes, text_vocab_size=0,
        max_len=num_tokens, remat="none", dtype="float32", class_dropout=0.1))
    c.head = ml_collections.ConfigDict(dict(depth=2, mlp_ratio=None))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_train_steps=1000, prediction_type="v_prediction", batch_mul=4,
        diffusion_weight=1.0, num_sampling_steps=20, cfg_scale=3.0, x0_clip=None))

    c.train = ml_collections.ConfigDict(dict(steps=1000, batch_size=64, log_every=100, seed=0))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=100, final_lr_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
        clip_norm=1.0, ema_decay=0.995))

    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), dcn_shape=(1, 1, 1), rules=()))
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, max_to_keep=2, async_save=True))
    c.eval = ml_collections.ConfigDict(dict(
        samples_per_class=100, sample_batch=500, use_ema=True, classifier_steps=1500, seed=1))
    return c
