"""The sweep runner (latent_lm/sweep.py): names, command-line values, one clear error for a bad sweep, emitted
launch lines, and end to end with the real `latent_lm.main`: two tiny runs, a SIGTERM mid-run, the resume, the
rerun that starts nothing."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import ROOT, env, write_synthetic_cache

from latent_lm import sweep
from latent_lm.sweep import SweepError

DEFAULT = f"{ROOT}/configs/default.py"


def _config_file(tmp_path, sweep_body: str, name: str = "cfg.py", config_body: str = "") -> str:
    path = tmp_path / name
    path.write_text(f"from configs import default\n\n\ndef get_config(arg=None):\n    c = default.get_config(arg)\n"
                    f"{config_body}    return c\n\n\ndef get_sweep(arg=None):\n    return {sweep_body}\n")
    return str(path)


def test_values_survive_the_command_line():
    values = {"model.width": 64, "optim.lr": 3e-4, "optim.warmup_steps": 7, "vae_optim.lr": 1e-5,
              "eval.use_ema": False, "mesh.shape": (1, -1, 1), "mesh.dcn_shape": [2, 1, 1],
              "stages": ("train", "sample"), "model.dtype": "bfloat16", "model.class_dropout": 0,
              "data.mixture": (("imagenet2012", 0.9), ("imagenette", 0.1)), "data.data_dir": "gs://b/tfds dir"}
    args = [f"--config.{k}={sweep.format_value(v)}" for k, v in values.items()]
    config = sweep.parse_config(DEFAULT, None, args, "test")
    for key, value in values.items():
        section, _, field = key.rpartition(".")
        got = (config[section] if section else config)[field]
        assert got == sweep._plain(value) and isinstance(got, bool) == isinstance(value, bool), (key, got)
    assert sweep.format_value(True) == "True" and sweep.format_value(1e-5) == "1e-05"
    with pytest.raises(SweepError, match="cannot put a value of type dict"):
        sweep.format_value({"a": 1})


def test_default_names_are_deterministic_and_filesystem_safe():
    assert sweep.default_name({"model.width": 64, "optim.lr": 3e-4}) == "width=64_lr=0.0003"
    assert sweep.default_name({"model.width": 64, "vae.width": 96}) == "model.width=64_vae.width=96"
    assert sweep.default_name({"mesh.shape": (1, -1, 1), "eval.use_ema": False}) == "shape=1x-1x1_use_ema=False"
    assert sweep.default_name({}, "size=Base,family=dit") == "size=Base-family=dit"
    assert sweep.default_name({}) == "base" and sweep.default_name({"a._b": 1}) == "b=1"
    assert sweep.default_name({"data.data_dir": "/a b/c"}) == "data_dir=-a-b-c"
    long_a = sweep.default_name({f"k{i}.value": "x" * 10 for i in range(12)})
    long_b = sweep.default_name({**{f"k{i}.value": "x" * 10 for i in range(11)}, "k11.value": "y" * 10})
    assert len(long_a) == len(long_b) == sweep.MAX_NAME_LEN and long_a != long_b
    for name in (long_a, "width=64_lr=0.0003", "size=Base-family=dit"):
        assert sweep._NAME_RE.match(name)


@pytest.mark.parametrize("sweep_body, extra, message", [
    ("[{'model.widht': 64}]", "", r"unknown config key 'model.widht' \(did you mean 'model.width'\?\)"),
    ("[{'model.num_kv_heads': 2}]", "", "model.num_kv_heads is None in the config"),
    ("[{'model.width': 'wide'}]", "", "--config.model.width=wide: invalid literal for int"),
    ("[{'model.width': 30}]", "", "model.width=30 must split into num_heads=4 heads"),
    ("[{'optim.lr': 1e-3}, {'optim.lr': 1e-3}]", "", "the name is also that of point 0"),
    ("[{'name': 'a/b', 'optim.lr': 1e-3}]", "", "name 'a/b' must be 1-128 characters"),
    ("[{'train.steps': 5}]", "--config.train.steps=9", "--extra sets 'train.steps', which the point sets too"),
    ("[{'optim.lr': 1e-3}]", "--workdir=/elsewhere", "--extra must not set --workdir"),
    ("[{'optim.lr': 1e-3}]", "--config.optim.b3=1", "unknown config key 'optim.b3'"),
    ("[{'config_arg': 'cifar', 'optim.lr': 1e-3}]", "", "unknown dataset 'cifar'"),
    ("[]", "", "must return a non-empty list"),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, sweep_body, extra, message):
    cfg = _config_file(tmp_path, sweep_body)
    with pytest.raises(SweepError, match=message):
        sweep.run_sweep(cfg, str(tmp_path / "root"), extra=extra)
    assert not (tmp_path / "root").exists()


def test_cli_error_is_one_line_and_status_2(tmp_path):
    cfg = _config_file(tmp_path, "[{'model.widht': 64}]")
    res = subprocess.run([sys.executable, "-m", "latent_lm.sweep", f"--config={cfg}", f"--root={tmp_path}/r"],
                         capture_output=True, text=True, cwd=ROOT, env=env(1), timeout=120, check=False)
    assert res.returncode == 2, res.stderr
    expected = ("error: sweep point 0 ('widht=64'): unknown config key 'model.widht' (did you mean "
                "'model.width'?)")
    assert res.stderr.strip().splitlines() == [expected]
    missing = tmp_path / "nope.py"
    with pytest.raises(SweepError, match="nope.py' not found"):
        sweep.run_sweep(str(missing), str(tmp_path / "r"))
    no_sweep = tmp_path / "plain.py"
    no_sweep.write_text("from configs.default import get_config\n")
    with pytest.raises(SweepError, match="defines no get_sweep"):
        sweep.run_sweep(str(no_sweep), str(tmp_path / "r"))


def test_emit_prints_one_launch_line_per_unfinished_run(tmp_path):
    cfg = _config_file(tmp_path, "[{'optim.lr': 1e-3}, {'optim.lr': 3e-4, 'mesh.shape': (1, -1, 1)}, "
                                 "{'name': 'dit', 'config_arg': 'animal_mnist'}]",
                       config_body="    c.optim.warmup_steps = 10\n")  # < the 100 steps of --extra
    root = str(tmp_path / "root")
    out = io.StringIO()
    assert sweep.run_sweep(f"{cfg}:mnist", root, emit="tpu", tpu_name="pod-{index}",
                           extra="--config.train.steps=100 --config.checkpoint.every=50", out=out) == 0
    lines = [shlex.split(line) for line in out.getvalue().splitlines()]
    assert [ln[:3] for ln in lines] == [["TPU_NAME=pod-0", "RUN_NAME=lr=0.001", "launch/tpu/run.sh"],
                                        ["TPU_NAME=pod-1", "RUN_NAME=lr=0.0003_shape=1x-1x1", "launch/tpu/run.sh"],
                                        ["TPU_NAME=pod-2", "RUN_NAME=dit", "launch/tpu/run.sh"]]
    assert lines[1][3:] == ["python", "-m", "latent_lm.main", f"--config={cfg}:mnist",
                            f"--workdir={root}/lr=0.0003_shape=1x-1x1", "--mode=all", "--config.optim.lr=0.0003",
                            "--config.mesh.shape=(1, -1, 1)", "--config.train.steps=100",
                            "--config.checkpoint.every=50", "--distributed=on"]
    assert lines[2][6] == f"--config={cfg}:animal_mnist"
    recorded = json.loads((tmp_path / "root" / "sweep.json").read_text())
    assert [r["name"] for r in recorded["runs"]] == ["lr=0.001", "lr=0.0003_shape=1x-1x1", "dit"]
    assert recorded["runs"][1]["command"] == lines[1][3:-1]

    # A finished run (done.json, and config.json equal to this sweep's config) is left out; a changed one is not.
    runs = sweep.expand(f"{cfg}:mnist", root, shlex.split("--config.train.steps=100 --config.checkpoint.every=50"))[1]
    for run, steps in zip(runs[:2], (100, 99)):
        os.makedirs(run.workdir)
        config = dict(run.config_json, train=dict(run.config_json["train"], steps=steps))
        with open(f"{run.workdir}/config.json", "w") as f:
            f.write(json.dumps(config))
        with open(f"{run.workdir}/done.json", "w") as f:
            f.write("{}")
    out = io.StringIO()
    sweep.run_sweep(f"{cfg}:mnist", root, emit="slurm", out=out,
                    extra="--config.train.steps=100 --config.checkpoint.every=50")
    lines = [shlex.split(line) for line in out.getvalue().splitlines()]
    assert [ln[:3] for ln in lines] == [["sbatch", "--job-name=lr=0.0003_shape=1x-1x1", "launch/gpu/slurm.sbatch"],
                                        ["sbatch", "--job-name=dit", "launch/gpu/slurm.sbatch"]]
    assert lines[0][3] == f"--config={cfg}:mnist"
    out = io.StringIO()
    sweep.run_sweep(f"{cfg}:mnist", root, emit="local", only=["dit"], out=out)
    assert shlex.split(out.getvalue())[:4] == ["python", "-m", "latent_lm.main", f"--config={cfg}:animal_mnist"]


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        assert proc.poll() is None, f"the sweep ended (status {proc.returncode}) before {pattern!r} appeared"
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout}s")


# A stand-in for `python -m latent_lm.main` (run_sweep's `python` argument): the run named seed=1 is stopped mid-run
# the first time, as an operator would stop the sweep (SIGTERM to the runner), and "resumes" the next time; every
# finished run writes done.json. Lines go on until the runner passes the SIGTERM on, so that the runner's main thread,
# reading them, handles the signal whichever of its threads received it.
FAKE_MAIN = """
import os, signal, sys, time
workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
checkpoint = os.path.join(workdir, "checkpoint")

def preempt(signum, frame):
    open(checkpoint, "w").close()
    print("preempted: checkpoint of step 5 saved", flush=True)
    sys.exit(128 + signum)

if workdir.endswith("seed=1") and not os.path.exists(checkpoint):
    signal.signal(signal.SIGTERM, preempt)
    print("step 5/100", flush=True)
    os.kill(os.getppid(), signal.SIGTERM)
    deadline = time.time() + 120
    while time.time() < deadline:
        print("training", flush=True)
        time.sleep(0.05)
    sys.exit(1)
if os.path.exists(checkpoint):
    print("resumed from step 5", flush=True)
print("step 100/100", flush=True)
open(os.path.join(workdir, "done.json"), "w").write("{}")
"""


def test_sweep_passes_sigterm_on_skips_finished_runs_and_reruns_the_rest(tmp_path, monkeypatch):
    """The runner's own logic with a stand-in child: SIGTERM to the runner reaches the running child and no further
    run starts (status 128+15, the run "interrupted … rerun to resume"); the rerun skips the finished run and starts
    the interrupted one again; once all are finished nothing starts. (Fast sibling of
    test_sweep_runs_skips_and_resumes_with_the_real_cli, whose child is the real train loop.)"""
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_MAIN}")
    fake.chmod(0o755)
    cfg = _config_file(tmp_path, "[{'train.seed': 0}, {'train.seed': 1}, {'train.seed': 2}]")
    root = tmp_path / "root"
    out = io.StringIO()
    assert sweep.run_sweep(cfg, str(root), python=str(fake), out=out) == 128 + signal.SIGTERM, out.getvalue()
    table = out.getvalue()[out.getvalue().rindex("name "):]
    assert re.search(r"seed=0\s+done", table) and re.search(r"seed=1\s+interrupted .*signal 15; rerun to resume",
                                                             table), table
    assert re.search(r"seed=2\s+pending", table) and not (root / "seed=2").exists()  # never started
    assert "[seed=1] preempted: checkpoint of step 5 saved" in out.getvalue()
    assert (root / "seed=0" / "done.json").exists() and not (root / "seed=1" / "done.json").exists()
    recorded = json.loads((root / "sweep.json").read_text())
    assert [r["workdir"] for r in recorded["runs"]] == [f"{root}/seed={i}" for i in range(3)]
    assert recorded["runs"][1]["command"][1:] == ["-m", "latent_lm.main", f"--config={cfg}", f"--workdir={root}/seed=1",
                                                  "--mode=all", "--config.train.seed=1"]

    out = io.StringIO()
    assert sweep.run_sweep(cfg, str(root), python=str(fake), out=out) == 0, out.getvalue()
    assert "=== seed=0: finished before, skipped" in out.getvalue()
    assert "[seed=1] resumed from step 5" in out.getvalue() and (root / "seed=2" / "done.json").exists()
    log = (root / "seed=1" / "log.txt").read_text()  # each start appends to the run's log
    assert log.count("=== ") == 2 and "preempted" in log and "step 100/100" in log

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    out = io.StringIO()
    assert sweep.run_sweep(cfg, str(root), python=str(fake), out=out) == 0
    assert all(re.search(rf"seed={i}\s+skipped", out.getvalue()) for i in range(3))


@pytest.mark.slow
def test_sweep_runs_skips_and_resumes_with_the_real_cli(tmp_path, monkeypatch):
    """`python -m latent_lm.sweep` with the real `latent_lm.main`: SIGTERM to the runner mid-run makes the train loop
    checkpoint; the rerun resumes it from that checkpoint to the end; then the run is finished (done.json, and the
    config.json main wrote equals the sweep's) and nothing starts. Slow (two training processes). Fast sibling,
    with a stand-in child and several runs: test_sweep_passes_sigterm_on_skips_finished_runs_and_reruns_the_rest."""
    tok = tmp_path / "tok"
    write_synthetic_cache(str(tok))  # a latent cache: no σ-VAE training
    body = ("    c.model.update(dict(width=32, depth=2, num_heads=4))\n    c.head.depth = 1\n"
            "    c.train.update(dict(steps=100, batch_size=16, log_every=5))\n    c.checkpoint.every = 20\n"
            "    c.optim.warmup_steps = 10\n"
            f"    c.stages = ('train',)\n    c.data.tokenizer_workdir = {str(tok)!r}\n")
    cfg = _config_file(tmp_path, "[{'train.seed': 1}]", config_body=body)
    root = tmp_path / "root"
    # env(1) carries conftest's run-wide compilation cache: the resumed run loads the first one's program.
    run_env = env(1)
    command = [sys.executable, "-m", "latent_lm.sweep", f"--config={cfg}", f"--root={root}"]
    proc = subprocess.Popen(command, cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        _wait_for(root / "seed=1" / "log.txt", r"step 5/100", proc)
        proc.send_signal(signal.SIGTERM)  # the runner passes it on; the train loop checkpoints and exits
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    table = output[output.rindex("name "):]
    assert re.search(r"seed=1\s+interrupted .*rerun to resume", table), output
    assert not (root / "seed=1" / "done.json").exists()
    preempted = re.search(r"preempted: checkpoint of step (\d+) saved", (root / "seed=1" / "log.txt").read_text())
    assert preempted and 5 <= int(preempted.group(1)) < 100, output
    recorded = json.loads((root / "sweep.json").read_text())
    assert [r["workdir"] for r in recorded["runs"]] == [f"{root}/seed=1"]

    # Rerun: the interrupted run resumes from its checkpoint and finishes.
    out = io.StringIO()
    assert sweep.run_sweep(cfg, str(root), env=run_env, out=out) == 0, out.getvalue()
    log = (root / "seed=1" / "log.txt").read_text()
    assert f"resumed from step {preempted.group(1)}" in log and "step 100/100" in log
    assert json.loads((root / "seed=1" / "done.json").read_text())["lm_final_loss"] > 0

    # Finished, by the config.json the real run wrote: nothing is started.
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    out = io.StringIO()
    assert sweep.run_sweep(cfg, str(root), env=run_env, out=out) == 0
    assert (root / "seed=1" / "config.json").exists() and re.search(r"seed=1\s+skipped", out.getvalue())


def test_a_failing_run_is_reported_and_the_next_one_runs(tmp_path):
    # Both runs fail fast (no latent cache), each with its own error line in its log; the sweep exits 1.
    body = "    c.stages = ('train',)\n"
    cfg = _config_file(tmp_path, "[{'train.seed': 0}, {'train.seed': 1}]", config_body=body)
    out = io.StringIO()
    assert sweep.run_sweep(cfg, str(tmp_path / "root"), env=env(1), out=out, only=["seed=1", "seed=0"]) == 1
    table = out.getvalue()[out.getvalue().rindex("name "):]
    assert re.search(r"seed=0\s+failed .*exit status 2", table) and re.search(r"seed=1\s+failed", table)
    assert "latent cache not found" in (tmp_path / "root" / "seed=0" / "log.txt").read_text()
