"""Embedded default (`make run`): σ-VAE on MNIST → cached latents → class-conditional LatentLM → CFG samples.

Sized to finish end to end in ≤ 15 minutes on a 2-core CPU, install included (the README's figures).
`get_config("animal_mnist")` runs the same pipeline on the embedded animal silhouettes. Derived values (token count,
cache paths) are computed here.
"""

import ml_collections

from configs import args
from latent_lm.experiment import IMAGE_STAGES

DATASETS = {"mnist": 10, "animal_mnist": 10}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`default.py:animal_mnist` (or `dataset=animal_mnist`); `tiny=1` shrinks it for smoke runs (configs.args)."""
    a = args.parse(arg, dict(dataset="mnist", tiny=False))
    dataset = a.dataset
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # What `--mode=all` runs, in order (latent_lm.experiment.IMAGE_STAGES); done.json marks a finished run.
    c.stages = IMAGE_STAGES

    # tfds datasets (ImageNet): `data_dir` of the prepared ArrayRecord files ("" = tfds default), σ-VAE training
    # `mixture` of (tfds name, weight) pairs, ADM `random_flip`; latent caches have `cache_shards` shard files.
    # `tokenizer_workdir`: where vae/ and latents/ live when one tokenizer serves many runs ("" = the workdir).
    # `vae_workdir`: another run whose vae/ is read in place ("" = the tokenizer dir's; docs/experiments.md §10.4).
    c.data = ml_collections.ConfigDict(dict(
        dataset=dataset, image_size=28, channels=1, num_classes=DATASETS[dataset], num_workers=0, data_dir="",
        mixture=(), random_flip=True, cache_shards=4, encode_batch_size=500, tokenizer_workdir="", vae_workdir=""))

    # σ-VAE (docs/method.md §2): ViT encoder/decoder, patch 4 → a 7×7 grid of latent vectors. `kind="kl"` is the
    # learned-variance KL-VAE control (docs/method.md §2.4): `std` is then unused and `kl_weight` weighs the true KL
    # instead of the μ penalty; LDM KL-16's weight in this mean-reduced loss is 1e-6·(latent values / pixel values),
    # 2.5e-7 here (`sigma_vae.ldm_equivalent_kl_weight`), which collapses the posterior (r ≪ 0.05). `kind="fsq"` is
    # the discrete tokenizer of the VQ baseline (docs/method.md §2.5): `fsq_levels` per channel, latent_dim =
    # len(fsq_levels). `dtype`: compute dtype.
    c.vae = ml_collections.ConfigDict(dict(
        patch_size=4, width=96, depth=2, num_heads=4, mlp_ratio=4.0, latent_dim=4, std=0.5, kl_weight=0.01,
        kind="sigma", fsq_levels=(8, 5, 5, 5), dtype="float32"))
    # σ-VAE loss terms beyond L1 + kl_weight·(μ penalty | KL) (docs/method.md §2.3 recipe; training.tasks.VAETask):
    # l1/l2 pixel weights; LPIPS(VGG16) with `perceptual_weights` = comma-separated weight files (torchvision VGG16
    # + LPIPS v0.1 lin layers; `perceptual_random_init` is for tests only); PatchGAN hinge loss on when
    # disc_weight > 0, `adaptive_weight` = VQGAN's gradient-norm balancing, off until step `disc_start`.
    # All off here: the embedded default trains on pixels only.
    c.vae_loss = ml_collections.ConfigDict(dict(
        l1_weight=1.0, l2_weight=0.0, perceptual_weight=0.0, perceptual_weights="", perceptual_random_init=False,
        disc_weight=0.0, disc_start=0, disc_channels=64, disc_layers=3, adaptive_weight=True))
    c.vae_train = ml_collections.ConfigDict(dict(steps=1000, batch_size=64, log_every=100, seed=0))
    c.vae_optim = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=100, final_lr_ratio=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
        clip_norm=1.0, ema_decay=0.0))

    grid = c.data.image_size // c.vae.patch_size
    num_tokens = grid * grid

    # LatentLM backbone (docs/method.md §4) and diffusion head (docs/method.md §5); arch="dit" trains its DiT twin
    # instead (docs/method.md §9).
    c.model = ml_collections.ConfigDict(dict(
        arch="latent_lm", width=96, depth=4, num_heads=4, num_kv_heads=None, mlp_ratio=4.0, posi_scale=1.0,
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
    # eval_loss: held-out loss over `loss_repeats` noise draws per batch of `loss_batch`; `classifier_dir` caches the
    # embedded-data classifier ("" = <workdir>/eval; relative paths are relative to the workdir, shared by sweeps).
    # ImageNet: FID/IS with `inception_weights` (pytorch-fid file; "" = its default path) against `reference_stats`.
    c.eval = ml_collections.ConfigDict(dict(
        samples_per_class=100, sample_batch=500, use_ema=True, classifier_steps=1500, seed=1,
        loss_batch=200, loss_repeats=4, classifier_dir="", inception_weights="", reference_stats=""))
    if a.tiny:
        c = args.shrink_to_embedded(c)
        c.data.dataset = dataset
    return c
