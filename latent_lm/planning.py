"""Per-device memory plan of the generator train step (LatentLM or its DiT twin) for any config on N devices (#4).

The plan never allocates the model. It builds the abstract train state with the mesh's shardings
(`jax.eval_shape` inside `build_state_fns`), lowers the same jitted train step that training runs
(`jit_train_step`) on N fake XLA:CPU devices with the global batch `config.train.batch_size`, and reports per device:

* params, optimizer state, EMA and the rest of the state: exact, the shard shape of every array under its sharding;
* the batch: exact, the batch's shard shapes ([B, T, C] float32 latents and [B] int32 labels over (data, fsdp));
* activations and temporaries: `temp_size_in_bytes` of the step compiled for that mesh, or, when the step is not
  compiled, `analytic_activation_bytes` (below).

On fake CPU devices the compile is XLA:CPU's; run on a TPU/GPU host (`python -m latent_lm.main --mode=plan`), the same
function compiles with that backend and its temporaries are the accelerator's own.

XLA:CPU computes bf16 matmuls in f32 (its optimised HLO converts the operands to f32 and the product back), so a bf16
program compiled for CPU holds f32 temporaries where TPU/GPU keep bf16 ones. Measured here on LatentLM-Base
(16 sequences × 256 tokens, remat full, one device): 3.35 GB of temporaries with bf16 compute, 5.96 GB with fp32.
The CPU figure is therefore an estimate of the accelerator's, on the high side for bf16 configs; TPU/GPU compilers
also fuse and schedule differently.

The fake devices must exist before jax is imported: `launch/plan.py` sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` itself before its imports.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from latent_lm.errors import ConfigError
from latent_lm.models.diffusion_head import FREQ_DIM
from latent_lm.models.dit import DiTConfig
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.layers import swiglu_hidden
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
from latent_lm.training.tasks import make_generator_task
from latent_lm.training.train_loop import build_state_fns, jit_train_step

GB = 1e9  # vendors quote HBM in decimal gigabytes (TPU v5p 95 GB, H100 80 GB)
# A plan "fits" when its total is at most this fraction of the HBM: the runtime, collective buffers and allocator
# fragmentation take the rest, and the CPU-compiled temporaries are an estimate of the accelerator's.
USABLE_HBM_FRACTION = 0.9
STAGES = ("shapes", "lower", "compile")

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
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

    @property
    def state(self) -> int:
        return self.params + self.opt_state + self.ema + self.other_state

    @property
    def total(self) -> int:
        return self.state + self.batch + self.activations + self.outputs_not_donated

    @property
    def sequences_per_shard(self) -> int:
        return self.global_batch // (self.mesh_shape["data"] * self.mesh_shape["fsdp"])

    def fits(self, hbm_bytes: float | None = None, usable_fraction: float = USABLE_HBM_FRACTION) -> bool | None:
        hbm = hbm_bytes if hbm_bytes is not None else self.hbm_bytes
        return None if hbm is None else self.total <= usable_fraction * hbm


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays/ShapeDtypeStructs with shardings (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_batch(mesh, batch_size: int, seq_len: int, latent_dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The generator task's batch (cached latents and labels), sharded over (data, fsdp) like `shard_batch`."""
    return {"latents": jax.ShapeDtypeStruct((batch_size, seq_len, latent_dim), jnp.float32,
                                            sharding=batch_sharding(mesh, 3)),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding(mesh, 1))}


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


def _planning_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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


def plan_memory(config: ml_collections.ConfigDict, num_devices: int, *, stage: str = "compile",
                hbm_bytes: float | None = None, seed: int = 0) -> MemoryPlan:
    """Per-device memory of `config`'s generator train step (`model.arch`) on the first `num_devices` devices.

    `config.mesh.shape` (one -1 allowed) must cover exactly `num_devices`; `config.train.batch_size` is the global
    batch and must divide over data×fsdp. `stage`: "compile" (activations = the compiler's temporaries), "lower"
    (the step is traced and lowered, activations analytic) or "shapes" (state shapes only, activations analytic;
    a fraction of a second, for searching meshes).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if num_devices < 1:
        raise ConfigError(f"num_devices must be ≥ 1, got {num_devices}")
    available = jax.devices()
    if len(available) < num_devices:
        raise ConfigError(f"planning for {num_devices} devices but jax sees {len(available)}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before jax is imported "
                         f"(launch/plan.py does this)")
    config = _planning_config(config)
    mesh = make_mesh(config.mesh, available[:num_devices])
    rules = logical_rules(config.mesh)
    dp = data_parallel_size(mesh)
    global_batch = int(config.train.batch_size)
    if global_batch % dp:
        raise ConfigError(f"train.batch_size {global_batch} is not divisible by the data-parallel size {dp} "
                         f"(mesh data×fsdp {dict(mesh.shape)})")
    task = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    cfg = task.model.config
    total_steps = int(config.train.steps)
    tx = make_optimizer(config.optim, total_steps)
    _, abstract, shardings = build_state_fns(task, tx, mesh, rules, seed)
    batch = abstract_batch(mesh, global_batch, cfg.max_len, cfg.latent_dim)

    lowered, lower_seconds = None, None
    if stage != "shapes":
        t0 = time.perf_counter()
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            step = jit_train_step(task, tx, learning_rate_schedule(config.optim, total_steps),
                                  config.optim.ema_decay, shardings, mesh)
            lowered = step.lower(abstract, batch)
        lower_seconds = time.perf_counter() - t0

    params = per_device_bytes(abstract.params)
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
    source = "shapes only (analytic)" if stage == "shapes" else "lowered only (analytic)"
    if stage == "compile":
        t0 = time.perf_counter()
        memory = lowered.compile().memory_analysis()
        compile_seconds = time.perf_counter() - t0
        platform = mesh.devices.flat[0].platform
        activations, source = int(memory.temp_size_in_bytes), f"compiled (XLA:{platform.upper()})"
        not_donated = max(int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes), 0)
        argument_bytes = int(memory.argument_size_in_bytes)

    path, count = largest_replicated(abstract.params, shardings.params)
    leaf_bytes = {jax.tree_util.keystr(p): jnp.dtype(x.dtype).itemsize
                  for p, x in jax.tree_util.tree_leaves_with_path(abstract.params)}
    return MemoryPlan(
        num_devices=num_devices, mesh_shape=dict(mesh.shape), global_batch=global_batch, seq_len=cfg.max_len,
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        params=params, opt_state=per_device_bytes(abstract.opt_state), ema=per_device_bytes(abstract.ema_params),
        other_state=per_device_bytes((abstract.step, abstract.rng, abstract.skipped)),
        batch=per_device_bytes(batch), activations=activations, activation_source=source,
        analytic_activations=analytic, peak_phase="update" if update_phase >= backward_phase else "backward",
        outputs_not_donated=not_donated, compiled_argument_bytes=argument_bytes,
        largest_replicated=(path, count * leaf_bytes.get(path, 0)), lower_seconds=lower_seconds,
        compile_seconds=compile_seconds, hbm_bytes=hbm_bytes)


def _bytes(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= 0.1 * scale:
            return f"{n / scale:8.2f} {unit}"
    return f"{n:8.0f} B"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(plan: MemoryPlan, title: str = "", usable_fraction: float = USABLE_HBM_FRACTION) -> str:
    """A readable per-device breakdown (GB = 1e9 bytes)."""
    m = plan.mesh_shape
    lines = [title] if title else []
    lines.append(f"{_count(plan.num_params)} params on {plan.num_devices} devices, mesh data={m['data']} "
                 f"fsdp={m['fsdp']} tensor={m['tensor']}, global batch {plan.global_batch} "
                 f"({plan.sequences_per_shard} sequences × {plan.seq_len} tokens per data shard)")
    rows = [("params (fp32)", plan.params), ("optimizer state (AdamW μ, ν)", plan.opt_state),
            ("EMA params", plan.ema), ("step, key, counters", plan.other_state), ("batch", plan.batch),
            (f"temporaries: activations, grads, update [{plan.activation_source}]", plan.activations)]
    if plan.activation_source.endswith("(analytic)"):
        rows[-1] = (rows[-1][0][:-1] + f", peak in the {plan.peak_phase} phase]", plan.activations)
    if plan.outputs_not_donated:
        rows.append(("outputs not donated (metrics)", plan.outputs_not_donated))
    rows.append(("total per device", plan.total))
    if not plan.activation_source.endswith("(analytic)"):
        rows.append((f"(analytic estimate, peak in the {plan.peak_phase} phase)", plan.analytic_activations))
    width = max(len(r[0]) for r in rows) + 2
    lines += [f"  {name:<{width}}{_bytes(value)}" for name, value in rows]
    path, nbytes = plan.largest_replicated
    if plan.num_devices > 1:
        lines.append("  largest fully replicated param: " + (f"{path} ({_bytes(nbytes).strip()})" if path else "none"))
    if plan.hbm_bytes is not None:
        verdict = "fits" if plan.fits(usable_fraction=usable_fraction) else "does NOT fit"
        lines.append(f"  HBM {plan.hbm_bytes / GB:g} GB: {100 * plan.total / plan.hbm_bytes:.0f}% used, {verdict} "
                     f"(usable {100 * usable_fraction:.0f}%)")
    timing = [f"lowered in {plan.lower_seconds:.1f} s"] if plan.lower_seconds is not None else []
    if plan.compile_seconds is not None:
        timing.append(f"compiled in {plan.compile_seconds:.1f} s")
    if timing:
        lines.append(f"  ({', '.join(timing)})")
    return "\n".join(lines)


def as_dict(plan: MemoryPlan) -> dict[str, Any]:
    """JSON-friendly record with the derived totals."""
    return dict(dataclasses.asdict(plan), state=plan.state, total=plan.total, fits=plan.fits(),
                sequences_per_shard=plan.sequences_per_shard)
