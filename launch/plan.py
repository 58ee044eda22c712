"""Planning mode: per-device memory of the train step for any config on any mesh, on fake CPU devices (issue #4) or
with the TPU compiler for a named TPU slice (issue #17), no accelerator needed.

  python launch/plan.py --config=configs/imagenet.py:7B --num_devices=256 '--config.mesh.shape=(32,8,1)' \\
      --config.train.batch_size=2048 --hbm_gb=95
  python launch/plan.py --config=configs/imagenet.py:L --topology=v5p:2x4x4 '--config.mesh.shape=(1,-1,1)' \\
      --config.train.batch_size=512          # XLA:TPU memory, compiled FLOPs/bytes, roofline (pip install -e '.[tpu]')
  python launch/plan.py --config=configs/imagenet.py:L --topology=v5p:2x2x1 --what=sampler --sample_batch=256
                                         # one sampler call (256 images): memory, cost, roofline, images/s bound
  python launch/plan.py --table          # docs/scaling_out.md §6.1: scaling family on TPU v5p (95 GB) and H100 (80 GB)
  python launch/plan.py --table --arch=dit --sizes=Base,Medium    # the same for the DiT twins
  python launch/plan.py --table --family=mllm --per_device_batch=8   # the paper-scale multimodal 1.3B (2,048 positions)
  python launch/plan.py --table --hardware=v5p --cpu_compare     # §6.4: smallest v5p slice per size, TPU compiler

The process gives itself `--num_devices` (or, with --table, `--max_devices`) fake XLA:CPU devices before jax is
imported, builds the mesh from `config.mesh.shape`, lowers and compiles the same jitted train step that training
runs, and prints per-device params, optimizer state, EMA, batch and temporaries (activations, gradients, update)
(`latent_lm/planning.py` says how each figure is obtained and what the CPU compile can and cannot tell). With
`--topology` (or a TPU chip name in `--hardware`) the mesh is built from the compile-only devices of that TPU slice
(`planning.tpu_topology`) and the step compiles with XLA:TPU; the roofline adds two small probe compiles.
`--what=sampler` plans one call of the sample stage's sampler instead (`latent_lm/sampler_planning.py`): params,
inputs, outputs, temporaries with the KV cache, the cost with every loop iteration counted (five small unrolled
probes, three for the DiT) and, on a TPU chip, the roofline time per call and the images/s it bounds.
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TABLE_MAX_DEVICES = 1024
TPU_CHIP_NAMES = ("v4", "v5e", "v5p", "v6e")  # planning.CHIPS (not imported here: jax must not be imported yet)


def _requested_devices(argv: list[str]) -> int:
    """The fake device count this run needs, read from argv before absl parses it (jax must not be imported yet).

    A TPU topology brings its own (compile-only) devices: one fake CPU device is enough unless a table also
    compiles on CPU (XLA:CPU hardware entries, or `--cpu_compare`).
    """
    text = " ".join(argv)
    if re.search(r"--table(\s|=|$)", text) and not re.search(r"--table=(false|False|0)", text):
        hardware = re.search(r"--hardware[= ](\S+)", text)
        tpu_only = hardware and all(h.strip() in TPU_CHIP_NAMES for h in hardware.group(1).split(","))
        if tpu_only and not re.search(r"--cpu_compare(\s|=true|=True|=1|$)", text):
            return 1
        found = re.search(r"--max_devices[= ](\d+)", text)
        return int(found.group(1)) if found else TABLE_MAX_DEVICES
    if re.search(r"--topology[= ]\S", text):
        return 1
    found = re.search(r"--num_devices[= ](\d+)", text)
    return int(found.group(1)) if found else 1


def fake_device_env(num_devices: int, xla_flags: str = "") -> dict[str, str]:
    """Environment for `num_devices` fake XLA:CPU devices; effective only if set before jax is imported.

    Keeps other XLA flags, replaces a device count already there, and adds the in-order CPU scheduler flag that
    tests/conftest.py uses (the concurrency-optimised one can deadlock collectives in the scanned step).
    JAX_PLATFORMS=cpu: the plan never runs anything, and a TPU topology compiles through libtpu without a TPU backend.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be ≥ 1, got {num_devices}")
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    kept.append(f"--xla_force_host_platform_device_count={num_devices}")
    if not any(f.startswith("--xla_cpu_enable_concurrency_optimized_scheduler") for f in kept):
        kept.append("--xla_cpu_enable_concurrency_optimized_scheduler=false")
    return {"XLA_FLAGS": " ".join(kept), "JAX_PLATFORMS": "cpu"}


if __name__ == "__main__":
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the fake device count could be set")
    os.environ.update(fake_device_env(_requested_devices(sys.argv[1:]), os.environ.get("XLA_FLAGS", "")))

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import imagenet, mllm  # noqa: E402
from latent_lm import cli  # noqa: E402
from latent_lm.errors import ConfigError, UserError  # noqa: E402
from latent_lm.planning import (CHIPS, GB, USABLE_HBM_FRACTION, MemoryPlan, as_dict, format_plan,  # noqa: E402
                                plan_memory, step_cost, tpu_topology)
from latent_lm.sampler_planning import (check_plan_flags, format_sampler_plan, plan_sampler,  # noqa: E402
                                        sampler_as_dict)

assert set(TPU_CHIP_NAMES) == set(CHIPS)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config to plan (e.g. configs/imagenet.py:7B).",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices in the mesh (fake CPU devices; with --topology "
                                    "default all of the slice's).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile with the TPU compiler for this TPU slice, e.g. v5p:2x2x1, "
                                "v5e:2x4, v6e:4x4, v4:2x2x2 (needs pip install -e '.[tpu]'; no TPU needed).")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "sampler"],
                          "train: the train step; sampler: one call of the class-conditional image sampler (the "
                          "sample stage's, docs/scaling_out.md §6.4) for --sample_batch images.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "--what=sampler: images per sampler call, split over "
                                     "data×fsdp (default config.eval.sample_batch).")
_ROOFLINE = flags.DEFINE_bool("roofline", True, "On a TPU chip: also count every layer's FLOPs and bytes (two "
                              "unrolled probe compiles at depth 1 and 2; the sampler: five, or three for the DiT) "
                              "for the roofline time and MFU.")
_HBM_GB = flags.DEFINE_float("hbm_gb", None, "HBM per device in GB (1e9 bytes); says whether the plan fits "
                             "(default with --topology: the chip's).")
_STAGE = flags.DEFINE_enum("stage", "compile", ["shapes", "lower", "compile"],
                           "compile: activations from the compiled step; lower/shapes: analytic estimate (faster).")
_USABLE = flags.DEFINE_float("usable_fraction", USABLE_HBM_FRACTION, "Fraction of HBM a plan may use to 'fit'.")
_JSON = flags.DEFINE_string("json", None, "Also write the plan(s) as JSON to this path.")
_TABLE = flags.DEFINE_bool("table", False, "Print docs/scaling_out.md's scaling-family tables, not one plan.")
_ARCH = flags.DEFINE_enum("arch", "latent_lm", ["latent_lm", "dit"], "Table: LatentLM or its DiT twin.")
_FAMILY = flags.DEFINE_enum("family", "imagenet", ["imagenet", "mllm"],
                            "Table: class-conditional ImageNet models (configs/imagenet.py:<size>, 256 tokens) or the "
                            "paper-scale multimodal model (configs/mllm.py:scale=paper,size=<size>, packed rows of "
                            "2,048 positions; default size 1.3B).")
_SIZES = flags.DEFINE_list("sizes", ["Base", "Medium", "Large", "XL", "3B", "7B", "13B"],
                           "Table: model sizes (configs/imagenet.py: B, L, H and the scaling family Base…13B; "
                           "--family=mllm: 1.3B too, and 1.3B alone by default).")
_HARDWARE = flags.DEFINE_list("hardware", ["TPU v5p=95", "H100=80"],
                              "Table: name=HBM GB per device (fake XLA:CPU devices), or a TPU chip (v4, v5e, v5p, "
                              "v6e: its slices, compiled with the TPU compiler).")
_SLICES = flags.DEFINE_list("slices", None, "Table on a TPU chip: the slice shapes searched, fewest chips first "
                            "(default the offered ones, planning.CHIPS; e.g. 1x1x1,2x1x1,2x2x1,2x2x2 for the XLA:CPU "
                            "table's device counts: the compiler takes sub-host v5p shapes that are not sold).")
_CPU_COMPARE = flags.DEFINE_bool("cpu_compare", False, "Table on a TPU chip: also compile each chosen mesh on fake "
                                 "XLA:CPU devices and show its temporaries beside the TPU compiler's.")
_PER_SHARD = flags.DEFINE_integer("per_device_batch", 16,
                                  "Table: sequences per data-parallel shard (global batch = this × data × fsdp).")
_MAX_DEVICES = flags.DEFINE_integer("max_devices", TABLE_MAX_DEVICES, "Table: largest device count searched.")
_TENSOR = flags.DEFINE_list("tensor_options", ["1"],
                            "Table: tensor-parallel sizes tried at each device count, in order (fsdp takes the rest). "
                            "Tensor parallelism did not lower the compiled peak (13B on 8: 74.8–75.0 GB for 1–8).")
_SCREEN = flags.DEFINE_float("screen_slack", 1.15,
                             "Table: compile a mesh only if its analytic total is within this factor of the budget.")


def _size_config(size: str):
    if _FAMILY.value == "mllm":
        if _ARCH.value != "latent_lm":
            raise ConfigError("--family=mllm plans the multimodal LatentLM; it has no --arch=dit twin")
        return mllm.get_config(f"scale=paper,size={size}")
    return imagenet.get_config(f"size={size},arch={_ARCH.value}")


def _sizes() -> list[str]:
    """--sizes, or the multimodal model's 1.3B when the family is mllm and no sizes were given."""
    if _FAMILY.value == "mllm" and not flags.FLAGS["sizes"].present:
        return ["1.3B"]
    return list(_SIZES.value)


def _tokens(plans: dict[str, tuple[str, MemoryPlan] | None]) -> int:
    """Positions per sequence of the table's plans (256 for the ImageNet family, 2,048 for the multimodal rows)."""
    return next((found[1].seq_len for found in plans.values() if found is not None), 256)


def _table_config(size: str, n: int, tensor: int, per_shard: int):
    c = _size_config(size)
    c.mesh.shape = (1, n // tensor, tensor)
    c.train.batch_size = per_shard * (n // tensor)
    return c


@dataclasses.dataclass(frozen=True)
class Hardware:
    """A table column set: fake XLA:CPU devices with a stated HBM, or a TPU chip's slices (the TPU compiler)."""

    name: str
    hbm_gb: float
    chip: str | None = None  # a key of planning.CHIPS

    @classmethod
    def parse(cls, entry: str) -> "Hardware":
        if entry.strip() in CHIPS:
            chip = CHIPS[entry.strip()]
            return cls(f"TPU {chip.name}", chip.hbm_bytes / GB, chip.name)
        if "=" not in entry:
            raise ConfigError(f"--hardware entry {entry!r}: give name=HBM_GB or a TPU chip, one of {list(CHIPS)}")
        name, hbm = entry.rsplit("=", 1)
        return cls(name, float(hbm))

    def meshes(self, size: str, max_devices: int, tensors: list[int]) -> Iterator[tuple[str, list | None, int, int]]:
        """(slice or "", devices or None for fake CPU ones, device count, tensor) in the order searched: fewest
        devices first, pure FSDP before tensor parallelism."""
        heads = _size_config(size).model.num_heads
        if self.chip is None:
            shapes = [("", None, 2**k) for k in range(max_devices.bit_length()) if 2**k <= max_devices]
        else:
            shapes = []
            for shape in _SLICES.value or CHIPS[self.chip].slices:
                devices = _topology_devices(f"{self.chip}:{shape}")
                if len(devices) > max_devices:
                    break
                shapes.append((f"{self.chip}:{shape}", devices, len(devices)))
        for label, devices, n in shapes:
            for t in tensors:
                if t <= n and heads % t == 0:
                    yield label, devices, n, t


_TOPOLOGIES: dict[str, list] = {}


def _topology_devices(name: str) -> list:
    if name not in _TOPOLOGIES:
        _TOPOLOGIES[name] = tpu_topology(name)[1]
    return _TOPOLOGIES[name]


def smallest_fitting(size: str, hardware: Hardware, *, per_shard: int, max_devices: int, tensors: list[int],
                     usable: float, slack: float, cache: dict, log: Callable[[str], None] = print
                     ) -> tuple[str, MemoryPlan] | None:
    """(slice, plan) of the first mesh in `hardware.meshes` whose compiled plan fits `usable`·HBM; compiled plans are
    cached. Each candidate is screened by its exact state bytes plus the analytic activation estimate (no
    lowering) and compiled only if that total is within `slack`× the budget."""
    for label, devices, n, t in hardware.meshes(size, max_devices, tensors):
        key = (hardware.chip or "cpu", size, n, t, per_shard)
        if key not in cache:
            config = _table_config(size, n, t, per_shard)
            screen = plan_memory(config, n, stage="shapes", devices=devices)
            if screen.total > slack * usable * device_hbm(screen, hardware):
                continue
            t0 = time.perf_counter()
            cache[key] = plan_memory(config, n, stage="compile", devices=devices)
            p = cache[key]
            log(f"  {size} on {label or n} ({n} devices, fsdp {n // t}, tensor {t}): {p.total / GB:.1f} GB in all; "
                f"temporaries {p.activations / GB:.2f} GB {p.activation_source}, {p.analytic_activations / GB:.2f} GB "
                f"analytic ({p.peak_phase} phase) [{time.perf_counter() - t0:.0f} s]")
        if cache[key].total <= usable * device_hbm(cache[key], hardware):
            return label, cache[key]
    return None


def device_hbm(plan: MemoryPlan, hardware: Hardware) -> float:
    """HBM bytes of one device of `plan`: its TPU chip's share (a v4 TensorCore has half of its chip's), else the
    table's stated figure."""
    return plan.hbm_bytes or hardware.hbm_gb * GB


def table_markdown(hardware: Hardware, plans: dict[str, tuple[str, MemoryPlan] | None], per_shard: int,
                   usable: float) -> str:
    head = (f"**{hardware.name}** ({hardware.hbm_gb:g} GB HBM per device, a plan fits at ≤ {100 * usable:.0f}%; "
            f"{per_shard} sequences × {_tokens(plans)} tokens per data shard)\n\n"
            "| size | params | devices | mesh (data, fsdp, tensor) | global batch | params | AdamW μ,ν | EMA | "
            "temporaries | total / device | HBM used | peak phase |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size, found in plans.items():
        if found is None:
            rows.append(f"| {size} | | none ≤ max_devices | | | | | | | | | |")
            continue
        p = found[1]
        m = p.mesh_shape
        rows.append(f"| {size} | {p.num_params / 1e9:.2f} B | {p.num_devices} | ({m['data']}, {m['fsdp']}, "
                    f"{m['tensor']}) | {p.global_batch} | {p.params / GB:.2f} | {p.opt_state / GB:.2f} | "
                    f"{p.ema / GB:.2f} | {p.activations / GB:.2f} | {p.total / GB:.2f} GB | "
                    f"{100 * p.total / device_hbm(p, hardware):.0f}% | {p.peak_phase} |")
    return "\n".join([head, *rows])


def tpu_table_markdown(hardware: Hardware, plans: dict[str, tuple[str, MemoryPlan] | None],
                       cpu_temporaries: dict[str, float], per_shard: int, usable: float) -> str:
    """The TPU compiler's figures per size: memory, the XLA:CPU temporaries of the same mesh, the roofline."""
    head = (f"**{hardware.name}** ({hardware.hbm_gb:g} GB HBM per chip, per device on v4's two TensorCores a "
            f"half; a plan fits at ≤ {100 * usable:.0f}% of a device's; "
            f"{per_shard} sequences × {_tokens(plans)} tokens per data shard; GB = 1e9 bytes)\n\n"
            "| size | params | slice | mesh (data, fsdp, tensor) | global batch | state | temporaries XLA:TPU | "
            "XLA:CPU (same mesh) | padding + code | total / device | HBM used | step ≥ | bound | MFU ≤ |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size, found in plans.items():
        if found is None:
            rows.append(f"| {size} | | none ≤ max_devices | | | | | | | | | | | |")
            continue
        label, p = found
        m = p.mesh_shape
        roof = p.roofline()
        cpu = cpu_temporaries.get(size)
        rows.append(
            f"| {size} | {p.num_params / 1e9:.2f} B | {label} | ({m['data']}, {m['fsdp']}, {m['tensor']}) | "
            f"{p.global_batch} | {p.state / GB:.2f} | {p.activations / GB:.2f} | "
            f"{'' if cpu is None else f'{cpu / GB:.2f}'} | {(p.layout_padding + p.generated_code) / GB:.2f} | "
            f"{p.total / GB:.2f} GB | {100 * p.total / device_hbm(p, hardware):.0f}% | "
            + (f"{1e3 * roof.seconds:.0f} ms | {roof.bound} | {100 * roof.mfu:.0f}% |" if roof else "| | |"))
    return "\n".join([head, *rows])


def run_table() -> list[dict]:
    cache: dict = {}
    tensors = [int(t) for t in _TENSOR.value]
    records, sections = [], []
    t0 = time.perf_counter()
    for entry in _HARDWARE.value:
        hardware = Hardware.parse(entry)
        print(f"{hardware.name}: searching {', '.join(_sizes())}", flush=True)
        plans, cpu_temporaries = {}, {}
        for size in _sizes():
            found = smallest_fitting(size, hardware, per_shard=_PER_SHARD.value, max_devices=_MAX_DEVICES.value,
                                     tensors=tensors, usable=_USABLE.value, slack=_SCREEN.value, cache=cache,
                                     log=lambda s: print(s, flush=True))
            if found is not None and hardware.chip is not None:
                label, p = found
                config = _table_config(size, p.num_devices, p.mesh_shape["tensor"], _PER_SHARD.value)
                t1 = time.perf_counter()
                if _ROOFLINE.value:
                    flops, nbytes = step_cost(config, p.num_devices, devices=_topology_devices(label))
                    p = dataclasses.replace(p, step_flops=flops, step_bytes=nbytes)
                    found = (label, p)
                if _CPU_COMPARE.value:
                    cpu_temporaries[size] = plan_memory(config, p.num_devices).activations
                print(f"  {size} on {label}: " + "; ".join(format_plan(p).splitlines()[-3:-1])
                      + f" [{time.perf_counter() - t1:.0f} s]", flush=True)
            plans[size] = found
            if hardware.chip is not None:  # each row as soon as it is known: the big sizes take minutes each
                print("ROW " + tpu_table_markdown(hardware, {size: found}, cpu_temporaries, _PER_SHARD.value,
                                                  _USABLE.value).splitlines()[-1], flush=True)
        if hardware.chip is None:
            sections.append(table_markdown(hardware, plans, _PER_SHARD.value, _USABLE.value))
        else:
            sections.append(tpu_table_markdown(hardware, plans, cpu_temporaries, _PER_SHARD.value, _USABLE.value))
        records += [{"hardware": hardware.name, "hbm_gb": hardware.hbm_gb, "size": size,
                     "slice": found[0] if found else None, "plan": as_dict(found[1]) if found else None,
                     "xla_cpu_temporaries": cpu_temporaries.get(size)} for size, found in plans.items()]
    print(f"\n{len(cache)} compiles, {time.perf_counter() - t0:.0f} s in all\n")
    print("\n\n".join(sections))
    return records


def main(argv):
    logging.set_verbosity(logging.WARNING)
    sampler = _WHAT.value == "sampler"
    if sampler and (_TABLE.value or _STAGE.value != "compile"):
        raise UserError("--what=sampler plans one compiled sampler call: no --table, no --stage=shapes/lower")
    check_plan_flags(_WHAT.value, _SAMPLE_BATCH.value)
    if _TABLE.value:
        records = run_table()
    else:
        if _CONFIG.value is None or (_NUM_DEVICES.value is None and _TOPOLOGY.value is None):
            raise UserError("give --config and --num_devices or --topology (or --table)")
        devices = tpu_topology(_TOPOLOGY.value)[1] if _TOPOLOGY.value else None
        num_devices = _NUM_DEVICES.value or len(devices)
        hbm = _HBM_GB.value * GB if _HBM_GB.value else None
        where = f" on {_TOPOLOGY.value}" if _TOPOLOGY.value else ""
        name = flags.FLAGS["config"].config_filename
        if sampler:
            plan = plan_sampler(_CONFIG.value, num_devices, sample_batch=_SAMPLE_BATCH.value, hbm_bytes=hbm,
                                devices=devices, roofline=_ROOFLINE.value and devices is not None)
            print(format_sampler_plan(plan, title=f"sampler of {name}{where}", usable_fraction=_USABLE.value))
            records = [sampler_as_dict(plan)]
        else:
            plan = plan_memory(_CONFIG.value, num_devices, stage=_STAGE.value, hbm_bytes=hbm, devices=devices,
                               roofline=_ROOFLINE.value and devices is not None and _STAGE.value == "compile")
            print(format_plan(plan, title=f"train step of {name}{where}", usable_fraction=_USABLE.value))
            records = [as_dict(plan)]
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(records, f, indent=1, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                      else str(o))


if __name__ == "__main__":
    cli.absl_main(main)
