"""Shared helpers for the benchmark scripts: timing (alone, or several calls in turn), a random-weight model from a
config, and the model-size flags (`--width/--depth/--head_depth`, default: the config's) that let tests run every
script at a tiny size."""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_lm import host_memory
from latent_lm.models.dit import DiT, DiTConfig
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=None, help="backbone width (default: the config's)")
    p.add_argument("--depth", type=int, default=None, help="backbone depth (default: the config's)")
    p.add_argument("--head_depth", type=int, default=None, help="diffusion head depth (default: the config's)")


def apply_model_flags(c, args: argparse.Namespace) -> None:
    """Overrides the experiment config `c` with the size flags that were given."""
    if args.width:
        c.model.width = args.width
    if args.depth:
        c.model.depth = args.depth
    if args.head_depth:
        c.head.depth = args.head_depth


def time_fn(fn, *args, repeats: int = 5, warmup: int = 1, reduce=np.median) -> float:
    """Median (or `reduce`, e.g. min) wall seconds of fn(*args), blocking on a JAX result, after `warmup` untimed
    calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(reduce(times))


def best_of_alternating(calls: dict, repeats: int) -> dict:
    """Best wall seconds of each zero-argument call, timed in turn (a, b, c, a, b, c, …) after one untimed call of
    each, so that a change in the shared machine's load during the run falls on every side alike."""
    for call in calls.values():
        jax.block_until_ready(call())
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def random_model(cfg: LatentLMConfig | DiTConfig, seed: int = 0):
    """LatentLM (or its DiT twin) with random weights everywhere (the zero-init outputs are perturbed so sampling
    does work)."""
    n = cfg.max_len
    if isinstance(cfg, DiTConfig):
        model = DiT(cfg)
        args = (jnp.zeros((1, n, cfg.latent_dim)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    else:
        model = LatentLM(cfg)
        args = (jnp.zeros((1, n), jnp.int32), jnp.zeros((1, n, cfg.latent_dim)), jnp.zeros((1, n), bool))

    def init(rng):  # one compiled program (per-leaf eager ops would compile a kernel per parameter shape)
        params = nn.unbox(model.init(rng, *args))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                         for x, k in zip(leaves, keys)])

    return model, jax.jit(init)(jax.random.PRNGKey(seed))


TORCH_THREADS = (1, 2)  # the PyTorch side runs at each and reports the better (docs/benchmarks.md §1.1, §2)


def host_pages() -> str:
    """The device line's note of whether this process runs with huge pages for XLA:CPU (latent_lm/host_memory.py)."""
    return f"host huge pages: {'on' if host_memory.enabled() else 'off'}"


def torch_twin(params, cfg: LatentLMConfig):
    """The PyTorch twin with the same weights, exported and loaded as a user would load it (`latent_lm/convert`)."""
    import tempfile

    from latent_lm.convert import to_torch
    from latent_lm.convert.torch_files import load_model

    with tempfile.TemporaryDirectory() as out:
        to_torch.export_latent_lm(params, cfg, out)
        model, _ = load_model(out)
    return model


def parameter_count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved FLOP/s of a dense n×n×n matmul: the machine's practical peak for this dtype."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n ** 3 / time_fn(f, a, b, repeats=repeats)
