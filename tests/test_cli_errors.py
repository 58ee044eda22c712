"""Bad input through the command line: one clear `error:` line on stderr, no traceback, exit status 2.

Four cases run the real `python -m latent_lm.main` (in parallel): the three ways flag parsing fails (an unknown
`--config.` key, a bad value, an error inside the config file's get_config) and one UserError raised by a stage.
The other stage errors take the same path (`cli.run` around `experiment.run`), so they run in this process."""

from __future__ import annotations

import os
import subprocess

import cli_runs
import numpy as np
import pytest

from configs import imagenet
from data_pipelines.latent_cache import write_latent_cache
from latent_lm import cli, experiment
from latent_lm.errors import ConfigError

CLI_CASES = {
    "unknown_key": (["--config.model.bogus=1"], "unknown config key 'bogus' in --config.model.bogus"),
    "bad_value": (["--config.model.width=abc"], "flag --config.model.width=abc"),
    "config_file_argument": (["--config=configs/imagenet.py:size=Q"], "unknown model size 'Q'"),
    "missing_cache": ([], "latent cache not found"),
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
    for name, (flags, _) in CLI_CASES.items():
        cmd = cli_runs.command(str(tmp_path / name), cli_runs.overrides(2)) + flags
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=cli_runs.env(8), cwd=cli_runs.ROOT)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = _one_error_line(err)
        assert proc.returncode == 2, (name, proc.returncode, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and CLI_CASES[name][1] in lines[0], (name, lines)


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
