"""The compiled KV-cache sampler equals a no-cache reference that recomputes the prefix at every position."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_lm.diffusion import make_schedule
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.sampling import SamplerSettings, make_sampler, sample_latents
from reference_samplers import make_reference_sampler

CFG = LatentLMConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, latent_dim=3, head_depth=2, num_classes=5,
                     max_len=6)


def _random_params(seed=0):
    """Random weights everywhere, including the zero-initialised head outputs (else the head returns 0)."""
    model = LatentLM(CFG)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 6), jnp.int32), jnp.zeros((1, 6, 3)),
                                 jnp.zeros((1, 6), bool)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return model, jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("cfg_scale,prediction", [(4.0, "epsilon"), (None, "v_prediction"), (1.5, "v_prediction")])
def test_cached_sampler_matches_reference(cfg_scale, prediction):
    model, params = _random_params()
    schedule = make_schedule("cosine", 1000)
    settings = SamplerSettings(num_steps=5, cfg_scale=cfg_scale, prediction_type=prediction, x0_clip=None)
    labels = jnp.array([[0], [3], [4]], jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(5), (6, 3, 3))
    fast = jax.jit(lambda p, n: sample_latents(model, p, labels, n, schedule, settings))(params, noise)
    ref = make_reference_sampler(model, schedule, settings)(params, labels, noise)
    assert fast.shape == (3, 6, 3)
    assert np.all(np.isfinite(fast))
    np.testing.assert_allclose(fast, ref, atol=1e-4, rtol=1e-4)


def test_make_sampler_deterministic_and_label_dependent():
    model, params = _random_params(2)
    sampler = make_sampler(model, make_schedule("cosine", 1000), SamplerSettings(num_steps=3, cfg_scale=2.0), 6)
    a = sampler(params, jnp.array([1, 2]), jax.random.PRNGKey(0))
    b = sampler(params, jnp.array([1, 2]), jax.random.PRNGKey(0))
    c = sampler(params, jnp.array([1, 3]), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[0], c[0], atol=1e-6)  # rows are independent given their own noise
    assert not np.allclose(a[1], c[1])
