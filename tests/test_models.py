"""docs/method.md §11 numerics a port gets wrong, parameter counts, and KV-cache equivalence."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_lm.models import layers
from latent_lm.models.diffusion_head import DiffusionHead, TimestepEmbedder, timestep_sinusoid
from latent_lm.models.latent_lm import init_cache, LatentLM, LatentLMConfig
from latent_lm.models.presets import EXPECTED_PARAMS, PRESETS


TINY = LatentLMConfig(width=64, depth=2, num_heads=4, num_kv_heads=2, latent_dim=4, head_depth=2,
                      num_classes=10, max_len=16)


def test_rope_frequency_grid_includes_endpoint():
    f = layers.rope_frequencies(64)
    assert f.shape == (32,)
    np.testing.assert_allclose(f[0], 1.0)
    np.testing.assert_allclose(f[-1], 1e-4, rtol=1e-12)  # linspace(0, 1): the last exponent is exactly 1
    np.testing.assert_allclose(f, 10000.0 ** -(np.arange(32) / 31), rtol=1e-12)


def test_rope_rotates_interleaved_pairs():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 8))
    pos = jnp.array([[0, 1, 5]])
    y = np.asarray(layers.apply_rope(x, pos))
    ang = 5 * layers.rope_frequencies(8)
    x2 = np.asarray(x)[0, 2, 1]
    expect = np.empty(8)
    expect[0::2] = x2[0::2] * np.cos(ang) - x2[1::2] * np.sin(ang)
    expect[1::2] = x2[1::2] * np.cos(ang) + x2[0::2] * np.sin(ang)
    np.testing.assert_allclose(y[0, 2, 1], expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[0, 0], np.asarray(x)[0, 0], atol=1e-7)  # position 0 is the identity


@pytest.mark.parametrize("width,ratio,hidden", [(768, 4, 2048), (1024, 4, 2688), (1280, 4, 3392), (1024, 6, 4096),
                                                (64, 4, 128), (24, 1, 0)])
def test_swiglu_hidden_sizes(width, ratio, hidden):
    assert layers.swiglu_hidden(width, ratio) == hidden


def test_rms_norm_fp32_no_gain():
    x = jnp.array([[3.0, 4.0]], jnp.bfloat16)
    y = layers.rms_norm(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), [[3 / np.sqrt(12.5 + 1e-6), 4 / np.sqrt(12.5 + 1e-6)]],
                               rtol=1e-2)


def test_timestep_sinusoid_cos_first():
    e = timestep_sinusoid(jnp.array([0.0, 999.0]))
    assert e.shape == (2, 256)
    np.testing.assert_allclose(e[0, :128], 1.0)
    np.testing.assert_allclose(e[0, 128:], 0.0)
    np.testing.assert_allclose(e[1, 0], np.cos(999.0), rtol=1e-4)


def test_torch_default_init_bounds():
    d = layers.Dense(256, ("embed", "mlp"))
    params = nn.unbox(d.init(jax.random.PRNGKey(0), jnp.zeros((1, 100))))
    k = np.asarray(params["params"]["kernel"])
    assert np.abs(k).max() <= 0.1 and np.abs(k).max() > 0.098
    np.testing.assert_allclose(k.std(), 0.1 / np.sqrt(3), rtol=0.05)


def test_diffusion_head_outputs_zero_at_init():
    head = DiffusionHead(latent_dim=4, depth=3, mlp_ratio=4.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 7, 4))
    t = jnp.full((5, 7), 500)
    c = jax.random.normal(jax.random.PRNGKey(2), (5, 7, 64))
    out = jax.jit(lambda: head.apply(head.init(jax.random.PRNGKey(0), x, t, c), x, t, c))()  # one program
    assert np.all(np.asarray(out) == 0.0)


def test_diffusion_head_shared_timestep_equals_per_row_timesteps():
    """The sampler's solver passes one scalar t for every row (its embedding computed once): the same output as t
    given per row, as training passes it."""
    head = DiffusionHead(latent_dim=4, depth=2, mlp_ratio=4.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    c = jax.random.normal(jax.random.PRNGKey(2), (6, 64))
    np_rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(np_rng.normal(0.0, 0.1, a.shape), a.dtype),
                          nn.unbox(jax.eval_shape(head.init, jax.random.PRNGKey(0), x, jnp.zeros(6, jnp.int32), c)))
    apply = jax.jit(head.apply)
    shared = apply(params, x, jnp.int32(949), c)
    per_row = apply(params, x, jnp.full((6,), 949, jnp.int32), c)
    assert np.abs(np.asarray(shared)).max() > 0.1
    np.testing.assert_allclose(shared, per_row, atol=1e-6, rtol=1e-6)


def test_timestep_table_equals_per_row_embedding_and_its_gradient():
    """Training's integer timesteps through the schedule's table (more rows than steps) give the per-row values and
    the same parameter gradient; a timestep past the schedule is NaN, not a clamped row."""
    per_row, table = TimestepEmbedder(32), TimestepEmbedder(32, num_timesteps=50)
    t = jax.random.randint(jax.random.PRNGKey(3), (4, 30), 0, 50)
    params = per_row.init(jax.random.PRNGKey(0), t)
    ref, got = jax.jit(per_row.apply)(params, t), jax.jit(table.apply)(params, t)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5)
    grad = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, t)))))(params)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-4), grad(table), grad(per_row))
    assert np.isnan(np.asarray(table.apply(params, jnp.full((60,), 50)))).all()
    few = t[0, :10]  # fewer rows than steps: no table
    np.testing.assert_allclose(table.apply(params, few), per_row.apply(params, few), atol=1e-6)


def test_every_parameter_has_logical_axes():
    params = jax.eval_shape(LatentLM(TINY).init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32),
                            jnp.zeros((1, 16, 4)), jnp.zeros((1, 16), bool))
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)


@pytest.mark.parametrize("size", list(PRESETS))
def test_paper_parameter_counts(size):
    depth, width, heads, ratio, head_depth = PRESETS[size]
    cfg = LatentLMConfig(width=width, depth=depth, num_heads=heads, mlp_ratio=ratio, latent_dim=16,
                         head_depth=head_depth, num_classes=1000, max_len=256)
    shapes = jax.eval_shape(LatentLM(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.int32),
                            jnp.zeros((1, 256, 16)), jnp.zeros((1, 256), bool))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert abs(count - EXPECTED_PARAMS[size]) / EXPECTED_PARAMS[size] < 0.02, (size, count)


def test_kv_cache_matches_parallel_forward():
    model = LatentLM(TINY)
    rng = jax.random.PRNGKey(3)
    b, n = 2, 9
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(jnp.array([3, 7]))
    latents = jax.random.normal(rng, (b, n, 4))
    is_latent = jnp.arange(n)[None].repeat(b, 0) > 0
    # Random weights (no compiled init: its RNG takes seconds to compile); shapes from eval_shape.
    np_rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(np_rng.normal(0.0, 0.05, a.shape), a.dtype),
                          nn.unbox(jax.eval_shape(model.init, rng, tokens, latents, is_latent)))
    cond_par, _ = jax.jit(model.apply)(params, tokens, latents, is_latent)
    caches = init_cache(TINY, b, n)
    h = jax.jit(functools.partial(model.apply, method=LatentLM.embed))(params, tokens, latents, is_latent)
    forward = jax.jit(functools.partial(model.apply, method=LatentLM.backbone_forward))
    # prefill 3 positions, then one position at a time
    out = []
    c, _, caches = forward(params, h[:, :3], jnp.broadcast_to(jnp.arange(3), (b, 3)), caches)
    out.append(c)
    for i in range(3, n):
        c, _, caches = forward(params, h[:, i:i + 1], jnp.full((b, 1), i), caches)
        out.append(c)
    np.testing.assert_allclose(np.concatenate(out, 1), cond_par, atol=2e-5, rtol=1e-5)
