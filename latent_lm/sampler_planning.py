"""Per-device memory, compiled cost and roofline of one call of the class-conditional image sampler.

The plan compiles the sampler that the sample stage runs (`task.make_sampler`: LatentLM's KV-cached loop of
`latent_lm/sampling.py`, or the DiT twin's whole-image solver for `model.arch=dit`) for a global sampling batch on the
mesh of the config, without allocating anything: the params are the abstract train-state params with the config's
shardings (replicated under the default data-parallel mesh, sharded under FSDP rules), the labels are sharded over
the data-parallel axes (data × fsdp), the key is replicated. On fake XLA:CPU devices the compile is XLA:CPU's; on the
compile-only devices of `planning.tpu_topology` it is the TPU compiler's (docs/scaling_out.md §6.4, "The sampler on
TPU"). Per device it reports:

* arguments: the params shard and the inputs (labels shard, key), exact; the compiled argument bytes beyond them are
  the TPU's tile padding;
* outputs: the sampled latents [B, N, C] (fp32) shard;
* temporaries: `temp_size_in_bytes` of the compiled sampler; they hold the KV cache (LatentLM: 2 · depth · rows ·
  slots · kv_heads · head_dim in the compute dtype, rows = 2 × the batch shard with CFG, slots = 1 + N), shown
  beside them as an exact figure;
* generated code.

Cost: XLA's `cost_analysis()` counts a loop body once whatever its trip count (docs/scaling_out.md §6.4), and the
LatentLM sampler is three nested loops (N latents ⊃ K solver steps; the backbone's layers are an `nn.scan` too), so
the compiled figure of the sampler counts one latent, one solver step and one layer. `sampler_cost` therefore
compiles small probes of the same sampler with every loop unrolled (`jax.lax.scan` and `nn.scan`), at the real
batch shard and the real cache length (`cache_slots`), and fits the cost's structure in (depth L, latents N, steps K):

  LatentLM   probe(L, N, K) = A + B·L + N·K·H + (N − 1)·(G + D·L)
             call          = A + B·L + N·K·H + N·(G + D·L)
             probes at (L, N, K) = (2,2,2) (2,2,3) (3,2,2) (2,3,2) (3,3,2)
  DiT        probe(L, K)    = A + K·(G + D·L), probes at (2,2) (3,2) (2,3); the call the same at the config's L, K

A = once per call (noise, output, the prefill's non-layer part), B = one prefill layer, H = one solver step (the
diffusion head on 2B rows with CFG, the DPM-Solver++ update), G + D·L = one latent fed back through the embedding
and L layers against the full cache. An unrolled probe drops the last latent's backbone step (its cache write and
condition are never read, so XLA removes them); the sampler's loop runs it, hence N, not N − 1, in the call.
tests/test_planning.py checks the extrapolation against a fully unrolled sampler with 4 layers, 3 latents and 3
steps. The roofline takes the larger of these executed FLOPs and the model's own count (`model_sample_flops`).

That the compiled figure is each loop body once is checked in every plan with probes: the fitted terms counted once
each (`SamplerCost.counted_once`) against the scanned compile's own cost. FLOPs agree (1.00–1.13× on the embedded
model and ImageNet-L, XLA:CPU and XLA:TPU); bytes do not: the compiler counts 1.5–2.4× more bytes for a loop body
than for its unrolled copy (ImageNet-L 1.5× on v5p, 1.9× on v5e; the embedded model 1.6–2.4×), so the memory time
of the roofline, taken from the unrolled probes, is the lower of the two readings of the compiler's traffic model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from latent_lm.errors import ConfigError, UserError
from latent_lm.latents import LatentNormalization
from latent_lm.models.dit import DiTConfig
from latent_lm.parallel.mesh import batch_sharding, data_parallel_size, logical_rules, make_mesh
from latent_lm.planning import (USABLE_HBM_FRACTION, Chip, HBMBudget, Roofline, compiled_cost, device_chip,
                                format_bytes, format_count, per_device_bytes, planning_config, plans_vae,
                                roofline_line, roofline_record, take_devices, unrolled_scans)
from latent_lm.sampling import SamplerSettings, make_dit_sampler, make_sampler
from latent_lm.training.flops import dit_train_flops_per_step, latent_lm_sample_flops_per_image
from latent_lm.training.optimizer import make_optimizer
from latent_lm.training.tasks import make_generator_task
from latent_lm.training.train_loop import build_state_fns


@dataclasses.dataclass(frozen=True)
class SamplerPlan(HBMBudget):
    """Per-device bytes and cost of one sampler call (`global_batch` images); see the module docstring."""

    arch: str                        # "latent_lm" or "dit"
    num_devices: int
    mesh_shape: dict[str, int]
    global_batch: int
    num_latents: int                 # N per image
    num_steps: int                   # K solver steps
    cfg_scale: float | None          # None: no guidance (no doubled batch)
    num_params: int
    params: int                      # the params shard, exact
    inputs: int                      # labels shard + key, exact
    outputs: int                     # compiled output bytes (the latents shard)
    temporaries: int                 # compiled temp bytes (the KV cache among them)
    kv_cache: int                    # the KV cache's shard, exact (0 for the DiT)
    generated_code: int
    layout_padding: int              # compiled argument bytes beyond the exact params and inputs (TPU tiles)
    compiled_flops: float            # cost_analysis() per device: each loop body counted once
    compiled_bytes_accessed: float
    call_flops: float | None         # per device, every loop iteration counted (`sampler_cost`)
    call_bytes: float | None
    once_flops: float | None         # the fitted terms counted once each, against compiled_flops
    once_bytes: float | None         # the same for bytes, against compiled_bytes_accessed
    model_flops: float               # the model's own count per call, all devices
    source: str                      # "compiled (XLA:<backend>)"
    lower_seconds: float
    compile_seconds: float
    device_kind: str = ""
    hbm_bytes: float | None = None
    chip: Chip | None = None

    @property
    def total(self) -> int:
        return self.params + self.inputs + self.layout_padding + self.outputs + self.temporaries + self.generated_code

    @property
    def images_per_shard(self) -> int:
        return self.global_batch // (self.mesh_shape["data"] * self.mesh_shape["fsdp"])

    def roofline(self) -> Roofline | None:
        """Time of one call bounded by the chip's peaks (None without a chip or the probes); FLOPs never below the
        model's count, as in `MemoryPlan.roofline`."""
        if self.chip is None or self.call_flops is None or self.call_bytes is None:
            return None
        model = self.model_flops / self.num_devices
        return Roofline(self.chip, max(self.call_flops, model), self.call_bytes, model)

    def images_per_second(self) -> float | None:
        """The roofline's bound on throughput: the global batch over the call's roofline time."""
        roof = self.roofline()
        return None if roof is None else self.global_batch / roof.seconds


def check_plan_flags(what: str, sample_batch: int | None) -> None:
    """The planners' `--what` / `--sample_batch` rule, one error line (latent_lm.main --mode=plan, launch/plan.py)."""
    if sample_batch is not None and what != "sampler":
        raise UserError("--sample_batch goes with --what=sampler (the train step's batch is --config.train.batch_size)")


def sampler_settings(config: ml_collections.ConfigDict) -> SamplerSettings:
    """The settings the sample stage uses (`config.diffusion`)."""
    d = config.diffusion
    return SamplerSettings(num_steps=int(d.num_sampling_steps), cfg_scale=d.cfg_scale,
                           prediction_type=d.prediction_type, x0_clip=d.x0_clip)


def model_sample_flops(task, settings: SamplerSettings) -> float:
    """The model's own FLOP count of one image (training/flops.py's conventions: matmuls and attention, forward)."""
    cfg, rows = task.model.config, 1 if settings.cfg_scale is None else 2
    if isinstance(cfg, DiTConfig):  # training counts 3 forward passes: 6 vs 2 per matmul weight, 12 vs 4 attention
        return rows * settings.num_steps * dit_train_flops_per_step(cfg, 1)["total"] / 3
    return latent_lm_sample_flops_per_image(cfg, 1, task.num_tokens, settings.num_steps,
                                            guidance=settings.cfg_scale is not None)["total"]


def _sampler_task(config: ml_collections.ConfigDict):
    if plans_vae(config):
        raise ConfigError("a tokenizer-only config has no sampler to plan: plan its train step (--what=train)")
    task = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    if config.model.get("arch", "latent_lm") not in ("latent_lm", "dit"):
        raise ConfigError(f"the sampler plan covers the class-conditional image samplers (model.arch latent_lm or "
                          f"dit), not model.arch={config.model.arch!r}")
    return task


def _lower_sampler(config: ml_collections.ConfigDict, devices: list[jax.Device], sample_batch: int, seed: int, *,
                   num_latents: int | None = None, num_steps: int | None = None, cache_slots: int | None = None):
    """(task, mesh, settings, abstract params, inputs (labels, key), lowered sampler) of `config` on `devices`;
    `num_latents`, `num_steps`, `cache_slots` override the real ones (the probes)."""
    mesh = make_mesh(config.mesh, devices)
    rules = logical_rules(config.mesh)
    dp = data_parallel_size(mesh)
    if sample_batch < 1 or sample_batch % dp:
        raise ConfigError(f"sample batch {sample_batch} is not a positive multiple of the data-parallel size {dp} "
                          f"(mesh data×fsdp {dict(mesh.shape)})")
    task = _sampler_task(config)
    settings = sampler_settings(config)
    if num_steps is not None:
        settings = settings.replace(num_steps=num_steps)
    _, abstract, _ = build_state_fns(task, make_optimizer(config.optim, int(config.train.steps)), mesh, rules, seed)
    params = abstract.params  # the EMA params the sample stage uses have the same shapes and shardings
    labels = jax.ShapeDtypeStruct((sample_batch,), jnp.int32, sharding=batch_sharding(mesh, 1))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
    if isinstance(task.model.config, DiTConfig):
        sampler = make_dit_sampler(task.model, task.schedule, settings)
    else:
        sampler = make_sampler(task.model, task.schedule, settings, num_latents or task.num_tokens, cache_slots,
                               platform=mesh.devices.flat[0].platform)
    # Lowered outside the mesh and logical rules, as the sample stage calls it: the model's logical constraints are
    # written for the train step's [B, T, D] activations (the head's [rows, D] inputs break them), so every sharding
    # inside comes from the inputs' by XLA's propagation.
    lowered = sampler.lower(params, labels, key)
    return task, mesh, settings, params, (labels, key), lowered


@contextlib.contextmanager
def _unrolled_loops():
    """`planning.unrolled_scans` (every `nn.scan` unrolled) and every `jax.lax.scan` unrolled fully: the sampler's
    loop over latents and the solver's loop over steps."""
    scan = jax.lax.scan
    jax.lax.scan = lambda *args, **kwargs: scan(*args, **dict(kwargs, unroll=True))
    try:
        with unrolled_scans():
            yield
    finally:
        jax.lax.scan = scan


def probe_cost(config: ml_collections.ConfigDict, devices: list[jax.Device], sample_batch: int, *, depth: int,
               num_latents: int, num_steps: int, cache_slots: int | None, seed: int = 0) -> tuple[float, float]:
    """(FLOPs, HBM bytes) per device of the sampler with every loop unrolled, at `depth` layers, `num_latents`
    latents (LatentLM) and `num_steps` solver steps, the cache `cache_slots` long."""
    probe = ml_collections.ConfigDict(config.to_dict())
    probe.model.depth = depth
    with _unrolled_loops():
        lowered = _lower_sampler(probe, devices, sample_batch, seed, num_latents=num_latents, num_steps=num_steps,
                                 cache_slots=cache_slots)[-1]
    return compiled_cost(lowered.compile())


@dataclasses.dataclass(frozen=True)
class SamplerCost:
    """The fitted cost structure of the module docstring, one of FLOPs or HBM bytes per device: `once` (A),
    `prefill_layer` (B), `solver_step` (H), `latent_step` (G) and `latent_layer` (D)."""

    once: float
    prefill_layer: float
    solver_step: float
    latent_step: float
    latent_layer: float

    def call(self, depth: int, num_latents: int, num_steps: int, backbone_steps: int | None = None) -> float:
        """One call at `depth` layers, N latents, K steps; `backbone_steps` latents fed back (the loop: N; an
        unrolled program: N − 1)."""
        fed = num_latents if backbone_steps is None else backbone_steps
        return (self.once + depth * self.prefill_layer + num_latents * num_steps * self.solver_step
                + fed * (self.latent_step + depth * self.latent_layer))

    def dit_call(self, depth: int, num_steps: int) -> float:
        """The DiT's call: K model calls of `depth` layers."""
        return self.once + num_steps * (self.solver_step + depth * self.latent_layer)

    def counted_once(self) -> float:
        """Every term once: what `cost_analysis()` of the scanned sampler should count if it counts each loop body
        once (one layer of the prefill, one solver step, one latent with one layer)."""
        return self.once + self.prefill_layer + self.solver_step + self.latent_step + self.latent_layer


def fit_sampler_cost(config: ml_collections.ConfigDict, num_devices: int, sample_batch: int, *, seed: int = 0,
                     devices: Sequence[jax.Device] | None = None, num_latents: int | None = None
                     ) -> tuple[SamplerCost, SamplerCost]:
    """(FLOPs, HBM bytes) structure per device from the unrolled probes of the module docstring, against the cache
    of `num_latents` (default the config's) latents. The DiT's has no prefill and no latents fed back: its `once` is
    A, its `solver_step` the model at depth 0 (G) and its `latent_layer` one layer (D), N = 1."""
    config = planning_config(config)
    devices = take_devices(num_devices, devices)
    task = _sampler_task(config)
    slots = 1 + int(num_latents or task.num_tokens)

    def probe(d: int, n: int, k: int) -> tuple[float, float]:
        return probe_cost(config, devices, sample_batch, depth=d, num_latents=n, num_steps=k, cache_slots=slots,
                          seed=seed)

    # Probes start at 2 of each: measured on the embedded model, the step from 1 to 2 layers or latents differs from
    # every later one in HBM bytes (XLA fuses the single-layer program differently: 2.63e6 bytes against 1.75e6 for
    # each layer from 2 to 4), while from 2 on each added layer, latent or step costs the same.
    fitted = []
    if isinstance(task.model.config, DiTConfig):
        p22, p32, p23 = probe(2, 1, 2), probe(3, 1, 2), probe(2, 1, 3)
        for i in range(2):
            layer = (p32[i] - p22[i]) / 2                    # two calls, one more layer each
            step = p23[i] - p22[i] - 2 * layer               # one more call, without its layers
            fitted.append(SamplerCost(once=p22[i] - 2 * step - 4 * layer, prefill_layer=0.0, solver_step=step,
                                      latent_step=0.0, latent_layer=layer))
        return fitted[0], fitted[1]
    p222, p223, p322, p232, p332 = (probe(2, 2, 2), probe(2, 2, 3), probe(3, 2, 2), probe(2, 3, 2),
                                    probe(3, 3, 2))
    for i in range(2):  # probe(L, N, K) = A + B·L + N·K·H + (N − 1)·(G + D·L)
        h = (p223[i] - p222[i]) / 2                          # one more step for each of 2 latents
        d = (p332[i] - p322[i]) - (p232[i] - p222[i])        # one layer of a latent fed back
        b = p322[i] - p222[i] - d                            # one prefill layer
        g = p232[i] - p222[i] - 2 * h - 2 * d                # the rest of a latent fed back
        a = p222[i] - 2 * b - 4 * h - g - 2 * d              # once per call
        fitted.append(SamplerCost(once=a, prefill_layer=b, solver_step=h, latent_step=g, latent_layer=d))
    return fitted[0], fitted[1]


def sampler_cost(config: ml_collections.ConfigDict, num_devices: int, sample_batch: int, *, seed: int = 0,
                 devices: Sequence[jax.Device] | None = None) -> tuple[float, float, float, float]:
    """(FLOPs, HBM bytes) per device of one sampler call of `config`, every loop iteration counted
    (`fit_sampler_cost` at the config's depth, latents and solver steps), then the same two with every fitted
    term counted once (`SamplerCost.counted_once`, to hold against the scanned compile's own figures)."""
    config = planning_config(config)
    fits = fit_sampler_cost(config, num_devices, sample_batch, seed=seed, devices=devices)
    task = _sampler_task(config)
    depth, k = int(config.model.depth), int(config.diffusion.num_sampling_steps)
    if isinstance(task.model.config, DiTConfig):
        calls = [fit.dit_call(depth, k) for fit in fits]
    else:
        calls = [fit.call(depth, int(task.num_tokens), k) for fit in fits]
    return calls[0], calls[1], fits[0].counted_once(), fits[1].counted_once()


def kv_cache_bytes(task, settings: SamplerSettings, images_per_shard: int, mesh_shape: dict[str, int]) -> int:
    """Bytes of one device's KV cache shard: keys and values [depth, rows, kv_heads, 1 + N, head_dim] in the compute
    dtype, rows = the batch shard (× 2 with CFG), heads split over `tensor` where they divide."""
    cfg = task.model.config
    if isinstance(cfg, DiTConfig):
        return 0
    rows = images_per_shard * (1 if settings.cfg_scale is None else 2)
    tp = mesh_shape["tensor"]
    kv_heads = cfg.kv_heads / tp if cfg.kv_heads % tp == 0 else cfg.kv_heads
    return int(2 * cfg.depth * rows * (1 + task.num_tokens) * kv_heads * (cfg.width // cfg.num_heads)
               * jnp.dtype(cfg.dtype).itemsize)


def plan_sampler(config: ml_collections.ConfigDict, num_devices: int, *, sample_batch: int | None = None,
                 hbm_bytes: float | None = None, seed: int = 0, devices: Sequence[jax.Device] | None = None,
                 roofline: bool = False) -> SamplerPlan:
    """Per-device memory and cost of one call of `config`'s sampler for `sample_batch` images (default
    `config.eval.sample_batch`) on the first `num_devices` of `devices` (default `jax.devices()`; a TPU topology's
    compile with the TPU compiler). `config.mesh.shape` must cover `num_devices`; the batch must divide over
    data × fsdp. `roofline=True` adds `sampler_cost`'s probe compiles (five for LatentLM, three for the DiT)."""
    config = planning_config(config)
    available = take_devices(num_devices, devices)
    chip = device_chip(available)
    if hbm_bytes is None and chip is not None:
        hbm_bytes = chip.hbm_bytes
    batch = int(sample_batch if sample_batch is not None else config.eval.sample_batch)
    t0 = time.perf_counter()
    task, mesh, settings, params, inputs, lowered = _lower_sampler(config, available, batch, seed)
    lower_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    exact_arguments = per_device_bytes((params, inputs))
    flops, bytes_accessed = compiled_cost(compiled)
    call = sampler_cost(config, num_devices, batch, seed=seed, devices=available) if roofline else None
    images_per_shard = batch // data_parallel_size(mesh)
    return SamplerPlan(
        arch="dit" if isinstance(task.model.config, DiTConfig) else "latent_lm", num_devices=num_devices,
        mesh_shape=dict(mesh.shape), global_batch=batch, num_latents=int(task.num_tokens),
        num_steps=settings.num_steps, cfg_scale=settings.cfg_scale,
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        params=per_device_bytes(params), inputs=per_device_bytes(inputs),
        outputs=int(memory.output_size_in_bytes), temporaries=int(memory.temp_size_in_bytes),
        kv_cache=kv_cache_bytes(task, settings, images_per_shard, dict(mesh.shape)),
        generated_code=int(memory.generated_code_size_in_bytes),
        layout_padding=max(int(memory.argument_size_in_bytes) - exact_arguments, 0),
        compiled_flops=flops, compiled_bytes_accessed=bytes_accessed,
        call_flops=call[0] if call else None, call_bytes=call[1] if call else None,
        once_flops=call[2] if call else None, once_bytes=call[3] if call else None,
        model_flops=model_sample_flops(task, settings) * batch,
        source=f"compiled (XLA:{available[0].platform.upper()})", lower_seconds=lower_seconds,
        compile_seconds=compile_seconds, device_kind=available[0].device_kind, hbm_bytes=hbm_bytes, chip=chip)


def format_sampler_plan(plan: SamplerPlan, title: str = "", usable_fraction: float = USABLE_HBM_FRACTION) -> str:
    """A readable per-device breakdown (GB = 1e9 bytes) with the cost and, with the probes, the roofline."""
    m = plan.mesh_shape
    lines = [title] if title else []
    on = f" ({plan.chip.name})" if plan.chip is not None else ""
    guidance = "no CFG" if plan.cfg_scale is None else f"CFG {plan.cfg_scale:g} (2 rows per image)"
    what = (f"{plan.num_latents} latents per image, each by {plan.num_steps} DPM-Solver++ steps of the diffusion head"
            if plan.arch == "latent_lm" else f"{plan.num_steps} DPM-Solver++ steps over all {plan.num_latents} "
                                              f"latents (DiT)")
    lines.append(f"{format_count(plan.num_params)} params on {plan.num_devices} devices{on}, mesh data={m['data']} "
                 f"fsdp={m['fsdp']} tensor={m['tensor']}, {plan.global_batch} images per call "
                 f"({plan.images_per_shard} per data shard); {what}, {guidance}")
    rows = [("params (fp32, as the config shards them)", plan.params), ("labels and key", plan.inputs)]
    if plan.layout_padding:
        rows.append(("layout padding of the arguments (TPU tiles)", plan.layout_padding))
    rows.append(("outputs: latents [B, N, C] fp32", plan.outputs))
    rows.append((f"temporaries [{plan.source}]", plan.temporaries))
    if plan.kv_cache:
        rows.append(("  of which the KV cache (exact shard)", plan.kv_cache))
    rows += [("generated code", plan.generated_code), ("total per device", plan.total)]
    width = max(len(r[0]) for r in rows) + 2
    lines += [f"  {name:<{width}}{format_bytes(value)}" for name, value in rows]
    if plan.hbm_bytes is not None:
        lines.append(plan.hbm_line(usable_fraction))
    per_device = plan.model_flops / plan.num_devices
    lines.append(f"  FLOPs per device and call: model count {per_device:.3g}; compiled {plan.compiled_flops:.3g} "
                 f"(each loop body counted once: one latent, one solver step, one layer), "
                 f"{plan.compiled_bytes_accessed:.3g} HBM bytes")
    if plan.call_flops is not None:
        lines.append(f"  every iteration counted (unrolled probes, fitted in L, N, K): {plan.call_flops:.3g} FLOPs "
                     f"({plan.call_flops / per_device:.2f}× the model count), {plan.call_bytes:.3g} HBM bytes")
        lines.append(f"  check: the fitted terms counted once give {plan.once_flops:.3g} FLOPs "
                     f"({plan.compiled_flops / plan.once_flops:.2f}× in the compile: each loop body once) and "
                     f"{plan.once_bytes:.3g} bytes ({plan.compiled_bytes_accessed / plan.once_bytes:.2f}× in the "
                     f"compile: by the compiler's model a loop body moves more bytes than its unrolled copy; the "
                     f"roofline takes the unrolled figure, the lower)")
    roof = plan.roofline()
    if roof is not None:
        lines.append(roofline_line(roof, "call") + f"; ≤ {plan.images_per_second():,.0f} images/s")
    lines.append(f"  (lowered in {plan.lower_seconds:.1f} s, compiled in {plan.compile_seconds:.1f} s)")
    return "\n".join(lines)


def sampler_as_dict(plan: SamplerPlan) -> dict[str, Any]:
    """JSON-friendly record with the derived totals."""
    roof = roofline_record(plan.roofline())
    return dict(dataclasses.asdict(plan), total=plan.total, fits=plan.fits(), images_per_shard=plan.images_per_shard,
                roofline=None if roof is None else dict(roof, images_per_second=plan.images_per_second()))
