"""Test setup: 8 fake CPU devices (before jax is imported), parsed absl flags, the `slow` marker."""

import os

# The concurrency-optimised XLA:CPU scheduler may start independent collectives in a different order on different
# fake devices; inside a scanned (while-loop) train step that deadlocks the CPU rendezvous (measured here: a 40 s
# termination timeout on the (2,2,2) mesh in 3 of 4 runs); with the in-order scheduler it has not happened since.
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_cpu_enable_concurrency_optimized_scheduler=false"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

from absl import flags  # noqa: E402

# grain workers and absl-based code read FLAGS; pytest never calls absl.app.run.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still run in CI)")
