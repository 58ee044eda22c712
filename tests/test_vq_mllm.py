"""The VQ-MLLM baseline (docs/method.md §9.4): FSQ grid vectors ↔ code tokens after the text ids, the packed batch
(codes at image positions, next-token targets split into text and codes), the CE loss written out by hand against the
model's own teacher-forced forward, a parameter tree without the diffusion head, FLOPs against the tree and XLA, and
the `arm=vq` config and its checks. Code-mode generation is checked in tests/test_generation.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.mllm import get_config
from latent_lm.config_validation import validate
from latent_lm.errors import ConfigError
from latent_lm.experiment import STAGES
from latent_lm.latents import LatentNormalization
from latent_lm.models import fsq
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.text.tokenizer import SPECIAL_TOKENS
from latent_lm.training.batches import segment_positions
from latent_lm.diffusion import make_schedule
from latent_lm.generation import GenerationSettings, Prompt, generate
from latent_lm.training.flops import (latent_lm_sample_flops_per_image, vq_matmul_params, vq_sample_flops_per_image,
                                      vq_train_flops_per_step)
from latent_lm.training.tasks import GENERATOR_TASKS, MultimodalTask, VQMultimodalTask, make_generator_task
from latent_lm.training.tasks.vq_mllm import CODE_LM_PARAMS, token_logits


PAD, BOS, EOS, BOI, EOI, NULL = (SPECIAL_TOKENS.index(t) for t in ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>",
                                                                   "<null>"))
L = -1  # an image position in the layouts below
LEVELS = (3, 3, 3, 3)  # 81 codes, C = 4
TEXT_VOCAB = 40
T, C, N = 24, 4, 4  # row length, channels, codes per image
K = fsq.codebook_size(LEVELS)
MODEL = LatentLM(LatentLMConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, latent_dim=C, head_depth=1,
                                text_vocab_size=TEXT_VOCAB + K, max_len=T))
T2I = [BOS, NULL, BOI, L, L, L, L, EOI, EOS]
I2T = [BOS, BOI, L, L, L, L, EOI, 20, 21, EOS]
NORM = LatentNormalization(scale=1.0, bias=0.0)


def _task(model=MODEL, seq_len=T):
    return VQMultimodalTask(model=model, levels=LEVELS, code_offset=TEXT_VOCAB, norm=NORM, seq_len=seq_len,
                            head_capacity=2 * N, num_latents=N, dataset="mnist", documents={})


def _rows(codes, *docs):
    """One packed row per code list: documents' tokens (L → an image position holding the code's grid vector),
    segment ids and positions, as the data path yields them (`<pad>` at image positions)."""
    items = [(x, s + 1) for s, doc in enumerate(docs) for x in doc]
    items += [(PAD, 0)] * (T - len(items))
    is_latent = np.array([x == L for x, _ in items])
    tokens = np.array([0 if x == L else x for x, _ in items], np.int32)
    seg = np.array([s for _, s in items], np.int32)
    pos = np.asarray(segment_positions(jnp.asarray(seg)[None]))[0]
    latents = np.zeros((len(codes), T, C), np.float32)
    latents[:, is_latent] = np.asarray(fsq.latents_from_codes(jnp.asarray(codes), LEVELS))
    rep = lambda x: jnp.asarray(np.repeat(x[None], len(codes), 0))
    return dict(tokens=rep(tokens), is_latent=rep(is_latent), latents=jnp.asarray(latents), segment_ids=rep(seg),
                positions=rep(pos))


def _full_random_params(seed=0, std=0.2):
    """Every LatentLM leaf N(0, std²), the diffusion head included (shapes from eval_shape)."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32),
                                       jnp.zeros((1, T, C)), jnp.zeros((1, T), bool)))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), abstract)


def test_codes_and_tokens_round_trip():
    """Every code → its grid vector (as the FSQ cache holds it) → token code_offset + code → the same grid vector;
    text positions keep their ids."""
    task = _task()
    codes = jnp.arange(K)
    grid = fsq.latents_from_codes(codes, LEVELS)
    tokens = task.code_tokens(jnp.full((K,), 7), grid, jnp.ones((K,), bool))
    np.testing.assert_array_equal(tokens, TEXT_VOCAB + np.arange(K))
    np.testing.assert_array_equal(task.image_latents(tokens), grid)
    np.testing.assert_array_equal(task.code_tokens(jnp.arange(K), grid, jnp.zeros((K,), bool)), np.arange(K))
    assert task.image_codes == (TEXT_VOCAB, K) and task.codebook_size == 81


def test_batch_puts_codes_at_image_positions_and_targets_the_next_token():
    """Two packed documents: <boi> predicts code 1, codes predict the next code, code N predicts <eoi> (text), <null>
    and padding are never targets, a document's last position predicts nothing."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, K, size=(2, 2 * N))
    raw = _rows(codes, T2I, I2T)
    b = jax.device_get(_task().make_batch(raw))
    image_at = np.flatnonzero(np.asarray(raw["is_latent"][0]))
    np.testing.assert_array_equal(b["tokens"][:, image_at], TEXT_VOCAB + codes)
    text_at = np.setdiff1d(np.arange(T), image_at)
    np.testing.assert_array_equal(b["tokens"][:, text_at], np.asarray(raw["tokens"])[:, text_at])
    # T2I occupies 0…8, I2T 9…18. Targets: <null>→<boi> (1), <boi>→z1…z3→z4 (2…5), z4→<eoi> (6), <eoi>→<eos> (7);
    # <bos>→<boi> (9), <boi>→z1… (10…13), z4→<eoi> (14), <eoi>→20→21→<eos> (15…17). <bos>→<null> (0) is ignored.
    want_image = [2, 3, 4, 5, 10, 11, 12, 13]
    want_text = [1, 6, 7, 9, 14, 15, 16, 17]
    for r in range(2):
        np.testing.assert_array_equal(np.flatnonzero(b["image_mask"][r]), want_image)
        np.testing.assert_array_equal(np.flatnonzero(b["text_mask"][r]), want_text)
        np.testing.assert_array_equal(np.flatnonzero(b["mask"][r]), sorted(want_image + want_text))
        np.testing.assert_array_equal(b["targets"][r, want_image], TEXT_VOCAB + codes[r])
        np.testing.assert_array_equal(b["targets"][r, want_text], [BOI, EOI, EOS, BOI, EOI, 20, 21, EOS])


def test_loss_is_mean_cross_entropy_over_text_and_code_targets():
    """The loss recomputed in NumPy from LatentLM's own teacher-forced forward (full parameter tree, every position a
    token), with the targets written out; the task runs on the pruned tree."""
    full = _full_random_params()
    codes = np.random.default_rng(1).integers(0, K, size=(3, 2 * N))
    raw = _rows(codes, T2I, I2T)
    task = _task()
    params = {"params": {k: full["params"][k] for k in CODE_LM_PARAMS}}
    loss, metrics = task.loss(params, raw, jax.random.PRNGKey(0))

    tokens = np.asarray(raw["tokens"]).copy()
    tokens[np.asarray(raw["is_latent"])] = (TEXT_VOCAB + codes).reshape(-1)
    _, hidden = MODEL.apply(full, jnp.asarray(tokens), jnp.zeros((3, T, C)), jnp.zeros((3, T), bool),
                            raw["positions"], raw["segment_ids"])
    logits = np.asarray(MODEL.apply(full, hidden, method=LatentLM.lm_logits), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    image_at, text_at = [2, 3, 4, 5, 10, 11, 12, 13], [1, 6, 7, 9, 14, 15, 16, 17]
    nll = lambda at: np.stack([-logp[r, at, tokens[r, np.asarray(at) + 1]] for r in range(3)])
    image, text = nll(image_at), nll(text_at)
    np.testing.assert_allclose(loss, np.concatenate([image, text], 1).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["ce_loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["image_ce"], image.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["text_ce"], text.mean(), rtol=1e-5)
    assert loss > 0.5 * np.log(TEXT_VOCAB + K)  # random weights: near-uniform over text and codes


def test_parameters_have_no_diffusion_head_and_flops_match_the_tree_and_xla():
    """(1) init creates only the token embedding, backbone and LM head; every kernel acts once per position.
    (2) XLA's count of the lowered gradient (depth 1: a scan body counts once) agrees within 2 %. (3) Inference per
    image: the prompt once, N × (LM head + one backbone position), doubled by CFG."""
    task = _task()
    shapes = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))["params"]
    assert set(shapes) == set(CODE_LM_PARAMS)
    kernels = sum(int(np.prod(x.shape)) for p, x in traverse_util.flatten_dict(shapes, sep="/").items()
                  if p.endswith("kernel"))
    w = vq_matmul_params(MODEL.config)
    assert w["layers"] + w["lm"] == kernels
    want = 6 * kernels * T * 3 + 12 * MODEL.config.depth * MODEL.config.width * T * T * 3
    assert vq_train_flops_per_step(MODEL.config, 3, T)["total"] == want
    assert task.train_flops_per_example() == vq_train_flops_per_step(MODEL.config, 1, T)["total"]

    small = LatentLMConfig(width=256, depth=1, num_heads=4, latent_dim=C, head_depth=1, text_vocab_size=64 + K,
                           max_len=64)
    b, t = 2, 64
    big = _task(LatentLM(small), t)
    raw = dict(tokens=jax.ShapeDtypeStruct((b, t), jnp.int32), is_latent=jax.ShapeDtypeStruct((b, t), bool),
               latents=jax.ShapeDtypeStruct((b, t, C), jnp.float32),
               segment_ids=jax.ShapeDtypeStruct((b, t), jnp.int32), positions=jax.ShapeDtypeStruct((b, t), jnp.int32))
    params = nn.unbox(jax.eval_shape(big.init_params, jax.random.PRNGKey(0)))
    cost = jax.jit(jax.grad(lambda p, r: big.loss(p, r, jax.random.PRNGKey(0))[0])).lower(params, raw).cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = vq_train_flops_per_step(small, b, t)["total"]
    assert abs(xla - ours) / ours < 0.02, (xla, ours)

    p, n, d = 9, N, MODEL.config
    one = vq_sample_flops_per_image(d, p, n, guidance=False)
    slots = p + n
    assert one["prefill"] == 2 * w["layers"] * p + 4 * d.depth * d.width * p * slots
    assert one["decode"] == n * (2 * (w["layers"] + w["lm"]) + 4 * d.depth * d.width * slots)
    assert vq_sample_flops_per_image(d, p, n)["total"] == 2 * one["total"] == 2 * task.sample_flops_per_image(p, False)


def test_inference_flops_per_image_match_xla_for_both_arms():
    """The compiled generation loop of a 16-item text-to-image prompt with CFG, lowered with max_new = N = 1 and one
    solver step (XLA counts a loop body once): code mode against `vq_sample_flops_per_image`, latent mode against
    `latent_lm_sample_flops_per_image`, each within 2 % (measured 0.7 % and 1.0 %: elementwise work, the text
    branch's LM head, which the count leaves out as the loop skips it, and the head's timestep embedding, once per
    solver step for the whole batch, which the per-image count leaves out)."""
    s = jax.ShapeDtypeStruct
    p = 16
    prompt = Prompt(s((1, p), jnp.int32), s((1, p, C), jnp.float32), s((1, p), bool), s((1,), jnp.int32))
    for codes in (True, False):
        cfg = LatentLMConfig(width=256, depth=1, num_heads=4, latent_dim=C, head_depth=2,
                             text_vocab_size=64 + (K if codes else 0), max_len=64)
        model = LatentLM(cfg)
        if codes:
            init = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32), method=token_logits)
        else:
            init = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8, C)), jnp.zeros((1, 8), bool))
        params = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
        settings = GenerationSettings(max_new=1, num_latents=1, num_steps=1, cfg_scale=3.0,
                                      image_codes=(64, K) if codes else None)
        run = jax.jit(lambda prm, pr, r, null: generate(model, prm, pr, r, make_schedule("cosine", 1000), settings,
                                                        null))
        cost = run.lower(params, prompt, jax.random.PRNGKey(0), prompt).cost_analysis()
        xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
        ours = (vq_sample_flops_per_image(cfg, p, 1) if codes else latent_lm_sample_flops_per_image(cfg, p, 1, 1))
        assert abs(xla - ours["total"]) / ours["total"] < 0.02, (codes, xla, ours)


def test_vq_arm_config_matches_the_latentlm_arm_and_validates():
    vq, base = get_config("arm=vq"), get_config("arm=latentlm")
    validate(vq, STAGES)
    assert GENERATOR_TASKS["vq"] is VQMultimodalTask
    assert (vq.vae.kind, tuple(vq.vae.fsq_levels), vq.vae.latent_dim, vq.model.latent_dim) == ("fsq", (8, 5, 5, 5),
                                                                                               4, 4)
    assert vq.model.text_vocab_size == vq.text.vocab_size + 1000 and vq.model.arch == "vq"
    same = lambda c: (c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_ratio, c.model.max_len,
                      c.model.head_capacity, c.train.to_dict(), c.optim.to_dict(), c.data.to_dict(),
                      c.documents.to_dict(), c.text.to_dict(), tuple(c.stages), c.vae.width, c.vae.patch_size,
                      c.vae_train.to_dict())
    assert same(vq) == same(base)
    assert get_config("arm=transfusion").model.arch == "transfusion"
    tiny = get_config("arm=vq,tiny=1")
    validate(tiny, STAGES)
    task = make_generator_task(tiny, NORM)
    assert isinstance(task, VQMultimodalTask) and task.image_codes == (tiny.text.vocab_size, 1000)
    assert task.num_latents == 49 and task.make_dataset.__func__ is MultimodalTask.make_dataset
    for edit, words in [(lambda c: c.vae.update(dict(kind="sigma")), "fsq"),
                        (lambda c: c.model.update(dict(text_vocab_size=c.text.vocab_size)), "codebook"),
                        (lambda c: c.vae.update(dict(fsq_levels=(8, 5, 5))), "fsq_levels"),
                        (lambda c: c.model.update(dict(max_len=40)), "max_len")]:
        bad = get_config("arm=vq,tiny=1")
        edit(bad)
        with pytest.raises(ConfigError, match=words):
            validate(bad, STAGES)
    with pytest.raises(ConfigError, match="arm"):
        get_config("arm=vqgan")
