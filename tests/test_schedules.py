"""Schedules that fit the run (docs/experiments.md §4): a warm-up as long as the run is one clear config error, the
EMA's weight left on the initial weights is decay^(steps−1) as the train step computes it, a config whose evaluated
EMA keeps more than 1% of them gets a warning, and every shipped config and sweep point is clear of both."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default, imagenet, imagenet_vae, mllm, scaling, tokenizer_variance
from latent_lm.config_validation import EMA_INIT_WEIGHT_LIMIT, ema_warnings, validate
from latent_lm.errors import ConfigError
from latent_lm.experiment import STAGES
from latent_lm.training.optimizer import learning_rate_schedule
from latent_lm.training.train_loop import make_train_step
from latent_lm.training.train_state import TrainState, ema_init_weight, ema_update

# ---- the warm-up check ----


@pytest.mark.parametrize("optim,train,warmup,steps", [
    ("optim", "train", 100, 100), ("optim", "train", 62_500, 25_000),
    ("vae_optim", "vae_train", 100, 20), ("vae_optim", "vae_train", 5000, 5000),
])
def test_a_warmup_as_long_as_the_run_is_one_clear_error(optim, train, warmup, steps):
    c = default.get_config()
    c[optim].warmup_steps, c[train].steps = warmup, steps
    with pytest.raises(ConfigError) as e:
        validate(c, STAGES)
    message = str(e.value)
    assert "\n" not in message
    assert f"{optim}.warmup_steps={warmup}" in message and f"{train}.steps={steps}" in message, message
    c[optim].warmup_steps = steps - 1  # one step of decay is a schedule the optimizer runs as written
    validate(c, STAGES)


def test_the_warmup_check_comes_after_the_other_value_checks():
    """A config with another bad value and a long warm-up names the other value (the first bad one, as before)."""
    c = default.get_config()
    c.train.steps, c.model.remat = 2, "sometimes"
    with pytest.raises(ConfigError, match="model.remat='sometimes'"):
        validate(c, STAGES)


# ---- the EMA's weight on the initial weights ----


def _simulated_init_weight(decay: float, steps: int) -> float:
    """`ema_update` applied as the train step applies it (step index 0 … steps−1) to weights that are 1 after the
    first step and 0 after every later one: by linearity the EMA ends at its weight on the first step's weights."""
    def body(i, ema):
        params = jnp.where(i == 0, 1.0, 0.0).astype(jnp.float32)
        return ema_update(ema, params, i, decay)

    return float(jax.lax.fori_loop(0, steps, body, jnp.float32(1.0)))


@pytest.mark.parametrize("decay,steps", [
    (0.995, 400), (0.9999, 25_000), (0.975, 400), (0.9996, 25_000), (0.995, 1000), (0.9, 1), (0.9, 2), (0.0, 5),
])
def test_ema_init_weight_matches_a_simulation_of_ema_update(decay, steps):
    want = _simulated_init_weight(decay, steps)
    # float32 accumulation over up to 25,000 multiplies: a few 1e-3 relative
    np.testing.assert_allclose(ema_init_weight(decay, steps), want, rtol=5e-3, atol=1e-12)


def test_ema_init_weight_figures_of_the_issue():
    """Issue 17's figures: 0.9999 over 25,000 steps keeps ~8%, 0.995 over 400 keeps 13.5%."""
    np.testing.assert_allclose(ema_init_weight(0.9999, 25_000), 0.0821, atol=5e-4)
    np.testing.assert_allclose(ema_init_weight(0.995, 400), 0.1350, atol=5e-4)
    assert ema_init_weight(0.9, 1) == 1.0 and ema_init_weight(0.0, 2) == 0.0 and ema_init_weight(0.5, 0) == 1.0


class _Constant:
    """A task whose loss ignores the params: the optimizer below decides what the params are after each step."""

    def loss(self, params, batch, rng):
        loss = jnp.sum(params["params"]["w"]) * 0.0
        return loss, {"loss": loss}


def test_ema_init_weight_counts_the_steps_the_real_train_step_takes():
    """The real train step (make_train_step) with an optimizer that leaves the weights at 1 on its first update and
    sets them to 0 on every later one: after n steps the EMA holds exactly ema_init_weight(decay, n)."""
    def update(grads, count, params):
        zero_out = jax.tree.map(lambda p: jnp.where(count == 0, 0.0, -p), params)
        return zero_out, count + 1

    tx = optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)
    decay, n = 0.8, 7
    params = {"params": {"w": jnp.ones((3,), jnp.float32)}}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=params,
                       rng=jax.random.PRNGKey(0), skipped=jnp.zeros((), jnp.int32))
    step = jax.jit(make_train_step(_Constant(), tx, optax.constant_schedule(0.0), decay))
    for i in range(n):
        state, _ = step(state, {})
        np.testing.assert_allclose(np.asarray(state.ema_params["params"]["w"]), ema_init_weight(decay, i + 1),
                                   rtol=1e-6)
    assert int(state.step) == n and not np.any(np.asarray(state.params["params"]["w"]))


# ---- the EMA warning ----


def test_an_evaluated_ema_that_keeps_the_init_is_a_warning_that_says_what_to_change(caplog):
    c = default.get_config()
    c.train.steps = 400  # 0.995^399 = 13.5%
    with caplog.at_level(logging.WARNING):
        warnings = validate(c, STAGES)  # a warning, not an error: the run trains as configured
    assert len(warnings) == 1
    line = warnings[0]
    assert "optim.ema_decay=0.995" in line and "train.steps=400" in line and "13.5%" in line, line
    assert "optim.ema_decay ≤ 0.988" in line and "eval.use_ema=False" in line, line
    assert any(line in r.getMessage() for r in caplog.records)
    bound = float(line.split("optim.ema_decay ≤ ")[1].split(" ")[0])
    assert ema_init_weight(bound, 400) <= EMA_INIT_WEIGHT_LIMIT < ema_init_weight(bound + 1e-4, 400)

    c.eval.use_ema = False  # the raw weights are evaluated: nothing to warn about
    assert ema_warnings(c) == []
    c.eval.use_ema, c.optim.ema_decay = True, bound
    assert ema_warnings(c) == []
    c.optim.ema_decay, c.stages = 0.995, ("train_vae", "encode")  # a tokenizer run evaluates no generator
    assert ema_warnings(c) == []


# ---- every shipped config ----

IMAGENET_ARGS = [f"size={s},arch={a}" for s in ("B", "L", "H", "Base", "Medium", "Large", "XL", "3B", "7B", "13B")
                 for a in ("latent_lm", "dit")] + ["size=XL,resolution=384"]


def _shipped():
    cases = [(default, None), (default, "animal_mnist"), (imagenet_vae, None), (imagenet_vae, "kind=kl")]
    if hasattr(mllm, "get_sweep"):  # the multimodal study's points, once it has a sweep; else each arm
        cases += [(mllm, p["config_arg"]) for p in mllm.get_sweep()]
    else:
        cases += [(mllm, f"arm={arm}") for arm in getattr(mllm, "ARMS", ("latentlm",))]
    cases += [(imagenet, a) for a in IMAGENET_ARGS]
    for module in (scaling, tokenizer_variance):
        for scale in ("embedded", "imagenet"):
            cases += [(module, p["config_arg"]) for p in module.get_sweep(f"scale={scale}")]
    return [(m.__name__.split(".")[-1], a) for m, a in cases]


SHIPPED = _shipped()
MODULES = {"default": default, "imagenet": imagenet, "imagenet_vae": imagenet_vae, "mllm": mllm,
           "scaling": scaling, "tokenizer_variance": tokenizer_variance}
# (config, arg) pairs whose evaluated EMA may keep more than 1% of the initial weights on purpose: none.
EMA_ALLOWED: set = set()


@pytest.mark.parametrize("name,arg", SHIPPED, ids=[f"{n}:{a}" for n, a in SHIPPED])
def test_shipped_configs_warm_up_within_the_run_and_evaluate_a_settled_ema(name, arg):
    c = MODULES[name].get_config(arg)
    warnings = validate(c, STAGES)
    assert c.optim.warmup_steps < c.train.steps and c.vae_optim.warmup_steps < c.vae_train.steps
    if (name, arg) not in EMA_ALLOWED:
        assert warnings == [], warnings
        if c.eval.use_ema and "train" in c.stages:
            assert ema_init_weight(c.optim.ema_decay, c.train.steps) <= EMA_INIT_WEIGHT_LIMIT


@pytest.mark.parametrize("scale,steps,warmup", [("embedded", 400, 40), ("imagenet", 25_000, 100)])
def test_scaling_schedules_follow_the_run_length(scale, steps, warmup):
    """Each generator point warms up within its run, decays to the end, and evaluates an EMA whose time constant is
    a tenth of the run (≈ e^−10 left on the initial weights)."""
    for point in scaling.get_sweep(f"scale={scale}")[1:]:
        c = scaling.get_config(point["config_arg"])
        assert (c.train.steps, c.optim.warmup_steps) == (steps, warmup), point
        assert c.eval.use_ema and "eval_loss" in c.stages
        np.testing.assert_allclose(1.0 / (1.0 - c.optim.ema_decay), steps / 10, rtol=1e-9)
        assert ema_init_weight(c.optim.ema_decay, steps) < 1e-4
        lr = learning_rate_schedule(c.optim, c.train.steps)
        end = c.optim.lr * c.optim.final_lr_ratio
        np.testing.assert_allclose(float(lr(warmup)), c.optim.lr, rtol=1e-5)  # the peak, after the warm-up
        np.testing.assert_allclose(float(lr(steps)), end, rtol=1e-5, atol=1e-9)  # and decayed by the end
        assert float(lr(steps // 2)) < c.optim.lr


def test_ema_decay_for_the_scaling_run_lengths():
    assert scaling.ema_decay_for(400) == pytest.approx(0.975)
    assert scaling.ema_decay_for(25_000) == pytest.approx(0.9996)
    for steps in (100, 400, 25_000, 250_000):
        assert 2e-5 < ema_init_weight(scaling.ema_decay_for(steps), steps) <= np.exp(-10)  # (1 − 10/n)^(n−1)


def test_the_old_scaling_schedules_are_what_validation_catches():
    """The settings issue 17 found: imagenet.py's 100-epoch warm-up on a 40-epoch run is an error, and the
    inherited EMAs are warnings at both scales."""
    c = imagenet.get_config("size=Base,epochs=40")
    with pytest.raises(ConfigError, match="optim.warmup_steps=62500 must be < train.steps=25000"):
        validate(c, STAGES)
    c.optim.warmup_steps = 100
    assert "8.2%" in ema_warnings(c)[0]
    e = scaling.get_config("scale=embedded,size=S1")
    e.optim.ema_decay = 0.995
    assert "13.5%" in ema_warnings(e)[0]
