"""Loss numerics of the generators (training/generator_losses.py, training/batches.py): the LatentLM loss recomputed
by hand from the same random draws (batch_mul copies in repeat_interleave order, masks, each term averaged over its
own targets), the class-token dropout of CFG training, and the DiT loss's label dropout."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_lm.diffusion import make_schedule
from latent_lm.models.dit import DiT, DiTConfig
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.training.batches import drop_class_tokens, drop_labels
from latent_lm.training.generator_losses import dit_loss, latent_lm_loss


SCHEDULE = make_schedule("cosine", 1000)
# 3 classes (ids 0..2), the null class 3, text ids from 4: [class][text text][latents ...] sequences.
CFG = LatentLMConfig(width=32, depth=1, num_heads=2, latent_dim=2, head_depth=1, num_classes=3, text_vocab_size=5,
                     max_len=6)
B, T, C = 3, 6, 2


def random_params(init, *args, seed=0, std=0.2):
    """N(0, std²) in every leaf, shapes from eval_shape (no compiled init: its RNG takes seconds to compile here);
    the zero-initialised head outputs are random too, else the head would ignore its input."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), *args))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), abstract)


MODEL = LatentLM(CFG)
# Jitted once per module (eager Flax applies of the scanned backbone are slow); the hand-written loss uses them.
_forward = jax.jit(MODEL.apply)
_diffuse = jax.jit(functools.partial(MODEL.apply, method=LatentLM.diffuse))
_logits = jax.jit(functools.partial(MODEL.apply, method=LatentLM.lm_logits))


@pytest.fixture(scope="module")
def lm():
    return MODEL, random_params(MODEL.init, jnp.zeros((1, T), jnp.int32), jnp.zeros((1, T, C)),
                                jnp.zeros((1, T), bool), seed=1)


def _batch(seed=0):
    """[class][text][text][z0][z1][z2]: text targets on positions 0–1, latent targets on 2–5, and the masks switch
    a few targets off (so the two terms have different, example-dependent target counts)."""
    rng = np.random.default_rng(seed)
    off = CFG.text_offset
    tokens = np.zeros((B, T), np.int32)
    tokens[:, 0] = rng.integers(0, CFG.num_classes, B)
    tokens[:, 1:3] = off + rng.integers(0, CFG.text_vocab_size, (B, 2))
    is_latent = np.zeros((B, T), bool)
    is_latent[:, 3:] = True
    latents = np.where(is_latent[..., None], rng.normal(size=(B, T, C)), 0.0).astype(np.float32)
    text_targets = np.zeros((B, T), np.int32)
    text_targets[:, :2] = rng.integers(0, CFG.text_vocab_size, (B, 2))
    text_mask = np.zeros((B, T), bool)
    text_mask[:, :2] = True
    text_mask[1, 1] = False
    latent_targets = rng.normal(size=(B, T, C)).astype(np.float32)
    latent_mask = np.zeros((B, T), bool)
    latent_mask[:, 2:] = True
    latent_mask[0, 4] = latent_mask[2, 2] = latent_mask[2, 5] = False
    return {k: jnp.asarray(v) for k, v in dict(tokens=tokens, latents=latents, is_latent=is_latent,
                                               text_targets=text_targets, text_mask=text_mask,
                                               latent_targets=latent_targets, latent_mask=latent_mask).items()}


@functools.lru_cache(maxsize=None)  # one compiled loss per setting
def _cached_loss_fn(model, kw):
    return jax.jit(lambda p, b, r: latent_lm_loss(model, p, b, r, schedule=SCHEDULE, **dict(kw)))


def _loss_fn(model, **kw):
    kw = dict(dict(prediction_type="v_prediction", batch_mul=3, class_dropout=0.0, diffusion_weight=0.7), **kw)
    return _cached_loss_fn(model, tuple(sorted(kw.items())))


def _by_hand(model, params, batch, rng, *, batch_mul, prediction_type, diffusion_weight=0.7, tokens=None,
             capacity=None):
    """The LatentLM loss written out from the spec with the loss's own draws: split(rng, 3) = (drop, t, ε); row r of
    the repeated batch is example r // batch_mul (adjacent copies), each row has its own t and ε per position.
    `capacity`: the head sees each row's first `capacity` latent targets in order (then unmasked slots), gathered."""
    _, rng_t, rng_eps = jax.random.split(rng, 3)
    tokens = batch["tokens"] if tokens is None else tokens
    cond, hidden = _forward(params, tokens, batch["latents"], batch["is_latent"])
    full_mask = np.asarray(batch["latent_mask"])
    idx = np.broadcast_to(np.arange(T), (B, T))
    if capacity is not None:
        idx = np.stack([np.concatenate([np.flatnonzero(m), np.flatnonzero(~m)])[:capacity] for m in full_mask])
    n = idx.shape[1]
    rows = B * batch_mul
    t = np.asarray(jax.random.randint(rng_t, (rows, n), 0, 1000))
    eps = np.asarray(jax.random.normal(rng_eps, (rows, n, C), jnp.float32))
    example = np.arange(rows) // batch_mul
    x0 = np.take_along_axis(np.asarray(batch["latent_targets"]), idx[..., None], 1)[example]
    ab = np.asarray(SCHEDULE.alphas_cumprod)[t][..., None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    target = eps if prediction_type == "epsilon" else np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
    cond = np.take_along_axis(np.asarray(cond), idx[..., None], 1)[example]
    out = np.asarray(_diffuse(params, jnp.asarray(x_t, jnp.float32), jnp.asarray(t), jnp.asarray(cond)))
    err = np.mean((out - target) ** 2, axis=-1)
    mask = np.take_along_axis(full_mask, idx, 1)[example]
    diffusion = err[mask].mean()  # over the latent targets only (every copy counts once)
    logp = np.asarray(jax.nn.log_softmax(_logits(params, hidden)))
    tmask = np.asarray(batch["text_mask"])
    nll = -np.take_along_axis(logp, np.asarray(batch["text_targets"])[..., None], -1)[..., 0]
    ce = nll[tmask].mean()  # over the text targets only
    return diffusion, ce, diffusion_weight * diffusion + ce


def test_latent_lm_loss_equals_the_loss_written_out(lm):
    """Every term, recomputed from the loss's own random draws: repeat_interleave order of the copies, per-copy t and
    ε, x_t and the v target (ε: the class-dropout test below), masked means over each term's own targets,
    L = λ·MSE + CE."""
    model, params = lm
    batch, rng = _batch(), jax.random.PRNGKey(3)
    loss, m = _loss_fn(model)(params, batch, rng)
    diffusion, ce, total = _by_hand(model, params, batch, rng, batch_mul=3, prediction_type="v_prediction")
    np.testing.assert_allclose(m["diffusion_loss"], diffusion, rtol=2e-5)
    np.testing.assert_allclose(m["ce_loss"], ce, rtol=2e-5)
    np.testing.assert_allclose(loss, total, rtol=2e-5)
    np.testing.assert_allclose(m["loss"], loss, rtol=0)
    # Text accuracy: argmax hits over the text targets only.
    logits = _logits(params, _forward(params, batch["tokens"], batch["latents"], batch["is_latent"])[1])
    hits = np.asarray(jnp.argmax(logits, -1) == batch["text_targets"])[np.asarray(batch["text_mask"])]
    np.testing.assert_allclose(m["text_accuracy"], hits.mean(), rtol=1e-6)


def test_speech_stop_term_joins_the_ce_written_out(lm):
    """`latent_stop_id` (docs/method.md §12.3): at the latents that another latent follows, −log(1 − p(stop)) is
    averaged with the text CE over both kinds of targets; the diffusion term is unchanged."""
    model, params = lm
    batch, rng = _batch(), jax.random.PRNGKey(3)
    stop = 2
    cmask = np.zeros((B, T), bool)
    cmask[:, 3:5] = True  # z0 and z1 are followed by latents
    cmask[1, 4] = False
    batch = dict(batch, continue_mask=jnp.asarray(cmask))
    loss, m = _loss_fn(model, latent_stop_id=stop)(params, batch, rng)
    diffusion, _, _ = _by_hand(model, params, batch, rng, batch_mul=3, prediction_type="v_prediction")
    logp = np.asarray(jax.nn.log_softmax(_logits(params, _forward(params, batch["tokens"], batch["latents"],
                                                                   batch["is_latent"])[1])), np.float64)
    tmask = np.asarray(batch["text_mask"])
    nll = -np.take_along_axis(logp, np.asarray(batch["text_targets"])[..., None], -1)[..., 0]
    go_on = -np.log(1 - np.exp(logp[..., stop]))
    ce = (nll[tmask].sum() + go_on[cmask].sum()) / (tmask.sum() + cmask.sum())
    np.testing.assert_allclose(m["ce_loss"], ce, rtol=2e-5)
    np.testing.assert_allclose(loss, 0.7 * diffusion + ce, rtol=2e-5)
    np.testing.assert_allclose(m["stop_accuracy"], (np.exp(logp[..., stop]) < 0.5)[cmask].mean(), rtol=1e-6)


@pytest.mark.parametrize("capacity", [4, 3])
def test_gathered_head_equals_the_loss_written_out(lm, capacity):
    """`head_capacity`: the head runs on each row's first `capacity` latent targets, gathered in order, with draws of
    shape [B·m, capacity]; rows with more targets lose the rest, counted as `head_overflow` (rows hold 3, 4 and 2)."""
    model, params = lm
    batch, rng = _batch(), jax.random.PRNGKey(5)
    loss, m = _loss_fn(model, head_capacity=capacity)(params, batch, rng)
    diffusion, ce, total = _by_hand(model, params, batch, rng, batch_mul=3, prediction_type="v_prediction",
                                    capacity=capacity)
    np.testing.assert_allclose(m["diffusion_loss"], diffusion, rtol=2e-5)
    np.testing.assert_allclose(loss, total, rtol=2e-5)
    assert int(m["head_overflow"]) == (1 if capacity == 3 else 0)


def test_batch_mul_copies_are_adjacent(lm):
    """batch_mul=3 is the loss of the batch repeated example by example (x0 x0 x0 x1 x1 x1 …) with batch_mul=1 (the
    draws have the same shapes, so they are the same numbers), and not of the batch tiled (x0 x1 x2 x0 …)."""
    model, params = lm
    batch, rng = _batch(), jax.random.PRNGKey(4)
    _, m3 = _loss_fn(model, batch_mul=3)(params, batch, rng)
    one = _loss_fn(model, batch_mul=1)
    _, adjacent = one(params, jax.tree.map(lambda x: jnp.repeat(x, 3, axis=0), batch), rng)
    _, tiled = one(params, jax.tree.map(lambda x: jnp.tile(x, (3,) + (1,) * (x.ndim - 1)), batch), rng)
    np.testing.assert_allclose(m3["diffusion_loss"], adjacent["diffusion_loss"], rtol=1e-5)
    assert abs(float(m3["diffusion_loss"]) - float(tiled["diffusion_loss"])) > 1e-3 * float(m3["diffusion_loss"])
    np.testing.assert_allclose(m3["ce_loss"], adjacent["ce_loss"], rtol=1e-5)  # CE is not repeated: a mean


def test_masked_targets_do_not_contribute(lm):
    """Targets where a mask is off can be anything: both terms are unchanged; a term with no targets is 0, not NaN."""
    model, params = lm
    batch, rng = _batch(), jax.random.PRNGKey(5)
    loss_fn = _loss_fn(model)
    loss, m = loss_fn(params, batch, rng)
    changed = dict(batch,
                   latent_targets=jnp.where(batch["latent_mask"][..., None], batch["latent_targets"], 100.0),
                   text_targets=jnp.where(batch["text_mask"], batch["text_targets"], 4))
    assert not np.array_equal(changed["latent_targets"], batch["latent_targets"])
    assert not np.array_equal(changed["text_targets"], batch["text_targets"])
    loss2, m2 = loss_fn(params, changed, rng)
    for k in ("diffusion_loss", "ce_loss", "loss"):
        np.testing.assert_allclose(m2[k], m[k], rtol=1e-6, err_msg=k)
    # Unmasking the changed targets does change the loss (the check above can fail).
    _, m3 = loss_fn(params, dict(changed, latent_mask=jnp.ones_like(batch["latent_mask"]),
                                 text_mask=jnp.ones_like(batch["text_mask"])), rng)
    assert float(m3["diffusion_loss"]) > 10 * float(m["diffusion_loss"])
    assert abs(float(m3["ce_loss"]) - float(m["ce_loss"])) > 1e-3
    # No targets at all: each term is 0 (the max(count, 1) denominator), so a text-only or latent-only batch works.
    _, empty = loss_fn(params, dict(batch, latent_mask=jnp.zeros_like(batch["latent_mask"]),
                                    text_mask=jnp.zeros_like(batch["text_mask"])), rng)
    assert float(empty["diffusion_loss"]) == 0.0 and float(empty["ce_loss"]) == 0.0


def test_drop_class_tokens_rate_and_scope():
    """≈ prob of examples lose their class tokens (all of them, to the null class); latent positions (whose token id
    0 is also class 0's id), text tokens and the null class are never touched."""
    n = 20_000
    cfg = LatentLMConfig(width=8, depth=1, num_heads=1, latent_dim=2, head_depth=1, num_classes=3, text_vocab_size=5)
    off = cfg.text_offset
    rng = np.random.default_rng(0)
    # [class][text][class][null][latent 0][latent 0]
    tokens = np.stack([rng.integers(0, 3, n), off + rng.integers(0, 5, n), rng.integers(0, 3, n),
                       np.full(n, cfg.null_class), np.zeros(n), np.zeros(n)], 1).astype(np.int32)
    is_latent = np.zeros_like(tokens, bool)
    is_latent[:, 4:] = True
    dropped = np.asarray(drop_class_tokens(jax.random.PRNGKey(0), cfg, jnp.asarray(tokens), jnp.asarray(is_latent),
                                           0.1))
    changed = dropped != tokens
    per_example = changed.any(1)
    assert abs(per_example.mean() - 0.1) < 0.01, per_example.mean()  # binomial σ ≈ 0.002
    # Per example: both class tokens go together, to the null class; nothing else moves.
    np.testing.assert_array_equal(changed[:, 0], per_example)
    np.testing.assert_array_equal(changed[:, 2], per_example)
    assert not changed[:, [1, 3, 4, 5]].any()
    assert np.all(dropped[changed] == cfg.null_class)
    # prob 0 and a model without classes never drop.
    np.testing.assert_array_equal(drop_class_tokens(jax.random.PRNGKey(0), cfg, jnp.asarray(tokens),
                                                    jnp.asarray(is_latent), 0.0), tokens)
    text_only = LatentLMConfig(width=8, depth=1, num_heads=1, latent_dim=2, head_depth=1, text_vocab_size=5)
    np.testing.assert_array_equal(drop_class_tokens(jax.random.PRNGKey(0), text_only, jnp.asarray(tokens),
                                                    jnp.asarray(is_latent), 1.0), tokens)


def test_latent_lm_loss_class_dropout_only_when_training(lm):
    """Inside the loss (ε-prediction here): the dropped examples are those of the loss's own draw
    (uniform(split(rng, 3)[0]) < p), only their class tokens change (latents and targets are the batch's), and
    train=False never drops."""
    model, params = lm
    batch, rng = _batch(1), jax.random.PRNGKey(6)
    p = 0.5
    drop = np.asarray(jax.random.uniform(jax.random.split(rng, 3)[0], (B, 1)) < p)
    assert 0 < drop.sum() < B  # this draw drops some examples and keeps others
    tokens = np.asarray(batch["tokens"]).copy()
    tokens[:, 0] = np.where(drop[:, 0], CFG.null_class, tokens[:, 0])
    by_hand = functools.partial(_by_hand, model, params, batch, rng, batch_mul=3, prediction_type="epsilon")
    _, m = _loss_fn(model, prediction_type="epsilon", class_dropout=p)(params, batch, rng)
    diffusion, ce, _ = by_hand(tokens=jnp.asarray(tokens))
    np.testing.assert_allclose([m["diffusion_loss"], m["ce_loss"]], [diffusion, ce], rtol=2e-5)
    kept_diffusion, kept_ce, kept_loss = by_hand()
    assert abs(float(m["diffusion_loss"]) - kept_diffusion) > 1e-4  # the drop is visible
    _, held_out = _loss_fn(model, prediction_type="epsilon", class_dropout=1.0, train=False)(params, batch, rng)
    np.testing.assert_allclose([held_out["diffusion_loss"], held_out["ce_loss"], held_out["loss"]],
                               [kept_diffusion, kept_ce, kept_loss], rtol=2e-5)


# ---- the DiT twin ----

DIT = DiTConfig(width=32, depth=1, num_heads=2, latent_dim=2, num_classes=3, max_len=4)


@pytest.fixture(scope="module")
def dit():
    model = DiT(DIT)
    labels = jnp.zeros((1,), jnp.int32)
    return model, random_params(model.init, jnp.zeros((1, 4, 2)), labels, labels, seed=2)


def test_dit_loss_equals_the_loss_written_out_with_its_label_dropout(dit):
    """One uniform t per image, MSE over all elements, and the labels the loss's own draw drops (train only)."""
    model, params = dit
    n, p = 8, 0.5
    latents = jax.random.normal(jax.random.PRNGKey(1), (n, 4, 2))
    labels = jnp.arange(n, dtype=jnp.int32) % 3
    rng = jax.random.PRNGKey(2)

    @jax.jit
    def losses(params):  # the variants in one program (one compile)
        def loss(y, drop, train):
            return dit_loss(model, params, latents, y, rng, schedule=SCHEDULE, prediction_type="v_prediction",
                            class_dropout=drop, train=train)
        null = jnp.full_like(labels, DIT.null_class)
        return (loss(labels, p, True), loss(labels, 0.0, True)[0], loss(labels, 1.0, False)[0],
                loss(labels, 1.0, True)[0], loss(null, 0.0, True)[0])

    rng_drop, rng_t, rng_eps = jax.random.split(rng, 3)
    drop = np.asarray(jax.random.uniform(rng_drop, (n,)) < p)
    assert 0 < drop.sum() < n
    t = np.asarray(jax.random.randint(rng_t, (n,), 0, 1000))
    eps = np.asarray(jax.random.normal(rng_eps, (n, 4, 2), jnp.float32))
    ab = np.asarray(SCHEDULE.alphas_cumprod)[t][:, None, None]  # one t for every token of an image
    x0 = np.asarray(latents)
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    y = np.where(drop, DIT.null_class, np.asarray(labels)).astype(np.int32)
    out = np.asarray(jax.jit(model.apply)(params, jnp.asarray(x_t, jnp.float32), jnp.asarray(t), jnp.asarray(y)))
    want = np.mean((out - (np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0)) ** 2)
    (loss, m), kept, held_out, all_dropped, null = losses(params)
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    assert float(m["loss"]) == float(m["diffusion_loss"]) == float(loss)
    # train=False never drops; dropping every label equals feeding the null class.
    assert abs(float(loss) - float(kept)) > 1e-4
    np.testing.assert_allclose(held_out, kept, rtol=1e-6)
    np.testing.assert_allclose(all_dropped, null, rtol=1e-6)


def test_drop_labels_rate():
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 3, 20_000), jnp.int32)
    dropped = np.asarray(drop_labels(jax.random.PRNGKey(0), labels, 3, 0.25))
    changed = dropped != np.asarray(labels)
    assert abs(changed.mean() - 0.25) < 0.015 and np.all(dropped[changed] == 3)  # binomial σ ≈ 0.003
    np.testing.assert_array_equal(drop_labels(jax.random.PRNGKey(0), labels, 3, 0.0), labels)
