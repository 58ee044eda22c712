"""The DiT twin baseline (docs/method.md §9): official parameter counts and position table, adaLN-Zero init,
bidirectional attention, exact FLOPs, learning and class-conditional CFG sampling through the one train loop, sharding,
and the CLI end to end (train → sample → eval_loss)."""

import json
import os
import shutil
import subprocess

import cli_runs
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from test_train_loop import configs

from configs import default
from data_pipelines.latent_cache import write_latent_cache
from latent_lm import experiment
from latent_lm.convert.torch_modules import get_2d_sincos_pos_embed
from latent_lm.errors import ConfigError
from latent_lm.models.dit import DiT, DiTConfig, sincos_pos_embed_2d
from latent_lm.training.batches import drop_labels
from latent_lm.models.presets import DIT_EXPECTED_PARAMS, apply_dit_preset, dit_preset
from latent_lm.parallel.mesh import DEFAULT_RULES, largest_replicated, make_mesh, shard_batch
from latent_lm.sampling import SamplerSettings, sample_dit_latents
from latent_lm.training.flops import dit_matmul_params, dit_train_flops_per_step
from latent_lm.training.metrics_writer import read_metrics
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.training.tasks import DiTTask, make_generator_task
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import build_state_fns, jit_train_step, train


CLASSES, TOKENS, CHANNELS = 4, 16, 4
CLASS_MEANS = np.array([-1.5, -0.5, 0.5, 1.5], np.float32)
PATTERN = (0.5 * np.random.default_rng(7).standard_normal((TOKENS, CHANNELS))).astype(np.float32)


def dit_config(**model):
    """The default experiment config with a tiny DiT twin on a 4×4 grid of 4-channel latents, 4 classes."""
    c = default.get_config()
    c.model.update({**dict(arch="dit", width=32, depth=2, num_heads=4, latent_dim=CHANNELS, num_classes=CLASSES,
                           max_len=TOKENS), **model})
    c.vae.update(dict(latent_dim=CHANNELS, std=0.1))  # little σ-VAE noise: the class means stay crisp
    c.diffusion.prediction_type = "v_prediction"
    return c


def make_task(**model) -> DiTTask:
    return make_generator_task(dit_config(**model), LatentNormalization(1.0, 0.0))


def toy_data(seed=0, batch=16):
    """Latent images = a class-dependent level + a fixed spatial pattern + a little noise."""
    rng = np.random.default_rng(seed)
    while True:
        label = rng.integers(0, CLASSES, batch).astype(np.int32)
        lat = CLASS_MEANS[label][:, None, None] + PATTERN + 0.1 * rng.standard_normal((batch, TOKENS, CHANNELS))
        yield {"latents": lat.astype(np.float32), "label": label}


def one_device_mesh():
    return make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])


def random_params(task: DiTTask, seed=0, std=0.05):
    """N(0, std²) everywhere (shapes from eval_shape), so the zero-initialised layers are exercised too."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), abstract)


def param_count(cfg: DiTConfig) -> int:
    shapes = jax.eval_shape(DiT(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, cfg.max_len, cfg.latent_dim)),
                            jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))


# ---- the official architecture ----

@pytest.mark.parametrize("size", list(DIT_EXPECTED_PARAMS))
def test_official_parameter_counts(size):
    """Exact official counts (input_size 16, 16 channels, 1000 classes + null); the official count includes the
    frozen pos_embed [256, D], a constant here."""
    depth, width, heads, ratio = dit_preset(size)
    cfg = DiTConfig(width=width, depth=depth, num_heads=heads, mlp_ratio=ratio, latent_dim=16, num_classes=1000,
                    max_len=256)
    assert param_count(cfg) + 256 * width == DIT_EXPECTED_PARAMS[size]


def test_tiny_official_config_count_and_presets():
    # official_state_dict_keys.md "## DiT": input_size 4, C 4, D 64, depth 2, 4 heads, 10 classes → 162,048
    cfg = DiTConfig(width=64, depth=2, num_heads=4, latent_dim=4, num_classes=10, max_len=16)
    assert param_count(cfg) + 16 * 64 == 162_048
    model = ml_collections.ConfigDict(dict(arch="latent_lm", depth=1, width=8, num_heads=2, mlp_ratio=6.0))
    apply_dit_preset(model, "Medium")
    assert (model.arch, model.depth, model.width, model.num_heads, model.mlp_ratio) == ("dit", 24, 1024, 16, 4.0)
    with pytest.raises(ValueError, match="unknown DiT size 'B'"):
        dit_preset("B")


def test_pos_embed_is_the_mae_2d_sincos_table():
    """Re-derived token by token: channels [0, D/4) sin(col·ω), [D/4, D/2) cos(col·ω), then the same for the row;
    ω_k = 10000^(−k/(D/4)), tokens in raster order (MAE's meshgrid(w, h) puts the column first)."""
    dim, side = 32, 5
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
    want = np.zeros((side * side, dim))
    for n in range(side * side):
        row, col = divmod(n, side)
        want[n] = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega),
                                  np.cos(row * omega)])
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, side), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(dim, side), want, rtol=0, atol=1e-12)  # the PyTorch twin


def test_zero_init_output_and_bidirectional_attention():
    task = make_task()
    model = task.model
    x = jax.random.normal(jax.random.PRNGKey(1), (2, TOKENS, CHANNELS))
    t, y = jnp.array([10, 900]), jnp.array([1, CLASSES])  # the second row uses the null class
    params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
    q = params["params"]["blocks"]["attn"]["query"]["kernel"]
    assert q.value.shape == (2, 32, 4, 8) and q.names == ("layers", "embed", "heads", "kv")
    apply = jax.jit(model.apply)
    assert np.all(np.asarray(apply(nn.unbox(params), x, t, y)) == 0.0)  # adaLN-Zero + zero final layer

    rand = random_params(task, std=0.3)
    out = np.asarray(apply(rand, x, t, y))
    later = np.asarray(apply(rand, x.at[:, -1].add(1.0), t, y))
    assert np.abs(out[:, 0] - later[:, 0]).max() > 1e-3  # token 0 sees the last token: no causal mask
    earlier = np.asarray(apply(rand, x.at[:, 0].add(1.0), t, y))
    assert np.abs(out[:, -1] - earlier[:, -1]).max() > 1e-3


def test_class_dropout_and_bad_configs():
    labels = jnp.zeros((20_000,), jnp.int32)
    dropped = np.asarray(drop_labels(jax.random.PRNGKey(0), labels, CLASSES, 0.1))
    assert set(np.unique(dropped)) == {0, CLASSES} and abs((dropped == CLASSES).mean() - 0.1) < 0.01
    assert np.array_equal(np.asarray(drop_labels(jax.random.PRNGKey(0), labels, CLASSES, 0.0)), labels)
    with pytest.raises(ConfigError, match="max_len=15 is not a square number"):
        make_task(max_len=15)
    with pytest.raises(ConfigError, match="text_vocab_size=7: the DiT twin generates class-conditional"):
        make_task(text_vocab_size=7)


# ---- FLOPs ----

def test_flops_match_the_parameter_shapes_and_xla():
    """(1) The count equals one derived from the actual parameter tree: kernels of the timestep MLP and of every
    adaLN modulation act once per image, all other kernels once per token, plus the attention square.
    (2) XLA's own FLOP count of the lowered gradient (depth 1: XLA counts a scan body once) agrees within 2%."""
    depth, width, heads, ratio = dit_preset("Base")
    cfg = DiTConfig(width=width, depth=depth, num_heads=heads, mlp_ratio=ratio, latent_dim=16, num_classes=1000,
                    max_len=256)
    shapes = nn.unbox(jax.eval_shape(DiT(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 16)),
                                     jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)))
    per_token = per_image = 0
    for path, x in traverse_util.flatten_dict(shapes["params"], sep="/").items():
        if not path.endswith("kernel"):
            continue
        size = int(np.prod(x.shape))
        if path.startswith("t_embedder") or "adaLN_modulation" in path:
            per_image += size
        else:
            per_token += size
    assert dit_matmul_params(cfg) == {"token": per_token, "image": per_image}
    want = 6 * (per_token * 256 + per_image) * 8 + 12 * depth * width * 256 * 256 * 8
    assert dit_train_flops_per_step(cfg, 8)["total"] == want

    small = DiTConfig(width=256, depth=1, num_heads=4, latent_dim=4, num_classes=10, max_len=64)
    model, b = DiT(small), 4
    x, t = jnp.ones((b, 64, 4)), jnp.zeros((b,), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, t))
    cost = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x, t, t) ** 2))).lower(params).cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = dit_train_flops_per_step(small, b)["total"]
    assert abs(xla - ours) / ours < 0.02, (xla, ours)
    task = make_task()
    assert task.train_flops_per_example() == dit_train_flops_per_step(task.model.config, 1)["total"]


# ---- training and sampling ----

TRAIN_STEPS = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """400 steps of the real train loop on the toy class-conditional latents (one device; ≈ 3 s of steps, the rest
    is compilation)."""
    task = make_task()
    optim, train_cfg, ckpt = configs(TRAIN_STEPS)
    workdir = str(tmp_path_factory.mktemp("dit") / "run")
    res = train(task, toy_data(), optim_config=optim, train_config=train_cfg, mesh=one_device_mesh(),
                rules=DEFAULT_RULES, workdir=workdir, checkpoint_config=ckpt, log=lambda s: None)
    return task, jax.device_get(res.state.params), workdir


def test_loss_falls_in_the_train_loop(trained):
    _, _, workdir = trained
    rows = read_metrics(workdir)
    assert rows[-1]["step"] == TRAIN_STEPS and {"loss", "diffusion_loss", "grad_norm"} <= set(rows[-1])
    first = np.mean([r["loss"] for r in rows[:2]])
    last = np.mean([r["loss"] for r in rows[-10:]])
    assert last < 0.5 * first, (first, last)


def test_samples_are_class_dependent(trained):
    """A generative model is proven by generating: per-class sample means follow the class levels, and the shared
    spatial pattern (learnt through attention + positions) is reproduced."""
    task, params, _ = trained
    labels = np.repeat(np.arange(CLASSES), 8).astype(np.int32)
    levels = {}
    for scale in (1.0, 3.0):
        sampler = task.make_sampler(SamplerSettings(num_steps=10, cfg_scale=scale, prediction_type="v_prediction"))
        z = np.asarray(sampler(params, jnp.asarray(labels), jax.random.PRNGKey(0)))
        assert z.shape == (32, TOKENS, CHANNELS) and z.dtype == np.float32
        levels[scale] = np.array([(z[labels == k] - PATTERN).mean() for k in range(CLASSES)])
        centred = z - levels[scale][labels][:, None, None]
        assert np.corrcoef(centred.mean(0).ravel(), PATTERN.ravel())[0, 1] > 0.9
    print("per-class sample levels", levels, "targets", CLASS_MEANS)
    # Scale 1 is the plain conditional model: it reproduces the class levels. Guidance pushes away from the
    # unconditional (class-averaged) level, so at scale 3 the extreme classes spread further apart.
    assert np.abs(levels[1.0] - CLASS_MEANS).max() < 0.25, levels
    assert np.all(np.diff(levels[3.0]) > 0.5), levels
    assert levels[3.0][-1] - levels[3.0][0] > levels[1.0][-1] - levels[1.0][0] + 0.2, levels


def test_sampler_cfg_determinism_and_clipping(trained):
    task, params, _ = trained
    labels = jnp.asarray(np.arange(8) % CLASSES, jnp.int32)
    noise = jax.random.normal(jax.random.PRNGKey(3), (8, TOKENS, CHANNELS))

    def run(**kw):
        settings = SamplerSettings(num_steps=10, prediction_type="v_prediction", **kw)
        return np.asarray(jax.jit(lambda p, y, e: sample_dit_latents(task.model, p, y, e, task.schedule, settings))(
            params, labels, noise))

    cond, s1, s4 = run(cfg_scale=None), run(cfg_scale=1.0), run(cfg_scale=4.0)
    np.testing.assert_allclose(s1, cond, atol=1e-5)  # u + 1·(c − u) = c: the doubled batch pairs rows correctly
    assert np.abs(s4 - cond).max() > 0.05  # guidance changes the samples
    clipped = run(cfg_scale=4.0, x0_clip=0.5)
    assert np.abs(clipped).max() <= 0.5 + 1e-6 and np.abs(clipped - s4).max() > 0.1  # the last step returns x̂₀

    sampler = task.make_sampler(SamplerSettings(num_steps=10, cfg_scale=2.0, prediction_type="v_prediction"))
    a = np.asarray(sampler(params, labels, jax.random.PRNGKey(5)))
    b = np.asarray(sampler(params, labels, jax.random.PRNGKey(5)))
    c = np.asarray(sampler(params, labels, jax.random.PRNGKey(6)))
    assert np.array_equal(a, b) and np.abs(a - c).max() > 0.05


# ---- parallelism ----

def _steps(task, shape, n=3):
    """The first n steps of the `trained` run's optimizer (the same schedule, logical rules and batches as `train`),
    so the one-device step is the program `trained` compiled: the persistent compilation cache serves it."""
    optim, _, _ = configs(TRAIN_STEPS)
    tx, schedule = make_optimizer(optim, TRAIN_STEPS), learning_rate_schedule(optim, TRAIN_STEPS)
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=shape)), jax.devices()[: int(np.prod(shape))])
    init, _, shardings = build_state_fns(task, tx, mesh, DEFAULT_RULES, 0)
    data, losses = toy_data(), []
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = init(jax.random.PRNGKey(0))
        step = jit_train_step(task, tx, schedule, optim.ema_decay, shardings, mesh)
        for _ in range(n):
            state, metrics = step(state, shard_batch(next(data), mesh))
            losses.append(float(metrics["loss"]))
    return losses, state, shardings


@pytest.mark.slow
def test_sharded_run_matches_one_device():
    """DP × FSDP × TP (2, 2, 2) trains like one device, with the parameters really split by the logical rules."""
    task = make_task()
    ref_losses, ref_state, _ = _steps(task, (1, 1, 1))
    losses, state, shardings = _steps(task, (2, 2, 2))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(ref_state.params))):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-4)
    _check_dit_layout(state.params, shardings.params)


def _check_dit_layout(params, param_shardings):
    blocks = params["params"]["blocks"]
    assert blocks["mlp"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert blocks["adaLN_modulation"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    name, size = largest_replicated(params, param_shardings)
    assert size <= 256, (name, size)


def test_sharded_layout_follows_the_logical_rules():
    """Fast sibling of the sharded run: on the (2, 2, 2) mesh the DiT's state is laid out by the logical rules (the
    block kernels split over fsdp × tensor, nothing larger than 256 elements whole), from the abstract state alone."""
    optim, _, _ = configs(TRAIN_STEPS)
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(2, 2, 2))), jax.devices())
    _, abstract, shardings = build_state_fns(make_task(), make_optimizer(optim, TRAIN_STEPS), mesh, DEFAULT_RULES, 0)
    _check_dit_layout(abstract.params, shardings.params)


def test_remat_policies_give_the_same_gradients():
    task = make_task()
    params = random_params(task)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, TOKENS, CHANNELS))
    t, y = jnp.array([5, 700]), jnp.array([0, 3])
    grads = {}
    for remat in ("none", "full"):  # "dots" is the same nn.remat wrapper with another policy
        model = make_task(remat=remat).model
        f = lambda p, m=model: jnp.sum(jnp.square(m.apply(p, x, t, y)))  # noqa: E731
        grads[remat] = jax.jit(jax.grad(f))(params)
        if remat != "none":
            assert "remat" in str(jax.make_jaxpr(jax.grad(f))(params))
    for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- the stages and the CLI ----

def _synthetic_cache(workdir: str, counts=(("train", 256), ("test", 64))) -> None:
    """Class-dependent latents in the default config's shape [49, 4], with the identity normalisation."""
    rng = np.random.default_rng(0)
    for split, count in counts:
        labels = rng.integers(0, 10, count).astype(np.int32)
        latents = (labels[:, None, None] / 5.0 - 1.0 + 0.3 * rng.standard_normal((count, 49, 4))).astype(np.float32)
        meta = {"latent_norm": cli_runs.NORM} if split == "train" else {}
        write_latent_cache(os.path.join(workdir, "latents", split), latents, labels, meta)


def _check_stage_outputs(workdir: str, config, num_images: int, steps: int) -> None:
    """What sample and eval_loss leave for the DiT twin: uint8 samples, and the held-out loss with the DiT's own
    FLOPs and parameter count."""
    samples = np.load(f"{workdir}/samples/final.npz")
    assert samples["images"].shape == (num_images, 28, 28, 1) and samples["images"].dtype == np.uint8
    task = make_generator_task(config, LatentNormalization(**cli_runs.NORM))
    assert isinstance(task, DiTTask)
    loss = json.loads(open(f"{workdir}/eval/loss.json").read())
    assert loss["family"] == "dit" and loss["steps"] == steps and np.isfinite(loss["eval_loss"])
    assert loss["flops_per_step"] == task.train_flops_per_example() * config.train.batch_size
    assert loss["params"] == param_count(task.model.config)


def test_sample_and_eval_loss_stages_of_the_dit_twin(tiny_dit_workdir, tmp_path):
    """Fast sibling of the CLI test below: the sample and eval_loss stages in this process on a DiT
    checkpoint at the `tiny=1` size (`tiny_dit_workdir`: random weights at step 7, written without training; the
    DiT in the train loop is `trained` above, the train stage itself the CLI test)."""
    workdir = str(tmp_path)
    for part in ("lm", "vae"):
        shutil.copytree(f"{tiny_dit_workdir['workdir']}/{part}", f"{workdir}/{part}")
    _synthetic_cache(workdir, (("train", 16), ("test", 32)))
    config = tiny_dit_workdir["config"].copy_and_resolve_references()
    assert config.model.arch == "dit"
    config.eval.update(dict(loss_batch=16, loss_repeats=1))
    # The sample stage on the suite's 8 devices (its batches padded and split over the data axis), eval_loss on one.
    for stage, mesh in (("sample", make_mesh(None)), ("eval_loss", one_device_mesh())):
        experiment.RUNNERS[stage](config, workdir, mesh, DEFAULT_RULES)
    _check_stage_outputs(workdir, config, num_images=config.eval.samples_per_class * 10, steps=7)


@pytest.mark.slow
def test_cli_trains_and_samples_the_dit_twin(tmp_path):
    """`python -m latent_lm.main --config.model.arch=dit` on a synthetic latent cache: σ-VAE (2 steps, for the
    decoder), DiT training, CFG sampling and the held-out loss with the DiT's FLOPs, in one process."""
    workdir = str(tmp_path)
    _synthetic_cache(workdir)
    over = {"model.arch": "dit", "model.width": 32, "model.depth": 2, "model.num_heads": 4, "train.steps": 4,
            "train.batch_size": 16, "train.log_every": 2, "vae.width": 32, "vae.depth": 1, "vae_train.steps": 2,
            "optim.warmup_steps": 3, "vae_optim.warmup_steps": 1,  # what the clamp gave: a warm-up < the run
            "vae_train.batch_size": 16, "diffusion.num_sampling_steps": 2, "eval.samples_per_class": 2,
            "eval.sample_batch": 20, "eval.loss_batch": 32, "eval.loss_repeats": 1}
    cmd = cli_runs.command(workdir, over, "--config.stages=('train_vae', 'train', 'sample', 'eval_loss')")
    cmd = [a if a != "--mode=train" else "--mode=all" for a in cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cli_runs.env(), cwd=cli_runs.ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    _check_stage_outputs(workdir, cli_runs.make_config(over), num_images=20, steps=4)
    rows = read_metrics(f"{workdir}/lm")
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
