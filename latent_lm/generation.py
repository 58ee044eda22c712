"""Generation over interleaved text tokens and image latents in one compiled loop (docs/method.md §8.5).

One jitted `lax.while_loop` carries a static KV cache across modality switches. Every batch element has its own mode:
in text mode the LM head samples the next token (greedy, temperature, top-p), and sampling `<boi>` switches the element
to latent mode; in latent mode the diffusion head's K-step DPM-Solver++ samples the next latent, and after
`num_latents` latents of the current image the element is back in text mode, where the model itself must emit
`<eoi>` (never forced). An element stops at a stop id (`<eos>`) or after `max_new` items; the loop ends when all
have stopped.

Prompts of different lengths are left-padded to one width P. Every row writes cache slot s at step s (one shared
write slot), its RoPE position is s − pad[row] (a prompt's first item is position 0, as in training; with
`restart_positions`, (s − the slot of the prompt's last span opener up to s) · `span_position_scale`, where there is
one), and a per-row mask over cache slots hides the padding (`layers.Attention`'s `mask`/`cache_index` with a cache).
CFG doubles the batch [conditional prompts; null prompts]; an element's tokens come from its conditional row's logits,
its latents from the guided head u + s·(c − u), and whatever it emits is fed to both of its rows.
Element e draws its token and its x_T at step i from fold_in(fold_in(rng, i), e) (`step_keys`), so a no-cache
reference replays it (tests/test_generation.py), and an element generates the same alone or in a batch.

Speech mode (`settings.latent_stop_id`, e.g. `<eod>`; docs/method.md §12.3): a span of latents has no fixed length.
At every latent step the LM head reads the element's conditional hidden state first; where it gives the stop id a
probability ≥ 1/2 the element emits that token (a text item) and is back in text mode, otherwise the diffusion head
samples the next latent. `num_latents` is then the longest span (reaching it returns the element to text mode).

Code mode (`settings.image_codes=(offset, count)`, the VQ-MLLM baseline, docs/method.md §9.4): image positions are
discrete code tokens offset … offset+count−1 of the LM head's vocabulary. Latent mode then draws the next code from the
LM logits restricted to that range, guided on logits (u + s·(c − u)), with the text temperature and top-p, and feeds
it back as a token; text mode never emits a code (the range is masked out). The model is read through its token
embedding and backbone alone (no latent projection, ConditionLayer or diffusion head: their parameters may be absent).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.diffusion import NoiseSchedule, dpm_solver_sample
from latent_lm.diffusion.schedule import check_prediction_type
from latent_lm.models.latent_lm import init_cache, LatentLM
from latent_lm.sampling import guided_head
from latent_lm.text.tokenizer import SPECIAL_TOKENS

PAD_ID, EOS_ID, BOI_ID = (SPECIAL_TOKENS.index(t) for t in ("<pad>", "<eos>", "<boi>"))


@flax.struct.dataclass
class Prompt:
    """A batch of prompts, each left-aligned: item j < lengths[b] of row b is tokens[b, j], or latents[b, j] where
    is_latent[b, j]. Latents are in the model's normalised latent space. Every length must be ≥ 1 (e.g. `<bos>`).
    In code mode (`GenerationSettings.image_codes`) images are code tokens and `latents`/`is_latent` are ignored."""

    tokens: jax.Array     # int32 [B, P] (embedding rows; text id k is row k in multimodal configs)
    latents: jax.Array    # float32 [B, P, C]
    is_latent: jax.Array  # bool [B, P]
    lengths: jax.Array    # int32 [B]


@flax.struct.dataclass
class Generation:
    """What `generate` returns: item j < num_generated[b] of element b is tokens[b, j] (text), or latents[b, j] where
    is_latent[b, j]; the rest is `<pad>` / zeros. A stop token is included in the count. In code mode an image item
    is the code token tokens[b, j] (offset + code), is_latent[b, j] still marks it, and latents stay zero."""

    tokens: jax.Array         # int32 [B, max_new]
    latents: jax.Array        # float32 [B, max_new, C]
    is_latent: jax.Array      # bool [B, max_new]
    num_generated: jax.Array  # int32 [B]


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Static settings of the compiled loop (docs/method.md §8.5). `temperature=0` is greedy; `top_p < 1` keeps the
    smallest set of tokens whose probability reaches top_p. `cfg_scale` must be set exactly when a null prompt is
    given. The solver settings are those of `sampling.SamplerSettings` (§8.2). `image_codes=(offset, count)` turns on
    code mode (module docstring): image items are the code tokens offset … offset+count−1, sampled from the LM head
    (the solver settings are then unused)."""

    max_new: int
    num_latents: int
    temperature: float = 0.0
    top_p: float = 1.0
    num_steps: int = 20
    cfg_scale: float | None = None
    prediction_type: str = "epsilon"
    x0_clip: float | None = None
    stop_ids: tuple[int, ...] = (EOS_ID,)
    boi_id: int = BOI_ID
    pad_id: int = PAD_ID
    image_codes: tuple[int, int] | None = None
    latent_stop_id: int | None = None
    # RoPE positions count again from each `boi_id` of the prompt (the generated items hold none), as training with
    # `positions="restart"` (docs/method.md §12.2).
    restart_positions: bool = False
    # With `restart_positions`: the positions after an opener times this (training's `tts.position_scale`).
    span_position_scale: float = 1.0

    def __post_init__(self):
        if self.max_new < 1 or self.num_latents < 1 or self.num_steps < 1:
            raise ValueError(f"max_new, num_latents and num_steps must be >= 1: {self}")
        if not self.span_position_scale > 0:
            raise ValueError(f"span_position_scale must be > 0: {self}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1: {self}")
        check_prediction_type(self.prediction_type)
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        if self.image_codes is not None:
            offset, count = (int(i) for i in self.image_codes)
            object.__setattr__(self, "image_codes", (offset, count))
            if offset < 0 or count < 1:
                raise ValueError(f"image_codes=(offset, count) needs offset >= 0 and count >= 1: {self}")
            if any(offset <= i < offset + count for i in (self.boi_id, self.pad_id, *self.stop_ids)):
                raise ValueError(f"boi_id, pad_id and stop_ids must lie outside the code range: {self}")
            if self.latent_stop_id is not None:
                raise ValueError(f"latent_stop_id (speech spans) and image_codes (code mode) exclude each other: {self}")

    def is_code(self, tokens: jax.Array) -> jax.Array:
        """Where `tokens` are image code tokens (all False outside code mode)."""
        if self.image_codes is None:
            return jnp.zeros(jnp.shape(tokens), bool)
        offset, count = self.image_codes
        return (tokens >= offset) & (tokens < offset + count)


def make_prompt(sequences: Sequence[Sequence[int | np.ndarray]], latent_dim: int, width: int | None = None) -> Prompt:
    """Host helper: a Prompt from Python sequences whose items are token ids (int) or latent vectors ([C] arrays)."""
    width = width or max(len(s) for s in sequences)
    b = len(sequences)
    tokens = np.zeros((b, width), np.int32)
    latents = np.zeros((b, width, latent_dim), np.float32)
    is_latent = np.zeros((b, width), bool)
    for r, seq in enumerate(sequences):
        if not 1 <= len(seq) <= width:
            raise ValueError(f"prompt {r} has {len(seq)} items; need 1..{width}")
        for j, item in enumerate(seq):
            if np.ndim(item) == 0:
                tokens[r, j] = int(item)
            else:
                latents[r, j], is_latent[r, j] = np.asarray(item, np.float32), True
    return Prompt(jnp.asarray(tokens), jnp.asarray(latents), jnp.asarray(is_latent),
                  jnp.asarray([len(s) for s in sequences], jnp.int32))


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter on logits [..., V]: keeps the most probable tokens until their probability reaches `top_p` (a
    token is kept when the mass of the tokens ranked above it is < top_p, so the top token always stays); the others
    become −inf."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids [B] from fp32 logits [B, V] and one key per row: argmax at temperature 0, else a draw from
    softmax(logits / T), nucleus-filtered when top_p < 1."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        logits = top_p_filter(logits, top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def step_keys(rng: jax.Array, step: jax.Array | int, batch: int) -> tuple[jax.Array, jax.Array]:
    """(token keys [B], noise keys [B]) of loop step `step`: element e splits fold_in(fold_in(rng, step), e) in two,
    so its draws depend neither on the batch size nor on the other elements."""
    step_key = jax.random.fold_in(rng, step)
    keys = jax.vmap(lambda e: jax.random.split(jax.random.fold_in(step_key, e)))(jnp.arange(batch))
    return keys[:, 0], keys[:, 1]


def prompt_state(prompt: Prompt, settings: GenerationSettings) -> tuple[jax.Array, jax.Array]:
    """(latent mode [B] bool, latents of the current image so far [B]) after each prompt: latent mode when it ends
    with `<boi>`, or with k < num_latents latents (an image to continue, k already there); in code mode the image
    items are the code tokens."""
    b, p = prompt.tokens.shape
    image = prompt.is_latent if settings.image_codes is None else settings.is_code(prompt.tokens)
    last = prompt.lengths - 1
    last_tok = jnp.take_along_axis(prompt.tokens, last[:, None], 1)[:, 0]
    last_lat = jnp.take_along_axis(image, last[:, None], 1)[:, 0]
    idx = jnp.arange(p)[None]
    # Trailing run of latents: from the last non-latent item (or the start) to the end of the prompt.
    last_text = jnp.max(jnp.where((idx < prompt.lengths[:, None]) & ~image, idx, -1), axis=1)
    run = jnp.where(last_lat, last - last_text, 0)
    mode = jnp.where(last_lat, run < settings.num_latents, last_tok == settings.boi_id)
    return mode, run.astype(jnp.int32)


def _left_pad(prompt: Prompt, width: int) -> tuple[Prompt, jax.Array]:
    """The prompt right-aligned in `width` slots (padding first: <pad>, zero latents); returns it and pad [B]."""
    p = prompt.tokens.shape[1]
    pad = width - prompt.lengths
    src = jnp.arange(width)[None] - pad[:, None]  # slot → prompt index (< 0 on padding)
    valid = src >= 0
    src = jnp.clip(src, 0, p - 1)

    def take(a, fill):
        got = jnp.take_along_axis(a, src.reshape(src.shape + (1,) * (a.ndim - 2)), axis=1)
        return jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - 2)), got, fill)

    return Prompt(take(prompt.tokens, 0), take(prompt.latents, 0.0), take(prompt.is_latent, False),
                  prompt.lengths), pad


def _token_embed(module: LatentLM, tokens: jax.Array) -> jax.Array:
    """Code mode's input: the token embedding alone (every item is a token)."""
    return module.token_embed(tokens)


def _backbone_only(module: LatentLM, h, positions, caches, mask, cache_index):
    """Code mode's `LatentLM.backbone_forward` without the ConditionLayer: (hidden as the unused condition, hidden,
    caches)."""
    hidden, caches = module.backbone(h, positions, caches, mask, cache_index)
    return hidden, hidden, caches


def mask_codes(logits: jax.Array, settings: GenerationSettings) -> jax.Array:
    """Text mode's logits [..., V] with the code range at −inf (unchanged outside code mode)."""
    if settings.image_codes is None:
        return logits
    return jnp.where(settings.is_code(jnp.arange(logits.shape[-1])), -jnp.inf, logits)


def guided_code_logits(logits: jax.Array, settings: GenerationSettings, batch: int) -> jax.Array:
    """Code mode's logits [B, count] from the LM logits of all rows [rows, V]: the code range of the conditional rows,
    or with CFG (rows = 2B) u + s·(c − u) of the conditional (c) and null (u) rows. Guiding logits equals guiding
    log-probabilities: log-softmax subtracts one constant per row, which softmax, argmax and top-p ignore."""
    offset, count = settings.image_codes
    code = logits[:, offset:offset + count]
    if settings.cfg_scale is None:
        return code[:batch]
    c, u = code[:batch], code[batch:]
    return u + settings.cfg_scale * (c - u)


def generate(model: LatentLM, params, prompt: Prompt, rng: jax.Array, schedule: NoiseSchedule,
             settings: GenerationSettings, null_prompt: Prompt | None = None) -> Generation:
    """Generates up to `max_new` interleaved tokens and latents after each prompt (docs/method.md §8.5).

    `null_prompt` (same batch size, any width; e.g. `<bos><null><boi>`) turns on classifier-free guidance with
    `settings.cfg_scale`; it should end in the same mode as the prompt. Jit it (`make_generator`, or an outer jit):
    there is no Python loop over steps.
    """
    cfg = model.config
    if not cfg.text_vocab_size or cfg.text_offset:
        raise ValueError("generation needs a text vocabulary whose ids are embedding rows (num_classes=0)")
    codes = settings.image_codes
    if codes is not None and sum(codes) > cfg.text_vocab_size:
        raise ValueError(f"image_codes={codes} reach past the LM head's {cfg.text_vocab_size} ids")
    if (null_prompt is None) != (settings.cfg_scale is None):
        raise ValueError("classifier-free guidance needs both a null prompt and settings.cfg_scale (or neither)")
    b, p_cond = prompt.tokens.shape
    c = cfg.latent_dim
    chex.assert_shape([prompt.tokens, prompt.is_latent], (b, p_cond))
    chex.assert_shape(prompt.latents, (b, p_cond, c))
    chex.assert_shape(prompt.lengths, (b,))
    guided = null_prompt is not None
    width = p_cond
    if guided:
        chex.assert_shape(null_prompt.lengths, (b,))
        chex.assert_equal_shape_prefix([null_prompt.tokens, null_prompt.is_latent, null_prompt.latents], 2)
        chex.assert_shape(null_prompt.latents, (b, None, c))
        width = max(p_cond, null_prompt.tokens.shape[1])
    padded, pad = _left_pad(prompt, width)
    if guided:
        null_padded, null_pad = _left_pad(null_prompt, width)
        padded = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), padded, null_padded)
        pad = jnp.concatenate([pad, null_pad])
    rows = padded.tokens.shape[0]
    max_new, n_lat_max = settings.max_new, settings.num_latents
    num_slots = width + max_new  # the last step's (unused) write still fits
    slots = jnp.arange(num_slots)
    if settings.restart_positions:  # per slot, the prompt's last opener up to it (-1: none), as training counts
        opener = (padded.tokens == settings.boi_id) & ~padded.is_latent & (slots[None, :width] >= pad[:, None])
        opened = jax.lax.cummax(jnp.where(opener, slots[None, :width], -1), axis=1)
        opened = jnp.concatenate([opened, jnp.repeat(opened[:, -1:], max_new, axis=1)], axis=1)  # [rows, num_slots]

    def dup(a):  # an element's value for both of its rows (conditional, unconditional)
        return jnp.concatenate([a, a]) if guided else a

    def forward(h, start, key_valid, caches):
        """Backbone on h [rows, T] at slots start…start+T−1: causal over the row's real slots (each sees itself)."""
        start = jnp.asarray(start, jnp.int32)
        q_slots = start + jnp.arange(h.shape[1])
        positions = jnp.maximum(q_slots[None] - pad[:, None], 0)  # padding: 0, never seen by a real item
        if settings.restart_positions:
            since = jax.lax.dynamic_slice_in_dim(opened, start, h.shape[1], axis=1)
            positions = jnp.where(since >= 0, (q_slots[None] - since) * jnp.float32(settings.span_position_scale),
                                  positions)
        sees = (slots[None, None] <= q_slots[None, :, None]) & key_valid[:, None]
        mask = (sees | (slots[None, None] == q_slots[None, :, None]))[:, None]  # [rows, 1, T, S]
        cond, hidden, caches = model.apply(params, h, positions, caches, mask, start,
                                           method=LatentLM.backbone_forward if codes is None else _backbone_only)
        return cond[:, -1], hidden[:, -1], caches

    def embed(tokens, latents, is_latent):
        if codes is not None:
            return model.apply(params, tokens, method=_token_embed)
        return model.apply(params, tokens, latents.astype(jnp.float32), is_latent, method=LatentLM.embed)

    key_valid = (slots[None] >= pad[:, None]) & (slots[None] < width)
    caches = init_cache(cfg, rows, num_slots, jnp.dtype(cfg.dtype))
    h = embed(padded.tokens, padded.latents, padded.is_latent)
    cond, hidden, caches = forward(h, 0, key_valid, caches)
    latent_mode, n_lat = prompt_state(prompt, settings)

    def text_step(hidden, keys):
        logits = model.apply(params, hidden[:b], method=LatentLM.lm_logits)  # the conditional rows
        return sample_tokens(mask_codes(logits, settings), keys, settings.temperature, settings.top_p)

    def code_step(hidden, keys):  # all rows: the null rows' logits guide
        logits = guided_code_logits(model.apply(params, hidden, method=LatentLM.lm_logits), settings, b)
        return sample_tokens(logits, keys, settings.temperature, settings.top_p) + codes[0]

    def stop_probability(hidden):  # speech mode: p(stop id) under the LM head, conditional rows
        logits = model.apply(params, hidden[:b], method=LatentLM.lm_logits).astype(jnp.float32)
        return jax.nn.softmax(logits, axis=-1)[:, settings.latent_stop_id]

    def latent_step(cond, keys):
        x_T = jax.vmap(lambda k: jax.random.normal(k, (c,), jnp.float32))(keys)
        return dpm_solver_sample(guided_head(model, params, cond, settings.cfg_scale), x_T, schedule,
                                 settings.num_steps, settings.prediction_type, settings.x0_clip)

    def body(carry):
        i, done, latent_mode, n_lat, count, cond, hidden, caches, key_valid, out = carry
        k_tok, k_noise = step_keys(rng, i, b)
        want_text, want_lat = ~done & ~latent_mode, ~done & latent_mode
        # Each head runs only when some element needs it: the K solver steps are the expensive half.
        tok = jax.lax.cond(jnp.any(want_text), text_step, lambda *_: jnp.zeros((b,), jnp.int32), hidden, k_tok)
        if settings.latent_stop_id is not None:  # the LM head may end a speech span before the solver runs
            p_stop = jax.lax.cond(jnp.any(want_lat), stop_probability, lambda _: jnp.zeros((b,), jnp.float32),
                                  hidden)
            ends = want_lat & (p_stop >= 0.5)
            want_lat, want_text = want_lat & ~ends, want_text | ends
            tok = jnp.where(ends, settings.latent_stop_id, tok)
        if codes is None:
            x0 = jax.lax.cond(jnp.any(want_lat), latent_step, lambda *_: jnp.zeros((b, c), jnp.float32), cond,
                              k_noise)
            tok = jnp.where(want_text, tok, settings.pad_id)
            x0 = jnp.where(want_lat[:, None], x0, 0.0)
        else:  # an image item is a code token, drawn with the element's token key
            code = jax.lax.cond(jnp.any(want_lat), code_step, lambda *_: jnp.zeros((b,), jnp.int32), hidden, k_tok)
            tok = jnp.where(want_text, tok, jnp.where(want_lat, code, settings.pad_id))
            x0 = jnp.zeros((b, c), jnp.float32)
        out = Generation(out.tokens.at[:, i].set(tok), out.latents.at[:, i].set(x0),
                         out.is_latent.at[:, i].set(want_lat), out.num_generated)
        switch = want_text & (tok == settings.boi_id)
        new_mode = jnp.where(want_lat, n_lat + 1 < n_lat_max, jnp.where(want_text, switch, latent_mode))
        n_lat = jnp.where(want_lat, n_lat + 1, jnp.where(switch, 0, n_lat))
        stop = want_text & jnp.isin(tok, jnp.asarray(settings.stop_ids, jnp.int32))
        active = ~done
        # Feed the emitted item at slot width + i. All rows write there; a finished element's rows mark it
        # invisible and keep their state.
        start = width + i
        h = embed(dup(tok)[:, None], dup(x0)[:, None], dup(want_lat)[:, None])
        key_valid = key_valid.at[:, start].set(dup(active))
        new_cond, new_hidden, caches = forward(h, start, key_valid, caches)
        keep = dup(active)[:, None]
        cond, hidden = jnp.where(keep, new_cond, cond), jnp.where(keep, new_hidden, hidden)
        return (i + 1, done | stop, new_mode, n_lat, count + active, cond, hidden, caches, key_valid, out)

    def not_finished(carry):
        i, done = carry[:2]
        return (i < max_new) & ~jnp.all(done)

    out = Generation(jnp.full((b, max_new), settings.pad_id, jnp.int32), jnp.zeros((b, max_new, c), jnp.float32),
                     jnp.zeros((b, max_new), bool), jnp.zeros((b,), jnp.int32))
    carry = (jnp.int32(0), jnp.zeros((b,), bool), latent_mode, n_lat, jnp.zeros((b,), jnp.int32), cond, hidden,
             caches, key_valid, out)
    carry = jax.lax.while_loop(not_finished, body, carry)
    out, count = carry[-1], carry[4]
    return out.replace(num_generated=count)


def make_generator(model: LatentLM, schedule: NoiseSchedule, settings: GenerationSettings) -> Callable:
    """Returns jitted `generate(params, prompt, rng, null_prompt=None) -> Generation` (docs/method.md §8.5); one
    compile per prompt shape and for each of with / without a null prompt."""

    @jax.jit
    def run(params, prompt: Prompt, rng: jax.Array, null_prompt: Prompt | None = None) -> Generation:
        return generate(model, params, prompt, rng, schedule, settings, null_prompt)

    return run
