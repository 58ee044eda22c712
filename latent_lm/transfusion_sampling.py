"""Compiled Transfusion generation with a static KV cache (docs/method.md §9.3).

Text-to-image: the prompt (`<bos> caption <boi>`, left-padded rows) is prefilled into the cache once; then every
DPM-Solver++ step (docs/method.md §8.2) runs the backbone over the N image positions, bidirectional among themselves
and attending to the cached prompt, and reads the ε or v prediction of each position from the out-projection. Each
step rewrites the image's cache slots and leaves the prompt's alone, so the prompt is never recomputed.
Classifier-free guidance doubles the batch, [prompts; null prompts], and guides u + s·(c − u) (docs/method.md §8.3).

Image-to-text: the prompt, with its images clean (t = 0), is prefilled the same way; greedy decoding then runs one
position per step in a `lax.while_loop` until every row has emitted the stop id or `max_new` tokens.

Prompts are right-aligned in P slots (`lengths` [B] real items each): slot s of row b holds RoPE position s − pad_b
(pad_b = P − lengths_b), and a mask over cache slots hides each row's padding, as in `generation.generate`
(docs/method.md §8.5).
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.diffusion import NoiseSchedule, dpm_solver_sample
from latent_lm.models.layers import KVCache
from latent_lm.models.transfusion import Transfusion, init_cache, transfusion_mask
from latent_lm.sampling import SamplerSettings
from latent_lm.text.tokenizer import SPECIAL_TOKENS

PAD_ID, BOS_ID, EOS_ID, BOI_ID, NULL_ID = (SPECIAL_TOKENS.index(t)
                                           for t in ("<pad>", "<bos>", "<eos>", "<boi>", "<null>"))
NULL_PROMPT = np.array([BOS_ID, NULL_ID, BOI_ID], np.int32)  # the dropped caption of CFG training (§7.3)


def prefill(model: Transfusion, params, tokens: jax.Array, latents: jax.Array, is_latent: jax.Array,
            lengths: jax.Array, cache_len: int) -> tuple[jax.Array, KVCache]:
    """Runs right-aligned prompts [B, P] (images clean, t = 0, bidirectional inside each) into a fresh cache of
    `cache_len` slots; returns (hidden of the last prompt position [B, D], caches)."""
    chex.assert_rank([tokens, latents, is_latent, lengths], [2, 3, 2, 1])
    cfg = model.config
    b, p = tokens.shape
    pad = p - lengths
    slots = jnp.arange(p)[None]
    real = slots >= pad[:, None]
    positions = jnp.maximum(slots - pad[:, None], 0)
    # Real slots form one document, padding another (a padded slot sees itself, so no softmax row is empty).
    mask = transfusion_mask(real.astype(jnp.int32), is_latent & real)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, cache_len - p)))
    h = model.apply(params, tokens, latents, is_latent & real, jnp.zeros((b, 1), jnp.int32),
                    (is_latent & real).astype(jnp.int32), method=Transfusion.embed)
    caches = init_cache(cfg, b, cache_len, jnp.dtype(cfg.dtype))
    hidden, caches = model.apply(params, h, positions, caches, mask, jnp.int32(0),
                                 method=Transfusion.backbone_forward)
    return hidden[:, -1], caches


def _left_pad(x: jax.Array, width: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (width - x.shape[1], 0)) + ((0, 0),) * (x.ndim - 2))


def sample_image(model: Transfusion, params, tokens: jax.Array, lengths: jax.Array, noise: jax.Array,
                 schedule: NoiseSchedule, settings: SamplerSettings, null_prompt: np.ndarray | None = NULL_PROMPT,
                 latents: jax.Array | None = None, is_latent: jax.Array | None = None) -> jax.Array:
    """N latents after right-aligned prompts `tokens` [B, P] that end with `<boi>`; `noise` [B, N, C] is x_T.

    `latents`/`is_latent` [B, P(, C)] (optional) carry clean images of the prompt (e.g. the successor documents).
    `settings.cfg_scale=None` runs the conditional rows alone; otherwise `null_prompt` (1-D token ids, any width)
    forms the unconditional rows. Returns normalised latents [B, N, C] (fp32). No Python loop over solver steps:
    jit it (`make_image_sampler`)."""
    cfg = model.config
    b, p = tokens.shape
    n = noise.shape[1]
    chex.assert_shape(noise, (b, n, cfg.latent_dim))
    latents = jnp.zeros((b, p, cfg.latent_dim)) if latents is None else latents
    is_latent = jnp.zeros((b, p), bool) if is_latent is None else is_latent
    if settings.cfg_scale is not None:
        null = jnp.asarray(null_prompt, jnp.int32)
        width = max(p, null.shape[0])
        tokens = jnp.concatenate([_left_pad(tokens, width), _left_pad(jnp.broadcast_to(null, (b, null.shape[0])),
                                                                      width)])
        latents = jnp.concatenate([_left_pad(latents, width), jnp.zeros((b, width, cfg.latent_dim))])
        is_latent = jnp.concatenate([_left_pad(is_latent, width), jnp.zeros((b, width), bool)])
        lengths = jnp.concatenate([lengths, jnp.full((b,), null.shape[0], lengths.dtype)])
    rows, width = tokens.shape
    _, caches = prefill(model, params, tokens, latents, is_latent, lengths, width + n)

    positions = lengths[:, None] + jnp.arange(n)[None]
    slots = jnp.arange(width + n)[None]
    visible = (slots >= (width - lengths)[:, None])  # the real prompt and every image slot
    mask = jnp.broadcast_to(visible[:, None, None, :], (rows, 1, n, width + n))

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:  # x [rows, N, C], t [rows, 1] → prediction [rows, N, C]
        h = model.apply(params, jnp.zeros((rows, n), jnp.int32), x, jnp.ones((rows, n), bool), t,
                        jnp.ones((rows, n), jnp.int32), method=Transfusion.embed)
        # The returned cache is dropped: the next step rewrites the same image slots of the prefilled one.
        hidden, _ = model.apply(params, h, positions, caches, mask, jnp.int32(width),
                                method=Transfusion.backbone_forward)
        return model.apply(params, hidden, method=Transfusion.denoise)

    def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        t = jnp.full((x.shape[0], 1), t)  # the solver's t is shared by every latent of every image
        if settings.cfg_scale is None:
            return denoise(x, t)
        c, u = jnp.split(denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t])), 2)
        return u + settings.cfg_scale * (c - u)

    return dpm_solver_sample(model_fn, noise.astype(jnp.float32), schedule, settings.num_steps,
                             settings.prediction_type, settings.x0_clip)


def make_image_sampler(model: Transfusion, schedule: NoiseSchedule, settings: SamplerSettings, num_latents: int,
                       null_prompt: np.ndarray | None = NULL_PROMPT) -> Callable:
    """Jitted `sample(params, tokens [B, P], lengths [B], rng) -> normalised latents [B, N, C]`, x_T ~ N(0, I)."""

    @jax.jit
    def sample(params, tokens, lengths, rng):
        noise = jax.random.normal(rng, (tokens.shape[0], num_latents, model.config.latent_dim))
        return sample_image(model, params, tokens, lengths, noise, schedule, settings, null_prompt)

    return sample


def greedy_text(model: Transfusion, params, tokens: jax.Array, latents: jax.Array, is_latent: jax.Array,
                lengths: jax.Array, max_new: int, stop_id: int = EOS_ID) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation of right-aligned prompts [B, P] whose images are clean (t = 0), e.g. `<bos> <boi> z…
    <eoi>` for captioning. Returns (tokens int32 [B, max_new], num_generated [B]); a row stops after `stop_id`
    (counted) and emits `<pad>` afterwards; the loop ends when every row has stopped."""
    b, p = tokens.shape
    cache_len = p + max_new
    last, caches = prefill(model, params, tokens, latents, is_latent, lengths, cache_len)
    first = jnp.argmax(model.apply(params, last, method=Transfusion.lm_logits), -1).astype(jnp.int32)
    out = jnp.full((b, max_new), PAD_ID, jnp.int32).at[:, 0].set(first)
    pad = p - lengths
    slots = jnp.arange(cache_len)[None]
    prompt_visible = (slots >= pad[:, None]) & (slots < p)

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_new - 1) & ~jnp.all(done)

    def body(state):
        i, out, done, num, caches = state
        tok = jax.lax.dynamic_slice_in_dim(out, i, 1, axis=1)  # [B, 1]: the token fed at slot P + i
        h = model.apply(params, tok, jnp.zeros((b, 1, model.config.latent_dim)), jnp.zeros((b, 1), bool),
                        jnp.zeros((b, 1), jnp.int32), jnp.zeros((b, 1), jnp.int32), method=Transfusion.embed)
        mask = (prompt_visible | ((slots >= p) & (slots <= p + i)))[:, None, None, :]
        hidden, caches = model.apply(params, h, (lengths + i)[:, None], caches, mask, p + i,
                                     method=Transfusion.backbone_forward)
        nxt = jnp.argmax(model.apply(params, hidden[:, 0], method=Transfusion.lm_logits), -1).astype(jnp.int32)
        nxt = jnp.where(done, PAD_ID, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i + 1, axis=1)
        num = num + (~done).astype(jnp.int32)
        return i + 1, out, done | (nxt == stop_id), num, caches

    state = (jnp.int32(0), out, first == stop_id, jnp.ones((b,), jnp.int32), caches)
    _, out, _, num, _ = jax.lax.while_loop(cond, body, state)
    return out, num


def make_captioner(model: Transfusion, max_new: int, stop_id: int = EOS_ID) -> Callable:
    """Jitted `caption(params, tokens, latents, is_latent, lengths) -> (tokens [B, max_new], num_generated [B])`."""
    return jax.jit(lambda params, tokens, latents, is_latent, lengths: greedy_text(
        model, params, tokens, latents, is_latent, lengths, max_new, stop_id))
