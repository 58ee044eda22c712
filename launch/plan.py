"""Planning mode: per-device memory of the train step for any config on any mesh, on fake CPU devices (issue #4).

  python launch/plan.py --config=configs/imagenet.py:7B --num_devices=256 '--config.mesh.shape=(32,8,1)' \\
      --config.train.batch_size=2048 --hbm_gb=95
  python launch/plan.py --table          # docs/scaling_out.md §6.1: scaling family on TPU v5p (95 GB) and H100 (80 GB)
  python launch/plan.py --table --arch=dit --sizes=Base,Medium    # the same for the DiT twins

The process gives itself `--num_devices` (or, with --table, `--max_devices`) fake XLA:CPU devices before jax is
imported, builds the mesh from `config.mesh.shape`, lowers and compiles the same jitted train step that training
runs, and prints per-device params, optimizer state, EMA, batch and temporaries (activations, gradients, update)
(`latent_lm/planning.py` says how each figure is obtained and what the CPU compile can and cannot tell).
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TABLE_MAX_DEVICES = 1024


def _requested_devices(argv: list[str]) -> int:
    """The fake device count this run needs, read from argv before absl parses it (jax must not be imported yet)."""
    text = " ".join(argv)
    if re.search(r"--table(\s|=|$)", text) and not re.search(r"--table=(false|False|0)", text):
        found = re.search(r"--max_devices[= ](\d+)", text)
        return int(found.group(1)) if found else TABLE_MAX_DEVICES
    found = re.search(r"--num_devices[= ](\d+)", text)
    return int(found.group(1)) if found else 1


def fake_device_env(num_devices: int, xla_flags: str = "") -> dict[str, str]:
    """Environment for `num_devices` fake XLA:CPU devices; effective only if set before jax is imported.

    Keeps other XLA flags, replaces a device count already there, and adds the in-order CPU scheduler flag that
    tests/conftest.py uses (the concurrency-optimised one can deadlock collectives in the scanned step).
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

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import imagenet  # noqa: E402
from latent_lm import cli  # noqa: E402
from latent_lm.errors import UserError  # noqa: E402
from latent_lm.planning import (GB, USABLE_HBM_FRACTION, MemoryPlan, as_dict, format_plan,  # noqa: E402
                                 plan_memory)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config to plan (e.g. configs/imagenet.py:7B).",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices in the mesh (fake CPU devices).")
_HBM_GB = flags.DEFINE_float("hbm_gb", None, "HBM per device in GB (1e9 bytes); says whether the plan fits.")
_STAGE = flags.DEFINE_enum("stage", "compile", ["shapes", "lower", "compile"],
                           "compile: activations from the compiled step; lower/shapes: analytic estimate (faster).")
_USABLE = flags.DEFINE_float("usable_fraction", USABLE_HBM_FRACTION, "Fraction of HBM a plan may use to 'fit'.")
_JSON = flags.DEFINE_string("json", None, "Also write the plan(s) as JSON to this path.")
_TABLE = flags.DEFINE_bool("table", False, "Print docs/scaling_out.md's scaling-family tables, not one plan.")
_ARCH = flags.DEFINE_enum("arch", "latent_lm", ["latent_lm", "dit"], "Table: LatentLM or its DiT twin.")
_SIZES = flags.DEFINE_list("sizes", ["Base", "Medium", "Large", "XL", "3B", "7B", "13B"], "Table: model sizes.")
_HARDWARE = flags.DEFINE_list("hardware", ["TPU v5p=95", "H100=80"], "Table: name=HBM GB per device.")
_PER_SHARD = flags.DEFINE_integer("per_device_batch", 16,
                                  "Table: sequences per data-parallel shard (global batch = this × data × fsdp).")
_MAX_DEVICES = flags.DEFINE_integer("max_devices", TABLE_MAX_DEVICES, "Table: largest device count searched.")
_TENSOR = flags.DEFINE_list("tensor_options", ["1"],
                            "Table: tensor-parallel sizes tried at each device count, in order (fsdp takes the rest). "
                            "Tensor parallelism did not lower the compiled peak (13B on 8: 74.8–75.0 GB for 1–8).")
_SCREEN = flags.DEFINE_float("screen_slack", 1.15,
                             "Table: compile a mesh only if its analytic total is within this factor of the budget.")


def _size_config(size: str):
    return imagenet.get_config(f"size={size},arch={_ARCH.value}")


def _table_config(size: str, n: int, tensor: int, per_shard: int):
    c = _size_config(size)
    c.mesh.shape = (1, n // tensor, tensor)
    c.train.batch_size = per_shard * (n // tensor)
    return c


def _candidates(size: str, max_devices: int, tensors: list[int]):
    """(devices, tensor) in the order searched: fewest devices first, pure FSDP before tensor parallelism."""
    heads = _size_config(size).model.num_heads
    n = 1
    while n <= max_devices:
        for t in tensors:
            if t <= n and heads % t == 0:
                yield n, t
        n *= 2


def smallest_fitting(size: str, hbm_bytes: float, *, per_shard: int, max_devices: int, tensors: list[int],
                     usable: float, slack: float, cache: dict, log=print) -> MemoryPlan | None:
    """The first (devices, mesh) in `_candidates` whose compiled plan fits `usable`·HBM; compiled plans are cached.

    Each candidate is screened by its exact state bytes plus the analytic activation estimate (no lowering) and
    compiled only if that total is within `slack`× the budget.
    """
    budget = usable * hbm_bytes
    for n, t in _candidates(size, max_devices, tensors):
        key = (size, n, t, per_shard)
        if key not in cache:
            screen = plan_memory(_table_config(size, n, t, per_shard), n, stage="shapes")
            if screen.total > slack * budget:
                continue
            t0 = time.perf_counter()
            cache[key] = plan_memory(_table_config(size, n, t, per_shard), n, stage="compile")
            p = cache[key]
            log(f"  {size} on {n} devices (fsdp {n // t}, tensor {t}): {p.total / GB:.1f} GB in all; temporaries "
                f"{p.activations / GB:.2f} GB compiled, {p.analytic_activations / GB:.2f} GB analytic "
                f"({p.peak_phase} phase) [{time.perf_counter() - t0:.0f} s]")
        if cache[key].total <= budget:
            return cache[key]
    return None


def table_markdown(hardware: str, hbm_gb: float, plans: dict[str, MemoryPlan | None], per_shard: int,
                   usable: float) -> str:
    head = (f"**{hardware}** ({hbm_gb:g} GB HBM per device, a plan fits at ≤ {100 * usable:.0f}%; "
            f"{per_shard} sequences × 256 tokens per data shard)\n\n"
            "| size | params | devices | mesh (data, fsdp, tensor) | global batch | params | AdamW μ,ν | EMA | "
            "temporaries | total / device | HBM used | peak phase |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size, p in plans.items():
        if p is None:
            rows.append(f"| {size} | | none ≤ max_devices | | | | | | | | | |")
            continue
        m = p.mesh_shape
        rows.append(f"| {size} | {p.num_params / 1e9:.2f} B | {p.num_devices} | ({m['data']}, {m['fsdp']}, "
                    f"{m['tensor']}) | {p.global_batch} | {p.params / GB:.2f} | {p.opt_state / GB:.2f} | "
                    f"{p.ema / GB:.2f} | {p.activations / GB:.2f} | {p.total / GB:.2f} GB | "
                    f"{100 * p.total / (hbm_gb * GB):.0f}% | {p.peak_phase} |")
    return "\n".join([head, *rows])


def run_table() -> list[dict]:
    cache: dict = {}
    tensors = [int(t) for t in _TENSOR.value]
    records, sections = [], []
    t0 = time.perf_counter()
    for entry in _HARDWARE.value:
        name, hbm = entry.rsplit("=", 1)
        hbm_gb = float(hbm)
        print(f"{name}: searching {', '.join(_SIZES.value)}", flush=True)
        plans = {size: smallest_fitting(size, hbm_gb * GB, per_shard=_PER_SHARD.value,
                                        max_devices=_MAX_DEVICES.value, tensors=tensors, usable=_USABLE.value,
                                        slack=_SCREEN.value, cache=cache, log=lambda s: print(s, flush=True))
                 for size in _SIZES.value}
        sections.append(table_markdown(name, hbm_gb, plans, _PER_SHARD.value, _USABLE.value))
        records += [{"hardware": name, "hbm_gb": hbm_gb, "size": size, "plan": as_dict(p) if p else None}
                    for size, p in plans.items()]
    print(f"\n{len(cache)} compiles, {time.perf_counter() - t0:.0f} s in all\n")
    print("\n\n".join(sections))
    return records


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if _TABLE.value:
        records = run_table()
    else:
        if _CONFIG.value is None or _NUM_DEVICES.value is None:
            raise UserError("give --config and --num_devices (or --table)")
        hbm = _HBM_GB.value * GB if _HBM_GB.value else None
        plan = plan_memory(_CONFIG.value, _NUM_DEVICES.value, stage=_STAGE.value, hbm_bytes=hbm)
        print(format_plan(plan, title=f"train step of {flags.FLAGS['config'].config_filename}",
                          usable_fraction=_USABLE.value))
        records = [as_dict(plan)]
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(records, f, indent=1, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                      else str(o))


if __name__ == "__main__":
    cli.absl_main(main)
