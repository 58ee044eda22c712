"""AdamW with linear warm-up + cosine decay and global-norm clipping (spec §6.4; official train_hf.py)."""

from __future__ import annotations

import optax


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr·final_lr_ratio` at `total_steps`."""
    warmup = min(int(optim_config.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim_config.lr * optim_config.get("final_lr_ratio", 0.0))


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) → AdamW(β1, β2, eps, weight decay on every parameter, as the official code)."""
    return optax.chain(
        optax.clip_by_global_norm(optim_config.clip_norm),
        optax.adamw(learning_rate_schedule(optim_config, total_steps), b1=optim_config.b1, b2=optim_config.b2,
                    eps=optim_config.eps, weight_decay=optim_config.weight_decay),
    )
