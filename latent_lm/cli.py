"""The one command-line error path of every entry point (`latent_lm.main`, the sweep, the studies, export/import,
FID tools, `launch/plan.py`): bad input — a `UserError`, a bad flag, an unknown `--config.` key — is one
`error: …` line on stderr and exit status 2, without a traceback; anything else is a bug and keeps its traceback.

  python entry point with argparse:   if __name__ == "__main__": cli.main(main)        # main(argv) raises UserError
  python entry point with absl flags: if __name__ == "__main__": cli.absl_main(main)
Both first re-execute the process once with glibc's huge pages for XLA:CPU's temporaries (`host_memory`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags

from latent_lm import host_memory
from latent_lm.errors import UserError

USAGE_ERROR = 2


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def cpu_unless_tpu_attached(environ: dict[str, str] | None = None) -> bool:
    """Pins jax to the CPU where libtpu is installed but no TPU is attached; returns whether it did.

    The `tpu` extra (`pip install -e '.[tpu]'`) installs libtpu for compiling against TPU topologies on any machine
    (docs/scaling_out.md §6.4). With it, jax's default start-up still tries a TPU backend on a machine without one: it
    fails, libtpu prints four lines about TPU_ACCELERATOR_TYPE and worker hostnames to stderr, and jax falls back to
    the CPU. Pinning the CPU leaves the same devices without that detour. Nothing changes where the user chose
    platforms (JAX_PLATFORMS, even empty), where a TPU or an NVIDIA/AMD GPU is visible, or without libtpu; child
    processes (sweeps, data workers) inherit the setting. Must run before the first jax device query.
    """
    environ = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    try:
        from jax._src import hardware_utils  # noqa: PLC0415  (private, as jax's own check: guarded)
        if (hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0 or hardware_utils.has_visible_nvidia_gpu()
                or hardware_utils.num_available_amd_gpus(stop_at=1) > 0):
            return False
    except (ImportError, AttributeError, OSError):
        return False
    import jax  # noqa: PLC0415

    environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    return True


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)`; 0 when it returns, 2 (after the `error:` line) when it raises a `UserError`. First,
    `cpu_unless_tpu_attached`."""
    cpu_unless_tpu_attached()
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    return 0


def main(entry: Callable[[Sequence[str] | None], object]) -> NoReturn:
    """`sys.exit(run(entry, sys.argv[1:]))`: the `__main__` line of an argparse entry point; first the huge-pages
    re-exec (`host_memory`)."""
    host_memory.reexec_with_huge_pages()
    sys.exit(run(entry, sys.argv[1:]))


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors; an unknown `--config.a.b` key is named (config_flags raises a bare
    AttributeError/KeyError for it), and an error inside a config's `get_config` keeps its last line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        if "Traceback (most recent call last)" in message:
            lines = [line for line in message.splitlines() if line.strip()]
            message = f"{lines[0].rstrip(':')}: {lines[-1]}"
        fail(message)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("'\"")
        culprit = [a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a.split("=")[0]]
        fail(f"unknown config key {key!r} in {culprit[0] if culprit else 'a --config override'}; "
             f"see the config file for the valid keys")


def absl_main(entry: Callable[[list[str]], object]) -> None:
    """`app.run` for an absl entry point: flags parsed by `parse_absl_flags`, user errors through `run`; first the
    huge-pages re-exec (`host_memory`)."""
    host_memory.reexec_with_huge_pages()

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        sys.exit(run(entry, argv))

    app.run(wrapped, flags_parser=parse_absl_flags)
