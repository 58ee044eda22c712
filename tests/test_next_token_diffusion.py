"""Behavioural proof that next-token diffusion is the real method (docs/method.md §10.4).

* Bimodal toy: x_{i+1} = ±R·x_i + noise with a random sign. Sampling the trained LatentLM reproduces both modes;
  an MSE-regression head on the same backbone collapses to the conditional mean (≈ 0, between the modes).
* Mixed sequence: [caption] <BOD> z0..z3 <EOD> trains the LM head (CE) and the diffusion head (MSE) together.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_lm.diffusion import make_schedule
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.training.batches import class_conditional_batch
from latent_lm.training.generator_losses import latent_lm_loss
from latent_lm.sampling import SamplerSettings, sample_latents

ROT = np.array([[0.0, -1.0], [1.0, 0.0]], np.float32)
N_POINTS = 4


def bimodal_sequences(rng: np.random.Generator, n: int) -> np.ndarray:
    x = np.zeros((n, N_POINTS, 2), np.float32)
    angle = rng.uniform(0, 2 * np.pi, n)
    x[:, 0] = np.stack([np.cos(angle), np.sin(angle)], -1)
    for i in range(1, N_POINTS):
        sign = rng.choice([-1.0, 1.0], size=(n, 1))
        x[:, i] = sign * x[:, i - 1] @ ROT.T + 0.03 * rng.standard_normal((n, 2))
    return x


def _fit(loss_fn, params, steps, lr=2e-3, seed=0, warmup=50):
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.1))
    opt = jax.jit(tx.init)(params)  # one program, not one eager op per parameter shape

    @jax.jit
    def step(params, opt, rng):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, rng)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(seed * 100_000 + i))
        losses.append(loss)
    return params, [float(x) for x in losses]


def _mode_stats(x: np.ndarray):
    """(fraction of transitions near a mode, fraction of '+' choices) over all transitions."""
    prev, nxt = x[:, :-1], x[:, 1:]
    plus = prev @ ROT.T
    d_plus = np.linalg.norm(nxt - plus, axis=-1)
    d_minus = np.linalg.norm(nxt + plus, axis=-1)
    near = np.minimum(d_plus, d_minus) < 0.35  # modes are 2.0 apart
    return near.mean(), (d_plus < d_minus).mean()


def _diffusion_head_vs_mse_head(cfg, *, steps, batch, lr, sample_steps, num_samples, mse_steps):
    """Trains LatentLM (diffusion head) and the same backbone with an MSE readout on the bimodal toy (`mse_steps`
    Adam steps; 0: the least-squares readout of the diffusion-trained backbone); checks that sampling the first
    reproduces both modes and that the second predicts the mean between them."""
    model = LatentLM(cfg)
    data = jnp.asarray(bimodal_sequences(np.random.default_rng(0), 4096))
    labels = jnp.zeros((len(data),), jnp.int32)
    schedule = make_schedule("cosine", 1000)
    first = class_conditional_batch(data[:1], labels[:1])
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), first["tokens"], first["latents"],
                                          first["is_latent"]))

    def batch_of(rng):
        idx = jax.random.randint(rng, (batch,), 0, len(data))
        return class_conditional_batch(data[idx], labels[idx])

    def diffusion_loss(p, rng):
        r1, r2 = jax.random.split(rng)
        return latent_lm_loss(model, p, batch_of(r1), r2, schedule=schedule, prediction_type="v_prediction",
                              batch_mul=4, class_dropout=0.0)

    params, losses = _fit(diffusion_loss, params, steps, lr=lr)
    assert np.mean(losses[-steps // 8:]) < 0.6 * np.mean(losses[:20])

    settings = SamplerSettings(num_steps=sample_steps, cfg_scale=None, prediction_type="v_prediction")
    noise = jax.random.normal(jax.random.PRNGKey(7), (N_POINTS, num_samples, 2))
    samples = np.asarray(jax.jit(lambda p, n: sample_latents(model, p, jnp.zeros((num_samples, 1), jnp.int32), n,
                                                             schedule, settings))(params, noise))
    near, frac_plus = _mode_stats(samples)
    print(f"diffusion head: {near:.1%} of sampled transitions on a mode, {frac_plus:.1%} on the + mode")
    assert near > 0.8, near                 # samples sit on the modes...
    assert 0.3 < frac_plus < 0.7, frac_plus  # ...and both modes are used

    b = class_conditional_batch(data[:512], labels[:512])  # held out from the least-squares fit below
    if mse_steps:
        # Same backbone, but a regression readout trained with MSE on the next point: it learns the conditional
        # mean.
        class Regressor(nn.Module):
            @nn.compact
            def __call__(self, batch):
                cond, _ = LatentLM(cfg, name="lm")(batch["tokens"], batch["latents"], batch["is_latent"])
                return nn.Dense(2)(cond)

        reg = Regressor()
        rparams = jax.jit(reg.init)(jax.random.PRNGKey(1), batch_of(jax.random.PRNGKey(0)))

        def mse_loss(p, rng):
            b = batch_of(rng)
            return jnp.mean((reg.apply(p, b) - b["latent_targets"]) ** 2), {}

        rparams, _ = _fit(mse_loss, rparams, mse_steps, lr=3e-3, warmup=min(50, mse_steps // 4))
        pred = np.asarray(jax.jit(reg.apply)(rparams, b))
    else:
        # The MSE-optimal linear readout of the trained backbone's conditions, in closed form (least squares): no
        # second model to compile and train, the same conclusion.
        conditions = jax.jit(lambda p, b: model.apply(p, b["tokens"], b["latents"], b["is_latent"])[0])
        fit = class_conditional_batch(data[512:2560], labels[512:2560])

        def features(batch):
            c = np.asarray(conditions(params, batch), np.float64).reshape(-1, cfg.width)
            return np.concatenate([c, np.ones((len(c), 1))], 1)

        readout = np.linalg.lstsq(features(fit), np.asarray(fit["latent_targets"]).reshape(-1, 2), rcond=None)[0]
        pred = (features(b) @ readout).reshape(512, N_POINTS, 2)
    # Each step of the regressor from true points predicts near 0, between the modes.
    near_mse, _ = _mode_stats(np.concatenate([np.asarray(data[:512, :1]), pred[:, 1:2]], 1))
    print(f"MSE head: {near_mse:.1%} on a mode, mean |prediction| {np.mean(np.linalg.norm(pred[:, 1:], axis=-1)):.3f}")
    assert near_mse < 0.2, near_mse
    assert np.mean(np.linalg.norm(pred[:, 1:], axis=-1)) < 0.3  # collapsed to the mean (true |x| = 1)


@pytest.mark.slow
def test_bimodal_next_token_diffusion_vs_mse_head():
    """The full-size toy: a 2-layer, width-64 backbone with a 2-block head, 20 solver steps on 512 samples, and a
    trained MSE regressor (200 steps of 64 sequences put 99.5 % of the sampled transitions on a mode; 800 steps of
    128 did not do better)."""
    cfg = LatentLMConfig(width=64, depth=2, num_heads=4, latent_dim=2, head_depth=2, num_classes=1,
                         max_len=N_POINTS)
    _diffusion_head_vs_mse_head(cfg, steps=200, batch=64, lr=3e-3, sample_steps=20, num_samples=512,
                                mse_steps=60)


def test_bimodal_next_token_diffusion_vs_mse_head_small():
    """Fast sibling: a 1-layer, width-32 backbone with a 1-block head and fewer steps. It lands ~93 % of the sampled
    transitions on a mode (after 60 steps only ~30 %: the check fails for an undertrained or collapsed head). The
    MSE head is the least-squares readout of the trained backbone rather than a second trained model."""
    cfg = LatentLMConfig(width=32, depth=1, num_heads=2, latent_dim=2, head_depth=1, num_classes=1,
                         max_len=N_POINTS)
    _diffusion_head_vs_mse_head(cfg, steps=150, batch=64, lr=3e-3, sample_steps=16, num_samples=256,
                                mse_steps=0)


def test_mixed_text_and_latent_sequence_both_losses_fall():
    """[caption] <BOD> z0..z3 <EOD>: the caption picks the latents' cluster. After 80 steps of a 1-layer width-32
    model the CE has fallen 10× with every text target right, and the diffusion loss has fallen too (measured:
    CE 1.95 → 0.02, diffusion 0.94 → 0.33; after 50 steps it is still above 0.7× its start: the check can fail)."""
    width, depth, head_depth, steps, batch = 32, 1, 1, 80, 32
    bod, eod, vocab = 0, 1, 6  # text ids: <BOD>, <EOD>, four caption words 2..5
    cfg = LatentLMConfig(width=width, depth=depth, num_heads=4, latent_dim=3, head_depth=head_depth,
                         text_vocab_size=vocab, max_len=7)
    model = LatentLM(cfg)
    off = cfg.text_offset
    rng = np.random.default_rng(0)
    n = 1024
    caption = rng.integers(2, 6, n)
    centers = np.random.default_rng(1).normal(size=(6, 4, 3)).astype(np.float32)
    z = centers[caption] + 0.1 * rng.standard_normal((n, 4, 3)).astype(np.float32)
    # inputs: caption, BOD, z0, z1, z2, z3, EOD ; position i predicts position i+1
    T = 7
    tokens = np.zeros((n, T), np.int32)
    tokens[:, 0], tokens[:, 1], tokens[:, 6] = caption + off, bod + off, eod + off
    latents = np.zeros((n, T, 3), np.float32)
    latents[:, 2:6] = z
    is_latent = np.zeros((n, T), bool)
    is_latent[:, 2:6] = True
    text_targets = np.zeros((n, T), np.int32)
    text_mask = np.zeros((n, T), bool)
    text_targets[:, 0], text_mask[:, 0] = bod, True   # caption → <BOD>
    text_targets[:, 5], text_mask[:, 5] = eod, True   # last latent → <EOD>
    latent_targets = np.zeros((n, T, 3), np.float32)
    latent_mask = np.zeros((n, T), bool)
    latent_targets[:, 1:5], latent_mask[:, 1:5] = z, True  # <BOD> → z0, z_k → z_{k+1}
    data = {k: jnp.asarray(v) for k, v in dict(tokens=tokens, latents=latents, is_latent=is_latent,
                                               text_targets=text_targets, text_mask=text_mask,
                                               latent_targets=latent_targets, latent_mask=latent_mask).items()}
    schedule = make_schedule("cosine", 1000)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), data["tokens"][:1], data["latents"][:1],
                                          data["is_latent"][:1]))

    def loss_fn(p, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch,), 0, n)
        return latent_lm_loss(model, p, jax.tree.map(lambda x: x[idx], data), k2, schedule=schedule,
                              prediction_type="v_prediction", batch_mul=4, class_dropout=0.0)

    eval_loss = jax.jit(loss_fn)
    _, m0 = eval_loss(params, jax.random.PRNGKey(99))
    params, _ = _fit(loss_fn, params, steps, lr=3e-3, warmup=min(50, steps // 4))
    _, m1 = eval_loss(params, jax.random.PRNGKey(99))
    print({k: (float(m0[k]), float(m1[k])) for k in ("ce_loss", "text_accuracy", "diffusion_loss")})
    assert m1["ce_loss"] < 0.1 * m0["ce_loss"], (m0["ce_loss"], m1["ce_loss"])
    assert m1["text_accuracy"] == 1.0
    assert m1["diffusion_loss"] < 0.7 * m0["diffusion_loss"], (m0["diffusion_loss"], m1["diffusion_loss"])
