"""AdamW with linear warm-up + cosine decay and global-norm clipping (docs/method.md §6.4; official train_hf.py)."""

from __future__ import annotations

from collections.abc import Mapping

import optax


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr·final_lr_ratio` at `total_steps`.

    A warm-up of `total_steps` or more is clamped to total_steps − 1 steps here (so the last step still decays), but
    an experiment config that asks for one is rejected before it runs (`config_validation.schedule_checks`): the
    clamped schedule rises for the whole run, not the schedule the config describes."""
    warmup = min(int(optim_config.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim_config.lr * optim_config.get("final_lr_ratio", 0.0))


def clip_each_collection(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` applied to each top-level entry of the gradient dict on its own.

    A generator's params are one collection ({"params": …}), so this is plain global-norm clipping. The σ-VAE with
    the GAN on holds two players ({"params": VAE, "disc": PatchGAN}, `VAETask`); one shared norm would let the
    discriminator's gradients shrink the VAE's steps and vice versa, which two optimizers (taming's VQGAN) never do.
    The state is the clip's empty state, so checkpoints do not change.
    """
    clip = optax.clip_by_global_norm(max_norm)

    def update_fn(updates, state, params=None):
        del params
        if not isinstance(updates, Mapping) or len(updates) < 2:
            return clip.update(updates, state)
        return type(updates)({key: clip.update(sub, state)[0] for key, sub in updates.items()}), state

    return optax.GradientTransformation(clip.init, update_fn)


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (per GAN player, `clip_each_collection`) → AdamW(β1, β2, eps, weight decay on every
    parameter, as the official code)."""
    return optax.chain(
        clip_each_collection(optim_config.clip_norm),
        optax.adamw(learning_rate_schedule(optim_config, total_steps), b1=optim_config.b1, b2=optim_config.b2,
                    eps=optim_config.eps, weight_decay=optim_config.weight_decay),
    )
