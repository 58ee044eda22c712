"""Scaling study: LatentLM vs its DiT twin across model sizes (paper Fig. 4; docs/method.md §4.6, §9, §10.2).

  python -m latent_lm.sweep --config=configs/scaling.py:scale=embedded --root=runs/scaling   (make scaling)
  python -m latent_lm.studies.scaling_law --root=runs/scaling
The sweep's first point trains and encodes one tokenizer (`role=tokenizer`); every generator point reads it
through `data.tokenizer_workdir=../tokenizer`, trains, and writes its held-out loss and exact training FLOPs
(eval/loss.json); the study fits L(C) = a·C^(−b) + c per family.

scale=embedded: 4 sizes × 2 families on the embedded MNIST latents, about 20 minutes on a 2-core CPU.
scale=imagenet: the paper's family Base…13B × {LatentLM, DiT} on ImageNet 256 at batch 2048 (docs/method.md §6.4:
"scaling runs use a different LR and batch 2048"; Table 7's per-size LRs are not recovered: 4e-4 up to XL, 2e-4 above —
our default) for `epochs` epochs each, plus FID-50k of every run.

Schedules follow each run's length, not the 400-epoch recipe of configs/imagenet.py (docs/experiments.md §4):
- warm-up: 100 steps at scale=imagenet, as the official recipe (imagenet.py's 100 *epochs* = 62,500 steps is longer
  than a 40-epoch run of 25,000 steps, which then never decays); 40 of the 400 steps at scale=embedded.
- EMA: every point evaluates its EMA weights (`eval.use_ema`: the weights imagenet.py samples FID from), with the
  decay chosen from the step count so that the EMA averages the last tenth of the run: 1/(1 − decay) = steps/10
  (`ema_decay_for`), which leaves decay^(steps−1) ≈ e^(−10) ≈ 5·10⁻⁵ of the initial weights at any run length.
  The inherited decays left 13.5% (0.995 over 400 steps) and 8% (0.9999 over 25,000), which pulls every
  evaluated loss and sample toward those of the untrained model. `--config.eval.use_ema=False --mode=eval_loss`
  evaluates a finished run's raw weights instead.
"""

import ml_collections

from configs import args, default, imagenet
from latent_lm.errors import ConfigError

ARGS = dict(scale="embedded", role="generator", size="S1", arch="latent_lm", epochs=40, tiny=False)
FAMILIES = ("latent_lm", "dit")

# Embedded family: (width, depth, heads, head_depth); one step budget for all, so compute grows with size.
EMBEDDED_SIZES = {"S1": (32, 1, 4, 1), "S2": (48, 2, 4, 1), "S3": (64, 3, 4, 2), "S4": (96, 4, 4, 2)}
EMBEDDED_STEPS = 400
IMAGENET_SIZES = ("Base", "Medium", "Large", "XL", "3B", "7B", "13B")
TOKENIZER = "../tokenizer"  # relative to each generator run's workdir (latent_lm.experiment.tokenizer_dir)
EMBEDDED_WARMUP_STEPS = 40
IMAGENET_WARMUP_STEPS = 100  # the official recipe's warm-up, in steps
EMA_WINDOWS_PER_RUN = 10  # a run lasts this many EMA time constants 1/(1 − decay) (docstring)


def ema_decay_for(steps: int) -> float:
    """The EMA decay whose time constant is 1/EMA_WINDOWS_PER_RUN of a `steps`-step run: 0.975 for 400 steps,
    0.9996 for 25,000; the weight left on the initial weights is then ≈ e^(−EMA_WINDOWS_PER_RUN)."""
    return 1.0 - EMA_WINDOWS_PER_RUN / steps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = args.parse(arg, ARGS)
    if a.scale not in ("embedded", "imagenet"):
        raise ConfigError(f"scale={a.scale!r} must be embedded or imagenet")
    c = _imagenet(a) if a.scale == "imagenet" else _embedded(a)
    return args.shrink_to_embedded(c) if a.tiny else c


def _embedded(a) -> ml_collections.ConfigDict:
    c = default.get_config()
    if a.role == "tokenizer":
        c.stages = ("train_vae", "encode")
        return c
    if a.size not in EMBEDDED_SIZES:
        raise ConfigError(f"size={a.size!r} must be one of {list(EMBEDDED_SIZES)} at scale=embedded")
    width, depth, heads, head_depth = EMBEDDED_SIZES[a.size]
    c.model.update(dict(arch=a.arch, width=width, depth=depth, num_heads=heads))
    c.head.depth = head_depth
    c.data.tokenizer_workdir = TOKENIZER
    c.train.update(dict(steps=EMBEDDED_STEPS, batch_size=64, log_every=100))
    c.optim.update(dict(warmup_steps=EMBEDDED_WARMUP_STEPS, ema_decay=ema_decay_for(EMBEDDED_STEPS)))
    c.eval.use_ema = True
    c.checkpoint.every = 200
    c.stages = ("train", "eval_loss")
    return c


def _imagenet(a) -> ml_collections.ConfigDict:
    if a.role == "tokenizer":
        from configs import imagenet_vae  # noqa: PLC0415  (only the tokenizer point needs it)
        return imagenet_vae.get_config()
    if a.size not in IMAGENET_SIZES:
        raise ConfigError(f"size={a.size!r} must be one of {list(IMAGENET_SIZES)} at scale=imagenet")
    c = imagenet.get_config(f"size={a.size},arch={a.arch},epochs={a.epochs}")
    c.optim.lr = 4e-4 if IMAGENET_SIZES.index(a.size) <= IMAGENET_SIZES.index("XL") else 2e-4
    # Per run length (docstring): imagenet.py's warm-up and EMA are those of its 400-epoch run.
    c.optim.update(dict(warmup_steps=IMAGENET_WARMUP_STEPS, ema_decay=ema_decay_for(c.train.steps)))
    c.eval.use_ema = True
    c.data.tokenizer_workdir = TOKENIZER
    c.stages = ("train", "eval_loss", "sample", "eval")
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """The tokenizer first (later points read it), then every size of each family, smallest first."""
    a = args.parse(arg, ARGS)
    sizes = list(EMBEDDED_SIZES) if a.scale == "embedded" else list(IMAGENET_SIZES)
    base = f"scale={a.scale},epochs={a.epochs}"
    points = [{"name": "tokenizer", "config_arg": f"{base},role=tokenizer"}]
    points += [{"name": f"{arch}_{size}", "config_arg": f"{base},size={size},arch={arch}"}
               for arch in FAMILIES for size in sizes]
    return points
