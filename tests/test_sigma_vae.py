"""σ-VAE (docs/method.md §2): shapes, parameter layout, σ sampling, and that it learns."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_lm.models.sigma_vae import latent_grid, num_latent_tokens, SigmaVAE
from latent_lm.training.tasks import VAETask
from latent_lm.training.vae_losses import mu_regularizer, pixel_loss, posterior_regularizer
from latent_lm.latents import sample_latent


def _boxed_leaves(variables):
    return jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.fixture(scope="module")
def mnist_like():
    model = SigmaVAE(image_size=28, in_channels=1, patch_size=4, width=64, depth=2, num_heads=4, latent_dim=4)
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1), minval=-1.0, maxval=1.0)
    variables = jax.jit(lambda x: model.init({"params": jax.random.key(1)}, x, rng=jax.random.key(2)))(x)
    return model, variables, x


def test_grid_helpers():
    assert latent_grid(28, 4) == (7, 7) and num_latent_tokens(28, 4) == 49
    assert latent_grid((32, 16), 8) == (4, 2) and num_latent_tokens(256, 16) == 256
    with pytest.raises(ValueError):
        latent_grid(30, 4)


def test_shapes_28x28x1_patch4(mnist_like):
    model, variables, x = mnist_like
    out = jax.jit(lambda v, x: model.apply(v, x, rng=jax.random.key(3)))(variables, x)
    assert out["mu"].shape == (2, 49, 4) and out["z"].shape == (2, 49, 4)
    assert out["recon"].shape == (2, 28, 28, 1)
    mu = jax.jit(lambda v, x: model.apply(v, x, method=SigmaVAE.encode))(variables, x)
    np.testing.assert_allclose(mu, out["mu"], atol=1e-5)
    recon = jax.jit(lambda v, z: model.apply(v, z, method=SigmaVAE.decode))(variables, out["z"])
    np.testing.assert_allclose(recon, out["recon"], atol=1e-5)


def test_shapes_32x32x3_patch8_and_official_param_count():
    # Same config as the official `SigmaVAE small` recorded in official_state_dict_keys.md: 231,812 params.
    model = SigmaVAE(image_size=32, in_channels=3, patch_size=8, width=64, depth=2, num_heads=4, latent_dim=4)
    x = jnp.zeros((2, 32, 32, 3))
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, rng=jax.random.key(1)))
    assert sum(math.prod(v.shape) for v in jax.tree.leaves(nn.unbox(shapes))) == 231_812
    out = jax.eval_shape(lambda p: model.apply(p, x, rng=jax.random.key(1)), nn.unbox(shapes))
    assert out["mu"].shape == (2, 16, 4) and out["recon"].shape == (2, 32, 32, 3)
    # Without CLS: encoder and decoder each lose the token and one position row (2·64 params each).
    no_cls = model.clone(use_cls=False)
    shapes = jax.eval_shape(lambda: no_cls.init({"params": jax.random.key(0)}, x, rng=jax.random.key(1)))
    assert sum(math.prod(v.shape) for v in jax.tree.leaves(nn.unbox(shapes))) == 231_812 - 4 * 64


def test_bf16_compute_keeps_fp32_params():
    model = SigmaVAE(image_size=32, in_channels=3, patch_size=8, width=64, depth=1, num_heads=4, latent_dim=4,
                     dtype=jnp.bfloat16)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, rng=jax.random.key(1)))
    assert {v.dtype for v in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda p: model.apply(p, x, rng=jax.random.key(1)), nn.unbox(variables))
    assert out["recon"].dtype == jnp.bfloat16


def test_attention_biases_and_logical_names(mnist_like):
    _, variables, _ = mnist_like
    for part in ("encoder", "decoder"):
        block = variables["params"][part]["vit"]["blocks_0"]
        assert {"q_bias", "v_bias"} <= set(block) and "k_bias" not in block
        assert set(block["qkv"]) == {"kernel"}  # no fused bias: k has none (BEiT convention)
    leaves = _boxed_leaves(variables)
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    assert all(len(v.names) == v.value.ndim for v in leaves)
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    specs = jax.tree.leaves(nn.get_partition_spec(variables), is_leaf=is_spec)
    assert len(specs) == len(leaves)
    used = {n for v in leaves for n in v.names}
    assert {"embed", "mlp", "heads", "patch", "latent", "pos"} <= used


def test_init_conventions(mnist_like):
    _, variables, _ = mnist_like
    params = nn.unbox(variables)["params"]
    dec = params["decoder"]["vit"]
    assert float(jnp.max(jnp.abs(params["encoder"]["head"]["bias"]))) == 0.0
    assert float(jnp.max(jnp.abs(dec["blocks_0"]["q_bias"]))) == 0.0
    np.testing.assert_allclose(np.std(dec["blocks_0"]["qkv"]["kernel"]), 0.02, rtol=0.05)
    # fix_init_weight: proj and fc2 of block layer_id=i+1 are scaled by 1/√(2·layer_id).
    for i in range(2):
        for name in ("proj", "fc2"):
            np.testing.assert_allclose(np.std(dec[f"blocks_{i}"][name]["kernel"]), 0.02 / math.sqrt(2 * (i + 1)),
                                       rtol=0.1)


def test_sample_latent_per_example_sigma():
    std, n, t, c = 0.75, 4000, 64, 4
    mu = jnp.zeros((n, t, c))
    z = sample_latent(jax.random.key(0), mu, std)
    per_example = np.asarray(jnp.std(z, axis=(1, 2)))  # ≈ |σ_b| (256 values each)
    # E|σ| = std·√(2/π)/0.8 ≈ 0.997·std; |σ_b| spreads widely across examples (half-normal, CV ≈ 0.76).
    np.testing.assert_allclose(per_example.mean(), std * math.sqrt(2 / math.pi) / 0.8, rtol=0.03)
    assert 0.65 < per_example.std() / per_example.mean() < 0.85
    # Shared per example: the noise is σ_b·ε with one σ_b, so shifting μ shifts z exactly.
    z2 = sample_latent(jax.random.key(0), mu + 3.0, std)
    np.testing.assert_allclose(z2 - 3.0, z, atol=1e-5)
    # sampling_std fixes σ for every example; σ = 0 is the mode, μ.
    fixed = np.asarray(jnp.std(sample_latent(jax.random.key(1), mu, std, sampling_std=0.3), axis=(1, 2)))
    np.testing.assert_allclose(fixed, 0.3, rtol=0.2)
    assert abs(fixed.mean() - 0.3) < 0.005
    mu_rand = jax.random.normal(jax.random.key(2), (3, 5, 2))
    np.testing.assert_array_equal(sample_latent(jax.random.key(3), mu_rand, std, sampling_std=0.0), mu_rand)


def test_vae_loss_terms():
    x = jnp.zeros((2, 4, 4, 1))
    out = {"recon": jnp.full((2, 4, 4, 1), 0.5), "mu": jnp.full((2, 3, 2), 2.0)}
    rec, m = pixel_loss(x, out["recon"], l1_weight=1.0, l2_weight=1.0)
    reg, reg_m = posterior_regularizer(out)
    np.testing.assert_allclose([m["l1"], m["mse"], reg_m["mu_reg"]], [0.5, 0.25, 4.0], rtol=1e-6)
    np.testing.assert_allclose(rec + 0.01 * reg, 0.5 + 0.25 + 0.04, rtol=1e-6)
    np.testing.assert_allclose(m["psnr"], 10 * math.log10(4 / 0.25), rtol=1e-6)
    assert float(mu_regularizer(out["mu"])) == 4.0


def _rectangles(n: int, size: int, seed: int) -> np.ndarray:
    """1–2 random bright rectangles of random intensity on a dark background, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = np.full((n, size, size, 1), -1.0, np.float32)
    for img in x:
        for _ in range(rng.integers(1, 3)):
            h0, w0 = rng.integers(0, size - 3, 2)
            h1, w1 = h0 + rng.integers(3, size - h0 + 1), w0 + rng.integers(3, size - w0 + 1)
            img[h0:h1, w0:w1] = rng.uniform(0.0, 1.0)
    return x


def test_tiny_sigma_vae_learns():
    """100 Adam steps on synthetic images: held-out L1 of decode(μ) drops ≥2× and beats the mean image (measured:
    ×0.18 and ×0.36; one layer of width 32 learns these rectangles as well as two of width 64 do in 200 steps)."""
    model = SigmaVAE(image_size=16, in_channels=1, patch_size=4, width=32, depth=1, num_heads=4, latent_dim=4,
                     std=0.5)
    train, test = jnp.asarray(_rectangles(512, 16, 0)), jnp.asarray(_rectangles(128, 16, 1))
    params = nn.unbox(jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x, rng=jax.random.key(1)))(train[:2]))
    task = VAETask(model, kl_weight=0.01, image_shape=(16, 16, 1))  # the one σ-VAE loss: L1 + 0.01·mean(μ²)
    steps = 100
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 15, steps, 3e-4))

    def step(carry, rng):
        params, opt_state = carry
        k_idx, k_z = jax.random.split(rng)
        batch = train[jax.random.randint(k_idx, (32,), 0, train.shape[0])]
        grads, metrics = jax.grad(lambda p: task.loss(p, {"image": batch}, k_z), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics["loss"]

    @jax.jit
    def held_out_l1(params):
        mu = model.apply(params, test, method=SigmaVAE.encode)
        return jnp.mean(jnp.abs(model.apply(params, mu, method=SigmaVAE.decode) - test))

    l1_init = float(held_out_l1(params))
    # One program for the optimizer's init and all steps.
    fit = jax.jit(lambda params, keys: jax.lax.scan(step, (params, tx.init(params)), keys))
    (params, _), losses = fit(params, jax.random.split(jax.random.key(2), steps))
    l1_final = float(held_out_l1(params))
    l1_mean_image = float(jnp.mean(jnp.abs(jnp.mean(train, axis=0) - test)))
    assert np.all(np.isfinite(losses))
    assert l1_final < 0.5 * l1_init, (l1_init, l1_final)
    assert l1_final < 0.5 * l1_mean_image, (l1_mean_image, l1_final)
