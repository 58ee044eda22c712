"""Checks a resolved experiment config before any work starts: one clear error naming the bad value."""

from __future__ import annotations

from typing import Collection

from latent_lm.diffusion import PREDICTION_TYPES
from latent_lm.errors import ConfigError
from latent_lm.models.transformer import REMAT_POLICIES
from latent_lm.training.tasks import GENERATOR_TASKS


def validate(config, stages: Collection[str]) -> None:
    """Raises one `ConfigError` naming the first bad value; `stages` are the stage names a config may list
    (`experiment.RUNNERS`)."""
    d, v, m, diff = config.data, config.vae, config.model, config.diffusion
    checks = [
        (d.image_size % v.patch_size == 0,
         f"data.image_size={d.image_size} is not divisible by vae.patch_size={v.patch_size}"),
        (m.latent_dim == v.latent_dim, f"model.latent_dim={m.latent_dim} must equal vae.latent_dim={v.latent_dim}"),
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
    if m.arch in GENERATOR_TASKS:  # the kind's own rules (e.g. what a sequence holds)
        checks += list(GENERATOR_TASKS[m.arch].config_checks(config))
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")
