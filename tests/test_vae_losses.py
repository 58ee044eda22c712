"""σ-VAE losses (docs/method.md §2.3: LPIPS, PatchGAN, adaptive weight, one-step GAN training) and the KL-VAE control
(§2.4)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import save_file

from configs import default, imagenet_vae
from data_pipelines.embedded import load_embedded
from data_pipelines.latent_cache import load_latent_cache
from latent_lm import experiment, stage_inputs
from latent_lm.checkpoint import Checkpointer
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.models.discriminator import PatchDiscriminator
from latent_lm.training.vae_losses import generator_adversarial_loss, hinge_discriminator_loss
from latent_lm.models.perceptual import (LPIPS, init_lpips_params, load_lpips_params, lpips_param_shapes,
                                         lpips_torch_state_dict)
from latent_lm.latents import from_sigma_points, LatentPosterior, SIGMA_DIVISOR, sigma_points
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.training.vae_losses import kl_divergence, ldm_equivalent_kl_weight
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.training.optimizer import clip_each_collection, make_optimizer
from latent_lm.latents import cache_shape, LatentNormalization, training_latents
from latent_lm.training.metrics_writer import read_metrics
from latent_lm.training.tasks import make_generator_task, VAETask
from latent_lm.training.train_loop import build_state_fns, train

DISC_START = 10  # imagenet_vae:tiny switches the GAN on after half of its 20 steps


def _mnist(split: str, n: int) -> np.ndarray:
    return load_embedded("mnist", split)[0][:n].astype(np.float32) / 127.5 - 1.0


def _leaves_close(a, b, rtol=1e-4, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        scale = float(np.max(np.abs(y))) or 1.0
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol * scale,
                                   err_msg=jax.tree_util.keystr(path))


# ---- LPIPS ----

def test_lpips_zero_for_identical_images_positive_otherwise():
    params = init_lpips_params(0)
    # The numpy initialiser builds exactly the tree (names, shapes) the Flax module declares.
    x = jnp.zeros((1, 32, 32, 3))
    declared = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)
    assert jax.tree.map(lambda a: a.shape, declared) == jax.tree.map(lambda a: a.shape, params)
    assert sum(a.size for a in jax.tree.leaves(params)) == 14_714_688 + sum((64, 128, 256, 512, 512))
    a, b = _mnist("test", 4), _mnist("test", 8)[4:]
    x0, x1 = jnp.asarray(np.concatenate([a, a])), jnp.asarray(np.concatenate([a, b]))

    # The weights are an argument, not 59 MB of constants baked into the program (the compilation cache then
    # writes them too: twice the time).
    @jax.jit
    def distance_and_grad(params, x):  # one forward pass serves both
        def distance(y):
            d = LPIPS().apply(params, y, x1)
            return jnp.sum(d[4:]), d

        (_, d), grad = jax.value_and_grad(distance, has_aux=True)(x)
        return d, grad

    d, grad = distance_and_grad(params, x0)
    np.testing.assert_allclose(d[:4], 0.0, atol=1e-12)  # (both halves run as one conv batch: rounding only)
    assert np.all(np.asarray(d[4:]) > 1e-3)
    # Differentiable: a finite gradient that moves exactly the images whose distance is taken.
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad[:4]).max()) == 0.0
    assert np.all(np.asarray(jnp.abs(grad[4:]).max(axis=(1, 2, 3))) > 0)


def _slice_of(index: int) -> int:
    return 1 + sum(index > boundary for boundary in (3, 8, 15, 22))  # lpips.vgg16: slices end at 4, 9, 16, 23


def test_lpips_weights_load_from_torch_named_files_and_fail_clearly(tmp_path):
    params = init_lpips_params(1)
    sd = lpips_torch_state_dict(params)
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    # lpips/taming full-model names for the VGG part (safetensors) + the lin layers (npz).
    save_file({f"net.slice{_slice_of(int(k.split('.')[1]))}.{k.split('.', 1)[1]}": v for k, v in vgg.items()},
              str(tmp_path / "vgg.safetensors"))
    np.savez(tmp_path / "lin.npz", **lin)
    loaded = load_lpips_params(f"{tmp_path}/vgg.safetensors, {tmp_path}/lin.npz")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    # torchvision's own vgg16 state_dict (classifier keys are ignored) and the LPIPS v0.1 .pth, read by torch.
    torch.save({**{k: torch.from_numpy(v) for k, v in vgg.items()}, "classifier.0.weight": torch.zeros(2, 2)},
               tmp_path / "vgg16.pth")
    torch.save({k: torch.from_numpy(v) for k, v in lin.items()}, tmp_path / "lpips_vgg.pth")
    loaded = load_lpips_params([str(tmp_path / "vgg16.pth"), str(tmp_path / "lpips_vgg.pth")])
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

    with pytest.raises(MissingInputError, match="download.pytorch.org"):
        load_lpips_params(f"{tmp_path}/vgg16.pth,{tmp_path}/nowhere.pth")
    with pytest.raises(DataError, match="lin0.model.1.weight"):
        load_lpips_params(str(tmp_path / "vgg16.pth"))
    np.savez(tmp_path / "bad.npz", **dict(lin, **{"lin4.model.1.weight": np.ones((1, 3, 1, 1), np.float32)}))
    with pytest.raises(DataError, match="lin4 has shape"):
        load_lpips_params(f"{tmp_path}/vgg16.pth,{tmp_path}/bad.npz")
    assert set(lpips_param_shapes()) == {"/".join(map(str, (k.key for k in p)))
                                         for p, _ in jax.tree_util.tree_leaves_with_path(params["params"])}

    c = default.get_config()
    c.vae_loss.perceptual_weight = 1.0
    with pytest.raises(ConfigError, match="perceptual_weights"):
        VAETask.from_config(c).perceptual_params  # what the loss reads: train_vae fails at its first step
    c.vae_loss.perceptual_weights = str(tmp_path / "missing.pth")
    with pytest.raises(MissingInputError, match="LPIPS v0.1"):
        VAETask.from_config(c).perceptual_params  # read on first use, i.e. when train_vae traces the loss


# ---- PatchGAN ----

def test_hinge_losses_and_discriminator_against_hand_computed_values():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
    # relu(1 − real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2): ½·(5/6 + 1)
    np.testing.assert_allclose(hinge_discriminator_loss(real, fake), 0.5 * (2.5 / 3 + 1.0), rtol=1e-6)
    np.testing.assert_allclose(generator_adversarial_loss(fake), 1.0 / 3, rtol=1e-6)

    # taming NLayerDiscriminator(3, ndf=64, n_layers=3): convs 3→64 (+bias), 64→128, 128→256, 256→512 (no bias,
    # BatchNorm affine), 512→1 (+bias), all 4×4; a 256² image gives the classic 30×30 patch logits.
    d = PatchDiscriminator()
    shapes = jax.eval_shape(d.init, jax.random.key(0), jnp.zeros((2, 256, 256, 3)))
    expected = (16 * 3 * 64 + 64) + 16 * 64 * 128 + 2 * 128 + 16 * 128 * 256 + 2 * 256 + 16 * 256 * 512 + 2 * 512 \
        + (16 * 512 + 1)
    assert sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)) == expected == 2_765_633
    assert jax.eval_shape(d.apply, shapes, jnp.zeros((2, 256, 256, 3))).shape == (2, 30, 30)
    # BatchNorm in training mode: an image's logits depend on the rest of the batch.
    small = PatchDiscriminator(channels=8, num_layers=2)
    x = jnp.asarray(_mnist("test", 4))
    variables = jax.jit(small.init)(jax.random.key(0), x)
    apply = jax.jit(small.apply)
    assert apply(variables, x).shape == (4, 5, 5)
    assert not np.allclose(apply(variables, x)[0], apply(variables, x.at[1:].set(0.0))[0])


# ---- the one-step GAN objective, the adaptive weight and the warm-up gate ----

def _gan_setup(perceptual: bool):
    """The tiny ImageNet σ-VAE recipe (L1 + LPIPS(random) + adaptive PatchGAN), its params and a reference.

    `perceptual=False`: the same recipe with LPIPS replaced by an MSE term (a second, smooth reconstruction loss), so
    that no VGG16 is compiled."""
    c = imagenet_vae.get_config("tiny")
    assert c.vae_loss.disc_start == DISC_START and c.vae_loss.perceptual_weight == 1.0
    if not perceptual:
        c.vae_loss.update(dict(perceptual_weight=0.0, l2_weight=1.0))
    task = VAETask.from_config(c)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.key(0)))
    x = jnp.asarray(_mnist("train", 4))
    rng = jax.random.key(7)
    task_grad = jax.jit(lambda p, step: jax.grad(task.loss, has_aux=True)(p, {"image": x, "step": step}, rng))

    @jax.jit
    def reference_fn(p, gate, lpips_params):
        """The textbook losses, each differentiated on its own, λ by brute force through the whole VAE."""
        model, disc = task.model, task.disc
        lpips = LPIPS()

        def recon_of(vae_vars):
            return model.apply(vae_vars, x, rng=rng)

        def rec_loss(r):
            loss = task.l1_weight * jnp.mean(jnp.abs(x - r)) + task.l2_weight * jnp.mean(jnp.square(x - r))
            if perceptual:
                loss = loss + task.perceptual_weight * jnp.mean(lpips.apply(lpips_params, x, r))
            return loss

        def g_loss(r):
            return generator_adversarial_loss(disc.apply({"params": p["disc"]}, r))

        vae_vars = {"params": p["params"]}
        last = lambda g: g["params"]["decoder"]["head_fc2"]["kernel"]  # noqa: E731
        grad_rec = last(jax.grad(lambda v: rec_loss(recon_of(v)["recon"]))(vae_vars))
        grad_gan = last(jax.grad(lambda v: g_loss(recon_of(v)["recon"]))(vae_vars))
        lam = task.disc_weight * jnp.clip(jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_gan) + 1e-4), 0, 1e4)

        def generator(v):
            out = recon_of(v)
            return (rec_loss(out["recon"]) + task.kl_weight * jnp.mean(jnp.square(out["mu"]))
                    + gate * lam * g_loss(out["recon"]))

        recon = recon_of(vae_vars)["recon"]

        def discriminator(d):
            return gate * hinge_discriminator_loss(disc.apply({"params": d}, x), disc.apply({"params": d}, recon))

        return jax.grad(generator)(vae_vars), jax.grad(discriminator)(p["disc"]), lam

    # The LPIPS weights go in as an argument: 59 MB of constants would double the compile (and cache write).
    lpips_params = task.perceptual_params if perceptual else None
    return task, params, task_grad, lambda p, gate: reference_fn(p, gate, lpips_params)


@pytest.fixture(scope="module")
def gan_setup():
    return _gan_setup(perceptual=False)


def _check_one_step_objective(task, params, task_grad, reference):
    grads, metrics = task_grad(params, jnp.int32(DISC_START))
    ref_vae, ref_disc, ref_lambda = reference(params, 1.0)
    # Adaptive weight (hᵀ·∂L/∂x̂, no second VAE backward) = brute-force ∇ through encoder and decoder.
    assert float(ref_lambda) > 0
    np.testing.assert_allclose(metrics["gan_weight"], ref_lambda, rtol=1e-4)
    _leaves_close(grads["params"], ref_vae["params"])
    _leaves_close(grads["disc"], ref_disc)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["disc"]))
    assert set(metrics) >= {"loss", "rec_loss", "l1", "mu_reg", "g_loss", "d_loss", "gan_weight", "psnr"}
    return metrics


def test_one_step_objective_gives_each_player_exactly_its_gradient(gan_setup):
    """L1 + MSE reconstruction (no VGG16 to compile); the LPIPS recipe is the slow sibling below."""
    metrics = _check_one_step_objective(*gan_setup)
    assert metrics["mse"] > 0


@pytest.mark.slow
def test_one_step_objective_with_lpips_gives_each_player_exactly_its_gradient():
    """The recipe itself: LPIPS (VGG16, random weights) in the reconstruction loss and in the adaptive weight."""
    metrics = _check_one_step_objective(*_gan_setup(perceptual=True))
    assert metrics["lpips"] > 0


def test_disc_start_gates_both_gan_terms(gan_setup):
    task, params, task_grad, reference = gan_setup
    grads, metrics = task_grad(params, jnp.int32(DISC_START - 1))
    ref_vae, _, _ = reference(params, 0.0)
    assert float(metrics["gan_weight"]) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["disc"]))
    _leaves_close(grads["params"], ref_vae["params"])  # the pure reconstruction + μ-penalty gradient
    with pytest.raises(ValueError, match="batch\\['step'\\]"):
        jax.eval_shape(task.loss, params, {"image": jnp.zeros((4, 28, 28, 1))}, jax.random.key(0))  # traced only


def test_each_gan_player_is_clipped_on_its_own():
    """The VAE's update does not shrink because the discriminator's gradient is large (two optimizers' behaviour);
    a single collection is clipped exactly as optax.clip_by_global_norm."""
    clip = clip_each_collection(1.0)
    grads = {"params": {"w": jnp.full((4,), 0.1), "b": jnp.full((2,), -0.2)}, "disc": {"w": jnp.full((3,), 100.0)}}
    clipped, _ = clip.update(grads, clip.init(grads))
    _leaves_close(clipped["params"], grads["params"])  # norm 0.35 < 1: untouched
    np.testing.assert_allclose(float(optax.tree.norm(clipped["disc"])), 1.0, rtol=1e-6)
    one = {"params": {"w": jnp.full((4,), 3.0), "b": jnp.full((2,), -1.0)}}
    ref, _ = optax.clip_by_global_norm(1.0).update(one, optax.clip_by_global_norm(1.0).init(one))
    got, _ = clip.update(one, clip.init(one))
    _leaves_close(got, ref)
    # The train loop's optimizer: the VAE's AdamW steps do not depend on the discriminator's gradient norm (two
    # steps, since Adam's first step is scale-free; with one shared clip the second is a quarter smaller).
    tx = make_optimizer(ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_ratio=0.0, b1=0.9, b2=0.99,
                                                        eps=1e-8, weight_decay=0.0, clip_norm=1.0)), 10)
    params = jax.tree.map(jnp.ones_like, grads)
    small_disc = dict(grads, disc={"w": jnp.full((3,), 0.01)})

    def vae_steps(first):
        state, out = tx.init(params), []
        for g in (first, small_disc):
            update, state = tx.update(g, state, params)
            out.append(update["params"])
        return out

    for a, b in zip(vae_steps(grads), vae_steps(small_disc)):
        _leaves_close(a, b)


def _encode_only_the_first(monkeypatch, count: int) -> None:
    """The encode stage reads only the first `count` images of each split (the same stage on fewer images)."""
    ordered_images = experiment.ordered_images

    def first(data, split, batch_size):
        n, read_batches = ordered_images(data, split, batch_size)
        return min(n, count), read_batches

    monkeypatch.setattr(experiment, "ordered_images", first)


@pytest.mark.slow
def test_tiny_imagenet_vae_recipe_trains_in_the_train_loop_and_encodes(tmp_path, monkeypatch):
    """The recipe as configured: σ-VAE, L1 + LPIPS (random VGG16) + adaptive PatchGAN switched on at step 3 of 6,
    then encode (200 images a split in batches of 48 = 8 devices × 6: a padded last batch in every shard)."""
    c = imagenet_vae.get_config("tiny")
    assert c.stages == ("train_vae", "encode")
    c.vae_train.update(dict(steps=6, batch_size=8, log_every=1))
    c.vae_loss.disc_start = 3
    c.checkpoint.every = 100
    c.data.encode_batch_size = 48
    _encode_only_the_first(monkeypatch, 200)
    # One device: the recipe, not the sharding, is under test here (and 8 fake devices compile slower).
    mesh, rules = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1]), logical_rules()
    experiment.train_vae(c, str(tmp_path), mesh, rules)
    summary = experiment.encode(c, str(tmp_path), mesh, rules)
    rows = [json.loads(line) for line in (tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("loss", "l1", "lpips", "g_loss", "d_loss", "gan_weight"))
        assert r["lpips"] > 0
    assert [r["gan_weight"] > 0 for r in rows] == [False] * 3 + [True] * 3  # steps 0–2 gated, 3–5 on
    assert summary["train_latents"] == [200, 49, 4] and summary["test_latents"] == [200, 49, 4]
    # The checkpoint holds the σ-VAE exactly where readers expect it, plus the discriminator.
    state = experiment.load_state(VAETask.from_config(c), optim_config=c.vae_optim, train_config=c.vae_train,
                                  mesh=mesh, rules=rules, workdir=f"{tmp_path}/vae")
    assert set(state.params) == {"params", "disc"}
    plain = jax.eval_shape(VAETask.from_config(default.get_config()).init_params, jax.random.key(0))
    assert set(plain) == {"params"}


@dataclasses.dataclass(frozen=True)
class _StepProbe:
    """A one-scalar task whose metrics report the step count the train loop puts in the batch."""

    def init_params(self, rng):
        return {"w": jnp.zeros(())}

    def loss(self, params, batch, rng):
        loss = jnp.mean(jnp.square(params["w"] - batch["x"]))
        return loss, {"loss": loss, "batch_step": batch["step"].astype(jnp.float32)}


def _write_random_checkpoint(task, c, workdir: str, step: int) -> None:
    """A train_vae checkpoint of `task` (params N(0, 0.05²), the rest zeros), as the loop leaves it: no training."""
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])
    _, abstract, _ = build_state_fns(task, make_optimizer(c.vae_optim, c.vae_train.steps), mesh, logical_rules(), 0)
    rng = np.random.default_rng(0)
    zeros = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), abstract)
    params = jax.tree.map(lambda a: jax.device_put(rng.normal(0.0, 0.05, a.shape).astype(a.dtype), a.sharding),
                          abstract.params)
    state = zeros.replace(step=jax.device_put(np.int32(step), abstract.step.sharding), params=params,
                          ema_params=params)
    ckpt = Checkpointer(f"{workdir}/vae/checkpoints", async_save=False)
    ckpt.save(step, state, meta={"config": c.to_json()}, force=True)
    ckpt.wait()
    ckpt.close()


def test_kl_vae_gan_checkpoint_encodes_sigma_points_and_the_loop_feeds_the_step(tmp_path, monkeypatch):
    """Fast sibling of the recipe test, without compiling a VAE train step (about 15 s here):

    * the train loop puts its step count in every batch (what the GAN's disc_start gate reads; the gate itself is
      `test_disc_start_gates_both_gan_terms`);
    * encode on a checkpoint of the recipe's KL-VAE control with its PatchGAN (random weights, written directly):
      the discriminator stays out of the σ-VAE's variables, the cache holds the posterior's sigma points (μ ± σ) and
      the latent normalisation is the closed form (Var z = Var μ + E σ²) over the cached train split."""
    optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_ratio=0.1, b1=0.9, b2=0.99, eps=1e-8,
                                           weight_decay=0.0, clip_norm=1.0, ema_decay=0.0))
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])
    probe = iter({"x": np.full((8,), i, np.float32)} for i in range(3))
    train(_StepProbe(), probe, optim_config=optim, train_config=ml_collections.ConfigDict(dict(
        steps=3, batch_size=8, log_every=1)), mesh=mesh, rules=logical_rules(), workdir=str(tmp_path / "probe"),
        log=lambda s: None)
    assert [r["batch_step"] for r in read_metrics(str(tmp_path / "probe"))] == [0, 1, 2]

    c = imagenet_vae.get_config("kind=kl,tiny=1")
    assert c.vae.kind == "kl" and c.vae_loss.disc_weight > 0
    c.vae_loss.perceptual_weight = 0.0
    c.data.encode_batch_size = 48  # 8 devices × 6: a padded last batch in every shard
    _encode_only_the_first(monkeypatch, 200)
    task = VAETask.from_config(c)
    _write_random_checkpoint(task, c, str(tmp_path), step=2)
    rules = logical_rules()
    params = stage_inputs.vae_params(c, str(tmp_path), mesh, rules)
    assert set(params) == {"params", "disc"}
    out = experiment.encode(c, str(tmp_path), mesh, rules)
    assert out["train_latents"] == [200, 49, 8] and out["test_latents"] == [200, 49, 8]
    cached, _ = load_latent_cache(f"{tmp_path}/latents/test")
    x = jnp.asarray(_mnist("test", 8))
    mu, logvar = jax.jit(functools.partial(task.model.apply, method=SigmaVAE.posterior))(
        task.vae_variables(params), x)
    np.testing.assert_allclose(cached[:8], sigma_points(mu, logvar), rtol=1e-4, atol=1e-5)
    train_cache, _ = load_latent_cache(f"{tmp_path}/latents/train")
    mu_all, sigma_all = map(np.asarray, from_sigma_points(jnp.asarray(train_cache)))
    assert sigma_all.std() > 0  # per-value σ from the logvar head, not one constant
    var_z = np.mean(mu_all.astype(np.float64) ** 2 + sigma_all.astype(np.float64) ** 2) - np.mean(mu_all) ** 2
    np.testing.assert_allclose(out["latent_scale"], var_z ** -0.5, rtol=1e-4)
    np.testing.assert_allclose(out["latent_bias"], -np.mean(mu_all), rtol=1e-4, atol=1e-6)


# ---- the KL-VAE control ----

def test_kl_divergence_and_kl_vae_posterior():
    rng = np.random.default_rng(0)
    mu, logvar = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 4))
    np.testing.assert_allclose(kl_divergence(jnp.asarray(mu), jnp.asarray(logvar)),
                               0.5 * np.mean(mu ** 2 + np.exp(logvar) - 1 - logvar), rtol=1e-5)
    assert ldm_equivalent_kl_weight(49 * 4, 28 * 28) == pytest.approx(2.5e-7)
    vae = SigmaVAE(image_size=28, in_channels=1, patch_size=4, width=32, depth=1, num_heads=4, latent_dim=4,
                   kind="kl")
    x = jnp.asarray(_mnist("test", 2))

    task = VAETask(vae, kl_weight=0.5, image_shape=(28, 28, 1))  # L1 + kl_weight·KL for kind="kl"

    @jax.jit
    def run(x):
        variables = vae.init({"params": jax.random.key(0)}, x, rng=jax.random.key(1))
        return (variables, vae.apply(variables, x, rng=jax.random.key(2)),
                vae.apply(variables, x, method=SigmaVAE.posterior), vae.apply(variables, x, method=SigmaVAE.encode),
                vae.apply(variables, x, method=SigmaVAE.cache_latents),
                task.loss(variables, {"image": x}, jax.random.key(2)))

    variables, out, (mu, logvar), mode, cached, (loss, metrics) = run(x)
    assert "logvar_head" in variables["params"]["encoder"] and out["logvar"].shape == (2, 49, 4)
    # The training loss of the KL control: the KL of its own posterior replaces the σ-VAE's μ penalty.
    kl = 0.5 * np.mean(np.square(out["mu"]) + np.exp(out["logvar"]) - 1 - out["logvar"])
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(np.abs(out["recon"] - x)) + 0.5 * kl, rtol=1e-5)
    assert "mu_reg" not in metrics
    np.testing.assert_allclose(mode, mu)  # mode() = μ
    eps = jax.random.normal(jax.random.key(2), mu.shape)
    np.testing.assert_allclose(out["z"], mu + jnp.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached, sigma_points(mu, logvar))
    with pytest.raises(ValueError, match="no learned variance"):
        vae.clone(kind="sigma").apply(variables, x, method=SigmaVAE.posterior)


def test_kl_cache_rows_and_training_latents_sample_the_learned_sigma():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(6, 4)).astype(np.float32) * 2 + 0.5
    sigma = np.array([0.05, 0.3, 1.0, 2.0], np.float32) * np.ones((6, 1), np.float32)
    points = sigma_points(jnp.asarray(mu), jnp.asarray(2 * np.log(sigma)))
    back_mu, back_sigma = from_sigma_points(points)
    np.testing.assert_allclose(back_mu, mu, atol=1e-6)
    np.testing.assert_allclose(back_sigma, sigma, rtol=1e-5, atol=1e-6)
    # The cached points' moments over all values are those of z = μ + σ·ε (closed-form normalisation).
    kl = LatentPosterior(kind="kl")
    var_z = np.mean(mu.astype(np.float64) ** 2 + sigma ** 2) - np.mean(mu) ** 2
    np.testing.assert_allclose(kl.latent_variance(float(np.std(np.asarray(points, np.float64)))), var_z, rtol=1e-5)
    np.testing.assert_allclose(np.mean(np.asarray(points, np.float64)), np.mean(mu), rtol=1e-5)
    # training_latents samples z = μ + σ ⊙ ε with the cached (learned) σ, then normalises.
    cached = jnp.broadcast_to(points, (4000, 6, 8))
    norm = LatentNormalization(scale=2.0, bias=-0.5)
    z = np.asarray(training_latents(jax.random.key(0), cached, kl, norm))
    assert z.shape == (4000, 6, 4)
    np.testing.assert_allclose(z.mean(0), 2.0 * (mu - 0.5), atol=4 * 2.0 * sigma.max() / np.sqrt(4000))
    np.testing.assert_allclose(z.std(0), 2.0 * sigma, rtol=0.08)
    # The σ-VAE keeps [T, C] rows and one σ_b per example.
    sig = LatentPosterior(kind="sigma", std=0.5)
    zs = np.asarray(training_latents(jax.random.key(1), jnp.zeros((2000, 6, 4)), sig, LatentNormalization(1.0, 0.0)))
    np.testing.assert_allclose(zs.std(), 0.5 / SIGMA_DIVISOR, rtol=0.05)
    assert sig.cache_dim(4) == 4 and kl.cache_dim(4) == 8
    c = default.get_config()
    c.vae.kind = "kl"
    assert cache_shape(c) == (49, 8)
    assert make_generator_task(c, norm).posterior == LatentPosterior(kind="kl", std=c.vae.std)


def _collapse_ratio(kind: str, kl_weight: float, steps: int, lr: float, held_out: np.ndarray) -> float:
    """Trains a tiny VAE of `kind` with Adam(lr) on MNIST (batches of 16) and returns r = mean posterior σ / std(μ)
    on the held-out images; init, training and r are one program (one compile, no eager ops)."""
    c = default.get_config()
    c.vae.update(dict(width=32, depth=1, kind=kind, kl_weight=kl_weight))
    # MSE: its curvature is what makes the noise cost reconstruction and σ shrink (L1's is zero almost everywhere;
    # measured: L1 alone leaves r between 0.03 and 0.3 after 400 steps, MSE gives 0.01 after 300, over 4 seeds).
    c.vae_loss.update(dict(l1_weight=0.0, l2_weight=1.0))
    task = VAETask.from_config(c)
    tx = optax.adam(lr)

    def step(carry, xs):
        params, opt = carry
        grads, _ = jax.grad(task.loss, has_aux=True)(params, {"image": xs[0]}, xs[1])
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), None

    @jax.jit
    def ratio(batches, keys, x):
        params = nn.unbox(task.init_params(jax.random.key(0)))
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (batches, keys))
        if kind == "kl":
            mu, logvar = task.model.apply(params, x, method=SigmaVAE.posterior)
            return jnp.mean(jnp.exp(0.5 * logvar)) / jnp.std(mu)
        mu = task.model.apply(params, x, method=SigmaVAE.encode)  # σ_b ~ |N(0, (std/0.8)²)|: E σ = std/0.8·√(2/π)
        return task.model.std / SIGMA_DIVISOR * math.sqrt(2 / math.pi) / jnp.std(mu)

    batches = _mnist("train", 4000)[np.random.default_rng(0).integers(0, 4000, (steps, 16))]
    return float(ratio(batches, jax.random.split(jax.random.key(1), steps), held_out))


def _collapse_ratios(kl_steps: int, kl_lr: float, sigma_steps: int, held_out: int) -> tuple[float, float]:
    """r for the KL-VAE (LDM-equivalent weight, Adam(kl_lr)) and the σ-VAE (Adam(1e-2)); r ≪ 0.05 is collapsed."""
    x = _mnist("test", held_out)
    r_kl = _collapse_ratio("kl", ldm_equivalent_kl_weight(49 * 4, 28 * 28), kl_steps, kl_lr, x)
    r_sigma = _collapse_ratio("sigma", 0.01, sigma_steps, 1e-2, x)
    print(f"r: KL-VAE {r_kl:.4f}, σ-VAE {r_sigma:.3f}")
    return r_kl, r_sigma


@pytest.mark.slow
def test_kl_vae_with_a_tiny_weight_collapses_and_the_sigma_vae_does_not():
    """docs/method.md §2.4: r = mean posterior σ / std(μ) on held-out images; r ≪ 0.05 means collapsed."""
    r_kl, r_sigma = _collapse_ratios(kl_steps=250, kl_lr=1e-2, sigma_steps=50, held_out=1000)
    assert r_kl < 0.05 and r_sigma > 0.3, (r_kl, r_sigma)


def test_kl_vae_collapses_and_the_sigma_vae_does_not_fast():
    """Fast sibling: the KL-VAE's σ collapses in 80 steps at a 3× learning rate (r ≈ 8.6 at 0 steps; 0.034 with
    the default XLA options, 0.029 with the test suite's, both 2026-12-07 on an AMD EPYC), the σ-VAE keeps r ≈ 0.5
    after 20 steps; 256 held-out images. 40 steps at 5e-2 were chaotic: r moved between 0.03 and 0.94 with the order
    of the matmul's float reductions. The bound is 0.1, 3× above the measured figures and 5× below the σ-VAE's; the
    slow test holds the KL-VAE to the collapse threshold itself, r < 0.05."""
    r_kl, r_sigma = _collapse_ratios(kl_steps=80, kl_lr=3e-2, sigma_steps=20, held_out=256)
    assert r_kl < 0.1 and r_sigma > 0.3, (r_kl, r_sigma)
