"""Runs survive faults: kill -9 at random moments (one of them during an async save), SIGTERM preemption, and a
corrupted latest checkpoint. Resumed runs end bit-identical to an uninterrupted run of the same length."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import time

import cli_runs
import jax
import ml_collections
import numpy as np
import pytest
from test_train_loop import MODEL, ToyTask, configs, toy_data

from latent_lm.checkpoint import NoUsableCheckpointError
from latent_lm.models.latent_lm import LatentLM
from latent_lm.parallel.mesh import DEFAULT_RULES, make_mesh
from latent_lm.training.train_loop import train

STEPS = 24


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0, poll: float = 0.002):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            return None
        time.sleep(poll)
    raise TimeoutError("the training subprocess made no progress")


def _last_step(log_path: str) -> int:
    if not os.path.exists(log_path):
        return 0
    with open(log_path) as f:
        steps = re.findall(r"\[lm\] step (\d+)/", f.read())
    return int(steps[-1]) if steps else 0


def _tmp_checkpoint(ckpt_dir: str) -> str | None:
    """Name of an in-progress (not yet renamed) orbax step directory, if any."""
    try:
        return next((n for n in os.listdir(ckpt_dir) if "tmp" in n), None)
    except FileNotFoundError:
        return None


def _resumed_steps(log_path: str) -> list[int]:
    with open(log_path) as f:
        return [int(s) for s in re.findall(r"resumed from step (\d+)", f.read())]


@pytest.mark.slow
def test_kill9_and_sigterm_resume_bit_exact(tmp_path):
    rng = random.Random(1234)
    over = cli_runs.overrides(STEPS)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    for w in (ref, run):
        cli_runs.write_synthetic_cache(w)
    proc = cli_runs.start(ref, over, str(tmp_path / "ref.log"))
    assert proc.wait(timeout=600) == 0, open(tmp_path / "ref.log").read()[-3000:]

    log = str(tmp_path / "run.log")
    ckpt_dir = f"{run}/lm/checkpoints"
    events = []
    for moment in ["random", "during_async_save", "sigterm", "random"]:
        before = _last_step(log)
        proc = cli_runs.start(run, over, log)
        if moment == "during_async_save":
            # let the restarted run get going, then kill the instant orbax has a step directory half written
            _wait_for(lambda: _last_step(log) > before, proc)
            tmp = _wait_for(lambda: _tmp_checkpoint(ckpt_dir), proc)
            assert tmp, "no async save was observed in progress"
            proc.send_signal(signal.SIGKILL)
            events.append(("kill -9 during save of", tmp))
        else:
            target = before + rng.randint(3, 6)
            _wait_for(lambda: _last_step(log) >= target, proc)
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGTERM if moment == "sigterm" else signal.SIGKILL)
            events.append((moment, _last_step(log)))
        rc = proc.wait(timeout=120)
        assert rc == (0 if moment == "sigterm" else -signal.SIGKILL), (moment, rc, open(log).read()[-3000:])
        if moment == "sigterm":
            assert "preempted: checkpoint of step" in open(log).read()
    assert cli_runs.start(run, over, log).wait(timeout=600) == 0, open(log).read()[-3000:]

    resumed = _resumed_steps(log)
    assert len(resumed) == 4 and resumed == sorted(resumed) and 0 < resumed[0], (resumed, events)
    assert not any("tmp" in n for n in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)
    a, b = cli_runs.trained_params(ref, over), cli_runs.trained_params(run, over)
    assert int(a.step) == int(b.step) == STEPS
    for x, y in zip(jax.tree.leaves((a.params, a.ema_params, a.opt_state)),
                    jax.tree.leaves((b.params, b.ema_params, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run(workdir, steps, every=2):
    optim, train_cfg, ckpt = configs(steps, every)
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])
    logs = []
    res = train(ToyTask(), toy_data(), optim_config=optim, train_config=train_cfg, mesh=mesh, rules=DEFAULT_RULES,
                workdir=str(workdir), checkpoint_config=ckpt, log=logs.append)
    return res, logs


def _damage(step_dir: str, how: str) -> None:
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            if how == "truncate":
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
            else:
                with open(path, "wb") as f:
                    f.write(b"\x00garbage" * 8)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys, how):
    _run(tmp_path, 6)
    ckpt = tmp_path / "checkpoints"
    assert sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) == [2, 4, 6]
    _damage(str(ckpt / "6"), how)
    res, logs = _run(tmp_path, 8)
    out = capsys.readouterr().out
    assert "WARNING: checkpoint step 6" in out and "falling back" in out
    assert "resumed from step 4" in logs and int(res.state.step) == 8
    assert any(n.startswith("corrupt.6.") for n in os.listdir(ckpt))


def test_all_checkpoints_corrupt_is_one_clear_error(tmp_path):
    _run(tmp_path, 4)
    for n in os.listdir(tmp_path / "checkpoints"):
        if n.isdigit():
            _damage(str(tmp_path / "checkpoints" / n), "garbage")
    with pytest.raises(NoUsableCheckpointError, match="none of the 2 checkpoints"):
        _run(tmp_path, 6)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing is moved when nothing restores


def test_checkpoint_of_another_config_is_an_error_not_corruption(tmp_path):
    _run(tmp_path, 4)
    wider = WiderTask()
    optim, train_cfg, ckpt = configs(6, 2)
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])
    with pytest.raises(NoUsableCheckpointError, match="use a new --workdir"):
        train(wider, toy_data(), optim_config=optim, train_config=train_cfg, mesh=mesh, rules=DEFAULT_RULES,
              workdir=str(tmp_path), checkpoint_config=ckpt, log=lambda s: None)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


class WiderTask(ToyTask):
    @property
    def model(self):
        return LatentLM(dataclasses.replace(MODEL, width=48))
