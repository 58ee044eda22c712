"""The launch scripts (launch/tpu/*.sh, launch/gpu/*) against fake `gcloud`, `srun`, `scancel`, `scontrol` and
`python` executables that record their arguments. The remote commands that the TPU scripts hand to `gcloud ... ssh
--command` are executed here with bash (HOME in tmp_path), so the quoting of the passed-through command is checked
end to end, and so are the per-worker pid file and log that stop.sh and logs.sh rely on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu"
GPU = ROOT / "launch" / "gpu"
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT", "QR_ID", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "NUM_SLICES", "PROVISIONING",
            "REPO_URL", "BRANCH", "REMOTE_DIR", "RUN_NAME", "LOG_DIR", "SSH_FLAGS", "DRY_RUN", "WAIT", "PYTHON",
            "COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "EXTRA_PIP", "JAX_PIP", "CREATE_FLAGS")
# A command whose arguments need every kind of shell quoting.
COMMAND = ["python", "-m", "latent_lm.main", "--config=configs/imagenet.py:L", "--workdir=gs://bucket/run a",
           "--config.mesh.shape=(1, -1, 1)", "--note=it's \"quoted\" $HOME `id` ;&| *", "--distributed=on"]

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print("ACTIVE")
if "scp" in sys.argv:  # keep what would be copied
    shutil.copy(sys.argv[5], os.environ["GCLOUD_LOG"] + ".tgz")
"""
# Records its argv (NUL-separated) and pid; on SIGTERM records it and exits 0, as the train loop does.
FAKE_PYTHON = """#!/bin/bash
trap 'echo TERM > "$FAKE_DIR/signal"; kill $! 2>/dev/null; exit 0' TERM
echo $$ > "$FAKE_DIR/pid"
printf '%s\\0' "$@" > "$FAKE_DIR/argv.tmp" && mv "$FAKE_DIR/argv.tmp" "$FAKE_DIR/argv"
sleep 60 & wait
"""


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake(tmp_path):
    """Environment with a fake gcloud first on PATH and HOME in tmp_path; `fake.calls()` are its argv lists."""
    bin_dir = tmp_path / "bin"
    _executable(bin_dir / "gcloud", FAKE_GCLOUD)
    log = tmp_path / "gcloud.jsonl"
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    base.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path / "home"), GCLOUD_LOG=str(log),
                FAKE_DIR=str(tmp_path))
    (tmp_path / "home").mkdir()

    class Fake:
        env = base
        dir = tmp_path

        @staticmethod
        def run(script: Path, *args: str, check: bool = True, **settings: str) -> subprocess.CompletedProcess:
            res = subprocess.run(["bash", str(script), *args], env=dict(base, **settings), capture_output=True,
                                 text=True, timeout=60, cwd=tmp_path, check=False)
            if check:
                assert res.returncode == 0, res.stderr
            return res

        @staticmethod
        def calls() -> list[list[str]]:
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return Fake


def _option(call: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in call if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, call)
    return values[0]


def test_every_script_parses():
    scripts = sorted(TPU.glob("*.sh")) + sorted(GPU.iterdir())
    assert {p.name for p in scripts} >= {"common.sh", "create.sh", "setup.sh", "run.sh", "logs.sh", "stop.sh",
                                         "delete.sh", "slurm.sbatch", "multinode.sh"}
    for script in scripts:
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert res.returncode == 0, (script, res.stderr)
        if script.name != "common.sh":
            assert os.access(script, os.X_OK), f"{script} is not executable"


def test_create_requests_a_queued_resource(fake):
    fake.run(TPU / "create.sh", TPU_NAME="lm", ZONE="us-east5-a", PROJECT="proj", ACCELERATOR_TYPE="v5p-128",
             PROVISIONING="spot", POLL_SECONDS="0")
    assert fake.calls() == [
        ["compute", "tpus", "queued-resources", "create", "lm", "--zone=us-east5-a", "--project=proj",
         "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--node-id=lm", "--spot"],
        ["compute", "tpus", "queued-resources", "describe", "lm", "--zone=us-east5-a", "--project=proj",
         "--format=value(state.state)"]]


def test_create_multislice(fake):
    fake.run(TPU / "create.sh", TPU_NAME="lm", QR_ID="lm-qr", ZONE="z", ACCELERATOR_TYPE="v6e-256", NUM_SLICES="4",
             PROVISIONING="best-effort", WAIT="0", CREATE_FLAGS="--network=net --internal-ips")
    assert fake.calls() == [
        ["compute", "tpus", "queued-resources", "create", "lm-qr", "--zone=z", "--accelerator-type=v6e-256",
         "--runtime-version=v2-alpha-tpuv6e", "--node-count=4", "--node-prefix=lm", "--best-effort",
         "--network=net", "--internal-ips"]]


@pytest.mark.parametrize("settings, message", [
    ({"ZONE": "z"}, "error: set TPU_NAME"),
    ({"TPU_NAME": "lm"}, "error: set ZONE"),
    ({"TPU_NAME": "lm", "ZONE": "z", "PROVISIONING": "cheap"}, "PROVISIONING=cheap must be"),
    ({"TPU_NAME": "lm", "ZONE": "z", "NUM_SLICES": "0"}, "NUM_SLICES=0 must be a positive integer"),
    ({"TPU_NAME": "lm", "ZONE": "z", "ACCELERATOR_TYPE": "v9-8"}, "no default RUNTIME_VERSION"),
    ({"TPU_NAME": "lm", "ZONE": "z", "RUN_NAME": "a b"}, "RUN_NAME=a b may hold only"),
])
def test_bad_settings_fail_with_one_error(fake, settings, message):
    res = fake.run(TPU / "create.sh", check=False, **settings)
    assert res.returncode == 2 and message in res.stderr and fake.calls() == []


def _bash_words(line: str) -> list[str]:
    """The words bash makes of a printed command line (printf %q may quote newlines as $'...')."""
    res = subprocess.run(["bash", "-c", f"words() {{ printf '%s\\0' \"$@\"; }}; words {line}"], capture_output=True,
                         text=True, check=True)
    return res.stdout.split("\0")[:-1]


def test_dry_run_prints_the_commands_and_runs_nothing(fake):
    settings = {"TPU_NAME": "lm", "ZONE": "z", "NUM_SLICES": "2", "RUN_NAME": "r1"}
    printed = []
    for script, args in ((TPU / "create.sh", ()), (TPU / "run.sh", COMMAND), (TPU / "stop.sh", ()),
                         (TPU / "logs.sh", ("1", "1")), (TPU / "delete.sh", ())):
        res = fake.run(script, *args, DRY_RUN="1", **settings)
        printed += [_bash_words(line) for line in res.stdout.splitlines()]
    assert fake.calls() == []
    assert all(p[0] == "gcloud" for p in printed) and len(printed) == 8  # create+describe, 2 run, 2 stop, logs, delete
    for script, args in ((TPU / "create.sh", ()), (TPU / "run.sh", COMMAND), (TPU / "stop.sh", ()),
                         (TPU / "logs.sh", ("1", "1")), (TPU / "delete.sh", ())):
        fake.run(script, *args, **settings)
    assert [p[1:] for p in printed] == fake.calls()  # what DRY_RUN prints is exactly what runs


def test_run_starts_the_command_on_all_workers_and_stop_checkpoints_it(fake):
    settings = {"TPU_NAME": "lm", "ZONE": "z", "NUM_SLICES": "2", "RUN_NAME": "imagenet-L"}
    res = fake.run(TPU / "run.sh", *COMMAND, **settings)
    assert "--distributed" not in res.stderr
    calls = fake.calls()
    assert [c[:5] for c in calls] == [["compute", "tpus", "tpu-vm", "ssh", "lm-0"], ["compute", "tpus", "tpu-vm",
                                                                                     "ssh", "lm-1"]]
    assert all(_option(c, "worker") == "all" and _option(c, "zone") == "z" for c in calls)
    remote = _option(calls[0], "command")
    assert remote == _option(calls[1], "command")

    # What every worker runs, here: the checkout's .venv/bin comes first on PATH.
    home = Path(fake.env["HOME"])
    _executable(home / "latent_lm" / ".venv" / "bin" / "python", FAKE_PYTHON)
    worker = subprocess.run(["bash", "-c", remote], env=fake.env, capture_output=True, text=True, timeout=30,
                            check=False)
    assert worker.returncode == 0, worker.stderr
    argv_file, pid_file = fake.dir / "argv", home / "latent_lm_logs" / "imagenet-L.pid"
    deadline = time.time() + 20
    while not argv_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    try:
        assert argv_file.read_text().split("\0")[:-1] == COMMAND[1:]  # passed through word for word
        assert int((fake.dir / "pid").read_text()) == pid  # nohup exec'd the command: the pid file is its pid
        assert (home / "latent_lm_logs" / "imagenet-L.log").read_text().startswith("=== ")
        again = subprocess.run(["bash", "-c", remote], env=fake.env, capture_output=True, text=True, timeout=30,
                               check=False)
        assert again.returncode == 1 and "run imagenet-L is already running" in again.stderr

        fake.run(TPU / "stop.sh", STOP_TIMEOUT="20", **settings)
        stop = fake.calls()[-1]
        assert stop[:5] == ["compute", "tpus", "tpu-vm", "ssh", "lm-1"] and _option(stop, "worker") == "all"
        worker = subprocess.run(["bash", "-c", _option(stop, "command")], env=fake.env, capture_output=True,
                                text=True, timeout=60, check=False)
        assert worker.returncode == 0, worker.stderr
        assert (fake.dir / "signal").read_text().strip() == "TERM"  # SIGTERM: the train loop's checkpoint signal
        assert not pid_file.exists() and "stopped imagenet-L" in worker.stdout
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_run_warns_without_distributed_and_needs_a_command(fake):
    res = fake.run(TPU / "run.sh", "python", "-m", "latent_lm.main", "--config=c.py", TPU_NAME="lm", ZONE="z")
    assert "needs --distributed=on" in res.stderr and _option(fake.calls()[0], "worker") == "all"
    res = fake.run(TPU / "run.sh", check=False, TPU_NAME="lm", ZONE="z")
    assert res.returncode == 2 and "usage: run.sh COMMAND" in res.stderr


def test_setup_clones_the_repo_or_copies_this_checkout(fake):
    fake.run(TPU / "setup.sh", TPU_NAME="lm", ZONE="z", NUM_SLICES="2", REPO_URL="https://example.com/me/lm.git",
             BRANCH="exp 1", EXTRA_PIP="gcsfs", SSH_FLAGS="--internal-ip")
    calls = fake.calls()
    assert [c[4] for c in calls] == ["lm-0", "lm-1"]
    for call in calls:
        assert _option(call, "worker") == "all" and "--internal-ip" in call
        remote = _option(call, "command")
        assert r"git clone --quiet --branch exp\ 1 https://example.com/me/lm.git latent_lm" in remote
        assert ".venv/bin/pip install --quiet -e '.[tpu]' gcsfs" in remote  # the pinned jax[tpu] of setup.py
        assert subprocess.run(["bash", "-n", "-c", remote], check=False).returncode == 0

    fake.run(TPU / "setup.sh", TPU_NAME="lm", ZONE="z", JAX_PIP="jax[tpu]>=0.11")
    scp, ssh = fake.calls()[2:]
    assert r".venv/bin/pip install --quiet -e '.[tpu]' jax\[tpu\]\>=0.11" in _option(ssh, "command")
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "lm:latent_lm_src.tgz"
    assert _option(scp, "worker") == "all" and _option(ssh, "worker") == "all"
    assert "tar -xzf latent_lm_src.tgz -C latent_lm" in _option(ssh, "command")
    with tarfile.open(str(fake.env["GCLOUD_LOG"]) + ".tgz") as tar:
        names = set(tar.getnames())
    assert {"latent_lm/main.py", "launch/tpu/run.sh", "setup.py"} <= names
    assert not any(n.startswith((".venv/", "runs/", ".git/")) for n in names)


def test_logs_and_delete(fake):
    fake.run(TPU / "logs.sh", "3", "1", TPU_NAME="lm", ZONE="z", NUM_SLICES="2", RUN_NAME="r1", FOLLOW="0")
    fake.run(TPU / "delete.sh", TPU_NAME="lm", ZONE="z", PROJECT="p")
    logs, delete = fake.calls()
    assert logs[:5] == ["compute", "tpus", "tpu-vm", "ssh", "lm-1"] and _option(logs, "worker") == "3"
    assert _option(logs, "command") == 'tail -n 100  "$HOME/latent_lm_logs/r1.log"'
    assert delete == ["compute", "tpus", "queued-resources", "delete", "lm", "--zone=z", "--project=p", "--force",
                      "--quiet"]
    res = fake.run(TPU / "logs.sh", "0", "2", check=False, TPU_NAME="lm", ZONE="z", NUM_SLICES="2")
    assert res.returncode == 2 and "slice 2 does not exist" in res.stderr


def test_multinode_passes_the_coordinator_flags(fake):
    python = _executable(fake.dir / "py", FAKE_PYTHON.replace("sleep 60 & wait", "exit 0"))
    args = COMMAND[3:]
    fake.run(GPU / "multinode.sh", *args, COORDINATOR="10.0.0.1:1234", NUM_PROCESSES="4", PROCESS_ID="2",
             PYTHON=str(python))
    assert (fake.dir / "argv").read_text().split("\0")[:-1] == [
        "-m", "latent_lm.main", "--coordinator_address=10.0.0.1:1234", "--num_processes=4", "--process_id=2", *args]
    for settings, message in (({"NUM_PROCESSES": "4", "PROCESS_ID": "0"}, "set COORDINATOR"),
                              ({"COORDINATOR": "h:1", "NUM_PROCESSES": "4", "PROCESS_ID": "4"}, "must be in [0,"),
                              ({"COORDINATOR": "h", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "must be HOST:PORT")):
        res = fake.run(GPU / "multinode.sh", "--mode=train", check=False, PYTHON=str(python), **settings)
        assert res.returncode != 0 and message in res.stderr


FAKE_SRUN = """#!/bin/bash
trap 'echo TERM > "$FAKE_DIR/signal"; kill $! 2>/dev/null; exit 0' TERM
printf '%s\\0' "$@" > "$FAKE_DIR/srun_argv"
if [ "${SRUN_EXIT:-}" != "" ]; then exit "$SRUN_EXIT"; fi
echo $$ > "$FAKE_DIR/srun_pid"
sleep 60 & wait
"""
FAKE_SCANCEL = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_DIR/slurm_calls"
kill -TERM "$(cat "$FAKE_DIR/srun_pid")"
"""
FAKE_SCONTROL = """#!/bin/bash
printf 'scontrol %s\\n' "$*" >> "$FAKE_DIR/slurm_calls"
"""


def _slurm(fake) -> dict:
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        _executable(fake.dir / "bin" / name, text)
    return dict(fake.env, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(fake.dir))


def test_slurm_sbatch_header_and_pass_through(fake):
    text = (GPU / "slurm.sbatch").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8"):
        assert line in text
    assert "--gpus-per-task" not in text.replace("never --gpus-per-task", "")
    env = dict(_slurm(fake), SRUN_EXIT="3")
    res = subprocess.run(["bash", str(GPU / "slurm.sbatch"), *COMMAND[3:]], env=env, capture_output=True, text=True,
                         timeout=30, check=False)
    assert res.returncode == 3  # the run's exit status is the job's
    assert (fake.dir / "srun_argv").read_text().split("\0")[:-1] == [
        "--kill-on-bad-exit=1", "python", "-m", "latent_lm.main", *COMMAND[3:]]
    assert not (fake.dir / "slurm_calls").exists()  # no requeue when the time limit was not reached


def test_slurm_checkpoints_and_requeues_before_the_time_limit(fake):
    env = _slurm(fake)
    proc = subprocess.Popen(["bash", str(GPU / "slurm.sbatch"), "--config=configs/default.py"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 20
        while not (fake.dir / "srun_pid").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # let the script reach `wait`
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert (fake.dir / "signal").read_text().strip() == "TERM"
    assert (fake.dir / "slurm_calls").read_text().splitlines() == ["--signal=TERM 4242", "scontrol requeue 4242"]
    assert "requeueing job 4242" in output
