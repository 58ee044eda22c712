"""Behavioural proof that next-token diffusion is the real method (spec §7.4-2, §7.4-4).

* Bimodal toy: x_{i+1} = ±R·x_i + noise with a random sign. Sampling the trained LatentLM reproduces both modes;
  an MSE-regression head on the same backbone collapses to the conditional mean (≈ 0, between the modes).
* Mixed sequence: [caption] <BOD> z0..z3 <EOD> trains the LM head (CE) and the diffusion head (MSE) together.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def _fit(loss_fn, params, steps, lr=2e-3, seed=0):
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, 50, steps, lr * 0.1))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, rng):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, rng)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, jax.random.PRNGKey(seed * 100_000 + i))
        losses.append(float(loss))
    return params, losses


def _mode_stats(x: np.ndarray):
    """(fraction of transitions near a mode, fraction of '+' choices) over all transitions."""
    prev, nxt = x[:, :-1], x[:, 1:]
    plus = prev @ ROT.T
    d_plus = np.linalg.norm(nxt - plus, axis=-1)
    d_minus = np.linalg.norm(nxt + plus, axis=-1)
    near = np.minimum(d_plus, d_minus) < 0.35  # modes are 2.0 apart
    return near.mean(), (d_plus < d_minus).mean()


def test_bimodal_next_token_diffusion_vs_mse_head():
    cfg = LatentLMConfig(width=64, depth=2, num_heads=4, latent_dim=2, head_depth=2, num_classes=1,
                         max_len=N_POINTS)
    model = LatentLM(cfg)
    data = jnp.asarray(bimodal_sequences(np.random.default_rng(0), 4096))
    labels = jnp.zeros((len(data),), jnp.int32)
    schedule = make_schedule("cosine", 1000)
    params = model.init(jax.random.PRNGKey(0), *[v for k, v in class_conditional_batch(data[:1], labels[:1]).items()
                                                 if k in ("tokens", "latents", "is_latent")])
    params = nn.unbox(params)

    def batch_of(rng):
        idx = jax.random.randint(rng, (128,), 0, len(data))
        return class_conditional_batch(data[idx], labels[idx])

    def diffusion_loss(p, rng):
        r1, r2 = jax.random.split(rng)
        return latent_lm_loss(model, p, batch_of(r1), r2, schedule=schedule, prediction_type="v_prediction",
                              batch_mul=4, class_dropout=0.0)

    params, losses = _fit(diffusion_loss, params, 800, lr=3e-3)
    assert np.mean(losses[-100:]) < 0.6 * np.mean(losses[:20])

    settings = SamplerSettings(num_steps=20, cfg_scale=None, prediction_type="v_prediction")
    noise = jax.random.normal(jax.random.PRNGKey(7), (N_POINTS, 512, 2))
    samples = np.asarray(jax.jit(lambda p, n: sample_latents(model, p, jnp.zeros((512, 1), jnp.int32), n,
                                                             schedule, settings))(params, noise))
    near, frac_plus = _mode_stats(samples)
    assert near > 0.8, near                 # samples sit on the modes...
    assert 0.3 < frac_plus < 0.7, frac_plus  # ...and both modes are used

    # Same backbone, but a regression readout trained with MSE on the next point: it learns the conditional mean.
    class Regressor(nn.Module):
        @nn.compact
        def __call__(self, batch):
            cond, _ = LatentLM(cfg, name="lm")(batch["tokens"], batch["latents"], batch["is_latent"])
            return nn.Dense(2)(cond)

    reg = Regressor()
    rparams = reg.init(jax.random.PRNGKey(1), batch_of(jax.random.PRNGKey(0)))

    def mse_loss(p, rng):
        b = batch_of(rng)
        return jnp.mean((reg.apply(p, b) - b["latent_targets"]) ** 2), {}

    rparams, _ = _fit(mse_loss, rparams, 300, lr=3e-3)
    # Roll the regressor out greedily from true first points; each step predicts near 0, between the modes.
    b = class_conditional_batch(data[:512], labels[:512])
    pred = np.asarray(reg.apply(rparams, b))
    near_mse, _ = _mode_stats(np.concatenate([np.asarray(data[:512, :1]), pred[:, 1:2]], 1))
    assert near_mse < 0.2, near_mse
    assert np.mean(np.linalg.norm(pred[:, 1:], axis=-1)) < 0.3  # collapsed to the mean (true |x| = 1)


def test_mixed_text_and_latent_sequence_both_losses_fall():
    bod, eod, vocab = 0, 1, 6  # text ids: <BOD>, <EOD>, four caption words 2..5
    cfg = LatentLMConfig(width=64, depth=2, num_heads=4, latent_dim=3, head_depth=2, text_vocab_size=vocab,
                         max_len=7)
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
    params = nn.unbox(model.init(jax.random.PRNGKey(0), data["tokens"][:1], data["latents"][:1],
                                 data["is_latent"][:1]))

    def loss_fn(p, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (64,), 0, n)
        return latent_lm_loss(model, p, jax.tree.map(lambda x: x[idx], data), k2, schedule=schedule,
                              prediction_type="v_prediction", batch_mul=4, class_dropout=0.0)

    _, (m0) = loss_fn(params, jax.random.PRNGKey(99))
    params, _ = _fit(loss_fn, params, 200, lr=3e-3)
    _, m1 = jax.jit(loss_fn)(params, jax.random.PRNGKey(99))
    assert m1["ce_loss"] < 0.1 * m0["ce_loss"], (m0["ce_loss"], m1["ce_loss"])
    assert m1["text_accuracy"] == 1.0
    assert m1["diffusion_loss"] < 0.7 * m0["diffusion_loss"], (m0["diffusion_loss"], m1["diffusion_loss"])
