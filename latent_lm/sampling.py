"""Compiled autoregressive sampling with a static KV cache and per-token DPM-Solver++ (docs/method.md §8).

One jitted function per (batch, prefix length, number of latents): the prefix (e.g. the class token) is
prefilled into the cache, then `lax.scan` runs over latent positions; at each position the K solver steps of the
diffusion head run inside the scan body, and the sampled latent is embedded and written into the cache.
CFG doubles the batch: [conditional prefix; null prefix]; both halves are fed the same sampled latent and the head
output is guided with a constant scale, u + s·(c − u), on ε or v alike.

The DiT twin (docs/method.md §9) is sampled whole-image: one DPM-Solver++ run over all N latents at once, the same
settings and the same doubled-batch guidance (`sample_dit_latents`, `make_dit_sampler`).
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from latent_lm.diffusion import NoiseSchedule, dpm_solver_sample
from latent_lm.models.dit import DiT
from latent_lm.models.latent_lm import init_cache, LatentLM


@chex.dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 20
    cfg_scale: float = 4.0
    prediction_type: str = "epsilon"
    x0_clip: float | None = None


def guided_head(model: LatentLM, params, cond: jax.Array, cfg_scale: float | None) -> Callable:
    """model_fn(x [B,C], t scalar) for the solver; with CFG `cond` is [2B, D] = [conditional; unconditional]."""

    def model_fn(x, t):
        if cfg_scale is None:
            return model.apply(params, x, t, cond, method=LatentLM.diffuse)
        out = model.apply(params, jnp.concatenate([x, x]), t, cond, method=LatentLM.diffuse)
        c, u = jnp.split(out, 2)
        return u + cfg_scale * (c - u)

    return model_fn


def with_null_prefix(model: LatentLM, prefix: jax.Array, null_prefix: jax.Array | None) -> jax.Array:
    if null_prefix is None:
        null_prefix = jnp.full_like(prefix, model.config.null_class)
    return jnp.concatenate([prefix, null_prefix], axis=0)


def sample_latents(model: LatentLM, params, prefix: jax.Array, noise: jax.Array, schedule: NoiseSchedule,
                   settings: SamplerSettings, null_prefix: jax.Array | None = None,
                   cache_slots: int | None = None) -> jax.Array:
    """Generates N latents after a token prefix [B, P]; `noise` [N, B, C] is the initial x_T per position.

    `settings.cfg_scale=None` disables guidance (no doubled batch). Returns latents [B, N, C] (fp32).
    Jit it with `make_sampler` (or under an outer jit); it has no Python loop over tokens or solver steps.
    `cache_slots`: the static KV cache's length, default P + N; longer only for the planner's cost probes, which
    run fewer latents against the full-length cache (docs/scaling_out.md §6.4).
    """
    chex.assert_rank([prefix, noise], [2, 3])
    cfg = model.config
    n, b, _ = noise.shape
    p = prefix.shape[1]
    tokens = prefix if settings.cfg_scale is None else with_null_prefix(model, prefix, null_prefix)
    rows = tokens.shape[0]
    dtype = jnp.dtype(cfg.dtype)
    slots = p + n if cache_slots is None else cache_slots
    if slots < p + n:
        raise ValueError(f"cache_slots={slots} is shorter than the prefix and latents ({p} + {n})")
    caches = init_cache(cfg, rows, slots, dtype)  # one spare slot so the last (unused) write stays in bounds

    def embed_and_run(toks, lats, is_lat, positions, caches):
        h = model.apply(params, toks, lats, is_lat, method=LatentLM.embed)
        cond, _, caches = model.apply(params, h, positions, caches, method=LatentLM.backbone_forward)
        return cond[:, -1], caches

    positions = jnp.broadcast_to(jnp.arange(p), (rows, p))
    cond, caches = embed_and_run(tokens, jnp.zeros((rows, p, cfg.latent_dim)), jnp.zeros((rows, p), bool),
                                 positions, caches)

    def step(carry, xs):
        cond, caches = carry
        x_T, i = xs
        x0 = dpm_solver_sample(guided_head(model, params, cond, settings.cfg_scale), x_T, schedule,
                               settings.num_steps, settings.prediction_type, settings.x0_clip)
        feed = x0 if settings.cfg_scale is None else jnp.concatenate([x0, x0])
        pos = jnp.full((rows, 1), p + i)
        cond, caches = embed_and_run(jnp.zeros((rows, 1), jnp.int32), feed[:, None], jnp.ones((rows, 1), bool),
                                     pos, caches)
        return (cond, caches), x0

    _, samples = jax.lax.scan(step, (cond, caches), (noise.astype(jnp.float32), jnp.arange(n)))
    return jnp.swapaxes(samples, 0, 1)


# From batch CPU_DOT_MIN_BATCH on, XLA:CPU runs this loop's matmuls ([2B, D] × [D, ≤ 4D]) faster as its own dot
# kernels than as the YNNPACK fusions it picks by default (+10–20% images/s at batch 100–256, equal at 16, −45% at 1:
# docs/benchmarks.md §1); other platforms keep their defaults.
CPU_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
CPU_DOT_MIN_BATCH = 64


class _BatchSizeDispatch:
    """A CPU sampler compiled two ways, picked by the batch size (static): XLA's defaults below CPU_DOT_MIN_BATCH,
    CPU_DOT_OPTIONS from there. Called and lowered like the jitted function it wraps."""

    def __init__(self, fn: Callable):
        self._small, self._large = jax.jit(fn), jax.jit(fn, compiler_options=CPU_DOT_OPTIONS)

    def _pick(self, labels) -> Callable:
        return self._large if labels.shape[0] >= CPU_DOT_MIN_BATCH else self._small

    def __call__(self, params, labels, rng):
        return self._pick(labels)(params, labels, rng)

    def lower(self, params, labels, rng):
        return self._pick(labels).lower(params, labels, rng)


def row_noise(rng: jax.Array, batch: int, num_latents: int, latent_dim: int) -> jax.Array:
    """x_T [B, N, C]: row j draws from fold_in(rng, j), so a row's noise does not depend on the batch size, i.e. on
    how many rows the sample stage pads a batch with for a data-parallel mesh (docs/method.md §8.1)."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(batch))
    return jax.vmap(lambda key: jax.random.normal(key, (num_latents, latent_dim)))(keys)


def make_sampler(model: LatentLM, schedule: NoiseSchedule, settings: SamplerSettings, num_latents: int,
                 cache_slots: int | None = None, platform: str | None = None):
    """Returns jitted `sample(params, labels [B], rng) -> latents [B, N, C]` for class-conditional generation, x_T
    drawn per row from `rng` (`row_noise`). `cache_slots`: see `sample_latents`; `platform`: what it compiles for,
    default the default backend's."""

    def sample(params, labels, rng):
        noise = jnp.swapaxes(row_noise(rng, labels.shape[0], num_latents, model.config.latent_dim), 0, 1)
        return sample_latents(model, params, labels[:, None].astype(jnp.int32), noise, schedule, settings,
                              cache_slots=cache_slots)

    return _BatchSizeDispatch(sample) if (platform or jax.default_backend()) == "cpu" else jax.jit(sample)


def sample_dit_latents(model: DiT, params, labels: jax.Array, noise: jax.Array, schedule: NoiseSchedule,
                       settings: SamplerSettings) -> jax.Array:
    """Whole-image DPM-Solver++ from x_T = `noise` [B, N, C] for class labels [B] (official `DiT.sample_with_cfg`).

    With CFG every solver step runs the model once on [x; x] with labels [y; null] and guides u + s·(c − u);
    `settings.cfg_scale=None` runs the conditional model alone. Returns latents [B, N, C] (fp32).
    """
    cfg = model.config
    chex.assert_shape(noise, (labels.shape[0], cfg.max_len, cfg.latent_dim))
    labels = labels.astype(jnp.int32)

    def model_fn(x, t):
        t = jnp.full(x.shape[:1], t)  # the solver's t is shared by every token; the DiT takes one per image
        if settings.cfg_scale is None:
            return model.apply(params, x, t, labels)
        y = jnp.concatenate([labels, jnp.full_like(labels, cfg.null_class)])
        c, u = jnp.split(model.apply(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), y), 2)
        return u + settings.cfg_scale * (c - u)

    return dpm_solver_sample(model_fn, noise.astype(jnp.float32), schedule, settings.num_steps,
                             settings.prediction_type, settings.x0_clip)


def make_dit_sampler(model: DiT, schedule: NoiseSchedule, settings: SamplerSettings):
    """Returns jitted `sample(params, labels [B], rng) -> latents [B, N, C]`, x_T ~ N(0, I) drawn per row from `rng`
    (`row_noise`)."""

    @jax.jit
    def sample(params, labels, rng):
        noise = row_noise(rng, labels.shape[0], model.config.max_len, model.config.latent_dim)
        return sample_dit_latents(model, params, labels, noise, schedule, settings)

    return sample
