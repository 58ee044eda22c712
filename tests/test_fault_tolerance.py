"""Runs survive faults: kill -9 at random moments (one of them during an async save), SIGTERM preemption, and a
corrupted latest checkpoint. Resumed runs end bit-identical to an uninterrupted run of the same length."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import time

import cli_runs
import jax
import numpy as np
import pytest
from test_train_loop import (MODEL, REF_STEPS, Crash, Interrupted, ToyTask, assert_same_state, toy_data,
                             train_toy)

from latent_lm.checkpoint import NoUsableCheckpointError
from latent_lm.models.latent_lm import LatentLM
from latent_lm.training.train_loop import Preempted

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


def test_crash_half_written_save_and_preemption_resume_bit_exact(tmp_path, toy_reference):
    """The CLI test above in-process: a crash (nothing saved after it), a half-written async save left by it, a
    SIGTERM preemption, then a run to the end. Each run resumes from the right step with the data position of that
    step, and the result is bit-identical to the uninterrupted reference (params, optimizer state, EMA, key, counts)."""
    run, logs = tmp_path / "run", []
    with pytest.raises(Crash):  # read 11 is taken during step 11: 10 steps done, the last checkpoint is step 8
        train_toy(run, Interrupted(toy_data(), at=11, how="crash"), log=logs.append)
    ckpts = run / "checkpoints"
    assert sorted(n for n in os.listdir(ckpts)) == ["8"]
    # What kill -9 during the async save of step 16 leaves: orbax's temporary directory, partly written.
    half = ckpts / "16.orbax-checkpoint-tmp"
    shutil.copytree(ckpts / "8", half)
    _damage(str(half), "truncate")

    with pytest.raises(Preempted) as preempted:
        train_toy(run, Interrupted(toy_data(), at=5), log=logs.append)
    assert preempted.value.step == 13 and "preempted: checkpoint of step 13" in str(preempted.value)
    assert not half.exists()  # the manager removed the leftover; it was never taken for a checkpoint
    res = train_toy(run, toy_data(), log=logs.append)
    assert [line for line in logs if line.startswith("resumed")] == ["resumed from step 8", "resumed from step 13"]
    assert_same_state(res.state, toy_reference.state)
    assert not any("tmp" in n for n in os.listdir(ckpts))
    # A finished run started again restores its last checkpoint and has nothing left to do.
    again = train_toy(run, toy_data(), log=logs.append)
    assert logs[-1] == f"resumed from step {REF_STEPS}" and again.steps_per_sec == 0.0
    assert_same_state(again.state, toy_reference.state)


def _copy_reference(toy_reference, tmp_path):
    """A writable copy of the reference run's workdir: checkpoints 8, 16 and 24, each with its data position."""
    shutil.copytree(toy_reference.workdir, tmp_path / "run")
    assert sorted(int(n) for n in os.listdir(tmp_path / "run" / "checkpoints")) == [8, 16, REF_STEPS]
    return tmp_path / "run"


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
def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys, how, toy_reference):
    """The damaged latest checkpoint is moved aside with a warning; the run resumes from the one before and redoes
    the lost steps bit-identically."""
    run = _copy_reference(toy_reference, tmp_path)
    _damage(str(run / "checkpoints" / str(REF_STEPS)), how)
    logs = []
    res = train_toy(run, toy_data(), log=logs.append)
    out = capsys.readouterr().out
    assert f"WARNING: checkpoint step {REF_STEPS}" in out and "falling back" in out
    assert "resumed from step 16" in logs and int(res.state.step) == REF_STEPS
    assert any(n.startswith(f"corrupt.{REF_STEPS}.") for n in os.listdir(run / "checkpoints"))
    assert_same_state(res.state, toy_reference.state)


def test_all_checkpoints_corrupt_is_one_clear_error(tmp_path, toy_reference):
    run = _copy_reference(toy_reference, tmp_path)
    for n in os.listdir(run / "checkpoints"):
        _damage(str(run / "checkpoints" / n), "garbage")
    with pytest.raises(NoUsableCheckpointError, match="none of the 3 checkpoints"):
        train_toy(run, toy_data())
    assert sorted(os.listdir(run / "checkpoints")) == ["16", "24", "8"]  # nothing is moved when nothing restores


def test_checkpoint_of_another_config_is_an_error_not_corruption(tmp_path, toy_reference):
    run = _copy_reference(toy_reference, tmp_path)
    with pytest.raises(NoUsableCheckpointError, match="use a new --workdir"):
        train_toy(run, toy_data(), task=WiderTask())
    assert sorted(os.listdir(run / "checkpoints")) == ["16", "24", "8"]


class WiderTask(ToyTask):
    @property
    def model(self):
        return LatentLM(dataclasses.replace(MODEL, width=48))
