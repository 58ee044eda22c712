"""Tokenizer variance study (paper Fig. 6; docs/method.md §2.2, §2.4): LatentLM needs high-variance σ-VAE tokenizers,
DiT is less sensitive, and a learned-variance KL-VAE (which collapses its variance) is the control.

  python -m latent_lm.sweep --config=configs/tokenizer_variance.py:scale=embedded --root=runs/tokenizer_variance
  python -m latent_lm.studies.tokenizer_variance --root=runs/tokenizer_variance     (both: make tokenizer-variance)
Sweep: one tokenizer point per C_σ of `SIGMA_GRID` and one KL-VAE (`role=tokenizer`: train_vae, encode), then a
LatentLM and a DiT generator on each (train, sample, eval: class accuracy, FD, PSNR, collapse ratio r).

scale=embedded: MNIST with the embedded default's sizes and steps (times in docs/experiments.md §5).
scale=imagenet: the paper's setting (docs/method.md §6.4, from the paper appendix): the Medium model, lr 1e-4 cosine,
warm-up 100, weight decay 0.1, batch 256, 200k steps, v-prediction, DPM-Solver 20 steps; tokenizers from
configs/imagenet_vae.py with the swept C_σ; FID-50k.
"""

import ml_collections

from configs import args, default, imagenet
from latent_lm.errors import ConfigError
from latent_lm.training.vae_losses import ldm_equivalent_kl_weight

# C_σ grids: docs/method.md §2.2's {0.25, 0.5, 0.75, 1.0} at ImageNet; the CPU proxy (docs/method.md §10.4) spans 0 (a
# plain autoencoder) to 1 in three points to fit its time budget.
SIGMA_GRID = {"imagenet": (0.25, 0.5, 0.75, 1.0), "embedded": (0.0, 0.5, 1.0)}
ARGS = dict(scale="embedded", role="generator", tokenizer="sigma0.5", arch="latent_lm", tiny=False)
FAMILIES = ("latent_lm", "dit")


def tokenizer_names(scale: str = "embedded") -> list[str]:
    return [f"sigma{s:g}" for s in SIGMA_GRID[scale]] + ["kl"]


def _apply_tokenizer(c: ml_collections.ConfigDict, name: str) -> None:
    """σ-VAE with C_σ = `vae.std`, or the learned-variance KL-VAE control."""
    known = sorted(set(tokenizer_names("embedded") + tokenizer_names("imagenet")))
    if name not in known:
        raise ConfigError(f"tokenizer={name!r} must be one of {known}")
    if name == "kl":
        # LDM KL-f16's β (1e-6 on summed terms) for our mean-reduced losses: reconstruction dominates, σ collapses.
        num_latent_values = (c.data.image_size // c.vae.patch_size) ** 2 * c.vae.latent_dim
        c.vae.update(dict(kind="kl", std=0.0, kl_weight=ldm_equivalent_kl_weight(
            num_latent_values, c.data.image_size ** 2 * c.data.channels)))
    else:
        c.vae.update(dict(kind="sigma", std=float(name[len("sigma"):])))


def _imagenet_vae_arg(name: str) -> str:
    return "kind=kl" if name == "kl" else f"std={name[len('sigma'):]}"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = args.parse(arg, ARGS)
    if a.scale == "embedded":
        # The embedded default's sizes and step counts (1000 σ-VAE steps, LatentLM 96×4 for 1000 steps, which
        # generates 97.5%-accurate digits): a smaller budget (48×2, 400 steps) left most generators near chance,
        # which says nothing about the tokenizers.
        c = default.get_config()
        # One pixel loss for every tokenizer, MSE: under it the KL-VAE's learned σ collapses (r ≈ 0.01 in 300
        # steps); under the default's L1 it collapses slowly and unevenly (docs/experiments.md §7).
        c.vae_loss.update(dict(l1_weight=0.0, l2_weight=1.0))
        c.eval.update(dict(samples_per_class=30, sample_batch=300, classifier_dir="../classifier"))
    elif a.scale == "imagenet":
        if a.role == "tokenizer":
            from configs import imagenet_vae  # noqa: PLC0415
            c = imagenet_vae.get_config(_imagenet_vae_arg(a.tokenizer))
        else:
            c = imagenet.get_config("size=Medium,arch=" + a.arch)
            c.train.update(dict(steps=200_000, batch_size=256))
            c.optim.update(dict(lr=1e-4, warmup_steps=100, weight_decay=0.1))
            c.diffusion.update(dict(prediction_type="v_prediction", num_sampling_steps=20))
    else:
        raise ConfigError(f"scale={a.scale!r} must be embedded or imagenet")
    _apply_tokenizer(c, a.tokenizer)
    if a.role == "tokenizer":
        c.stages = ("train_vae", "encode")
    else:
        c.model.arch = a.arch
        c.data.tokenizer_workdir = f"../tok_{a.tokenizer}"
        c.stages = ("train", "sample", "eval")
    return args.shrink_to_embedded(c) if a.tiny else c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Every tokenizer first (generators read them), then LatentLM and DiT on each."""
    a = args.parse(arg, ARGS)
    points = [{"name": f"tok_{t}", "config_arg": f"scale={a.scale},role=tokenizer,tokenizer={t}"}
              for t in tokenizer_names(a.scale)]
    points += [{"name": f"{arch}_{t}", "config_arg": f"scale={a.scale},tokenizer={t},arch={arch}"}
               for t in tokenizer_names(a.scale) for arch in FAMILIES]
    return points
