"""AOT compilation for named TPU topologies without a TPU (issue #17, docs/scaling_out.md §6.4): the planner compiles
the real train step with the TPU compiler when libtpu is installed (`pip install -e '.[tpu]'`); without libtpu those
tests skip, and the error paths and the CPU pinning of the entry points are checked either way."""

import importlib.util
import os
import subprocess
import sys

import pytest

from configs import default
from latent_lm import cli
from latent_lm.errors import ConfigError
from latent_lm.parallel.mesh import make_mesh
from latent_lm.planning import CHIPS, plan_memory, tpu_topology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
# `make test-tpu` (CI) sets LATENT_LM_REQUIRE_LIBTPU=1: there a missing libtpu fails these tests instead of skipping.
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU and not os.environ.get("LATENT_LM_REQUIRE_LIBTPU"),
                                  reason="libtpu is not installed (pip install -e '.[tpu]'); the TPU compiler tests "
                                         "need it, no TPU")


def tiny_config(mesh_shape=(1, -1, 1), batch_size=16):
    """The embedded default (0.71 M params, 4 layers scanned), remat "full" as on ImageNet."""
    c = default.get_config()
    c.mesh.shape = mesh_shape
    c.train.batch_size = batch_size
    c.model.remat = "full"
    return c


def test_unknown_topology_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"unknown TPU topology 'v9:2x2': give <chip>:<shape> with chip one of"):
        tpu_topology("v9:2x2")
    with pytest.raises(ConfigError, match="unknown TPU topology 'v5p'"):
        tpu_topology("v5p")


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
        tpu_topology("v5p:2x2x1")


def test_entry_points_pin_the_cpu_only_where_libtpu_has_no_tpu(monkeypatch):
    """`cli.run` keeps jax on the CPU where libtpu is installed and no TPU is attached (its TPU backend would fail
    noisily first); a user's JAX_PLATFORMS, an attached TPU or GPU, or no libtpu leave the choice to jax."""
    from jax._src import hardware_utils

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else real(name, *a))
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: False)
    monkeypatch.setattr(hardware_utils, "num_available_amd_gpus", lambda stop_at=None: 0)
    env: dict[str, str] = {}
    assert cli.cpu_unless_tpu_attached(env) and env == {"JAX_PLATFORMS": "cpu"}
    assert not cli.cpu_unless_tpu_attached({"JAX_PLATFORMS": ""})  # the user's choice, even "any"
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, None))
    assert not cli.cpu_unless_tpu_attached({})
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    monkeypatch.setattr(hardware_utils, "has_visible_nvidia_gpu", lambda: True)
    assert not cli.cpu_unless_tpu_attached({})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert not cli.cpu_unless_tpu_attached({})


@needs_libtpu
def test_with_libtpu_installed_an_entry_point_still_runs_on_the_cpu_quietly():
    """Nothing changes where libtpu is installed and no TPU attached: the CPU devices, and no libtpu lines on stderr."""
    code = ("from latent_lm import cli\n"
            "def main(argv):\n    import jax; print(jax.default_backend(), len(jax.devices()))\n"
            "raise SystemExit(cli.run(main, []))")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    if "tpu" in out.stdout:
        pytest.skip("a TPU is attached here")
    assert out.stdout.strip() == "cpu 1"
    assert "TPU" not in out.stderr, out.stderr


@needs_libtpu
def test_topology_devices_and_chip():
    """A slice smaller than a 4-chip host (v5e:1x1) works; v4 topologies give one device per TensorCore, so each
    device gets half a chip's HBM and peaks, and the planner's mesh and compile take them."""
    chip, devices = tpu_topology("v5p:2x2x1")
    assert len(devices) == 4 and chip == CHIPS["v5p"] and devices[0].platform == "tpu"
    chip, devices = tpu_topology("v5e:1x1")
    assert len(devices) == 1 and chip.hbm_bytes == 16e9
    chip, devices = tpu_topology("v4:2x2x1")
    assert len(devices) == 8 and chip.hbm_bytes == CHIPS["v4"].hbm_bytes / 2
    # jax.make_mesh refuses two devices per chip; the planner's mesh takes them in order, and the step compiles.
    mesh = make_mesh(tiny_config().mesh, devices)
    assert mesh.devices.shape == (1, 8, 1) and list(mesh.devices.flat) == devices
    plan = plan_memory(tiny_config(), 8, devices=devices)
    assert plan.activation_source == "compiled (XLA:TPU)" and plan.device_kind == "TPU v4" and plan.fits()
    assert plan.hbm_bytes == CHIPS["v4"].hbm_bytes / 2  # what launch/plan.py's table divides by (device_hbm)
    with pytest.raises(ConfigError, match="TPU topology 'v5p:3x3x3': INVALID_ARGUMENT"):
        tpu_topology("v5p:3x3x3")


@needs_libtpu
def test_tpu_compiler_plans_a_tiny_config_on_v5e_2x2():
    """The real train step compiled by XLA:TPU for 4 v5e chips (≈ 15 s here): memory figures of the TPU executable,
    exact state bytes under it, compiled FLOPs that count the scanned layers once (4 layers, the model count is
    higher). Slow sibling with every layer counted and the roofline: test_roofline_counts_every_layer."""
    chip, devices = tpu_topology("v5e:2x2")
    plan = plan_memory(tiny_config(), 4, devices=devices)
    assert plan.activation_source == "compiled (XLA:TPU)" and plan.device_kind.startswith("TPU v5")
    assert plan.chip == chip and plan.hbm_bytes == 16e9 and plan.fits()
    assert plan.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1} and plan.sequences_per_shard == 4
    # The state is exact; the TPU's (8, 128) tiles pad small minor dimensions, which the plan shows separately.
    assert plan.compiled_argument_bytes == plan.state + plan.batch + plan.layout_padding
    assert 0 < plan.activations < 100e6 and 0 < plan.generated_code < 100e6
    assert plan.total == (plan.state + plan.batch + plan.layout_padding + plan.activations
                          + plan.outputs_not_donated + plan.generated_code)
    per_device = plan.model_flops / 4
    assert 0.5 * per_device < plan.compiled_flops < per_device  # the loop body counted once, not 4 times
    assert plan.compiled_bytes_accessed > plan.state
    assert plan.roofline() is None  # needs step_cost's probes


@needs_libtpu
def test_tpu_compiler_plans_a_tiny_sampler_on_v5e_2x2():
    """The sample stage's sampler for 16 images compiled by XLA:TPU for 4 v5e chips with its five probes (≈ 15 s
    here): the TPU executable's memory (tile padding, generated code, the KV cache among the temporaries), its
    compiled cost counting one loop body, every iteration near the model's count, a memory-bound roofline."""
    from latent_lm.sampler_planning import format_sampler_plan, plan_sampler

    chip, devices = tpu_topology("v5e:2x2")
    plan = plan_sampler(tiny_config((-1, 1, 1)), 4, sample_batch=16, devices=devices, roofline=True)
    assert plan.source == "compiled (XLA:TPU)" and plan.device_kind.startswith("TPU v5")
    assert plan.chip == chip and plan.hbm_bytes == 16e9 and plan.fits()
    assert plan.mesh_shape == {"data": 4, "fsdp": 1, "tensor": 1} and plan.images_per_shard == 4
    assert plan.params == 4 * plan.num_params and plan.inputs == 4 * 4 + 8
    assert plan.generated_code > 0 and plan.layout_padding > 0  # XLA:CPU reports neither
    assert plan.kv_cache < plan.temporaries < 100e6
    per_device = plan.model_flops / 4
    assert plan.compiled_flops < 0.01 * per_device  # one latent, one solver step, one layer
    assert 0.8 < plan.call_flops / per_device < 1.2 and plan.call_bytes > 20 * plan.compiled_bytes_accessed
    assert 0.9 < plan.compiled_flops / plan.once_flops < 1.2  # each loop body once: what the compile counts
    roof = plan.roofline()
    assert roof.bound == "memory"  # 0.7 M params, 8 rows per chip: a few FLOPs per byte
    assert plan.images_per_second() == pytest.approx(16 / roof.seconds)
    assert "images/s" in format_sampler_plan(plan)


@pytest.mark.slow
@needs_libtpu
def test_roofline_counts_every_layer():
    """Slow (three TPU compiles, ≈ 45 s here). The depth-1/2 probes count every layer: with remat "full" the chip
    executes the model's FLOPs plus one more forward pass of the 4 blocks, above the scanned compile's count.
    Fast sibling: test_tpu_compiler_plans_a_tiny_config_on_v5e_2x2."""
    _, devices = tpu_topology("v5e:2x2")
    plan = plan_memory(tiny_config(), 4, devices=devices, roofline=True)
    per_device = plan.model_flops / 4
    assert plan.step_flops > plan.compiled_flops and plan.step_bytes > plan.compiled_bytes_accessed
    assert 1.0 < plan.step_flops / per_device < 1.4
    roof = plan.roofline()
    assert roof.seconds == max(roof.compute_seconds, roof.memory_seconds) > 0
    assert roof.bound == "memory"  # 0.7 M params: a few FLOPs per byte, far below v5e's ridge (240)
    assert 0 < roof.mfu < 0.2


def test_cli_topology_error_is_one_line():
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "plan.py"), "--config=configs/default.py",
                          "--topology=v9:2x2"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown TPU topology 'v9:2x2'")
