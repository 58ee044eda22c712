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


def restart_positions(tokens: jax.Array, positions: jax.Array, open_id: int, scale: float = 1.0) -> jax.Array:
    """`positions` (restarting at 0 per document) counted again from each document's span-opening token `open_id`
    on, the opener at 0: speech positions then start where text positions do, as VALL-E's separate text and speech
    positions (docs/method.md §12.2); a span's positions are then multiplied by `scale` (phoneme symbols per speech
    step: a step sits at the position of the symbol it says). One span per document; [B, T] float32 (RoPE's)."""
    chex.assert_rank([tokens, positions], 2)
    idx = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    opener = jax.lax.cummax(jnp.where(tokens == open_id, idx, -1), axis=1)  # the last opener so far
    start = jax.lax.cummax(jnp.where(positions == 0, idx, -1), axis=1)  # this document's first slot
    opened_at = jnp.take_along_axis(positions, jnp.maximum(opener, 0), axis=1)
    return jnp.where(opener >= start, (positions - opened_at) * jnp.float32(scale), positions).astype(jnp.float32)


def image_span_ids(is_latent: jax.Array) -> jax.Array:
    """Numbers the contiguous runs of latent positions in each row 1, 2, … (0 elsewhere): one id per image of a
    packed row, so each image gets its own σ-VAE σ (docs/method.md §7.3). int32 [B, T]."""
    chex.assert_rank(is_latent, 2)
    starts = is_latent & ~jnp.pad(is_latent, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(is_latent, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)


def document_targets(tokens: jax.Array, is_latent: jax.Array, latents: jax.Array, segment_ids: jax.Array,
                     ignore_ids: tuple[int, ...], variable_spans: bool = False) -> dict[str, jax.Array]:
    """Next-position targets of packed interleaved documents (docs/method.md §7.3).

    Position i predicts position i+1 of the same document: a latent there is a diffusion target (the hidden state at
    `<boi>` conditions z_1, at z_k conditions z_{k+1}), a token a CE target (at z_N that is `<eoi>`). Tokens in
    `ignore_ids` (padding, the null prompt) are never CE targets; the last position of every document and padding
    (segment 0) predict nothing. Returns the `latent_lm_loss` target arrays, [B, T(, C)]; with `variable_spans`
    (speech, docs/method.md §12.3) also `continue_mask`: the latents followed by another latent of their document,
    where the LM head learns that the span goes on.
    """
    chex.assert_rank([tokens, is_latent, latents, segment_ids], [2, 2, 3, 2])
    shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))
    same_doc = (segment_ids > 0) & (shift(segment_ids) == segment_ids)
    next_latent, next_token = shift(is_latent), shift(tokens)
    ignored = jnp.isin(next_token, jnp.asarray(ignore_ids, jnp.int32))
    targets = dict(latent_targets=shift(latents), latent_mask=same_doc & next_latent,
                   text_targets=next_token, text_mask=same_doc & ~next_latent & ~ignored)
    if variable_spans:
        targets["continue_mask"] = same_doc & is_latent & next_latent
    return targets


def gather_positions(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The first `capacity` positions of each row where `mask` holds: indices [B, capacity] and whether each is real.

    The diffusion head then runs on [B, capacity] gathered targets instead of every position (docs/method.md §7.3):
    a text-heavy row does not pay head × batch_mul for its text. Rows with more targets than `capacity` lose the rest
    (the loss reports how many as `head_overflow`; the packer keeps rows within it)."""
    chex.assert_rank(mask, 2)
    order = jnp.argsort(~mask, axis=1, stable=True)[:, :capacity].astype(jnp.int32)
    return order, jnp.take_along_axis(mask, order, axis=1)
