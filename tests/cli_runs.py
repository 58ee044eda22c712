"""Helpers for tests that run `python -m latent_lm.main` in subprocesses: a tiny LatentLM config on a synthetic
latent cache, the command line for it, and loading the trained state back in the test process."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np

from configs import default
from data_pipelines.latent_cache import write_latent_cache
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.training.tasks import LatentLMTask
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import load_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM = {"scale": 1.0, "bias": 0.0}

# A LatentLM small enough that a subprocess starts, compiles and trains in seconds on 2 CPU cores.
TINY = {"model.width": 32, "model.depth": 2, "model.num_heads": 4, "head.depth": 1, "train.batch_size": 16,
        "train.log_every": 1, "checkpoint.every": 2, "checkpoint.max_to_keep": 3}


def overrides(steps: int, **extra) -> dict:
    """TINY for `steps` steps; the warm-up the optimizer used to clamp a longer one to (steps − 1), now that config
    validation rejects a warm-up ≥ the run."""
    return {**TINY, "train.steps": steps, "optim.warmup_steps": steps - 1, **extra}


def make_config(over: dict):
    config = default.get_config()
    for key, value in over.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def write_synthetic_cache(workdir: str, count: int = 256, seed: int = 0) -> None:
    """Latents whose mean depends on the class (learnable), in the default config's shape [49, 4]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count).astype(np.int32)
    latents = (labels[:, None, None] / 5.0 - 1.0 + 0.3 * rng.standard_normal((count, 49, 4))).astype(np.float32)
    write_latent_cache(os.path.join(workdir, "latents", "train"), latents, labels, {"latent_norm": NORM})


def command(workdir: str, over: dict, *extra_flags: str) -> list[str]:
    flags = [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in over.items()]
    return [sys.executable, "-m", "latent_lm.main", f"--config={ROOT}/configs/default.py", f"--workdir={workdir}",
            "--mode=train", *flags, *extra_flags]


def env(num_devices: int = 1) -> dict:
    """This process's environment (conftest's compilation cache and XLA settings) with `num_devices` fake CPUs."""
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={num_devices} "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false")
    return e


def start(workdir: str, over: dict, log_path: str, *extra_flags: str, num_devices: int = 1) -> subprocess.Popen:
    log = open(log_path, "a")
    return subprocess.Popen(command(workdir, over, *extra_flags), stdout=log, stderr=subprocess.STDOUT,
                            env=env(num_devices), cwd=ROOT)


def trained_params(workdir: str, over: dict):
    """The latest checkpointed train state of `workdir`, restored onto this process's first device."""
    config = make_config(over)
    task = LatentLMTask.from_config(config, LatentNormalization(**NORM))
    mesh = make_mesh(None, jax.devices()[:1])
    state = load_state(task, optim_config=config.optim, train_config=config.train, mesh=mesh,
                       rules=logical_rules(config.mesh), workdir=f"{workdir}/lm")
    return jax.device_get(state)
