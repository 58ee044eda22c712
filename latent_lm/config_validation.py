"""Checks a resolved experiment config before any work starts: one clear error naming the bad value, and a warning
line for a setting that runs but is almost certainly not what was meant.

Schedules (docs/experiments.md §4): a warm-up that lasts the run (`optim.warmup_steps` ≥ `train.steps`, or the σ-VAE's
`vae_optim`/`vae_train` pair) is an error. The optimizer would clamp it to steps − 1, so the learning rate would rise
for the whole run and never decay: the schedule the config spells out cannot happen. An EMA that still holds more
than `EMA_INIT_WEIGHT_LIMIT` of the initial weights at the end of the run, when the stages evaluate the EMA
(`eval.use_ema`), is a warning: the run trains as configured and its raw weights are in the checkpoint
(`--config.eval.use_ema=False` evaluates them), and smoke runs of a few steps are legitimately in that regime.
"""

from __future__ import annotations

import math
from typing import Collection

from absl import logging

from latent_lm.diffusion import PREDICTION_TYPES
from latent_lm.errors import ConfigError
from latent_lm.models.transformer import REMAT_POLICIES
from latent_lm.text.tokenizer import SPLITS
from latent_lm.training.tasks import GENERATOR_TASKS
from latent_lm.training.train_state import ema_init_weight

# Above this weight on the initial weights (ema_init_weight) an evaluated EMA gets a warning.
EMA_INIT_WEIGHT_LIMIT = 0.01
# Stages that read no generator weights (every other stage trains or evaluates the generator).
TOKENIZER_STAGES = ("train_tokenizer", "train_vae", "encode", "build_corpus", "train_audio_vae", "encode_audio",
                    "eval_audio_vae", "train_judges")


def schedule_checks(config) -> list[tuple[bool, str]]:
    """(ok, message) for each optimizer/run-length pair: the warm-up must end before the run does."""
    checks = []
    pairs = [("optim", "train"), ("vae_optim", "vae_train")]
    if "audio_vae_optim" in config:  # speech configs (docs/method.md §12)
        pairs.append(("audio_vae_optim", "audio_vae_train"))
    for optim, train in pairs:
        warmup, steps = int(config[optim].warmup_steps), int(config[train].steps)
        checks.append((warmup < steps, f"{optim}.warmup_steps={warmup} must be < {train}.steps={steps}: a warm-up "
                                       f"that does not end before the run leaves no steps to decay, the learning "
                                       f"rate would rise for the whole run"))
    return checks


def ema_warnings(config) -> list[str]:
    """One line when the stages evaluate the generator's EMA (`eval.use_ema`) and, after `train.steps`, it still
    holds more than `EMA_INIT_WEIGHT_LIMIT` of the initial weights; it says what to change."""
    if not config.eval.use_ema or all(s in TOKENIZER_STAGES for s in config.stages):
        return []
    decay, steps = float(config.optim.ema_decay), int(config.train.steps)
    weight = ema_init_weight(decay, steps)
    if weight <= EMA_INIT_WEIGHT_LIMIT:
        return []
    fix = "set eval.use_ema=False to evaluate the raw weights"
    if steps > 1:
        bound = math.floor(EMA_INIT_WEIGHT_LIMIT ** (1.0 / (steps - 1)) * 1e6) / 1e6
        fix = f"set optim.ema_decay ≤ {bound:g} (or more steps), or {fix}"
    return [f"optim.ema_decay={decay:g} over train.steps={steps} leaves {weight:.1%} of the initial weights in the "
            f"EMA that eval.use_ema=True evaluates (decay^(steps−1), above {EMA_INIT_WEIGHT_LIMIT:.0%}): {fix}"]


def validate(config, stages: Collection[str]) -> list[str]:
    """Raises one `ConfigError` naming the first bad value; `stages` are the stage names a config may list
    (`experiment.RUNNERS`). Logs a warning line for each of `ema_warnings` and returns them."""
    d, v, m, diff = config.data, config.vae, config.model, config.diffusion
    tokenizer = config.audio_vae if "audio_vae" in config else v  # the latents the generator reads
    per_position = int(config.tts.frames_per_step) if "tts" in config else 1  # TTS stacks frames (§12.2)
    checks = [
        (d.image_size % v.patch_size == 0,
         f"data.image_size={d.image_size} is not divisible by vae.patch_size={v.patch_size}"),
        (m.latent_dim == tokenizer.latent_dim * per_position,
         f"model.latent_dim={m.latent_dim} must equal {'audio_vae' if tokenizer is not v else 'vae'}.latent_dim="
         f"{tokenizer.latent_dim}" + (f" × tts.frames_per_step={per_position}" if per_position != 1 else "")),
        (m.width % m.num_heads == 0 and (m.width // m.num_heads) % 2 == 0,
         f"model.width={m.width} must split into num_heads={m.num_heads} heads of even size (RoPE pairs)"),
        (m.num_kv_heads is None or m.num_heads % m.num_kv_heads == 0,
         f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}"),
        (m.remat in REMAT_POLICIES, f"model.remat={m.remat!r} must be one of {list(REMAT_POLICIES)}"),
        (v.width % v.num_heads == 0, f"vae.width={v.width} is not divisible by vae.num_heads={v.num_heads}"),
        (diff.prediction_type in PREDICTION_TYPES,
         f"diffusion.prediction_type={diff.prediction_type!r} must be one of {list(PREDICTION_TYPES)}"),
        (diff.batch_mul >= 1, f"diffusion.batch_mul={diff.batch_mul} must be ≥ 1"),
        (diff.num_sampling_steps >= 1, f"diffusion.num_sampling_steps={diff.num_sampling_steps} must be ≥ 1"),
        (0.0 <= m.class_dropout < 1.0, f"model.class_dropout={m.class_dropout} must be in [0, 1)"),
        (config.train.steps >= 1 and config.vae_train.steps >= 1, "train.steps and vae_train.steps must be ≥ 1"),
        (config.eval.sample_batch >= 1, f"eval.sample_batch={config.eval.sample_batch} must be ≥ 1"),
        (0.0 <= config.optim.ema_decay < 1.0, f"optim.ema_decay={config.optim.ema_decay} must be in [0, 1)"),
        (m.arch in GENERATOR_TASKS, f"model.arch={m.arch!r} must be one of {sorted(GENERATOR_TASKS)}"),
        (len(config.stages) > 0 and all(s in stages for s in config.stages),
         f"stages={tuple(config.stages)} must be a non-empty sequence of {list(stages)}"),
        (config.eval.loss_batch >= 1 and config.eval.loss_repeats >= 1, "eval.loss_batch and eval.loss_repeats "
         "must be ≥ 1"),
    ]
    if "text" in config:  # the BPE text tokenizer's settings (configs/mllm.py, configs/tts.py)
        checks.append((config.text.split in SPLITS, f"text.split={config.text.split!r} must be one of {list(SPLITS)}"))
    if m.arch in GENERATOR_TASKS:  # the kind's own rules (e.g. what a sequence holds)
        checks += list(GENERATOR_TASKS[m.arch].config_checks(config))
    checks += schedule_checks(config)
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")
    warnings = ema_warnings(config)
    for message in warnings:
        logging.warning("config: %s", message)
    return warnings
