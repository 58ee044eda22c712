"""The optimizer and the EMA: warm-up + cosine learning rate, AdamW's decoupled weight decay on every parameter, the
EMA update inside the train step, and `eval.use_ema` choosing which weights the sample/eval_loss stages use."""

from __future__ import annotations

import dataclasses
import math

import cli_runs
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_train_loop import host_copy

from data_pipelines.latent_cache import write_latent_cache
from latent_lm import experiment
from latent_lm.checkpoint import Checkpointer
from latent_lm.latents import LatentNormalization
from latent_lm.parallel.mesh import DEFAULT_RULES, make_mesh, shard_batch
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.training.tasks import make_generator_task
from latent_lm.training.train_loop import build_state_fns, jit_train_step


def _optim(**over):
    base = dict(lr=3e-3, warmup_steps=5, final_lr_ratio=0.1, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
                clip_norm=1.0, ema_decay=0.9)
    return ml_collections.ConfigDict({**base, **over})


def _hand_lr(step: int, *, lr: float, warmup: int, total: int, final_ratio: float) -> float:
    """optimizer.py's documented schedule, by hand: linear 0 → lr over `warmup` steps, then a half cosine from lr to
    lr·final_ratio ending at `total` (and flat after). `warmup` is clamped to total − 1, as documented there."""
    warmup = min(warmup, total - 1)
    end = lr * final_ratio
    if step < warmup:
        return lr * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total,warmup,steps", [
    (25, 5, [0, 1, 2, 4, 5, 6, 10, 15, 20, 24, 25, 40]),
    # warm-up longer than the run: clamped to 3 steps, so the last step still decays (a config asking for it is
    # rejected before it runs: tests/test_schedules.py)
    (4, 5, [0, 1, 2, 3, 4, 9]),
])
def test_learning_rate_schedule_values(total, warmup, steps):
    schedule = learning_rate_schedule(_optim(warmup_steps=warmup), total)
    got = [float(schedule(s)) for s in steps]
    want = [_hand_lr(s, lr=3e-3, warmup=warmup, total=total, final_ratio=0.1) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    # landmarks written out, so a wrong hand formula cannot agree with a wrong schedule
    if total == 25:
        assert got[0] == 0.0
        np.testing.assert_allclose(got[2], 1.2e-3, rtol=1e-6)                 # 2/5 of the way up
        np.testing.assert_allclose(got[4], 3e-3, rtol=1e-6)                   # the peak, at the end of warm-up
        np.testing.assert_allclose(got[7], (3e-3 + 3e-4) / 2, rtol=1e-6)      # half-way down the cosine
        np.testing.assert_allclose(got[-2:], [3e-4, 3e-4], rtol=1e-6)         # lr·final_lr_ratio, and flat after
    # without final_lr_ratio the decay ends at zero
    no_ratio = _optim()
    del no_ratio["final_lr_ratio"]
    assert abs(float(learning_rate_schedule(no_ratio, total)(total))) < 1e-12


def _model_like_params():
    """Leaves named and shaped like a LatentLM's (what a weight-decay mask would single out: biases, norm scales,
    embeddings, the scanned layer stack), all non-zero so that each shrink is visible."""
    rng = np.random.default_rng(0)
    leaf = lambda *shape: jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    return {"params": {"token_embed": {"embedding": leaf(5, 8)}, "final_norm": {"scale": leaf(8)},
                       "backbone": {"blocks": {"mlp": {"fc1": {"kernel": leaf(2, 8, 16)}}}},
                       "head": {"out": {"kernel": leaf(8, 2), "bias": leaf(2)}}}}


def test_adamw_decays_every_parameter_by_lr_times_wd():
    """With zero gradients Adam's step is 0/(0+eps) = 0, so each step multiplies every parameter by
    (1 − lr(t)·wd) exactly: decoupled decay, at the scheduled rate, on every leaf (no mask, as the official code)."""
    total, wd = 10, 0.05
    optim = _optim(weight_decay=wd, lr=0.5)  # large, so the shrink is far above fp32 noise
    tx = make_optimizer(optim, total)
    params = _model_like_params()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    for step in range(4):
        updates, state = update(zeros, state, params)
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        factor = 1.0 - _hand_lr(step, lr=0.5, warmup=5, total=total, final_ratio=0.1) * wd
        for path, p, q in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params),
                              jax.tree.leaves(new)):
            np.testing.assert_allclose(np.asarray(q), np.asarray(p) * factor, rtol=2e-6,
                                       err_msg=f"step {step} {jax.tree_util.keystr(path[0])}")
        if step == 0:
            assert factor == 1.0  # warm-up starts at lr 0: nothing moves
        else:
            assert factor < 0.999
        params = new


@dataclasses.dataclass(frozen=True)
class Quadratic:
    """A two-leaf least-squares task: compiles in a blink, every gradient non-zero."""

    def init_params(self, rng):
        return {"params": {"w": jax.random.normal(rng, (4,)), "b": jnp.ones((2, 3))}}

    def loss(self, params, batch, rng):
        p = params["params"]
        loss = jnp.mean((batch["x"] @ p["w"] - 1.0) ** 2) + jnp.sum(jnp.square(p["b"] - batch["x"][0, 0]))
        return loss, {"loss": loss}


def test_ema_update_in_the_train_step():
    """Step 0 copies the updated weights into the EMA; every later step sets ema ← d·ema + (1−d)·params, with the
    params *after* that step's update (fp32; at most one rounding apart, XLA may fuse the multiply-add)."""
    decay, total = 0.9, 6
    optim = _optim(ema_decay=decay, warmup_steps=1)
    tx, schedule = make_optimizer(optim, total), learning_rate_schedule(optim, total)
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])
    init, _, shardings = build_state_fns(Quadratic(), tx, mesh, DEFAULT_RULES, 0)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        state = init(jax.random.PRNGKey(0))
        step = jit_train_step(Quadratic(), tx, schedule, decay, shardings, mesh)
        for i in range(4):
            before = host_copy(state)  # a copy: the step donates the old state's buffers
            state, _ = step(state, shard_batch({"x": rng.standard_normal((8, 4)).astype(np.float32)}, mesh))
            after = host_copy(state)
            d = np.float32(0.0 if i == 0 else decay)
            for e0, p1, e1, p0 in zip(jax.tree.leaves(before.ema_params), jax.tree.leaves(after.params),
                                      jax.tree.leaves(after.ema_params), jax.tree.leaves(before.params)):
                if i > 0:
                    assert not np.array_equal(p1, p0)  # the params moved, so the EMA test has teeth
                    assert not np.array_equal(e1, p1)
                want = d * e0 + (np.float32(1.0) - d) * p1
                np.testing.assert_array_max_ulp(e1, want, maxulp=1)


def _save_state_with_distinct_ema(workdir: str, config) -> tuple:
    """A LatentLM train state in `workdir/lm` (random values in the real tree and shapes; nothing compiled) whose
    EMA differs from its raw params."""
    write_latent_cache(f"{workdir}/latents/train", np.zeros((4, 49, 4), np.float32), np.zeros(4, np.int32),
                       {"latent_norm": cli_runs.NORM})
    task = make_generator_task(config, LatentNormalization(**cli_runs.NORM))
    mesh = make_mesh(None, jax.devices()[:1])
    _, abstract, _ = build_state_fns(task, make_optimizer(config.optim, config.train.steps), mesh, DEFAULT_RULES,
                                     config.train.seed)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    state = state.replace(step=np.int32(3), ema_params=jax.tree.map(lambda x: x + 1.0, state.params))
    ckpt = Checkpointer(f"{workdir}/lm/checkpoints", async_save=False)
    ckpt.save(3, state, force=True)
    ckpt.close()
    return state, mesh


def test_use_ema_picks_the_weights_the_stages_use(tmp_path, monkeypatch):
    config = cli_runs.make_config({"model.width": 32, "model.depth": 1, "model.num_heads": 4, "head.depth": 1})
    state, mesh = _save_state_with_distinct_ema(str(tmp_path), config)
    for use_ema, want in ((True, state.ema_params), (False, state.params)):
        config.eval.use_ema = use_ema
        _, params, step = experiment._generator_params(config, str(tmp_path), mesh, DEFAULT_RULES)
        assert step == 3
        for x, y in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(x, y)

    # ...and both generator stages take their weights from that helper.
    class Called(Exception):
        pass

    def helper(*args):
        raise Called

    monkeypatch.setattr(experiment, "_generator_params", helper)
    for stage in ("sample", "eval_loss"):
        with pytest.raises(Called):
            experiment.RUNNERS[stage](config, str(tmp_path), mesh, DEFAULT_RULES)
