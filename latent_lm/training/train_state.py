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


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
