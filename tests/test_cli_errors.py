"""Bad input through the command line: one clear `error:` line on stderr, no traceback, exit status 2.

Two cases run the real `python -m latent_lm.main` (in parallel): a flag parsing error and a UserError raised by a
stage. The other cases take the same two paths in this process: `cli.parse_absl_flags` on the same `--config` flag
(on a private FlagValues), and `cli.run` around `experiment.run`."""

from __future__ import annotations

import os
import subprocess

import cli_runs
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import imagenet
from data_pipelines.latent_cache import write_latent_cache
from latent_lm import cli, experiment
from latent_lm.errors import ConfigError

CLI_CASES = {
    "unknown_key": (["--config.model.bogus=1"], "unknown config key 'bogus' in --config.model.bogus"),
    "missing_cache": ([], "latent cache not found"),
}

DEFAULT = f"--config={cli_runs.ROOT}/configs/default.py"
FLAG_CASES = {  # the three ways parsing fails: an unknown key, a bad value, an error inside get_config
    "unknown_key": ([DEFAULT, "--config.model.bogus=1"], "unknown config key 'bogus' in --config.model.bogus"),
    "bad_value": ([DEFAULT, "--config.model.width=abc"], "flag --config.model.width=abc"),
    "config_file_argument": ([f"--config={cli_runs.ROOT}/configs/imagenet.py:size=Q"], "unknown model size 'Q'"),
}

IN_PROCESS_CASES = {
    "mesh_vs_devices": ({"mesh.shape": (3, 1, 1)}, "mesh.shape (3, 1, 1) has 3 devices but 8 are available"),
    "batch_vs_data_parallel": ({"train.batch_size": 12}, "batch_size 12 is not divisible by the data-parallel size 8"),
    "wrong_latent_shape": ({}, "holds latents of shape (49, 3) but the config expects (49, 4)"),
    "bad_remat": ({"model.remat": "sometimes"}, "model.remat='sometimes' must be one of"),
}


def _one_error_line(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and not line.startswith(("W", "I"))]


def test_bad_command_lines_are_one_clear_error(tmp_path):
    procs = {}
    for name, (extra, _) in CLI_CASES.items():
        cmd = cli_runs.command(str(tmp_path / name), cli_runs.overrides(2)) + extra
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=cli_runs.env(8), cwd=cli_runs.ROOT)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = _one_error_line(err)
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and CLI_CASES[name][1] in lines[0], (name, lines)


@pytest.mark.parametrize("name", FLAG_CASES)
def test_bad_flags_are_one_clear_error(name, monkeypatch, capsys):
    """`cli.parse_absl_flags` (latent_lm.main's flag parser) on main's `--config` flag, defined on private
    FlagValues so that this process's global flags stay untouched."""
    argv, message = ["main", *FLAG_CASES[name][0]], FLAG_CASES[name][1]
    values = flags.FlagValues()
    # as latent_lm.main defines it at import (config_flags reads the command line then, for the override flags)
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    monkeypatch.setattr(flags, "FLAGS", values)
    with pytest.raises(SystemExit) as exited:
        cli.parse_absl_flags(argv)
    assert exited.value.code == cli.USAGE_ERROR
    err = capsys.readouterr().err
    lines = _one_error_line(err)
    assert "Traceback" not in err and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("name", IN_PROCESS_CASES)
def test_bad_input_to_a_stage_is_one_clear_error(tmp_path, capsys, name):
    """What `latent_lm.main` does with a stage's UserError (cli.run around experiment.run), in this process."""
    over, message = IN_PROCESS_CASES[name]
    workdir = str(tmp_path)
    if name in ("batch_vs_data_parallel", "bad_remat"):
        cli_runs.write_synthetic_cache(workdir, count=32)
    if name == "wrong_latent_shape":
        write_latent_cache(os.path.join(workdir, "latents", "train"), np.zeros((4, 49, 3), np.float32),
                           np.zeros(4, np.int32), {"latent_norm": cli_runs.NORM})
    config = cli_runs.make_config({**cli_runs.overrides(2), **over})
    assert cli.run(lambda argv: experiment.run(config, workdir, "train")) == cli.USAGE_ERROR
    lines = _one_error_line(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_bad_config_file_argument_names_the_argument():
    """The config-file argument parser's own error (the CLI case above shows how such an error is printed)."""
    with pytest.raises(ConfigError, match="unknown config argument 'sizes'"):
        imagenet.get_config("sizes=L")
