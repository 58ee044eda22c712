"""Test setup: 8 fake CPU devices (before jax is imported), parsed absl flags, the `slow` marker."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

from absl import flags  # noqa: E402

# grain workers and absl-based code read FLAGS; pytest never calls absl.app.run.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (still run in CI)")
