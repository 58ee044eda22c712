"""The train state pytree: step, params, optimizer state, EMA params, base PRNG key, skipped-step count."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken (skipped steps included)
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array           # raw uint32 key data; the step's key is fold_in(rng, step), so resumes are exact
    skipped: jax.Array       # int32 scalar: steps whose loss or gradients were non-finite (update skipped)


def ema_update(ema, params, step: jax.Array, decay: float):
    """Official EMA: the first update copies the weights, then a constant decay (docs/method.md §6.4)."""
    d = jnp.where(step == 0, 0.0, decay)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def ema_init_weight(decay: float, steps: int) -> float:
    """The weight the EMA still puts on the start of training after `steps` train steps: decay^(steps − 1).

    `ema_update` runs once per step with the step index 0, 1, …, steps − 1: step 0 copies the weights (after that
    step's update, which are the initial weights when the warm-up starts the learning rate at 0), and each of the
    steps − 1 later ones multiplies that copy's weight by `decay`. (A skipped non-finite step leaves the EMA as it
    is, so each skip keeps a factor 1/decay more; `steps` < 1: no update, the EMA is the initial weights.)
    """
    return 1.0 if steps < 1 else float(decay) ** (int(steps) - 1)


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
