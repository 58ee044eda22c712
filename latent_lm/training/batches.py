"""Batch builders: cached latents and labels → the model's sequence arrays, and the condition dropout of CFG
training (docs/method.md §7.1, §8.3). The sequence contract is in `latent_lm/models/latent_lm.py`'s docstring."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from latent_lm.models.latent_lm import LatentLMConfig


def class_conditional_batch(latents: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """[class][z0..z_{N-2}] → targets z0..z_{N-1}: the ImageNet-style sequence (docs/method.md §7.1)."""
    chex.assert_rank([latents, labels], [3, 1])
    b, n, c = latents.shape
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(labels.astype(jnp.int32))
    inputs = jnp.concatenate([jnp.zeros((b, 1, c), latents.dtype), latents[:, :-1]], axis=1)
    is_latent = jnp.arange(n)[None, :].repeat(b, 0) > 0
    return dict(tokens=tokens, latents=inputs, is_latent=is_latent,
                latent_targets=latents, latent_mask=jnp.ones((b, n), bool),
                text_targets=jnp.zeros((b, n), jnp.int32), text_mask=jnp.zeros((b, n), bool))


def drop_class_tokens(rng: jax.Array, config: LatentLMConfig, tokens: jax.Array, is_latent: jax.Array,
                      prob: float) -> jax.Array:
    """CFG training: per example, replace class tokens by the null class with probability `prob`
    (docs/method.md §8.3)."""
    if not config.num_classes or prob <= 0:
        return tokens
    drop = jax.random.uniform(rng, (tokens.shape[0], 1)) < prob
    is_class = (~is_latent) & (tokens < config.num_classes)
    return jnp.where(drop & is_class, config.null_class, tokens)


def drop_labels(rng: jax.Array, labels: jax.Array, null_class: int, prob: float) -> jax.Array:
    """CFG training: each label becomes the null class with probability `prob` (official `LabelEmbedder`)."""
    if prob <= 0:
        return labels
    return jnp.where(jax.random.uniform(rng, labels.shape) < prob, null_class, labels)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 where each packed document starts ([B, T] int32; a new document begins where the
    segment id changes), so RoPE sees every document as if it were alone (docs/method.md §4.1)."""
    chex.assert_rank(segment_ids, 2)
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - first).astype(jnp.int32)
