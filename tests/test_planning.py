"""Planning mode (issue #4): exact per-device state bytes, FSDP scaling, one clear error for a bad mesh, the CLI."""

import math
import os
import subprocess
import sys

import jax
import pytest

from configs import default
from latent_lm.errors import ConfigError
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.planning import plan_memory
from latent_lm.training.optimizer import make_optimizer
from latent_lm.training.tasks import LatentLMTask, make_generator_task
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import build_state_fns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(mesh_shape, batch_size=16, arch="latent_lm"):
    """The embedded default model (0.7 M params, width 96 so every embed dim splits 8 ways), remat as on ImageNet;
    arch="dit" gives its DiT twin (same backbone sizes, 7×7 latent grid)."""
    c = default.get_config()
    c.mesh.shape = mesh_shape
    c.train.batch_size = batch_size
    c.model.remat = "full"
    c.model.arch = arch
    return c


def per_device_shard_bytes(tree) -> int:
    """What the fullest device really holds of an initialised (concrete) tree."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values())


def _initialised_state(config):
    """The train state initialised on the 8 fake devices with the shardings the train loop uses."""
    mesh = make_mesh(config.mesh, jax.devices()[:8])
    task = make_generator_task(config, LatentNormalization(1.0, 0.0))
    init, _, _ = build_state_fns(task, make_optimizer(config.optim, config.train.steps), mesh,
                                 logical_rules(config.mesh), 0)
    with jax.set_mesh(mesh):
        return task, init(jax.random.PRNGKey(0))


def _assert_state_bytes_are_the_shards(plan, state):
    assert plan.params == per_device_shard_bytes(state.params)
    assert plan.opt_state == per_device_shard_bytes(state.opt_state)
    assert plan.ema == per_device_shard_bytes(state.ema_params)
    assert plan.params < sum(x.nbytes for x in jax.tree.leaves(state.params))  # really sharded


@pytest.mark.parametrize("arch", ["latent_lm", "dit"])
def test_lowered_plan_counts_the_state_and_the_batch_shard(arch):
    """The step of either generator traces and lowers for the (2, 2, 2) mesh; the plan counts the batch shard and
    estimates activations analytically. For the LatentLM, the state bytes planned from shapes are what the
    initialised, sharded state really holds per device (the DiT's: in the slow test_plan_matches_the_compiled_step,
    the fast sibling of which this is)."""
    config = tiny_config((2, 2, 2), arch=arch)
    plan = plan_memory(config, 8, stage="lower", hbm_bytes=1e9)
    assert plan.batch == (16 // 4) * (49 * 4 * 4 + 4)  # 4 sequences per (data, fsdp) shard: latents + label
    assert plan.activation_source == "lowered only (analytic)" and plan.compiled_argument_bytes is None
    assert plan.activations == plan.analytic_activations > 0
    assert plan.fits() and not plan.fits(hbm_bytes=plan.total)  # 90% of HBM usable by default
    if arch == "latent_lm":
        task, state = _initialised_state(config)
        assert type(task.model).__name__ == "LatentLM"
        _assert_state_bytes_are_the_shards(plan, state)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["latent_lm", "dit"])
def test_plan_matches_the_compiled_step(arch):
    """Slow (compiles the sharded train step on 8 devices). The compiled step's arguments are exactly the planned
    state plus the batch shard, the planned state bytes are the initialised shards, and the analytic activation
    estimate (the fallback when the step is not compiled) is of the compiler's order.
    Fast sibling: test_lowered_plan_counts_the_state_and_the_batch_shard."""
    config = tiny_config((2, 2, 2), arch=arch)
    plan = plan_memory(config, 8, stage="compile", hbm_bytes=1e9)
    assert plan.compiled_argument_bytes == plan.state + plan.batch
    assert plan.batch == (16 // 4) * (49 * 4 * 4 + 4)
    task, state = _initialised_state(config)
    assert type(task.model).__name__ == {"latent_lm": "LatentLM", "dit": "DiT"}[arch]
    _assert_state_bytes_are_the_shards(plan, state)
    assert plan.activation_source == "compiled (XLA:CPU)"
    assert 0.3 < plan.analytic_activations / plan.activations < 3.0
    assert plan.fits() and not plan.fits(hbm_bytes=plan.total)  # 90% of HBM usable by default


def test_fsdp_divides_state_bytes_by_its_size():
    replicated = plan_memory(tiny_config((8, 1, 1)), 8, stage="shapes")
    sharded = plan_memory(tiny_config((1, 8, 1)), 8, stage="shapes")
    assert replicated.params == 4 * replicated.num_params  # pure data parallelism: every device holds all fp32 params
    assert replicated.params == 8 * sharded.params
    assert replicated.opt_state == 2 * replicated.params + 8  # AdamW μ, ν + two int32 step counts (Adam, schedule)
    assert sharded.opt_state == 2 * sharded.params + 8
    assert replicated.ema == 8 * sharded.ema
    assert sharded.largest_replicated == ("", 0)
    task = LatentLMTask.from_config(tiny_config((8, 1, 1)), LatentNormalization(1.0, 0.0))
    shapes = jax.tree.leaves(jax.eval_shape(task.init_params, jax.random.PRNGKey(0)))
    path, nbytes = replicated.largest_replicated
    assert "mlp" in path and nbytes == max(4 * math.prod(x.shape) for x in shapes)
    # The batch splits over data×fsdp, so both meshes hold the same 2 sequences per device.
    assert replicated.batch == sharded.batch


def test_mesh_that_does_not_cover_the_devices_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"mesh.shape \(2, 2, 1\) has 4 devices but 8 are available"):
        plan_memory(tiny_config((2, 2, 1)), 8, stage="shapes")
    with pytest.raises(ConfigError, match="planning for 16 devices but jax sees 8"):
        plan_memory(tiny_config((2, 8, 1)), 16, stage="shapes")
    with pytest.raises(ConfigError, match="batch_size 12 is not divisible by the data-parallel size 8"):
        plan_memory(tiny_config((2, 4, 1), batch_size=12), 8, stage="shapes")


def test_multi_slice_mesh_is_planned_as_its_global_mesh():
    """Per-device memory depends on the global mesh (shape × dcn_shape), which one process of fake devices can hold."""
    config = tiny_config((1, 4, 1))
    config.mesh.dcn_shape = (2, 1, 1)
    plan = plan_memory(config, 8, stage="shapes")
    assert plan.mesh_shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert plan.params == plan_memory(tiny_config((2, 4, 1)), 8, stage="shapes").params


def test_cli_gives_itself_the_fake_devices():
    """launch/plan.py sets the device count before importing jax (the parent's XLA_FLAGS say 8)."""
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "plan.py"), "--config=configs/default.py", "--num_devices=16",
         "--config.mesh.shape=(2,8,1)", "--config.train.batch_size=32", "--stage=shapes", "--hbm_gb=0.01"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 16 devices, mesh data=2 fsdp=8 tensor=1, global batch 32" in out.stdout
    assert "does NOT fit" in out.stdout  # a few MB per device against 10 MB at 90% usable


def test_tokenizer_only_config_plans_its_vae_step():
    """A config whose stages train the σ-VAE and no generator (configs/imagenet_vae.py) plans the σ-VAE's step: its
    optimizer state, its batch of images, the GAN and LPIPS terms traced (random LPIPS weights: only shapes matter)."""
    from configs import imagenet_vae

    config = imagenet_vae.get_config("tiny=1")
    config.mesh.shape = (1, 8, 1)
    config.vae_train.batch_size = 16
    plan = plan_memory(config, 8, stage="lower")
    assert plan.batch == (16 // 8) * 28 * 28 * 1 * 4  # float32 images [B, 28, 28, 1] over data×fsdp
    assert plan.global_batch == 16 and plan.model_flops == 0  # no model FLOP count for the σ-VAE
    assert plan.opt_state == 2 * plan.params + 8 and plan.activation_source == "lowered only (analytic)"
    assert plan.peak_phase == "update" and plan.activations > 0


@pytest.mark.slow  # seven XLA:CPU compiles, ≈ 45 s here
def test_sampler_plan_holds_the_kv_cache_and_counts_every_iteration():
    """The sample stage's sampler compiled for 16 and 32 images on 8 fake devices (data-parallel mesh): exact params
    and inputs, the latents out, the KV cache in the temporaries growing with the batch; the compiled cost counts
    each loop body once, the fit of the five unrolled probes every latent, step and layer (close to the model's own
    count). Slow sibling: test_sampler_cost_fit_matches_a_fully_unrolled_sampler."""
    from latent_lm.models.latent_lm import LatentLMConfig
    from latent_lm.sampler_planning import format_sampler_plan, plan_sampler

    config = tiny_config((-1, 1, 1))
    small = plan_sampler(config, 8, sample_batch=16, roofline=True)
    large = plan_sampler(config, 8, sample_batch=32)
    cfg = LatentLMConfig.from_config(config)
    for plan, per_shard in ((small, 2), (large, 4)):
        assert plan.images_per_shard == per_shard and plan.source == "compiled (XLA:CPU)"
        assert plan.params == 4 * plan.num_params  # replicated fp32 params under the data-parallel mesh
        assert plan.inputs == 4 * per_shard + 8 and plan.outputs == per_shard * 49 * 4 * 4  # labels + key; latents
        # keys and values [depth, 2 rows per image (CFG), 1 + 49 slots, kv heads, head dim], fp32
        assert plan.kv_cache == 2 * cfg.depth * 2 * per_shard * 50 * cfg.kv_heads * (cfg.width // cfg.num_heads) * 4
        assert plan.temporaries > plan.kv_cache
    assert large.temporaries - small.temporaries >= small.kv_cache  # the cache doubles with the batch
    per_device = small.model_flops / 8
    assert small.compiled_flops < 0.01 * per_device  # one latent, one step, one layer of 49 × 20 × 4
    assert 0.9 < small.call_flops / per_device < 1.15  # the real call: 49 latents × 20 steps × 4 layers
    assert small.call_bytes > 100 * small.compiled_bytes_accessed
    assert 0.9 < small.compiled_flops / small.once_flops < 1.15  # the compile counts each loop body once
    assert large.call_flops is None and small.roofline() is None  # no probes asked; no chip on XLA:CPU
    text = format_sampler_plan(small)
    assert "of which the KV cache" in text and "every iteration counted" in text


@pytest.mark.slow
def test_sampler_cost_fit_matches_a_fully_unrolled_sampler():
    """Slow (six compiles). The probes' fit extrapolates: a sampler with all its loops unrolled at 4 layers, 3 latents
    and 3 steps (the last latent's backbone step dead code there) costs what the fit says, FLOPs and bytes.
    Fast sibling: test_sampler_plan_holds_the_kv_cache_and_counts_every_iteration."""
    from latent_lm.sampler_planning import fit_sampler_cost, probe_cost

    config = tiny_config((-1, 1, 1))
    fits = fit_sampler_cost(config, 8, 16)
    unrolled = probe_cost(config, jax.devices()[:8], 16, depth=4, num_latents=3, num_steps=3, cache_slots=50)
    for fitted, measured in zip(fits, unrolled):
        assert fitted.call(4, 3, 3, backbone_steps=2) == pytest.approx(measured, rel=0.02)


def test_dit_sampler_plan_counts_every_solver_step_and_layer():
    """The DiT twin's whole-image sampler: no KV cache; its probes (3 compiles) count K model calls of every layer,
    close to the model's own count, where the compiled cost counts one call of one layer."""
    from latent_lm.sampler_planning import plan_sampler

    plan = plan_sampler(tiny_config((-1, 1, 1), arch="dit"), 8, sample_batch=16, roofline=True)
    assert plan.arch == "dit" and plan.kv_cache == 0 and plan.outputs == 2 * 49 * 4 * 4
    per_device = plan.model_flops / 8
    assert plan.compiled_flops < 0.1 * per_device < plan.call_flops
    assert 0.9 < plan.call_flops / per_device < 1.15
    assert 0.9 < plan.compiled_flops / plan.once_flops < 1.1  # the compile counts one call of one layer


def test_cli_plans_the_sampler_and_a_bad_batch_is_one_error_line():
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "plan.py"), "--config=configs/default.py", "--num_devices=8",
         "--what=sampler", "--sample_batch=12"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("error: sample batch 12 is not a positive multiple of the "
                                                   "data-parallel size 8 (mesh data×fsdp {'data': 8, 'fsdp': 1, "
                                                   "'tensor': 1})")


def test_sample_batch_without_the_sampler_is_refused():
    """Both planners share the `--what` / `--sample_batch` rule (latent_lm.main --mode=plan, launch/plan.py)."""
    from latent_lm.errors import UserError
    from latent_lm.sampler_planning import check_plan_flags
    check_plan_flags("sampler", 16)
    check_plan_flags("train", None)
    with pytest.raises(UserError, match="--sample_batch goes with --what=sampler"):
        check_plan_flags("train", 16)
