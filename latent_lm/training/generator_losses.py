"""Generator losses: next-token diffusion (LatentLM, docs/method.md §6.1–6.3) and whole-image diffusion (the DiT twin,
docs/method.md §9). Both see the same σ-sampled, normalised latents (`latent_lm.latents.training_latents`)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.diffusion import NoiseSchedule, add_noise, training_target
from latent_lm.models.dit import DiT
from latent_lm.models.latent_lm import LatentLM
from latent_lm.training.batches import drop_class_tokens, drop_labels, gather_positions


def latent_lm_loss(model: LatentLM, params, batch: dict[str, jax.Array], rng: jax.Array, *,
                   schedule: NoiseSchedule, prediction_type: str, batch_mul: int, class_dropout: float,
                   diffusion_weight: float = 1.0, train: bool = True, head_capacity: int | None = None,
                   latent_stop_id: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = CE (over text targets) + λ·MSE (over latent targets), each averaged over its own targets
    (docs/method.md §6.3).

    The backbone runs once; conditions are repeated `batch_mul`× (adjacent copies, repeat_interleave) and every
    copy of every target token gets its own uniform t and ε (docs/method.md §6.1–6.2). The MSE is in fp32.
    `head_capacity`: the head runs only on the first that many latent targets of each row, gathered
    (`batches.gather_positions`, docs/method.md §7.3), instead of on every position. Packed rows
    (`segment_ids`, `positions` in the batch) keep attention inside each document.
    `latent_stop_id` (speech spans, docs/method.md §12.3): where `batch["continue_mask"]` holds (a latent followed by
    another latent of its span) the LM head also learns "not the stop id", −log(1 − p(stop)), averaged with the CE
    over both kinds of targets; the span's last latent already has the stop id as its CE target.
    """
    cfg = model.config
    rng_drop, rng_t, rng_eps = jax.random.split(rng, 3)
    tokens = batch["tokens"]
    if train:
        tokens = drop_class_tokens(rng_drop, cfg, tokens, batch["is_latent"], class_dropout)
    cond, hidden = model.apply(params, tokens, batch["latents"], batch["is_latent"], batch.get("positions"),
                               batch.get("segment_ids"))
    metrics = {}
    loss = jnp.zeros((), jnp.float32)

    targets, latent_mask = batch["latent_targets"], batch["latent_mask"]
    if head_capacity is not None:
        idx, valid = gather_positions(latent_mask, head_capacity)
        metrics["head_overflow"] = jnp.sum(latent_mask) - jnp.sum(valid)
        cond = jnp.take_along_axis(cond, idx[..., None], axis=1)
        targets, latent_mask = jnp.take_along_axis(targets, idx[..., None], axis=1), valid
    b, t_len = latent_mask.shape
    # Every [B·mul, T, ...] tensor is pinned to the batch sharding: left alone, GSPMD builds t and ε whole on every
    # device and the head then runs on all rows of an fsdp group (measured: 2.4× the temporaries at fsdp 8).
    rows = lambda x, *names: nn.with_logical_constraint(x, ("batch", "length", *names))
    x0 = rows(jnp.repeat(targets.astype(jnp.float32), batch_mul, axis=0), "latent")
    cond_rep = rows(jnp.repeat(cond, batch_mul, axis=0), "embed")
    mask = jnp.repeat(latent_mask, batch_mul, axis=0).astype(jnp.float32)
    t = rows(jax.random.randint(rng_t, (b * batch_mul, t_len), 0, schedule.num_train_steps))
    noise = rows(jax.random.normal(rng_eps, x0.shape, jnp.float32), "latent")
    x_t = add_noise(schedule, x0, noise, t)
    out = model.apply(params, x_t, t, cond_rep, method=LatentLM.diffuse)
    err = jnp.mean(jnp.square(out - training_target(prediction_type, x0, noise, t, schedule)), axis=-1)
    diff_loss = jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    metrics["diffusion_loss"] = diff_loss
    loss = loss + diffusion_weight * diff_loss

    if cfg.text_vocab_size:
        logits = model.apply(params, hidden, method=LatentLM.lm_logits)
        tmask = batch["text_mask"].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["text_targets"][..., None], axis=-1)[..., 0]
        ce_sum, ce_count = jnp.sum(nll * tmask), jnp.sum(tmask)
        acc = jnp.sum((jnp.argmax(logits, -1) == batch["text_targets"]) * tmask) / jnp.maximum(jnp.sum(tmask), 1.0)
        metrics["text_accuracy"] = acc
        if latent_stop_id is not None:
            cmask = batch["continue_mask"].astype(jnp.float32)
            log_p_stop = logp[..., latent_stop_id]
            go_on = -jnp.log1p(-jnp.minimum(jnp.exp(log_p_stop), 1.0 - 1e-6))  # −log(1 − p(stop)), finite
            ce_sum, ce_count = ce_sum + jnp.sum(go_on * cmask), ce_count + jnp.sum(cmask)
            metrics["stop_accuracy"] = jnp.sum((log_p_stop < jnp.log(0.5)) * cmask) / jnp.maximum(jnp.sum(cmask), 1.0)
        ce = ce_sum / jnp.maximum(ce_count, 1.0)
        metrics["ce_loss"] = ce
        loss = loss + ce
    metrics["loss"] = loss
    return loss, metrics


def dit_loss(model: DiT, params, latents: jax.Array, labels: jax.Array, rng: jax.Array, *,
             schedule: NoiseSchedule, prediction_type: str, class_dropout: float, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Plain MSE (fp32, mean over all elements) of the ε or v prediction with one uniform t per image (official
    train_hf.py DiT branch; docs/method.md §6.1). Labels are dropped to the null class only when `train`."""
    chex.assert_rank([latents, labels], [3, 1])
    rng_drop, rng_t, rng_eps = jax.random.split(rng, 3)
    if train:
        labels = drop_labels(rng_drop, labels, model.config.null_class, class_dropout)

    def rows(x):  # pinned to the batch sharding so t and ε are drawn per shard, not whole on every device
        return nn.with_logical_constraint(x, ("batch", "length", "latent"))

    x0 = rows(latents.astype(jnp.float32))
    t = nn.with_logical_constraint(jax.random.randint(rng_t, labels.shape, 0, schedule.num_train_steps), ("batch",))
    noise = rows(jax.random.normal(rng_eps, x0.shape, jnp.float32))
    x_t = add_noise(schedule, x0, noise, t[:, None])
    out = model.apply(params, x_t, t, labels.astype(jnp.int32))
    loss = jnp.mean(jnp.square(out - training_target(prediction_type, x0, noise, t[:, None], schedule)))
    return loss, {"loss": loss, "diffusion_loss": loss}
