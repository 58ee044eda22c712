"""Command-line entry point.

  python -m latent_lm.main --config=configs/default.py --workdir=runs/default --mode=all
  python -m latent_lm.main --config=configs/default.py:animal_mnist --config.train.steps=2000 --mode=train

Modes: train_vae | encode | train | sample | eval | all (the stages in order) | plan (per-device memory of the
train step, or with --what=sampler of one sampler call of --sample_batch images, on this host's devices, or with
--topology=v5p:2x2x1 on a TPU slice's, compiled by the TPU compiler without a TPU; on a TPU chip also the compiled
cost with every loop iteration counted and a roofline time; for N fake devices on a CPU use launch/plan.py;
docs/scaling_out.md §6, §6.4).
Multi-host: on TPU VMs and SLURM the cluster is detected; elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on every process (docs/scaling_out.md).
"""

from __future__ import annotations

import jax
from absl import flags, logging
from ml_collections import config_flags

from latent_lm import cli, experiment
from latent_lm.parallel import distributed
from latent_lm.planning import GB, device_chip, format_plan, plan_memory, tpu_topology
from latent_lm.sampler_planning import check_plan_flags, format_sampler_plan, plan_sampler
from latent_lm.training.train_loop import Preempted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, latents, samples, metrics.")
_MODE = flags.DEFINE_enum("mode", "all", ["all", *experiment.RUNNERS, "plan"], "Which stage to run.")
_HBM_GB = flags.DEFINE_float("hbm_gb", None, "--mode=plan: HBM per device in GB, to say whether the plan fits.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=plan: compile for this TPU slice (e.g. v5p:2x2x1, v5e:2x4) "
                                "with the TPU compiler, no TPU needed (pip install -e '.[tpu]').")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "sampler"], "--mode=plan: the train step, or one call of the "
                          "class-conditional image sampler of the sample stage.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "--mode=plan --what=sampler: images per call, split over "
                                     "data×fsdp (default config.eval.sample_batch).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Initialize jax.distributed: auto = if the flags below are set or a TPU/SLURM "
                                 "multi-process job is detected.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host without "
                                   "TPU/SLURM detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process, 0..num_processes-1.")
flags.mark_flags_as_required(["config"])


def main(argv) -> None:
    if not flags.FLAGS["verbosity"].present:  # orbax/grain INFO logs drown the progress lines
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    try:
        if _MODE.value == "plan":
            _plan()
        else:
            experiment.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except Preempted as e:  # the checkpoint is written: a clean exit, the scheduler restarts the same command
        print(str(e), flush=True)


def _plan() -> None:
    check_plan_flags(_WHAT.value, _SAMPLE_BATCH.value)
    devices = tpu_topology(_TOPOLOGY.value)[1] if _TOPOLOGY.value else jax.devices()
    hbm = _HBM_GB.value * GB if _HBM_GB.value else None
    # On a TPU chip of planning.CHIPS the roofline's probe compiles are worth their time.
    roofline = device_chip(devices) is not None
    if _WHAT.value == "sampler":
        text = format_sampler_plan(plan_sampler(_CONFIG.value, len(devices), sample_batch=_SAMPLE_BATCH.value,
                                                hbm_bytes=hbm, devices=devices, roofline=roofline))
    else:
        text = format_plan(plan_memory(_CONFIG.value, len(devices), hbm_bytes=hbm, devices=devices,
                                       roofline=roofline))
    if jax.process_index() == 0:
        print(text, flush=True)


if __name__ == "__main__":
    cli.absl_main(main)
