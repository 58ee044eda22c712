"""The compiled KV-cache sampler equals a no-cache reference that recomputes the prefix at every position: class and
multi-token (text-prompt) prefixes, CFG with the default or an explicit null prefix, and x̂₀ clipping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_lm.diffusion import make_schedule
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.parallel.mesh import data_parallel_size, global_rows, host_arrays, make_mesh, pad_rows
from latent_lm.sampling import CPU_DOT_MIN_BATCH, SamplerSettings, make_sampler, row_noise, sample_latents
from reference_samplers import make_reference_sampler


# 5 classes (ids 0–4), the null class 5, text ids 6–9; grouped-query attention (4 query heads, 2 KV heads).
CFG = LatentLMConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, latent_dim=3, head_depth=1, num_classes=5,
                     text_vocab_size=4, max_len=6)
MODEL = LatentLM(CFG)
SCHEDULE = make_schedule("cosine", 1000)
N = 3  # latents sampled after the prefix: a prefill and two single-position cache writes
TEXT = CFG.text_offset
PROMPTS = np.array([[0, TEXT + 1, TEXT + 3], [3, TEXT + 2, TEXT], [4, TEXT + 3, TEXT + 3]], np.int32)
NULL_PROMPTS = np.array([[CFG.null_class, TEXT, TEXT]] * 3, np.int32)  # e.g. the empty caption


def _random_params(seed=0, std=0.1):
    """N(0, std²) in every leaf, the zero-initialised head outputs included (else the head returns 0); shapes from
    eval_shape, so no compiled init (its RNG alone takes seconds to compile)."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, 6), jnp.int32),
                                       jnp.zeros((1, 6, 3)), jnp.zeros((1, 6), bool)))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), abstract)


@pytest.mark.parametrize("cfg_scale,prediction,prefix_len,null,x0_clip", [
    (4.0, "epsilon", 1, "default", None),         # [class] → latents, CFG against the null class
    (None, "v_prediction", 3, "default", None),   # a 3-token prompt, no guidance
    (1.5, "v_prediction", 3, "explicit", 0.5),    # a prompt with its own null prompt, x̂₀ clipped
    (4.0, "epsilon", 3, "default", 2.0),          # ε-prediction's large x̂₀ at t = 999, clipped
])
def test_cached_sampler_matches_reference(cfg_scale, prediction, prefix_len, null, x0_clip):
    params = _random_params()
    settings = SamplerSettings(num_steps=4, cfg_scale=cfg_scale, prediction_type=prediction, x0_clip=x0_clip)
    prefix = jnp.asarray(PROMPTS[:, :prefix_len])
    null_prefix = jnp.asarray(NULL_PROMPTS[:, :prefix_len]) if null == "explicit" else None
    noise = jax.random.normal(jax.random.PRNGKey(5), (N, 3, 3))
    sampler = jax.jit(lambda p, n, nul: sample_latents(MODEL, p, prefix, n, SCHEDULE, settings, null_prefix=nul))
    fast = sampler(params, noise, null_prefix)
    ref = make_reference_sampler(MODEL, SCHEDULE, settings)(params, prefix, noise, null_prefix=null_prefix)
    assert fast.shape == (3, N, 3)
    assert np.all(np.isfinite(fast))
    np.testing.assert_allclose(fast, ref, atol=1e-4, rtol=1e-4)
    if x0_clip is not None:
        # The clip is active: the last solver step returns x̂₀, so some values sit exactly on ±x0_clip.
        assert np.abs(ref).max() <= x0_clip + 1e-6
        assert np.sum(np.isclose(np.abs(ref), x0_clip, rtol=0, atol=1e-6)) >= 2, ref
    if null == "explicit":
        # The null prompt is really used: the default null prefix (null class everywhere) samples differently.
        assert np.abs(np.asarray(sampler(params, noise, None)) - np.asarray(fast)).max() > 1e-3


def test_make_sampler_deterministic_and_label_dependent():
    params = _random_params(2)
    sampler = make_sampler(MODEL, SCHEDULE, SamplerSettings(num_steps=3, cfg_scale=2.0), 3)
    a = sampler(params, jnp.array([1, 2]), jax.random.PRNGKey(0))
    b = sampler(params, jnp.array([1, 2]), jax.random.PRNGKey(0))
    c = sampler(params, jnp.array([1, 3]), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[0], c[0], atol=1e-6)  # rows are independent given their own noise
    assert not np.allclose(a[1], c[1])


def test_sample_stage_batches_split_over_the_data_axes_and_padding_changes_no_row():
    """What the sample stage does on a mesh: labels padded to the data-parallel size and split over (data, fsdp); every
    device samples its rows only, and the real rows equal an unpadded, unsharded call (row noise: `row_noise`)."""
    np.testing.assert_array_equal(row_noise(jax.random.PRNGKey(4), 5, 3, 2),
                                  row_noise(jax.random.PRNGKey(4), 8, 3, 2)[:5])
    params = _random_params(4)
    sampler = make_sampler(MODEL, SCHEDULE, SamplerSettings(num_steps=2, cfg_scale=2.0), N, platform="cpu")
    mesh = make_mesh(None)  # the suite's 8 CPU devices on the data axis
    dp = data_parallel_size(mesh)
    labels = np.array([0, 4, 1, 3, 2], np.int32)
    padded = pad_rows(labels, dp)
    assert dp == 8 and padded.tolist() == [0, 4, 1, 3, 2, 2, 2, 2]
    key = jax.random.PRNGKey(6)
    z = sampler(params, global_rows(padded, mesh), key)
    assert z.shape == (8, N, 3) and z.sharding.shard_shape(z.shape) == (1, N, 3)  # one row per device
    np.testing.assert_allclose(host_arrays(z)[:5], sampler(params, jnp.asarray(labels), key), atol=1e-5)


def test_cpu_sampler_compiles_large_batches_with_xla_dots_and_samples_the_same():
    """On CPU, batches from CPU_DOT_MIN_BATCH on compile without YNNPACK fusions (faster there, docs/benchmarks.md
    §1) and sample what the default compile samples; other platforms get one plain jit."""
    params = _random_params(3)
    settings = SamplerSettings(num_steps=2, cfg_scale=2.0, prediction_type="v_prediction")
    sampler = make_sampler(MODEL, SCHEDULE, settings, 2, platform="cpu")
    labels = jnp.arange(CPU_DOT_MIN_BATCH, dtype=jnp.int32) % CFG.num_classes
    key = jax.random.PRNGKey(1)
    assert "ynn" not in sampler.lower(params, labels, key).compile().as_text()
    assert "ynn" in sampler._small.lower(params, labels, key).compile().as_text()  # the option is what removes them
    np.testing.assert_allclose(sampler(params, labels, key), sampler._small(params, labels, key), atol=1e-5)
    assert sampler._pick(labels[:CPU_DOT_MIN_BATCH - 1]) is sampler._small
    assert not hasattr(make_sampler(MODEL, SCHEDULE, settings, 2, platform="tpu"), "_pick")
