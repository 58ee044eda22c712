"""Config-file sweeps: expand a config's `get_sweep(arg)` into named runs and run them one after the other, or print
one launch command per unfinished run for a fleet of TPU VMs or a SLURM cluster (launch/README.md).

  python -m latent_lm.sweep --config=configs/x.py:arg --root=runs/x [--only=NAME,...] [--dry_run]
      [--emit=local|tpu|slurm] [--extra="--config.train.steps=100 ..."] [--mode=all]

A config file may define `get_sweep(arg)` next to `get_config(arg)` (arg: the text after `:`, or None). It returns
a list of points; each point is a dict of dotted config overrides (`{"model.width": 64, "optim.lr": 3e-4}`) plus
two optional keys: "name" (the run's name; by default built from the overrides) and "config_arg" (replaces the
`:arg` for this point). Run i works in `<root>/<name>` with
`python -m latent_lm.main --config=FILE:ARG --workdir=<root>/<name> --mode=MODE --config.k=v ... <extra>`.

- Before anything runs, every point's config is parsed exactly as `latent_lm.main` will parse it (ml_collections
  `config_flags` on the same argv) and validated; an unknown key, a value the command line cannot carry or a bad
  config is one `error: ...` line and exit status 2.
- A run is finished when its workdir holds `done.json` (written by `latent_lm.experiment.run` after the last stage
  of `--mode=all`) and its `config.json` equals the config this sweep would run now. Finished runs are skipped;
  any other run is (re)started, which resumes it from its checkpoints.
- Runs go in the sweep's order (later points may read what earlier ones wrote). One failing run is reported and the
  next one starts; the exit status is 1 if any run failed. SIGTERM/SIGINT are passed on to the running child as
  SIGTERM (the train loop checkpoints and exits), and no further run starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from absl import flags
from ml_collections import config_dict, config_flags

from latent_lm import cli, storage
from latent_lm.config_validation import validate
from latent_lm.experiment import STAGES
from latent_lm.errors import UserError

DONE_FILE = "done.json"
SWEEP_FILE = "sweep.json"
SPECIAL_KEYS = ("name", "config_arg")
EMIT_KINDS = ("local", "tpu", "slurm")
MAX_NAME_LEN = 96
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
# Flags the runner sets for every run; --extra must not set them again.
_RUNNER_FLAGS = ("--config", "--workdir", "--mode")


class SweepError(UserError, ValueError):
    """A sweep that cannot run: bad get_sweep result, unknown key, unparseable value, duplicate name."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of a sweep, resolved: its name, workdir, `:arg` and overrides (dotted key → Python value)."""

    index: int
    name: str
    config_arg: str | None
    overrides: dict[str, Any]
    workdir: str
    config_json: dict  # the resolved config, as latent_lm.main will write it to <workdir>/config.json

    def main_args(self, config_file: str, mode: str, extra: Sequence[str]) -> list[str]:
        """The arguments of `python -m latent_lm.main` for this run."""
        spec = config_file if self.config_arg is None else f"{config_file}:{self.config_arg}"
        return [f"--config={spec}", f"--workdir={self.workdir}", f"--mode={mode}",
                *(f"--config.{k}={format_value(v)}" for k, v in self.overrides.items()), *extra]


# ----------------------------------------------------------------------------------------------- values and names

def _plain(value: Any) -> Any:
    """numpy scalars → Python scalars, lists → tuples (ConfigDict fields hold tuples), recursively."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def format_value(value: Any) -> str:
    """The command-line text that ml_collections' config_flags parses back into `value`.

    bool → True/False, int/float → repr (exact round trip), str → as is (str fields take the raw text), tuple or
    list → a Python tuple literal (tuple fields are parsed with ast.literal_eval).
    """
    value = _plain(value)
    if isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return repr(value)
    raise SweepError(f"cannot put a value of type {type(value).__name__} ({value!r}) on the command line; use a "
                     f"bool, int, float, str or tuple")


def _name_value(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, tuple):
        return "x".join(_name_value(v) for v in value) or "empty"
    return repr(value) if isinstance(value, float) else str(value)


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-.")


def default_name(overrides: dict[str, Any], config_arg: str | None = None) -> str:
    """A deterministic, filesystem-safe name: `[arg_]key=value_key=value`, keys shortened to their last part
    unless two of them share it; names longer than 96 characters are cut and end with a hash of the whole."""
    last = [k.rsplit(".", 1)[-1] for k in overrides]
    parts = [_safe(config_arg)] if config_arg else []
    for key, short, value in zip(overrides, last, overrides.values()):
        label = short if last.count(short) == 1 else key
        parts.append(_safe(f"{label}={_name_value(value)}"))
    name = "_".join(p for p in parts if p).lstrip("._=+-") or "base"
    if len(name) > MAX_NAME_LEN:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME_LEN - 9].rstrip('-._')}-{digest}"
    return name


# --------------------------------------------------------------------------------------------- loading and parsing

def split_config_spec(spec: str) -> tuple[str, str | None]:
    """`configs/x.py:arg` → ("configs/x.py", "arg"); the split is at the first colon, as config_flags does."""
    path, _, arg = spec.partition(":")
    return path, (arg if ":" in spec else None)


def _load_module(path: str):
    if not os.path.isfile(path):
        raise SweepError(f"config file {path!r} not found")
    name = "sweep_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_points(config_file: str, arg: str | None) -> list[dict[str, Any]]:
    """The config file's `get_sweep(arg)` (or `get_sweep()`), checked to be a non-empty list of dicts."""
    module = _load_module(config_file)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise SweepError(f"{config_file} defines no get_sweep(arg); add one that returns a list of override dicts")
    takes_arg = bool(inspect.signature(get_sweep).parameters)
    if not takes_arg and arg is not None:
        raise SweepError(f"{config_file}: get_sweep() takes no argument but the config was given ':{arg}'")
    points = get_sweep(arg) if takes_arg else get_sweep()
    if not isinstance(points, (list, tuple)) or not points:
        raise SweepError(f"{config_file}: get_sweep({arg!r}) must return a non-empty list of dicts, got {points!r}")
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
            raise SweepError(f"{config_file}: sweep point {i} must be a dict with string keys, got {p!r}")
    return [dict(p) for p in points]


def _check_key(config: config_dict.ConfigDict, key: str, where: str) -> Any:
    """The value at dotted `key`, or one error naming the key and the closest existing one."""
    node, done = config, []
    for part in key.split("."):
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            siblings = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
            close = difflib.get_close_matches(part, siblings, n=1)
            hint = f" (did you mean {'.'.join([*done, close[0]])!r}?)" if close else ""
            raise SweepError(f"{where}: unknown config key {key!r}{hint}")
        node = node[part]
        done.append(part)
    return node


def parse_config(config_file: str, config_arg: str | None, override_args: Sequence[str], where: str):
    """The config `latent_lm.main` would get from `--config=FILE[:ARG] <override_args>` (same config_flags code)."""
    spec = config_file if config_arg is None else f"{config_file}:{config_arg}"
    argv = ["latent_lm.main", f"--config={spec}", *override_args]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
        config = holder.value
        config.keys()  # a config file that failed to load raises only when touched
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        field = re.search(r"Type <class 'NoneType'> of field config\.(\S+) is not supported", str(e))
        if field:  # config_flags' UnsupportedOperationError
            raise SweepError(f"{where}: {field.group(1)} is None in the config, and config_flags cannot override "
                             f"a None-valued field from the command line; give it a value in get_config, or switch "
                             f"it through the point's config_arg") from None
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise SweepError(f"{where}: {lines[-1] if lines else type(e).__name__}") from None
    return config


def _extra_overrides(extra: Sequence[str]) -> dict[str, str]:
    """`--config.k=v` arguments of --extra (key → text); other runner-owned flags are refused."""
    out = {}
    for a in extra:
        head = a.split("=", 1)[0]
        if head in _RUNNER_FLAGS:
            raise SweepError(f"--extra must not set {head}: the sweep runner sets it for every run")
        if head.startswith("--config."):
            if "=" not in a:
                raise SweepError(f"--extra: write {a}=VALUE (with '=')")
            out[head[len("--config."):]] = a.split("=", 1)[1]
    return out


def expand(config_spec: str, root: str, extra: Sequence[str] = ()) -> tuple[str, list[Run]]:
    """Expands `get_sweep` into runs (config file, runs), parsing and validating every point's config first."""
    config_file, arg = split_config_spec(config_spec)
    extra_over = _extra_overrides(extra)
    extra_args = [f"--config.{k}={v}" for k, v in extra_over.items()]
    runs, seen = [], {}
    for i, point in enumerate(load_points(config_file, arg)):
        config_arg = point.pop("config_arg", arg)
        if config_arg is not None and not isinstance(config_arg, str):
            raise SweepError(f"sweep point {i}: config_arg must be a string, got {config_arg!r}")
        name = point.pop("name", None)
        overrides = {k: _plain(v) for k, v in point.items()}
        for v in overrides.values():
            format_value(v)  # one error for a value the command line cannot carry
        if name is None:
            name = default_name(overrides, config_arg if config_arg != arg else None)
        elif not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 128:
            raise SweepError(f"sweep point {i}: name {name!r} must be 1-128 characters of letters, digits and "
                             f"._=+- (not starting with a symbol)")
        where = f"sweep point {i} ({name!r})"
        if name in seen:
            raise SweepError(f"{where}: the name is also that of point {seen[name]}; give the points distinct "
                             f"overrides or a 'name'")
        seen[name] = i
        both = sorted(set(overrides) & set(extra_over))
        if both:
            raise SweepError(f"{where}: --extra sets {both[0]!r}, which the point sets too")
        base = parse_config(config_file, config_arg, [], where)
        for key in [*overrides, *extra_over]:
            _check_key(base, key, where)
        args = [f"--config.{k}={format_value(v)}" for k, v in overrides.items()] + extra_args
        config = parse_config(config_file, config_arg, args, where)
        for key, want in overrides.items():
            got = _plain(_check_key(config, key, where))
            if got != want or isinstance(got, bool) != isinstance(want, bool):
                raise SweepError(f"{where}: {key}={want!r} does not survive the command line: "
                                 f"--config.{key}={format_value(want)} reads back as {got!r}")
        try:
            validate(config, STAGES)
        except UserError as e:
            raise SweepError(f"{where}: {e}") from None
        runs.append(Run(index=i, name=name, config_arg=config_arg, overrides=overrides,
                        workdir=f"{root.rstrip('/')}/{name}", config_json=json.loads(config.to_json())))
    return config_file, runs


# ------------------------------------------------------------------------------------------------------- status

def _read(path: str) -> str | None:
    """The file's text, or None if it does not exist (gs:// through `storage`, one error if gcsfs is missing)."""
    return storage.read_text(path) if storage.exists(path) else None


def is_finished(run: Run) -> bool:
    """done.json exists and the workdir's config.json is the config this run would use now (so a sweep whose
    settings changed, e.g. more train steps, runs again and resumes from its checkpoints)."""
    if _read(storage.join(run.workdir, DONE_FILE)) is None:
        return False
    text = _read(storage.join(run.workdir, "config.json"))
    try:
        return text is None or json.loads(text) == run.config_json
    except json.JSONDecodeError:
        return False


def _changed_since_done(run: Run) -> bool:
    return _read(storage.join(run.workdir, DONE_FILE)) is not None and not is_finished(run)


def write_sweep_file(root: str, config_spec: str, mode: str, extra: Sequence[str], runs: Sequence[Run],
                     commands: Sequence[Sequence[str]]) -> str:
    """Writes <root>/sweep.json (points, names, workdirs, commands) atomically; returns its path."""
    body = {"config": config_spec, "root": root, "mode": mode, "extra": list(extra),
            "runs": [{"index": r.index, "name": r.name, "config_arg": r.config_arg,
                      "overrides": {k: format_value(v) for k, v in r.overrides.items()},
                      "workdir": r.workdir, "command": list(c)} for r, c in zip(runs, commands)]}
    path = storage.join(root, SWEEP_FILE)
    storage.makedirs(root)
    storage.write_text_atomic(path, json.dumps(body, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------ launching

def main_command(python: str, args: Sequence[str]) -> list[str]:
    return [python, "-m", "latent_lm.main", *args]


def emit_line(kind: str, run: Run, args: Sequence[str], tpu_name: str = "") -> str:
    """One shell line that launches `run` on a fleet: local (python), tpu (launch/tpu/run.sh on every worker of a
    TPU VM, `--distributed=on`) or slurm (sbatch launch/gpu/slurm.sbatch)."""
    if kind == "local":
        return shlex.join(main_command("python", args))
    if kind == "tpu":
        # GCE TPU VMs keep the worker list in instance metadata, not in the environment that
        # distributed.cluster_detected reads, so multi-host TPU runs ask for jax.distributed explicitly.
        if not any(a.startswith("--distributed") for a in args):
            args = [*args, "--distributed=on"]
        env = [f"RUN_NAME={run.name}"]
        if tpu_name:
            env.insert(0, f"TPU_NAME={tpu_name.format(name=run.name, index=run.index)}")
        return " ".join(shlex.quote(e) for e in env) + " " + shlex.join(["launch/tpu/run.sh",
                                                                           *main_command("python", args)])
    if kind == "slurm":
        return shlex.join(["sbatch", f"--job-name={run.name}", "launch/gpu/slurm.sbatch", *args])
    raise SweepError(f"--emit={kind!r} must be one of {list(EMIT_KINDS)}")


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  # done | skipped | failed | interrupted | pending
    seconds: float = 0.0
    note: str = ""


class _Signals:
    """While a child runs: SIGTERM/SIGINT are passed on to it as SIGTERM (a graceful checkpoint), a second one as
    SIGKILL; either way no further run starts."""

    def __init__(self):
        self.received: int | None = None
        self.child: subprocess.Popen | None = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        again = self.received is not None
        self.received = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL if again else signal.SIGTERM)


def _run_one(command: Sequence[str], log_path: str, prefix: str, out: TextIO, signals: _Signals,
             env: dict[str, str]) -> tuple[int, bool]:
    """Runs `command`, appending its output to log_path and streaming it to `out`; (return code, preempted)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    preempted = False
    with open(log_path, "ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        log.flush()
        # A session of its own: a terminal's Ctrl-C reaches only the runner, which turns it into the SIGTERM that
        # makes the train loop checkpoint.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        signals.child = proc
        try:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                preempted = preempted or line.startswith("preempted:")
                out.write(prefix + line)
                out.flush()
            return proc.wait(), preempted
        finally:
            signals.child = None
            if proc.poll() is None:  # the runner itself is going down: do not leave the child behind
                proc.kill()
                proc.wait()


def format_table(outcomes: Sequence[Outcome]) -> str:
    width = max([len(o.name) for o in outcomes] + [4])
    lines = [f"{'name':<{width}}  {'status':<11}  {'seconds':>8}  note", "-" * (width + 34)]
    for o in outcomes:
        lines.append(f"{o.name:<{width}}  {o.status:<11}  {o.seconds:>8.1f}  {o.note}".rstrip())
    return "\n".join(lines)


def run_sweep(config_spec: str, root: str, *, mode: str = "all", only: Sequence[str] = (), extra: str = "",
              dry_run: bool = False, emit: str | None = None, tpu_name: str = "", python: str = sys.executable,
              out: TextIO | None = None, env: dict[str, str] | None = None) -> int:
    """Expands, checks and runs (or prints) a sweep; returns the process exit status (0: every run finished)."""
    out = out or sys.stdout
    if mode != "all" and mode not in STAGES:
        raise SweepError(f"--mode={mode!r} must be 'all' or one of {list(STAGES)}")
    if emit is not None and emit not in EMIT_KINDS:
        raise SweepError(f"--emit={emit!r} must be one of {list(EMIT_KINDS)}")
    extra_args = shlex.split(extra)
    config_file, runs = expand(config_spec, root, extra_args)
    names = [r.name for r in runs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise SweepError(f"--only names {unknown} are not in the sweep; its runs are: {', '.join(names)}")
    selected = [r for r in runs if not only or r.name in only]
    args = {r.name: r.main_args(config_file, mode, extra_args) for r in runs}

    if dry_run:
        for r in selected:
            state = "done" if is_finished(r) else ("changed" if _changed_since_done(r) else "pending")
            out.write(f"[{state}] {r.name}\n  {shlex.join(main_command(python, args[r.name]))}\n")
        return 0
    if emit is None and storage.is_url(root):
        raise SweepError(f"--root={root} is a cloud path: local runs write their logs under the root; use --emit "
                         f"(or a local --root)")
    write_sweep_file(root, config_spec, mode, extra_args, runs, [main_command("python", args[r.name]) for r in runs])
    if emit is not None:
        for r in selected:
            if is_finished(r):
                print(f"# {r.name}: finished, skipped", file=sys.stderr)
            else:
                out.write(emit_line(emit, r, args[r.name], tpu_name) + "\n")
        return 0

    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    outcomes = {r.name: Outcome(r.name, "pending") for r in selected}
    with _Signals() as signals:
        for r in selected:
            if signals.received is not None:
                break
            if is_finished(r):
                outcomes[r.name] = Outcome(r.name, "skipped", note="done.json")
                out.write(f"=== {r.name}: finished before, skipped\n")
                continue
            note = "config changed since done.json, " if _changed_since_done(r) else ""
            out.write(f"=== {r.name} ({r.index + 1}/{len(runs)}): {note}running\n")
            out.flush()
            # A marker of an earlier config must not survive this run's config.json if this run is interrupted.
            storage.remove(storage.join(r.workdir, DONE_FILE), missing_ok=True)
            t0 = time.time()
            code, preempted = _run_one(main_command(python, args[r.name]), f"{r.workdir}/log.txt",
                                       f"[{r.name}] ", out, signals, env)
            seconds = time.time() - t0
            if signals.received is not None or preempted:
                how = f"signal {signals.received}" if signals.received is not None else "preempted"
                outcomes[r.name] = Outcome(r.name, "interrupted", seconds, f"{how}; rerun to resume")
            elif code != 0:
                outcomes[r.name] = Outcome(r.name, "failed", seconds, f"exit status {code}, see {r.workdir}/log.txt")
            elif mode == "all" and _read(storage.join(r.workdir, DONE_FILE)) is None:  # removed before the start
                outcomes[r.name] = Outcome(r.name, "failed", seconds, f"exited 0 without writing {DONE_FILE}")
            else:
                outcomes[r.name] = Outcome(r.name, "done", seconds)
    rows = list(outcomes.values())
    out.write("\n" + format_table(rows) + "\n")
    out.flush()
    if signals.received is not None:
        return 128 + signals.received
    return 0 if all(o.status in ("done", "skipped") for o in rows) else 1


# ------------------------------------------------------------------------------------------------------------- CLI

def _define_flags() -> dict[str, flags.FlagHolder]:
    """The CLI's flags, defined only when run as a program (latent_lm.main defines --config and --mode too)."""
    holders = dict(
        config=flags.DEFINE_string("config", None, "Config file with get_sweep(arg), optionally FILE:ARG."),
        root=flags.DEFINE_string("root", None, "Sweep root: run NAME works in ROOT/NAME; ROOT/sweep.json lists "
                                 "them."),
        only=flags.DEFINE_list("only", [], "Run only these names (comma-separated), in sweep order."),
        dry_run=flags.DEFINE_bool("dry_run", False, "Print each run's state and command; write and run nothing."),
        emit=flags.DEFINE_enum("emit", None, list(EMIT_KINDS), "Print one launch command per unfinished run "
                               "instead of running: local (python), tpu (launch/tpu/run.sh), slurm (sbatch "
                               "launch/gpu/slurm.sbatch)."),
        extra=flags.DEFINE_string("extra", "", "Arguments appended to every run's command, e.g. "
                                  "\"--config.train.steps=100 --config.mesh.shape='(1,-1,1)'\"."),
        mode=flags.DEFINE_string("mode", "all", "--mode of every run: all, or one stage."),
        tpu_name=flags.DEFINE_string("tpu_name", "", "--emit=tpu: TPU_NAME of each line; {name} and {index} are "
                                     "replaced (one TPU per run); empty keeps the shell's $TPU_NAME."),
    )
    flags.mark_flags_as_required(["config", "root"])
    return holders


def main(argv: list[str]) -> None:
    f = {k: h.value for k, h in _FLAGS.items()}
    code = run_sweep(f["config"], f["root"], mode=f["mode"], only=f["only"], extra=f["extra"],
                     dry_run=f["dry_run"], emit=f["emit"], tpu_name=f["tpu_name"])
    if code:
        sys.exit(code)


if __name__ == "__main__":
    _FLAGS = _define_flags()
    cli.absl_main(main)
