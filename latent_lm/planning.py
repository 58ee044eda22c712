"""Per-device memory plan of the generator train step (LatentLM or its DiT twin) for any config on N devices (#4).

The plan never allocates the model. It builds the abstract train state with the mesh's shardings
(`jax.eval_shape` inside `build_state_fns`), lowers the same jitted train step that training runs
(`jit_train_step`) on N fake XLA:CPU devices with the global batch `config.train.batch_size`, and reports per device:

* params, optimizer state, EMA and the rest of the state: exact, the shard shape of every array under its sharding;
* the batch: exact, the batch's shard shapes over (data, fsdp): [B, T, C] float32 latents and [B] int32 labels, or
  the packed rows of a task that declares its batch (`batch_shapes`: the multimodal and TTS tasks);
* activations and temporaries: `temp_size_in_bytes` of the step compiled for that mesh, or, when the step is not
  compiled, `analytic_activation_bytes` (below).

On fake CPU devices the compile is XLA:CPU's; run on a TPU/GPU host (`python -m latent_lm.main --mode=plan`), the same
function compiles with that backend and its temporaries are the accelerator's own. With libtpu installed
(`pip install -e '.[tpu]'`), `tpu_topology("v5p:2x2x1")` gives the compile-only devices of a named TPU slice and the
same function compiles with the TPU compiler on any machine, no TPU attached (docs/scaling_out.md §6.4): the plan then
also holds the executable's `cost_analysis()` and a roofline step-time estimate against the chip's peaks (`CHIPS`).

XLA:CPU computes bf16 matmuls in f32 (its optimised HLO converts the operands to f32 and the product back), so a bf16
program compiled for CPU holds f32 temporaries where TPU/GPU keep bf16 ones. Measured here on LatentLM-Base
(16 sequences × 256 tokens, remat full, one device): 3.35 GB of temporaries with bf16 compute, 5.96 GB with fp32.
The CPU figure is therefore an estimate of the accelerator's, on the high side for bf16 configs; TPU/GPU compilers
also fuse and schedule differently.

The sampler of the sample stage is planned the same way by `latent_lm/sampler_planning.py` (docs/scaling_out.md §6.4).

The fake devices must exist before jax is imported: `launch/plan.py` sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` itself before its imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from latent_lm.errors import ConfigError
from latent_lm.models.diffusion_head import FREQ_DIM
from latent_lm.models.dit import DiTConfig
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.layers import swiglu_hidden
from latent_lm.parallel import distributed
from latent_lm.parallel.mesh import (
    MESH_AXES,
    batch_sharding,
    data_parallel_size,
    largest_replicated,
    logical_rules,
    make_mesh,
)
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.latents import LatentNormalization
from latent_lm.training.tasks import VAETask, make_generator_task
from latent_lm.training.train_loop import build_state_fns, jit_train_step

GB = 1e9  # vendors quote HBM in decimal gigabytes (TPU v5p 95 GB, H100 80 GB)
# A plan "fits" when its total is at most this fraction of the HBM: the runtime, collective buffers and allocator
# fragmentation take the rest, and the CPU-compiled temporaries are an estimate of the accelerator's.
USABLE_HBM_FRACTION = 0.9
STAGES = ("shapes", "lower", "compile")


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's public peaks, for the HBM budget and the roofline (sources: docs/scaling_out.md §6.4)."""

    name: str
    hbm_bytes: float
    bf16_flops: float     # dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    slices: tuple[str, ...] = ()  # slice shapes `launch/plan.py --table` searches, fewest chips first

    def per_device(self, devices_per_chip: int) -> "Chip":
        """The share of one jax device: v4 topologies give one device per TensorCore (2 per chip, no megacore)."""
        if devices_per_chip == 1:
            return self
        return dataclasses.replace(self, name=f"{self.name} (1/{devices_per_chip} chip)",
                                   hbm_bytes=self.hbm_bytes / devices_per_chip,
                                   bf16_flops=self.bf16_flops / devices_per_chip,
                                   hbm_bandwidth=self.hbm_bandwidth / devices_per_chip)


_CUBES = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16")
_PODS_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), per chip. v4 is quoted as
# 32 GiB; the others in GB (taken as 1e9 bytes, the lower reading where the pages disagree).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * 2**30, 275e12, 1200e9, _CUBES),
    "v5e": Chip("v5e", 16e9, 197e12, 819e9, _PODS_2D),
    "v5p": Chip("v5p", 95e9, 459e12, 2765e9, _CUBES),
    "v6e": Chip("v6e", 32e9, 918e12, 1640e9, _PODS_2D),
}
# `device_kind` of a real or compile-only TPU device → its chip (for `--mode=plan` on a TPU VM).
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
_TOPOLOGY = re.compile(r"(?P<chip>[a-z0-9]+):(?P<shape>\d+(?:x\d+){1,2})")


def tpu_topology(name: str) -> tuple[Chip, list[jax.Device]]:
    """(chip of one device, compile-only devices) of the TPU slice `name` ("v5p:2x2x1", "v5e:2x4", "v4:2x2x2").

    No TPU is needed, only libtpu (`pip install -e '.[tpu]'`): `jax.experimental.topologies` gives devices that
    lower and compile with the TPU compiler but cannot run (docs/scaling_out.md §6.4).
    """
    found = _TOPOLOGY.fullmatch(name.strip())
    if found is None or found["chip"] not in CHIPS:
        raise ConfigError(f"unknown TPU topology {name!r}: give <chip>:<shape> with chip one of {list(CHIPS)}, "
                          f"e.g. v5p:2x2x1 or v5e:2x4")
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"compiling for TPU topology {name!r} needs libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies  # noqa: PLC0415  (loads libtpu: only when asked for)

    dims = tuple(int(d) for d in found["shape"].split("x"))
    if not distributed._on_cloud_tpu_vm():  # read once, when libtpu first loads
        # libtpu takes /tmp/libtpu_lockfile so that one process owns the chips; with no chips to own, a second
        # planner (or a test) would fail with "Internal error when accessing libtpu multi-process lockfile".
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        if "TPU_WORKER_HOSTNAMES" not in os.environ:
            # Without a TPU VM's metadata libtpu prints four lines of warnings on load (no accelerator type, no
            # worker hostnames); these two settings are all it looks for, and the compiled programs are the same
            # with them (checked on v5e:2x2: temporaries, code size and cost identical).
            os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
            os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    options = {}
    if math.prod(dims) < 4:  # smaller than one 4-chip host (v5e-1, v6e-1): its bounds must be the host's
        options["chips_per_host_bounds"] = (dims + (1, 1))[:3]
    try:
        devices = list(topologies.get_topology_desc(topology_name=name.strip(), platform="tpu", **options).devices)
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"TPU topology {name!r}: {str(e).splitlines()[0]}") from None
    return device_chip(devices), devices


def device_chip(devices: Sequence[jax.Device]) -> Chip | None:
    """The public peaks of one of `devices` (all of one kind), if it is a TPU chip of `CHIPS`; None for CPU/GPU."""
    name = DEVICE_KINDS.get(devices[0].device_kind)
    if name is None:
        return None
    chips = len({tuple(getattr(d, "coords", ())) for d in devices})
    return CHIPS[name].per_device(max(len(devices) // max(chips, 1), 1))


class HBMBudget:
    """What a plan of `total` bytes per device says against the chip's `hbm_bytes` (train step or sampler)."""

    total: int
    hbm_bytes: float | None

    def fits(self, hbm_bytes: float | None = None, usable_fraction: float = USABLE_HBM_FRACTION) -> bool | None:
        hbm = hbm_bytes if hbm_bytes is not None else self.hbm_bytes
        return None if hbm is None else self.total <= usable_fraction * hbm

    def hbm_line(self, usable_fraction: float = USABLE_HBM_FRACTION) -> str:
        """The "HBM … used, fits" line of the plan's report (needs `hbm_bytes`)."""
        verdict = "fits" if self.fits(usable_fraction=usable_fraction) else "does NOT fit"
        return (f"  HBM {self.hbm_bytes / GB:g} GB: {100 * self.total / self.hbm_bytes:.0f}% used, {verdict} "
                f"(usable {100 * usable_fraction:.0f}%)")


@dataclasses.dataclass(frozen=True)
class MemoryPlan(HBMBudget):
    """Per-device bytes of one train step; `activations` comes from `activation_source`."""

    num_devices: int
    mesh_shape: dict[str, int]
    global_batch: int
    seq_len: int
    num_params: int
    params: int
    opt_state: int
    ema: int
    other_state: int
    batch: int
    activations: int
    activation_source: str           # "compiled (<backend>)", "lowered only (analytic)" or "shapes only (analytic)"
    analytic_activations: int        # the analytic estimate's peak (computed in every stage)
    peak_phase: str                  # where the analytic peak is: "backward" (activations) or "update" (param-sized)
    outputs_not_donated: int         # outputs that do not reuse a donated input buffer (the metrics)
    compiled_argument_bytes: int | None
    largest_replicated: tuple[str, int]  # (path, bytes) of the largest array every device holds whole
    lower_seconds: float | None
    compile_seconds: float | None
    hbm_bytes: float | None = None
    generated_code: int = 0          # the executable's code, resident in device memory (compiled only)
    layout_padding: int = 0          # compiled argument bytes beyond the exact shards (TPU tiles pad minor dims)
    model_flops: float = 0.0         # the task's own count per step, all devices (training/flops.py)
    compiled_flops: float | None = None           # cost_analysis() per device (see `roofline` for what it counts)
    compiled_bytes_accessed: float | None = None  # cost_analysis() HBM bytes per device
    step_flops: float | None = None  # per device, every layer counted (`step_cost`; the scanned compile's is not)
    step_bytes: float | None = None  # the same for HBM bytes accessed
    device_kind: str = ""
    chip: Chip | None = None         # peaks of one device, for the roofline (TPU topologies and TPU hosts)

    @property
    def state(self) -> int:
        return self.params + self.opt_state + self.ema + self.other_state

    @property
    def total(self) -> int:
        return (self.state + self.batch + self.layout_padding + self.activations + self.outputs_not_donated
                + self.generated_code)

    @property
    def sequences_per_shard(self) -> int:
        return self.global_batch // (self.mesh_shape["data"] * self.mesh_shape["fsdp"])

    def roofline(self) -> "Roofline | None":
        """Step time bounded by the chip's peaks, from `step_cost`'s figures (None without a chip or the probe).

        The chip executes at least the model's counted FLOPs (its matmuls), so a probe below that count is wrong
        and the model count replaces it: on the 2-host slice v5p:2x2x2 the probes lose remat's recompute whatever
        the size (Base: 0.87× the model count there, 1.13× on v5p:2x2x1; docs/scaling_out.md §6.4)."""
        if self.chip is None or self.step_flops is None or self.step_bytes is None:
            return None
        model = self.model_flops / self.num_devices
        return Roofline(self.chip, max(self.step_flops, model), self.step_bytes, model)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """max(FLOPs / peak FLOP/s, HBM bytes / bandwidth) per device: a lower bound on the step time that ignores
    collectives, their overlap and everything a chip does below its peaks (docs/scaling_out.md §6.4).

    `flops` is what the chip executes (remat recompute included), from the compiler; `model_flops` is the task's
    own count (training/flops.py: 6·params·tokens, attention, the head × batch_mul), the numerator of the MFU.
    `bytes` is the compiler's "bytes accessed", its model of HBM traffic: for one 4096² bf16 matmul on 4 v5p chips
    it is 3.7× the operand and result shards, so the memory time leans high and "memory-bound" means by that model.
    """

    chip: Chip
    flops: float
    bytes: float
    model_flops: float

    @property
    def compute_seconds(self) -> float:
        return self.flops / self.chip.bf16_flops

    @property
    def memory_seconds(self) -> float:
        return self.bytes / self.chip.hbm_bandwidth

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    @property
    def mfu(self) -> float:
        """Model FLOPs per second at the roofline time over the peak: the best MFU this step allows."""
        return self.model_flops / (self.seconds * self.chip.bf16_flops)

    @property
    def compute_mfu(self) -> float:
        """The same if HBM traffic were free: model FLOPs over executed FLOPs (remat recompute, uncounted ops)."""
        return self.model_flops / self.flops

    @property
    def intensity(self) -> float:
        """FLOPs per HBM byte; the chip's ridge point is bf16_flops / hbm_bandwidth."""
        return self.flops / max(self.bytes, 1.0)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays/ShapeDtypeStructs with shardings (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_batch(mesh, batch_size: int, seq_len: int, latent_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The generator task's batch (cached latents and labels), sharded over (data, fsdp) like `shard_batch`."""
    return {"latents": jax.ShapeDtypeStruct((batch_size, seq_len, latent_dim), jnp.float32,
                                            sharding=batch_sharding(mesh, 3)),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding(mesh, 1))}


def task_batch(task, mesh, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch `task.loss` takes, sharded like `shard_batch`: the task's `batch_shapes(batch_size)` when it declares
    them (packed documents), else the class-conditional `abstract_batch`."""
    shapes = getattr(task, "batch_shapes", None)
    if shapes is None:
        cfg = task.model.config
        return abstract_batch(mesh, batch_size, cfg.max_len, cfg.latent_dim)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes(batch_size).items()}


# Temporaries of the gradient/update phase per fp32 parameter byte on this device, measured with XLA:CPU on the
# compiled train step (3B on 1 and 2 devices, 7B on 4, 13B on 8: 4.27–4.29). They are the gradients, the forward
# and backward scans' loop-state copies of the donated stacked weights, and the AdamW/EMA update's intermediates
# (without donation the copies go away but every output needs its own buffer, which costs more).
UPDATE_PHASE_PARAM_FACTOR = 4.3


def analytic_activation_bytes(cfg: LatentLMConfig | DiTConfig, *, sequences: int, batch_mul: int,
                              mesh_shape: dict[str, int], param_bytes: int, layer_params: int,
                              head_params: int) -> tuple[int, int]:
    """Closed-form estimate of one device's temporaries in a train step: (backward phase, update phase) bytes.

    Used when the step is not compiled; the peak is the larger of the two phases. The update phase holds
    `UPDATE_PHASE_PARAM_FACTOR`·param_bytes (see there). The backward phase holds the fp32 gradients (param_bytes)
    plus the activations (n = sequences·T tokens of this data shard, R = n·batch_mul diffusion-head rows,
    s = compute bytes, F and heads divided by `tensor`):
      backbone residuals remat "full": each block's input, L·n·D·s;  "dots": + q, k, v, attention out, fc1, gate,
                         fc2 outputs;  "none": every intermediate, attention probabilities included
      one block's        the block recomputed and differentiated in fp32: n·(8D + 4F)·4 + attention scores,
      backward           probabilities and their gradient b·H·T²·(s + 8), plus the layer's gathered weights
      diffusion head     never rematerialised: per block R·(10D + 4F)·s (adaLN, norms, SwiGLU), final layer
                         R·6D·s, timestep sinusoids R·256·4, fp32 targets/noise/errors R·C·4·6; its weights are
                         gathered whole once under FSDP (head_params·s)
    The DiT twin (`DiTConfig`, docs/method.md §9) has no diffusion head and no batch multiplier; its adaLN-Zero blocks
    add the two modulated inputs and the two gated branches, 4D per token, to every block term (8D → 12D), and its
    final layer (modulate + linear) keeps n·3D·s plus the same fp32 targets/noise/errors n·C·4·6.
    Within 15% of the XLA:CPU compile on the scaling family (docs/scaling_out.md §6.1); checked in
    tests/test_planning.py.
    """
    t, d, c = cfg.max_len, cfg.width, cfg.latent_dim
    tp, fsdp = mesh_shape["tensor"], mesh_shape["fsdp"]
    s = jnp.dtype(cfg.dtype).itemsize
    dit = isinstance(cfg, DiTConfig)
    f = swiglu_hidden(d, cfg.mlp_ratio) / tp
    token = (12 if dit else 8) * d  # D-sized tensors per token and block besides the SwiGLU's 4F
    heads = cfg.num_heads / tp
    qkv = (cfg.num_heads + 2 * cfg.kv_heads) * (d // cfg.num_heads) / tp
    n = sequences * t
    rows = n * batch_mul
    attention = sequences * heads * t * t
    if cfg.remat == "full":
        residuals = cfg.depth * n * d * s
    elif cfg.remat == "dots":
        residuals = cfg.depth * n * (d + qkv + d + 2 * f + d + (4 * d if dit else 0)) * s
    else:
        residuals = cfg.depth * (n * (token + 4 * f) * s + attention * (s + 4))
    gathered = (4 + s) * layer_params / tp if fsdp > 1 else 0
    block_backward = n * (token + 4 * f) * 4 + attention * (s + 8) + gathered
    if dit:
        head = n * 3 * d * s + n * c * 4 * 6
    else:
        fh = swiglu_hidden(d, cfg.head_mlp_ratio or cfg.mlp_ratio) / tp
        head = (cfg.head_depth * rows * (10 * d + 4 * fh) * s + rows * 6 * d * s + rows * FREQ_DIM * 4
                + rows * c * 4 * 6 + (head_params * s / tp if fsdp > 1 else 0))
    return int(param_bytes + residuals + block_backward + head), int(UPDATE_PHASE_PARAM_FACTOR * param_bytes)


def planning_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with a multi-slice mesh folded into one mesh: on fake devices every device is one process's.

    Per-device memory depends on the global mesh (shape × dcn_shape), not on which links carry which axis.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    dcn = tuple(config.mesh.get("dcn_shape") or (1,) * len(MESH_AXES))
    if math.prod(dcn) > 1:
        if -1 in tuple(config.mesh.shape):
            raise ConfigError("planning a multi-slice mesh needs an explicit mesh.shape (no -1)")
        config.mesh.shape = tuple(int(a) * int(b) for a, b in zip(config.mesh.shape, dcn))
        config.mesh.dcn_shape = (1,) * len(MESH_AXES)
    return config


def take_devices(num_devices: int, devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    """The first `num_devices` of `devices` (default `jax.devices()`), or one clear error."""
    if num_devices < 1:
        raise ConfigError(f"num_devices must be ≥ 1, got {num_devices}")
    available = list(devices) if devices is not None else jax.devices()
    if len(available) < num_devices:
        if devices is not None:
            raise ConfigError(f"planning for {num_devices} devices but the topology has {len(available)}")
        raise ConfigError(f"planning for {num_devices} devices but jax sees {len(available)}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before jax is imported "
                         f"(launch/plan.py does this)")
    return available[:num_devices]


def plans_vae(config: ml_collections.ConfigDict) -> bool:
    """A tokenizer-only config (stages with train_vae and no train, e.g. `configs/imagenet_vae.py`) plans its σ-VAE
    train step; every other config its generator's."""
    stages = tuple(config.get("stages", ()))
    return "train_vae" in stages and "train" not in stages


def _train_step(config: ml_collections.ConfigDict, devices: list[jax.Device], seed: int, lower: bool):
    """(task, mesh, abstract state, shardings, abstract batch, lowered step or None) of `config` on `devices`:
    the generator's step, or the σ-VAE's (`plans_vae`: its optimizer, batch of images, GAN and LPIPS terms)."""
    config = planning_config(config)
    mesh = make_mesh(config.mesh, devices)
    rules = logical_rules(config.mesh)
    dp = data_parallel_size(mesh)
    vae = plans_vae(config)
    optim, train = (config.vae_optim, config.vae_train) if vae else (config.optim, config.train)
    global_batch = int(train.batch_size)
    if global_batch % dp:
        raise ConfigError(f"{'vae_train' if vae else 'train'}.batch_size {global_batch} is not divisible by the "
                          f"data-parallel size {dp} (mesh data×fsdp {dict(mesh.shape)})")
    if vae:
        if config.get("vae_loss"):  # the frozen LPIPS weights are constants of the step: only their shapes matter
            config.vae_loss.update(dict(perceptual_random_init=True, perceptual_weights=""))
        task = VAETask.from_config(config)
        d = config.data
        batch = {"image": jax.ShapeDtypeStruct((global_batch, d.image_size, d.image_size, d.channels), jnp.float32,
                                               sharding=batch_sharding(mesh, 4))}
    else:
        task = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
        batch = task_batch(task, mesh, global_batch)
    total_steps = int(train.steps)
    tx = make_optimizer(optim, total_steps)
    _, abstract, shardings = build_state_fns(task, tx, mesh, rules, seed)
    lowered = None
    if lower:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step = jit_train_step(task, tx, learning_rate_schedule(optim, total_steps), optim.ema_decay,
                                  shardings, mesh)
            lowered = step.lower(abstract, batch)
    return task, mesh, abstract, shardings, batch, lowered


def compiled_cost(compiled) -> tuple[float, float]:
    """(flops, bytes accessed) per device from `cost_analysis()` (a dict, or a one-dict list in older jax)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


@contextlib.contextmanager
def unrolled_scans():
    """Every `nn.scan` traced inside unrolls fully (`unroll=length`), and every `nn.remat` keeps its recompute
    (`prevent_cse=True`): the probe of `step_cost`. The models remat with prevent_cse=False, which is exact inside a
    scan (a loop cannot share work between its forward and backward iterations) but lets an unrolled program merge
    a block's recompute into its forward pass: measured, an unrolled depth-1 step with remat "full" costs what one
    without remat does."""
    scan, remat = nn.scan, nn.remat
    nn.scan = lambda *args, **kwargs: scan(*args, **dict(kwargs, unroll=kwargs.get("length") or 1))
    nn.remat = lambda *args, **kwargs: remat(*args, **dict(kwargs, prevent_cse=True))
    try:
        yield
    finally:
        nn.scan, nn.remat = scan, remat


def step_cost(config: ml_collections.ConfigDict, num_devices: int, *, seed: int = 0,
              devices: Sequence[jax.Device] | None = None) -> tuple[float, float]:
    """(FLOPs, HBM bytes) per device of one train step of `config`, every layer counted.

    XLA's cost analysis counts a while loop's body once whatever its trip count, so the scanned step's own figures
    miss depth − 1 layers (measured: 5.6e9 against 10.8e9 FLOPs for 8 layers; docs/scaling_out.md §6.4).
    Everything but the layers is the same at any depth and every layer costs the same, so two compiles with the scan
    unrolled, at depth 1 and 2 (the rest of the config unchanged), give: c(L) = c(1) + (L−1)·(c(2) − c(1)).
    """
    devices = take_devices(num_devices, devices)
    costs = []
    for depth in (1, 2):
        probe = ml_collections.ConfigDict(config.to_dict())
        probe.model.depth = depth
        with unrolled_scans():
            lowered = _train_step(probe, devices, seed, lower=True)[-1]
        costs.append(compiled_cost(lowered.compile()))
    depth = int(config.model.depth)
    (f1, b1), (f2, b2) = costs
    return f1 + (depth - 1) * (f2 - f1), b1 + (depth - 1) * (b2 - b1)


def plan_memory(config: ml_collections.ConfigDict, num_devices: int, *, stage: str = "compile",
                hbm_bytes: float | None = None, seed: int = 0, devices: Sequence[jax.Device] | None = None,
                roofline: bool = False) -> MemoryPlan:
    """Per-device memory of `config`'s train step on the first `num_devices` devices: its generator's (`model.arch`),
    or its σ-VAE's for a tokenizer-only config (`plans_vae`; batch `vae_train.batch_size`, no analytic estimate).

    `devices`: where to plan, default `jax.devices()`; the compile-only devices of `tpu_topology` compile with the
    TPU compiler. `config.mesh.shape` (one -1 allowed) must cover exactly `num_devices`; `config.train.batch_size` is
    the global batch and must divide over data×fsdp. `stage`: "compile" (activations = the compiler's temporaries),
    "lower" (the step is traced and lowered, activations analytic) or "shapes" (state shapes only, activations
    analytic; a fraction of a second, for searching meshes). On a TPU chip of `CHIPS`, `hbm_bytes` defaults to its
    HBM and the plan carries its peaks; `roofline=True` (with stage "compile") adds `step_cost`'s two probe compiles
    so that `MemoryPlan.roofline` can estimate the step time.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    available = take_devices(num_devices, devices)
    chip = device_chip(available)
    if hbm_bytes is None and chip is not None:
        hbm_bytes = chip.hbm_bytes
    t0 = time.perf_counter()
    task, mesh, abstract, shardings, batch, lowered = _train_step(config, available, seed, lower=stage != "shapes")
    lower_seconds = time.perf_counter() - t0 if lowered is not None else None
    global_batch = int(batch[next(iter(batch))].shape[0])
    dp = data_parallel_size(mesh)
    params = per_device_bytes(abstract.params)
    if isinstance(task, VAETask):
        # No closed form for the σ-VAE's activations: the screen uses the update phase's floor alone.
        backward_phase, update_phase = 0, int(UPDATE_PHASE_PARAM_FACTOR * params)
        seq_len = (task.model.image_size // task.model.patch_size) ** 2
    else:
        cfg = task.model.config
        seq_len = cfg.max_len
        tree = abstract.params["params"]
        blocks = tree["blocks"] if isinstance(cfg, DiTConfig) else tree["backbone"]["blocks"]
        layer_params = sum(math.prod(x.shape) for x in jax.tree.leaves(blocks)) // cfg.depth
        head_params = sum(math.prod(x.shape) for x in jax.tree.leaves(tree.get("head", {})))
        batch_mul = 1 if isinstance(cfg, DiTConfig) else int(config.diffusion.batch_mul)  # DiT: one t per image
        backward_phase, update_phase = analytic_activation_bytes(
            cfg, sequences=global_batch // dp, batch_mul=batch_mul, mesh_shape=dict(mesh.shape),
            param_bytes=params, layer_params=layer_params, head_params=head_params)
    analytic = max(backward_phase, update_phase)

    activations, not_donated, argument_bytes, compile_seconds = analytic, 0, None, None
    code, padding, flops, bytes_accessed, step = 0, 0, None, None, None
    source = "shapes only (analytic)" if stage == "shapes" else "lowered only (analytic)"
    state_and_batch = per_device_bytes((abstract, batch))
    if stage == "compile":
        t0 = time.perf_counter()
        compiled = lowered.compile()
        compile_seconds = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        platform = mesh.devices.flat[0].platform
        activations, source = int(memory.temp_size_in_bytes), f"compiled (XLA:{platform.upper()})"
        not_donated = max(int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes), 0)
        argument_bytes = int(memory.argument_size_in_bytes)
        padding = max(argument_bytes - state_and_batch, 0)
        code = int(memory.generated_code_size_in_bytes)
        flops, bytes_accessed = compiled_cost(compiled)
        if roofline:  # the σ-VAE scans nothing: its own figures count everything
            vae = isinstance(task, VAETask)
            step = (flops, bytes_accessed) if vae else step_cost(config, num_devices, seed=seed, devices=available)

    path, count = largest_replicated(abstract.params, shardings.params)
    leaf_bytes = {jax.tree_util.keystr(p): jnp.dtype(x.dtype).itemsize
                  for p, x in jax.tree_util.tree_leaves_with_path(abstract.params)}
    return MemoryPlan(
        num_devices=num_devices, mesh_shape=dict(mesh.shape), global_batch=global_batch, seq_len=seq_len,
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        params=params, opt_state=per_device_bytes(abstract.opt_state), ema=per_device_bytes(abstract.ema_params),
        other_state=per_device_bytes((abstract.step, abstract.rng, abstract.skipped)),
        batch=per_device_bytes(batch), activations=activations, activation_source=source,
        analytic_activations=analytic, peak_phase="update" if update_phase >= backward_phase else "backward",
        outputs_not_donated=not_donated, compiled_argument_bytes=argument_bytes,
        largest_replicated=(path, count * leaf_bytes.get(path, 0)), lower_seconds=lower_seconds,
        compile_seconds=compile_seconds, hbm_bytes=hbm_bytes, generated_code=code, layout_padding=padding,
        model_flops=float(getattr(task, "train_flops_per_example", lambda: 0.0)()) * global_batch,  # σ-VAE: none
        compiled_flops=flops, compiled_bytes_accessed=bytes_accessed, step_flops=step[0] if step else None,
        step_bytes=step[1] if step else None, device_kind=available[0].device_kind, chip=chip)


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= 0.1 * scale:
            return f"{n / scale:8.2f} {unit}"
    return f"{n:8.0f} B"


def format_count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def roofline_line(roof: Roofline, per: str) -> str:
    """The roofline line of a plan: compute and memory time `per` step or call, the bound, the MFU it allows."""
    return (f"  roofline on {roof.chip.name} ({roof.chip.bf16_flops / 1e12:g} TFLOP/s bf16, "
            f"{roof.chip.hbm_bandwidth / 1e9:g} GB/s): compute {1e3 * roof.compute_seconds:.3g} ms, "
            f"memory {1e3 * roof.memory_seconds:.3g} ms → ≥ {1e3 * roof.seconds:.3g} ms per {per}, "
            f"{roof.bound}-bound ({roof.intensity:.0f} FLOPs/byte, ridge "
            f"{roof.chip.bf16_flops / roof.chip.hbm_bandwidth:.0f})"
            + (f", MFU ≤ {100 * roof.mfu:.0f}% ({100 * roof.compute_mfu:.0f}% if compute-bound)"
               if roof.model_flops else ""))


def format_plan(plan: MemoryPlan, title: str = "", usable_fraction: float = USABLE_HBM_FRACTION) -> str:
    """A readable per-device breakdown (GB = 1e9 bytes), with the compiled cost and the roofline when present."""
    m = plan.mesh_shape
    lines = [title] if title else []
    on = f" ({plan.chip.name})" if plan.chip is not None else ""
    lines.append(f"{format_count(plan.num_params)} params on {plan.num_devices} devices{on}, mesh data={m['data']} "
                 f"fsdp={m['fsdp']} tensor={m['tensor']}, global batch {plan.global_batch} "
                 f"({plan.sequences_per_shard} sequences × {plan.seq_len} tokens per data shard)")
    rows = [("params (fp32)", plan.params), ("optimizer state (AdamW μ, ν)", plan.opt_state),
            ("EMA params", plan.ema), ("step, key, counters", plan.other_state), ("batch", plan.batch)]
    if plan.layout_padding:
        rows.append(("layout padding of the arguments (TPU tiles)", plan.layout_padding))
    rows.append((f"temporaries: activations, grads, update [{plan.activation_source}]", plan.activations))
    if plan.activation_source.endswith("(analytic)"):
        rows[-1] = (rows[-1][0][:-1] + f", peak in the {plan.peak_phase} phase]", plan.activations)
    if plan.outputs_not_donated:
        rows.append(("outputs not donated (metrics)", plan.outputs_not_donated))
    if plan.generated_code:
        rows.append(("generated code", plan.generated_code))
    rows.append(("total per device", plan.total))
    if not plan.activation_source.endswith("(analytic)"):
        rows.append((f"(analytic estimate, peak in the {plan.peak_phase} phase)", plan.analytic_activations))
    width = max(len(r[0]) for r in rows) + 2
    lines += [f"  {name:<{width}}{format_bytes(value)}" for name, value in rows]
    path, nbytes = plan.largest_replicated
    if plan.num_devices > 1:
        lines.append("  largest fully replicated param: " + (f"{path} ({format_bytes(nbytes).strip()})" if path else "none"))
    if plan.hbm_bytes is not None:
        lines.append(plan.hbm_line(usable_fraction))
    per_device = plan.model_flops / plan.num_devices
    if plan.compiled_flops is not None:
        lines.append("  FLOPs per device and step: " + (f"model count {per_device:.3g}; " if per_device else "")
                     + f"compiled {plan.compiled_flops:.3g} (a scanned loop's body counted once), "
                     f"{plan.compiled_bytes_accessed:.3g} HBM bytes")
    if plan.step_flops is not None and per_device:
        lines.append(f"  every layer counted (unrolled depth-1/2 probes): {plan.step_flops:.3g} FLOPs "
                     f"({plan.step_flops / per_device:.2f}× the model count), {plan.step_bytes:.3g} HBM bytes"
                     + ("; below the model count: the probes are wrong here, the roofline uses the model count"
                        if plan.step_flops < per_device else ""))
    roof = plan.roofline()
    if roof is not None:
        lines.append(roofline_line(roof, "step"))
    timing = [f"lowered in {plan.lower_seconds:.1f} s"] if plan.lower_seconds is not None else []
    if plan.compile_seconds is not None:
        timing.append(f"compiled in {plan.compile_seconds:.1f} s")
    if timing:
        lines.append(f"  ({', '.join(timing)})")
    return "\n".join(lines)


def as_dict(plan: MemoryPlan) -> dict[str, Any]:
    """JSON-friendly record with the derived totals."""
    return dict(dataclasses.asdict(plan), state=plan.state, total=plan.total, fits=plan.fits(),
                sequences_per_shard=plan.sequences_per_shard, roofline=roofline_record(plan.roofline()))


def roofline_record(roof: Roofline | None) -> dict[str, Any] | None:
    """A plan's roofline as JSON-friendly figures (train step or sampler)."""
    return None if roof is None else dict(
        seconds=roof.seconds, compute_seconds=roof.compute_seconds, memory_seconds=roof.memory_seconds,
        bound=roof.bound, mfu=roof.mfu, compute_mfu=roof.compute_mfu if roof.flops else None,
        intensity=roof.intensity)
