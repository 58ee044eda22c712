"""Multi-host start-up: `jax.distributed.initialize` before any other JAX call (docs/design.md §7).

- TPU VM pods and SLURM jobs: detected from the environment, JAX finds the coordinator itself.
- GPU clusters without SLURM, and local testing: explicit coordinator address, process count and id (flags
  `--coordinator_address --num_processes --process_id`). CPU processes talk through gloo collectives.
After initialization every process sees all devices of the job (`jax.devices()`) and its own
(`jax.local_devices()`); global batches are assembled with `jax.make_array_from_process_local_data`.

Preemption (docs/scaling_out.md §4.1): `jax.distributed.initialize` also starts JAX's preemption sync manager
(`jax_enable_preemption_service`, on by default), whose notifier catches SIGTERM on any process; the train loop's
`Checkpointer.reached_preemption` then gives every process the same step to save. Nothing else is needed here, and the
loop installs no SIGTERM handler of its own with several processes, which would take the signal from the notifier.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from latent_lm.errors import ConfigError


def _on_cloud_tpu_vm() -> bool:
    # GCE TPU VMs keep the worker list and MEGASCALE settings in instance metadata, not in the environment; jax
    # sets this flag at import by probing for the TPU driver. Initializing on a single-host TPU VM is harmless.
    try:
        from jax._src import cloud_tpu_init  # noqa: PLC0415  (private, so guarded)
        return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
    except ImportError:
        return False


def cluster_detected(env: dict[str, str] | None = None) -> bool:
    """True inside a TPU VM (slice or multislice) or a multi-process SLURM job, where JAX detects the cluster."""
    if env is None and _on_cloud_tpu_vm():
        return True
    env = os.environ if env is None else env
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    if "MEGASCALE_COORDINATOR_ADDRESS" in env:  # multislice
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, mode: str = "auto") -> bool:
    """Initializes the JAX distributed runtime if this is a multi-process job; returns whether it did.

    mode: "auto" (explicit flags, else a detected cluster, else single process), "on" (always, letting JAX
    detect the cluster) or "off".
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--distributed={mode!r} must be one of auto, on, off")
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ConfigError("--coordinator_address, --num_processes and --process_id must be given together")
    if explicit and not 0 <= process_id < num_processes:  # checked before any JAX setting changes
        raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if mode == "off" or (mode == "auto" and not explicit and not cluster_detected()):
        return False
    # Affects only the CPU backend (local multi-process tests, CPU clusters); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    return True


def barrier(name: str) -> None:
    """Every process waits here for the others (e.g. until process 0 has written a file they read next)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
