"""bf16 compute (`model.dtype="bfloat16"`): the same fp32 parameters give the fp32 loss, gradients and samples
to bf16 precision.

Tolerances: bf16 keeps 8 significant bits (a rounding error of up to 2⁻⁹ ≈ 0.2 % per value). Weights and activations
are rounded at every matmul input; the loss, the diffusion target, the normalisations and the solver stay fp32. With
random weights on this 2-layer backbone and 1-block head, measured: loss 1e-4 relative (the MSE is dominated by the
fp32 target), gradient 1 % (‖g₁₆ − g₃₂‖/‖g₃₂‖), samples 1.5 % (max deviation / max value, after 4 solver steps and 16
autoregressive positions). Each bound is a few times that, well under the O(1) errors of a broken cast; and exact
equality is ruled out, so the bf16 path is really taken.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from latent_lm.latents import LatentNormalization
from latent_lm.sampling import SamplerSettings, sample_latents
from latent_lm.training.tasks import make_generator_task

TOKENS, CHANNELS = 16, 4


def _task(dtype: str):
    c = default.get_config()
    c.model.update(dict(width=32, depth=2, num_heads=4, latent_dim=CHANNELS, max_len=TOKENS, dtype=dtype))
    c.vae.latent_dim = CHANNELS
    c.head.depth = 1
    c.diffusion.batch_mul = 2
    return make_generator_task(c, LatentNormalization(1.0, 0.0))


def _random_params(abstract, seed=0, std=0.1):
    """N(0, std²) everywhere (the zero-initialised head outputs too: at init the head returns 0 whatever the dtype)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, std, s.shape).astype(s.dtype), abstract)


@pytest.fixture(scope="module")
def tasks():
    return {dtype: _task(dtype) for dtype in ("float32", "bfloat16")}


def test_bf16_loss_and_gradients_match_fp32(tasks):
    """The train step's loss, metrics and gradients (the task loss the train loop differentiates, σ-VAE noise and
    class dropout included) under bf16 compute, from the same fp32 parameters, batch and key as fp32."""
    task32, task16 = tasks["float32"], tasks["bfloat16"]
    abstract = nn.unbox(jax.eval_shape(task32.init_params, jax.random.PRNGKey(0)))
    # bf16 compute keeps fp32 parameters: both dtypes declare the same tree of fp32 arrays.
    abstract16 = nn.unbox(jax.eval_shape(task16.init_params, jax.random.PRNGKey(0)))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract16) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                   abstract)
    assert {a.dtype for a in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    params = _random_params(abstract)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    batch = {"latents": (labels[:, None, None] / 5.0 - 1.0 + 0.3 * rng.standard_normal((16, TOKENS, CHANNELS))
                         ).astype(np.float32), "label": labels}
    out = {}
    for name, task in (("float32", task32), ("bfloat16", task16)):
        grad_fn = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
        (loss, metrics), grads = jax.device_get(grad_fn(params, batch, jax.random.PRNGKey(1)))
        out[name] = loss, metrics, np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    (l32, m32, g32), (l16, m16, g16) = out["float32"], out["bfloat16"]
    print("loss", l32, l16, "grad norm", np.linalg.norm(g32), np.linalg.norm(g16),
          "relative grad error", np.linalg.norm(g16 - g32) / np.linalg.norm(g32))
    assert np.isfinite(l16) and np.all(np.isfinite(g16)) and g16.dtype == np.float32
    assert l16 != l32  # bf16 compute is really on
    np.testing.assert_allclose(l16, l32, rtol=2e-3)
    np.testing.assert_allclose(m16["diffusion_loss"], m32["diffusion_loss"], rtol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(g16), np.linalg.norm(g32), rtol=0.02)
    assert np.linalg.norm(g16 - g32) < 0.05 * np.linalg.norm(g32)  # the same direction, not just the same size


def test_bf16_sampler_matches_fp32(tasks):
    """The CFG sampler with the bf16 model (bf16 KV cache, bf16 head, fp32 solver) tracks the fp32 sampler."""
    task32, task16 = tasks["float32"], tasks["bfloat16"]
    params = _random_params(nn.unbox(jax.eval_shape(task32.init_params, jax.random.PRNGKey(0))), seed=1)
    settings = SamplerSettings(num_steps=4, cfg_scale=3.0, prediction_type="v_prediction")
    labels = jnp.arange(4, dtype=jnp.int32)[:, None]
    noise = jax.random.normal(jax.random.PRNGKey(3), (TOKENS, 4, CHANNELS))
    out = {}
    for name, task in (("float32", task32), ("bfloat16", task16)):
        out[name] = np.asarray(jax.jit(lambda p, n, m=task.model, s=task.schedule: sample_latents(
            m, p, labels, n, s, settings))(params, noise))
    z32, z16 = out["float32"], out["bfloat16"]
    assert z16.dtype == np.float32 and np.all(np.isfinite(z16))
    err = np.abs(z16 - z32).max() / np.abs(z32).max()
    print("max relative deviation of bf16 samples", err)
    assert 0 < err < 0.05, err
