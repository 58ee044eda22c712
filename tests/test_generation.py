"""The compiled multimodal generator (docs/method.md §8.5) equals a no-cache reference that reruns the teacher-forced
forward over everything generated so far at every step: mixed prompts of different lengths in one batch, greedy text,
the switch to latents at <boi> and back after N latents, a prompt ending inside an image, stop at <eos> per element,
CFG with a null prompt of another width, temperature + top-p sampling; and a prompt generates the same alone as when
left-padded in a batch of longer prompts. Code mode (the VQ arm's discrete image tokens): the same reference with
codes as tokens, greedy and sampled, the code-range masks of both modes, CFG on logits with a null prompt, and a
parameter tree of only the token embedding, backbone and LM head."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_lm.diffusion import dpm_solver_sample, make_schedule
from latent_lm.generation import (BOI_ID, EOS_ID, GenerationSettings, guided_code_logits, make_generator, make_prompt,
                                  mask_codes, sample_tokens, step_keys, top_p_filter)
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.text.tokenizer import SPECIAL_TOKENS
from latent_lm.training.batches import restart_positions


CFG = LatentLMConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, latent_dim=3, head_depth=1, text_vocab_size=16,
                     max_len=64)
MODEL = LatentLM(CFG)
SCHEDULE = make_schedule("cosine", 1000)
C = CFG.latent_dim
N = 2  # latents per image
MAX_NEW = 10
REF_LEN = 16  # the reference's fixed sequence length (≥ prompt width + MAX_NEW): one compile per row count
BOS, EOI, NULL, BOD, EOD = (SPECIAL_TOKENS.index(t) for t in ("<bos>", "<eoi>", "<null>", "<bod>", "<eod>"))
LATENT = "z"  # in a program: "after a latent"
# The programmed model's greedy continuation of each token (see `_programmed_params`).
PROGRAM = {BOS: 8, 8: 9, 9: BOI_ID, LATENT: EOI, EOI: 10, 10: EOS_ID, 11: 12, 12: 11, 13: BOI_ID, NULL: BOI_ID,
           EOS_ID: EOS_ID}
Z0 = np.array([0.3, -0.2, 0.1], np.float32)  # a latent already in a prompt
# Widths 1, 2, 3, 5: plain text, text that never stops, a prompt ending with <boi>, one ending inside an image.
PROMPTS = [[BOS], [BOS, 11], [BOS, 13, BOI_ID], [BOS, 8, 9, BOI_ID, Z0]]


def _random_params(seed=0, std=0.1, model=MODEL):
    """N(0, std²) in every leaf, the zero-initialised head outputs included; shapes from eval_shape (no compiled
    init)."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                                       jnp.zeros((1, 4, C)), jnp.zeros((1, 4), bool)))
    return jax.tree.map(lambda s: np.asarray(rng.normal(0.0, std, s.shape), np.float32), abstract)


def _programmed_params(seed=0):
    """Random weights plus a greedy program: token k embeds as 10·e_k and a latent as ≈ 10·e_16 (x_embedder bias),
    so the last item dominates the residual stream, and the LM head maps e_k to PROGRAM[k] with a margin of ≈ 16
    logits. Attention and the diffusion head keep their random weights: conditions and latents still depend on the
    history."""
    params = _random_params(seed)
    p = params["params"]
    p["token_embed"]["embedding"] = np.zeros_like(p["token_embed"]["embedding"])
    p["token_embed"]["embedding"][np.arange(16), np.arange(16)] = 10.0
    p["x_embedder"]["bias"] = np.zeros_like(p["x_embedder"]["bias"])
    p["x_embedder"]["bias"][16] = 10.0
    for src, dst in PROGRAM.items():
        p["lm_head"]["kernel"][16 if src == LATENT else src, dst] += 3.0
    return jax.tree.map(jnp.asarray, params)


# ---------------------------------------------------------------------------------------------------------------
# The no-cache reference: Python state per element, the full forward over every sequence at every step.

@jax.jit
def _forward(params, toks, lats, is_lat, positions=None):
    cond, hidden = MODEL.apply(params, toks, lats, is_lat, positions)
    return cond, MODEL.apply(params, hidden, method=LatentLM.lm_logits)


def _solve(params, cond, x_T, settings):
    def head(x, t, c):
        return MODEL.apply(params, x, t, c, method=LatentLM.diffuse)

    def guided(x, t):  # written out here: u + s·(c − u) on the [conditional; unconditional] halves
        if settings.cfg_scale is None:
            return head(x, t, cond)
        c, u = (head(x, t, half) for half in jnp.split(cond, 2))
        return u + settings.cfg_scale * (c - u)

    return dpm_solver_sample(guided, x_T, SCHEDULE, settings.num_steps, settings.prediction_type, settings.x0_clip)


_solve_jit = jax.jit(_solve, static_argnums=3)


def _is_latent(item) -> bool:
    return np.ndim(item) > 0


def _mode_after(seq, is_image=_is_latent, n=N, boi=BOI_ID) -> tuple[bool, int]:
    """(latent mode, latents of the current image so far) after a prompt, from its last items."""
    if not is_image(seq[-1]):
        return seq[-1] == boi, 0
    run = 0
    while run < len(seq) and is_image(seq[-1 - run]):
        run += 1
    return run < n, run


def reference_generate(params, prompts, rng, settings, null_prompts=None):
    """The generator's contract, recomputed: per step, each row's whole sequence (right-padded to REF_LEN; causal
    attention ignores what follows) through the teacher-forced forward; the item at the row's last position decides."""
    if settings.image_codes is not None:
        return reference_generate_codes(params, prompts, rng, settings, null_prompts)
    b = len(prompts)
    seqs = [list(p) for p in prompts] + [list(p) for p in (null_prompts or [])]
    state = [_mode_after(p, n=settings.num_latents, boi=settings.boi_id) for p in prompts]
    mode, n_lat = [s[0] for s in state], [s[1] for s in state]
    done = [False] * b
    tokens = np.zeros((b, settings.max_new), np.int32)
    latents = np.zeros((b, settings.max_new, C), np.float32)
    is_lat = np.zeros((b, settings.max_new), bool)
    count = np.zeros(b, np.int32)
    for i in range(settings.max_new):
        if all(done):
            break
        rows = len(seqs)
        t_in, m_in = np.zeros((rows, REF_LEN), np.int32), np.zeros((rows, REF_LEN), bool)
        l_in = np.zeros((rows, REF_LEN, C), np.float32)
        for r, seq in enumerate(seqs):
            for j, item in enumerate(seq):
                if _is_latent(item):
                    l_in[r, j], m_in[r, j] = item, True
                else:
                    t_in[r, j] = item
        positions = None
        if settings.restart_positions:  # as training computes them (right padding never precedes an item)
            positions = restart_positions(t_in, np.broadcast_to(np.arange(REF_LEN), t_in.shape),
                                          settings.boi_id, settings.span_position_scale)
        cond, logits = _forward(params, t_in, l_in, m_in, positions)
        last = np.array([len(s) - 1 for s in seqs])
        cond, logits = cond[np.arange(rows), last], logits[np.arange(b), last[:b]]
        k_tok, k_noise = step_keys(rng, i, b)
        tok = np.asarray(sample_tokens(logits, k_tok, settings.temperature, settings.top_p))
        x_T = jnp.stack([jax.random.normal(k, (C,)) for k in k_noise])
        x0 = np.asarray(_solve_jit(params, cond, x_T, settings))
        for e in range(b):
            if done[e]:
                continue
            count[e] += 1
            stop_p = None if settings.latent_stop_id is None else jax.nn.softmax(logits[e])[settings.latent_stop_id]
            if mode[e] and (stop_p is None or stop_p < 0.5):
                item = x0[e]
                latents[e, i], is_lat[e, i] = item, True
                n_lat[e] += 1
                mode[e] = n_lat[e] < settings.num_latents
            elif mode[e]:  # speech mode: the LM head ends the span
                item = tokens[e, i] = settings.latent_stop_id
                mode[e] = False
                done[e] = item in settings.stop_ids
            else:
                item = int(tok[e])
                tokens[e, i] = item
                mode[e], n_lat[e] = (True, 0) if item == settings.boi_id else (False, n_lat[e])
                done[e] = item in settings.stop_ids
            seqs[e].append(item)
            if null_prompts:
                seqs[b + e].append(item)
    return tokens, latents, is_lat, count


def reference_generate_codes(params, prompts, rng, settings, null_prompts=None):
    """Code mode's contract, recomputed with CODE_MODEL's teacher-forced forward over token rows: image items are
    code tokens; text mode samples from the logits with the code range at −inf, latent mode from the code range
    alone, guided as u + s·(c − u) on the [conditional; null] rows' logits, each with the element's token key; the
    emitted item is appended to both of the element's rows."""
    offset, count = settings.image_codes
    is_code = lambda item: offset <= item < offset + count
    b = len(prompts)
    seqs = [list(p) for p in prompts] + [list(p) for p in (null_prompts or [])]
    mode, n_lat = map(list, zip(*[_mode_after(p, is_code) for p in prompts]))
    done = [False] * b
    tokens = np.zeros((b, settings.max_new), np.int32)
    is_lat = np.zeros((b, settings.max_new), bool)
    count_out = np.zeros(b, np.int32)
    for i in range(settings.max_new):
        if all(done):
            break
        t_in = np.zeros((len(seqs), REF_LEN), np.int32)
        for r, seq in enumerate(seqs):
            t_in[r, :len(seq)] = seq
        logits = np.asarray(_code_forward(params, t_in))[np.arange(len(seqs)), [len(s) - 1 for s in seqs]]
        text = logits[:b].copy()
        text[:, offset:offset + count] = -np.inf
        c = logits[:b, offset:offset + count]
        code = c if null_prompts is None else (logits[b:, offset:offset + count]
                                               + settings.cfg_scale * (c - logits[b:, offset:offset + count]))
        k_tok, _ = step_keys(rng, i, b)
        tok = np.asarray(sample_tokens(jnp.asarray(text), k_tok, settings.temperature, settings.top_p))
        code = offset + np.asarray(sample_tokens(jnp.asarray(code), k_tok, settings.temperature, settings.top_p))
        for e in range(b):
            if done[e]:
                continue
            count_out[e] += 1
            if mode[e]:
                item = int(code[e])
                is_lat[e, i] = True
                n_lat[e] += 1
                mode[e] = n_lat[e] < N
            else:
                item = int(tok[e])
                mode[e], n_lat[e] = (True, 0) if item == settings.boi_id else (False, n_lat[e])
                done[e] = item in settings.stop_ids
            tokens[e, i] = item
            seqs[e].append(item)
            if null_prompts:
                seqs[b + e].append(item)
    return tokens, np.zeros((b, settings.max_new, C), np.float32), is_lat, count_out


def _check_against_reference(out, ref):
    tokens, latents, is_lat, count = ref
    np.testing.assert_array_equal(out.num_generated, count)
    np.testing.assert_array_equal(out.is_latent, is_lat)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.latents, latents, atol=1e-4, rtol=1e-4)


def _pattern(out, e, codes=False) -> list:
    """Element e's generated items, latents as LATENT (with `codes`: image items as their code tokens)."""
    return [LATENT if out.is_latent[e, j] and not codes else int(out.tokens[e, j])
            for j in range(int(out.num_generated[e]))]


# ---------------------------------------------------------------------------------------------------------------

GREEDY = GenerationSettings(max_new=MAX_NEW, num_latents=N, num_steps=2, prediction_type="v_prediction")


@pytest.fixture(scope="module")
def programmed():
    params = _programmed_params()
    out = make_generator(MODEL, SCHEDULE, GREEDY)(params, make_prompt(PROMPTS, C), jax.random.PRNGKey(1))
    return params, jax.device_get(out)


def test_greedy_mixed_batch_switches_modality_and_matches_reference(programmed):
    params, out = programmed
    z = LATENT
    # The model's own tokens: <boi> switches to latents, after N latents it emits <eoi> (not forced), <eos> stops.
    assert _pattern(out, 0) == [8, 9, BOI_ID, z, z, EOI, 10, EOS_ID]
    assert _pattern(out, 1) == [12, 11] * (MAX_NEW // 2)  # never stops: max_new
    assert _pattern(out, 2) == [z, z, EOI, 10, EOS_ID]  # the prompt ended with <boi>
    assert _pattern(out, 3) == [z, EOI, 10, EOS_ID]  # the prompt held 1 of the N latents
    assert np.all(out.tokens[0, 8:] == 0) and not out.is_latent[0, 8:].any()  # <pad> after the stop
    assert np.abs(out.latents[out.is_latent]).min() > 0 and np.all(np.isfinite(out.latents))
    _check_against_reference(out, reference_generate(params, PROMPTS, jax.random.PRNGKey(1), GREEDY))


def test_prompt_alone_equals_prompt_left_padded_in_batch(programmed):
    """Element 0 (width 1) was left-padded by 4 slots in the batch; alone it has no padding."""
    params, batched = programmed
    alone = make_generator(MODEL, SCHEDULE, GREEDY)(params, make_prompt(PROMPTS[:1], C), jax.random.PRNGKey(1))
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[0])
    np.testing.assert_array_equal(alone.is_latent[0], batched.is_latent[0])
    np.testing.assert_allclose(alone.latents[0], batched.latents[0], atol=1e-5, rtol=1e-5)
    assert int(alone.num_generated[0]) == int(batched.num_generated[0]) == 8


def test_cfg_with_null_prompt_of_another_width(programmed):
    params, unguided = programmed
    settings = GenerationSettings(max_new=MAX_NEW, num_latents=N, num_steps=2, prediction_type="v_prediction",
                                  cfg_scale=3.0)
    # Text-to-image prompts (width 5) against "<bos><null><boi>" (width 3); element 3 is plain text (its text comes
    # from the conditional rows alone), element 1 continues an image in both halves.
    prompts = [[BOS, 8, 9, BOI_ID], [BOS, 8, 9, BOI_ID, Z0], PROMPTS[2], [BOS, 11]]
    nulls = [[BOS, NULL, BOI_ID], [BOS, NULL, BOI_ID, Z0], [BOS, NULL, BOI_ID], [BOS, NULL]]
    rng = jax.random.PRNGKey(1)
    out = jax.device_get(make_generator(MODEL, SCHEDULE, settings)(params, make_prompt(prompts, C), rng,
                                                                    make_prompt(nulls, C)))
    z = LATENT
    assert [_pattern(out, e) for e in range(3)] == [[z, z, EOI, 10, EOS_ID], [z, EOI, 10, EOS_ID],
                                                    [z, z, EOI, 10, EOS_ID]]
    assert _pattern(out, 3) == [12, 11] * (MAX_NEW // 2)
    _check_against_reference(out, reference_generate(params, prompts, rng, settings, nulls))
    # Guidance is on: element 2 (same prompt, same slot, same keys as in the unguided batch) samples other latents.
    assert np.abs(out.latents[2, :2] - unguided.latents[2, :2]).max() > 1e-3


def test_top_p_sampling_matches_reference():
    """Random weights (near-uniform logits over 16 ids), temperature 1.5, top-p 0.9: the draws, the switches they
    cause and the stops all match the reference."""
    params = jax.tree.map(jnp.asarray, _random_params(3, std=0.3))
    settings = GenerationSettings(max_new=MAX_NEW, num_latents=N, num_steps=2, prediction_type="v_prediction",
                                  temperature=1.5, top_p=0.9, stop_ids=(EOS_ID, 15))
    prompts = [[BOS, 5, 6], [BOS], PROMPTS[2], [BOS, 12, 9, 4, 3, 7]]
    rng = jax.random.PRNGKey(4)
    out = jax.device_get(make_generator(MODEL, SCHEDULE, settings)(params, make_prompt(prompts, C), rng))
    _check_against_reference(out, reference_generate(params, prompts, rng, settings))
    made = np.arange(MAX_NEW)[None] < out.num_generated[:, None]
    assert out.is_latent.any() and len(set(out.tokens[made & ~out.is_latent].tolist())) > 4  # both modes, varied text


def _speech_params():
    """The greedy program plus a stop rule for speech spans: a latent's first value writes 10·z₀ into dimension 17,
    and the `<eod>` column of the LM head is `<eoi>`'s (its rival after a latent), less 1 on the latent direction, plus
    3 on dimension 17: after a latent the LM head gives p(`<eod>`) ≥ 1/2 roughly when z₀ > 0."""
    params = jax.tree.map(np.array, _programmed_params(0))
    p = params["params"]
    p["x_embedder"]["kernel"][0] = 0.0
    p["x_embedder"]["kernel"][0, 17] = 10.0
    head = p["lm_head"]["kernel"]
    head[:, EOD] = head[:, EOI]
    head[17, EOD] += 3.0
    head[16, EOD] -= 1.0
    return jax.tree.map(jnp.asarray, params)


SPEECH_PROMPTS = [[BOS, 5, BOD], [BOS, 11, BOD, Z0], [BOS, 12, 3, 4, BOD], [BOS, 7, 9, BOD, -Z0]]


def _speech_settings(restart: bool = False, scale: float = 1.0) -> GenerationSettings:
    return GenerationSettings(max_new=11, num_latents=8, num_steps=2, prediction_type="v_prediction", boi_id=BOD,
                              latent_stop_id=EOD, stop_ids=(EOD, EOS_ID), restart_positions=restart,
                              span_position_scale=scale)


def test_speech_mode_lm_head_ends_spans_and_matches_reference():
    """Speech spans (docs/method.md §12.3): `<bod>` opens a span of no fixed length; before each latent the LM head's
    p(`<eod>`) decides whether the span ends (≥ 1/2: `<eod>` is emitted as a text item and stops the element). Spans
    end where the model says (after 1, 0 and 4 new latents here), or at `num_latents`, back in text mode."""
    params, settings = _speech_params(), _speech_settings()
    rng = jax.random.PRNGKey(2)
    out = jax.device_get(make_generator(MODEL, SCHEDULE, settings)(params, make_prompt(SPEECH_PROMPTS, C), rng))
    _check_against_reference(out, reference_generate(params, SPEECH_PROMPTS, rng, settings))
    z = LATENT
    assert _pattern(out, 0) == [z, EOD]
    assert _pattern(out, 1) == [EOD]  # the prompt's last latent has z₀ = 0.3 > 0
    assert _pattern(out, 2)[:9] == [z] * 8 + [4]  # the longest span, then text mode
    assert _pattern(out, 3) == [z, z, z, z, EOD]


def test_restarted_positions_match_training_and_change_the_latents():
    """`restart_positions` (docs/method.md §12.2): the compiled loop's RoPE positions count again from each prompt's
    `<bod>`, left padding and the null prompt's other width included, exactly as `batches.restart_positions` gives
    training (the reference's positions), scaled from there by `span_position_scale` as well; the latents then differ
    from those of positions that run on, and scaled from unscaled ones."""
    params, settings = _speech_params(), _speech_settings(restart=True)
    rng = jax.random.PRNGKey(2)
    nulls = [[BOS, NULL, BOD]] * 2 + [[BOS, NULL, BOD, Z0]] * 2
    guided = dataclasses.replace(settings, cfg_scale=2.0)
    outs = []
    for s, null in ((settings, None), (guided, nulls)):
        run = make_generator(MODEL, SCHEDULE, s)
        outs.append(jax.device_get(run(params, make_prompt(SPEECH_PROMPTS, C), rng,
                                       None if null is None else make_prompt(null, C))))
        _check_against_reference(outs[-1], reference_generate(params, SPEECH_PROMPTS, rng, s, null))
    plain = jax.device_get(make_generator(MODEL, SCHEDULE, _speech_settings())(
        params, make_prompt(SPEECH_PROMPTS, C), rng))
    scaled_settings = _speech_settings(restart=True, scale=1.5)
    scaled = jax.device_get(make_generator(MODEL, SCHEDULE, scaled_settings)(params, make_prompt(SPEECH_PROMPTS, C),
                                                                             rng))
    _check_against_reference(scaled, reference_generate(params, SPEECH_PROMPTS, rng, scaled_settings))
    restarted = outs[0]
    for other in (plain, scaled):
        first = restarted.is_latent[:, 0] & other.is_latent[:, 0]
        assert first.any() and not np.allclose(restarted.latents[first, 0], other.latents[first, 0], atol=1e-3)


def test_top_p_filter():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = jnp.asarray(np.log(probs))[None].repeat(4, 0)
    kept = np.isfinite(np.asarray(jax.vmap(top_p_filter)(logits, jnp.array([0.3, 0.75, 0.85, 1.0]))))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    # Draws come from the kept set only, in proportion to the renormalised probabilities.
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = np.asarray(sample_tokens(logits[:1].repeat(4000, 0), keys, 1.0, 0.75))
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)


def test_settings_and_guidance_checks():
    with pytest.raises(ValueError):
        GenerationSettings(max_new=0, num_latents=N)
    with pytest.raises(ValueError):
        GenerationSettings(max_new=4, num_latents=N, top_p=0.0)
    with pytest.raises(ValueError, match="span_position_scale"):
        GenerationSettings(max_new=4, num_latents=N, restart_positions=True, span_position_scale=0.0)
    gen = make_generator(MODEL, SCHEDULE, GREEDY)  # no cfg_scale: a null prompt is an error, not silently ignored
    prompt = make_prompt([[BOS]], C)
    with pytest.raises(ValueError, match="null prompt"):
        gen(_random_params(), prompt, jax.random.PRNGKey(0), prompt)


# ---------------------------------------------------------------------------------------------------------------
# Code mode (the VQ arm, docs/method.md §8.5, §9.4): image items are the code tokens 16…21 of a 22-id LM head.

CODES = (16, 6)  # (offset, count)
CODE_MODEL = LatentLM(dataclasses.replace(CFG, text_vocab_size=22))
# Greedy program: text as PROGRAM; code k → <eoi> first, code k+1 second (what code mode picks); <boi> → code 16 (the
# first image item); 11 → code 19 first, 12 second, so text mode's code mask is what keeps it text.
CODE_PROGRAM = {BOS: [8], 8: [9], 9: [BOI_ID], EOI: [10], 10: [EOS_ID], 12: [11], 13: [BOI_ID], NULL: [BOI_ID],
                EOS_ID: [EOS_ID], BOI_ID: [None, 16], 11: [19, 12],
                **{k: [EOI, 16 + (k - 15) % 6] for k in range(16, 22)}}
CODE_PROMPTS = [[BOS], [BOS, 11], [BOS, 13, BOI_ID], [BOS, 8, 9, BOI_ID, 20]]  # the last ends inside an image


@jax.jit
def _code_forward(params, toks):
    _, hidden = CODE_MODEL.apply(params, toks, jnp.zeros(toks.shape + (C,)), jnp.zeros(toks.shape, bool))
    return CODE_MODEL.apply(params, hidden, method=LatentLM.lm_logits)


def _code_lm_only(params):
    """The VQ arm's parameter tree: token embedding, backbone and LM head only (no x_embedder, ConditionLayer or
    diffusion head), so code mode must never touch the others."""
    return {"params": {k: params["params"][k] for k in ("token_embed", "backbone", "lm_head")}}


def _code_programmed_params(seed=0):
    params = _random_params(seed, model=CODE_MODEL)
    p = params["params"]
    p["token_embed"]["embedding"] = np.zeros_like(p["token_embed"]["embedding"])
    p["token_embed"]["embedding"][np.arange(22), np.arange(22)] = 10.0
    for src, dsts in CODE_PROGRAM.items():
        for dst, bump in zip(dsts, (3.0, 2.0)):
            if dst is not None:
                p["lm_head"]["kernel"][src, dst] += bump
    return jax.tree.map(jnp.asarray, params)


CODE_GREEDY = dataclasses.replace(GREEDY, image_codes=CODES)


def test_code_mode_greedy_emits_codes_as_tokens_and_matches_reference():
    params = _code_programmed_params()
    rng = jax.random.PRNGKey(1)
    out = jax.device_get(make_generator(CODE_MODEL, SCHEDULE, CODE_GREEDY)(_code_lm_only(params),
                                                                          make_prompt(CODE_PROMPTS, C), rng))
    pattern = [_pattern(out, e, codes=True) for e in range(4)]
    # <boi> → N codes drawn from the code range (fed back as tokens) → <eoi> by the model itself → text.
    assert pattern[0] == [8, 9, BOI_ID, 16, 17, EOI, 10, EOS_ID]
    assert pattern[1] == [12, 11] * (MAX_NEW // 2)  # 11's top id is code 19: masked out in text mode
    assert pattern[2] == [16, 17, EOI, 10, EOS_ID]
    assert pattern[3] == [21, EOI, 10, EOS_ID]  # the prompt held 1 of the N codes
    np.testing.assert_array_equal(out.is_latent[0, :8], [0, 0, 0, 1, 1, 0, 0, 0])  # image items stay marked
    assert not out.latents.any()
    _check_against_reference(out, reference_generate(params, CODE_PROMPTS, rng, CODE_GREEDY))


def test_code_mode_sampling_with_cfg_on_logits_matches_reference():
    """Random weights, temperature 1.5, top-p 0.95: text draws never hit the code range (6 of 22 ids, unmasked they
    would), image draws always do; with a null prompt of another width the code draws follow u + s·(c − u) of the
    logits (the reference writes it out) and differ from the unguided ones under the same keys."""
    params = jax.tree.map(jnp.asarray, _random_params(3, std=0.3, model=CODE_MODEL))
    settings = dataclasses.replace(GREEDY, image_codes=CODES, temperature=1.5, top_p=0.95, cfg_scale=3.0)
    prompts = [[BOS, 8, 9, BOI_ID], [BOS, 8, 9, BOI_ID, 20], [BOS, 13, BOI_ID], [BOS, 5, 6]]
    nulls = [[BOS, NULL, BOI_ID], [BOS, NULL, BOI_ID, 20], [BOS, NULL, BOI_ID], [BOS, NULL]]
    rng = jax.random.PRNGKey(4)
    gen = make_generator(CODE_MODEL, SCHEDULE, settings)
    out = jax.device_get(gen(_code_lm_only(params), make_prompt(prompts, C), rng, make_prompt(nulls, C)))
    _check_against_reference(out, reference_generate(params, prompts, rng, settings, nulls))
    made = np.arange(MAX_NEW)[None] < out.num_generated[:, None]
    code = (out.tokens >= 16) & (out.tokens < 22)
    np.testing.assert_array_equal(code & made, out.is_latent & made)
    assert out.is_latent.sum() == 5 and (made & ~out.is_latent).sum() >= 10  # both images, then text
    unguided = dataclasses.replace(settings, cfg_scale=None)
    plain = jax.device_get(make_generator(CODE_MODEL, SCHEDULE, unguided)(_code_lm_only(params),
                                                                          make_prompt(prompts, C), rng))
    _check_against_reference(plain, reference_generate(params, prompts, rng, unguided))
    assert (out.tokens[:3, 0] != plain.tokens[:3, 0]).any()  # the first code of each image, same key


def test_code_masks_guidance_and_settings():
    settings = dataclasses.replace(GREEDY, image_codes=CODES, cfg_scale=2.0)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 22)), jnp.float32)  # rows [c0, c1, u0, u1]
    masked = np.asarray(mask_codes(logits, settings))
    assert np.isneginf(masked[:, 16:]).all() and np.array_equal(masked[:, :16], np.asarray(logits)[:, :16])
    c, u = np.asarray(logits)[:2, 16:], np.asarray(logits)[2:, 16:]
    np.testing.assert_allclose(guided_code_logits(logits, settings, 2), u + 2.0 * (c - u), rtol=1e-6)
    # Guiding log-probabilities instead of logits shifts each row by a constant: the same distribution.
    logp = jax.nn.log_softmax(logits, -1)
    np.testing.assert_allclose(jax.nn.softmax(guided_code_logits(logp, settings, 2)),
                               jax.nn.softmax(u + 2.0 * (c - u)), rtol=1e-5)
    assert np.array_equal(mask_codes(logits, GREEDY), logits)  # no code mode, no mask
    for bad in [(16, 0), (-1, 4), (0, 8)]:  # empty range, negative offset, a range holding <boi>/<eos>/<pad>
        with pytest.raises(ValueError):
            dataclasses.replace(GREEDY, image_codes=bad)
    gen = make_generator(MODEL, SCHEDULE, dataclasses.replace(GREEDY, image_codes=(16, 6)))  # past 16 LM ids
    with pytest.raises(ValueError, match="image_codes"):
        gen(_random_params(), make_prompt([[BOS]], C), jax.random.PRNGKey(0))
