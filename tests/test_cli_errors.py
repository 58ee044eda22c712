"""Bad input through the command line: one clear `error:` line on stderr, no traceback, exit status 2."""

from __future__ import annotations

import os
import subprocess

import cli_runs
import numpy as np

from data_pipelines.latent_cache import write_latent_cache

CASES = {
    "unknown_key": (["--config.model.bogus=1"], "unknown config key 'bogus' in --config.model.bogus"),
    "bad_value": (["--config.model.width=abc"], "flag --config.model.width=abc"),
    "mesh_vs_devices": (["--config.mesh.shape=(3,1,1)"], "mesh.shape (3, 1, 1) has 3 devices but 8 are available"),
    "batch_vs_data_parallel": (["--config.train.batch_size=12"],
                               "batch_size 12 is not divisible by the data-parallel size 8"),
    "missing_cache": ([], "latent cache not found"),
    "wrong_latent_shape": ([], "holds latents of shape (49, 3) but the config expects (49, 4)"),
    "bad_remat": (["--config.model.remat=sometimes"], "model.remat='sometimes' must be one of"),
}


def test_bad_input_is_one_clear_error(tmp_path):
    procs = {}
    for name, (flags, _) in CASES.items():
        workdir = str(tmp_path / name)
        if name in ("batch_vs_data_parallel", "bad_remat"):
            cli_runs.write_synthetic_cache(workdir, count=32)
        if name == "wrong_latent_shape":
            write_latent_cache(os.path.join(workdir, "latents", "train"), np.zeros((4, 49, 3), np.float32),
                               np.zeros(4, np.int32), {"latent_norm": cli_runs.NORM})
        cmd = cli_runs.command(workdir, cli_runs.overrides(2)) + flags
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=cli_runs.env(8), cwd=cli_runs.ROOT)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("W", "I"))]
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and CASES[name][1] in lines[0], (name, lines)


def test_bad_config_file_argument_is_one_clear_error():
    """`--config=file.py:arg` errors raised inside get_config (config_flags wraps them with a traceback)."""
    for arg, expected in (("size=Q", "unknown model size 'Q'"), ("sizes=L", "unknown config argument 'sizes'")):
        proc = subprocess.run([*cli_runs.command("/tmp/unused", {})[:3], f"--config=configs/imagenet.py:{arg}"],
                              capture_output=True, text=True, env=cli_runs.env(1), cwd=cli_runs.ROOT, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
