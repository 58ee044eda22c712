"""Multi-host start-up arguments (`latent_lm.parallel.distributed.initialize`): when it initialises JAX's
distributed runtime, and that bad flags are one clear error before anything is initialised."""

from __future__ import annotations

import jax
import pytest

from latent_lm import cli
from latent_lm.errors import UserError
from latent_lm.parallel import distributed

BAD_ARGUMENTS = {
    "address_alone": (dict(coordinator_address="127.0.0.1:1234"), "must be given together"),
    "no_address": (dict(num_processes=2, process_id=0), "must be given together"),
    "process_id_too_big": (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
                           r"--process_id=2 must be in \[0, --num_processes=2\)"),
    "process_id_negative": (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=-1),
                            r"--process_id=-1 must be in \[0, --num_processes=2\)"),
    "bad_mode": (dict(mode="sometimes"), r"--distributed='sometimes' must be one of auto, on, off"),
}


@pytest.fixture
def runtime(monkeypatch):
    """Records calls to jax.distributed.initialize (none reaches the real one). The CPU collectives flag starts unset
    (None; this jax defaults to gloo, which would hide a change) and is restored afterwards; the backend
    exists by now, so the flag has no effect on it."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    before = jax.config.jax_cpu_collectives_implementation
    jax.config.update("jax_cpu_collectives_implementation", None)
    yield calls
    jax.config.update("jax_cpu_collectives_implementation", before)


def _collectives():
    return jax.config.jax_cpu_collectives_implementation


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_fail_before_initialising(case, runtime):
    kwargs, message = BAD_ARGUMENTS[case]
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)
    assert runtime == [] and _collectives() is None  # the runtime never started; no JAX setting changed


def test_bad_arguments_are_user_errors_that_change_nothing(runtime):
    """What the CLI contract needs: every bad argument is a UserError (one `error:` line, exit 2) raised before
    any JAX setting changes."""
    for case, (kwargs, message) in BAD_ARGUMENTS.items():
        with pytest.raises(UserError, match=message):
            distributed.initialize(**kwargs)
        assert _collectives() is None and runtime == [], case


def test_cli_path_turns_bad_flags_into_one_error_line(runtime, capsys):
    """latent_lm.main calls initialize with its flags inside `cli.run` (its whole body does): with only
    --coordinator_address that must be one `error:` line and exit status 2, not a traceback."""
    status = cli.run(lambda argv: distributed.initialize("127.0.0.1:1234", None, None))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == cli.USAGE_ERROR and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "must be given together" in lines[0]


def test_when_the_runtime_is_started(runtime, monkeypatch):
    """Explicit flags start it with exactly those arguments (and gloo collectives for CPU processes); `off` never
    starts it; `auto` without flags or a detected cluster stays single-process; `on` lets JAX detect the cluster."""
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    for var in ("SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    explicit = dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)
    assert distributed.initialize(**explicit, mode="off") is False
    assert distributed.initialize() is False
    assert runtime == [] and _collectives() is None
    assert distributed.initialize(**explicit) is True
    assert runtime == [((), explicit)] and _collectives() == "gloo"
    assert distributed.initialize(mode="on") is True
    assert runtime[1] == ((), {})
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.initialize() is True and len(runtime) == 3


@pytest.mark.parametrize("env,expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "2"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False), ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
])
def test_cluster_detection_from_the_environment(env, expected):
    assert distributed.cluster_detected(env) is expected
