"""Test setup: 8 fake CPU devices (before jax is imported), a persistent compilation cache shared by the whole run,
parsed absl flags, the `slow` marker."""

import atexit
import os
import shutil
import tempfile

# The concurrency-optimised XLA:CPU scheduler may start independent collectives in a different order on different
# fake devices; inside a scanned (while-loop) train step that deadlocks the CPU rendezvous (measured here: a 40 s
# termination timeout on the (2,2,2) mesh in 3 of 4 runs); with the in-order scheduler it has not happened since.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_cpu_enable_concurrency_optimized_scheduler=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

# Many tests compile the same programs again: each resume builds a new jitted step, and the CLI tests start dozens of
# training subprocesses. One cache per run (the pytest-xdist workers and every subprocess inherit the variable) makes
# a repeat compile a disk read: a tiny CLI training run went from 58 s to 28 s here. The cache key covers the HLO,
# XLA_FLAGS (device count included) and the jax version, so a hit is the same executable. Set the variable yourself
# to keep a cache across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="latent_lm_test_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# JAX skips the cache for compiles under 1 s by default; most test programs are that small, and hundreds of them
# recompile in subprocesses and resumed runs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from absl import flags  # noqa: E402

# grain workers and absl-based code read FLAGS; pytest never calls absl.app.run.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~20 s here; `make test` skips it, `make test-all` (CI) runs it. "
                                       "Every slow test has a fast sibling that checks the same behaviour smaller.")


# ---------------------------------------------------------------------------------------------------------------
# Shared fixtures below this line.
