"""latent_lm/host_memory.py: the entry points re-execute once with glibc's huge pages for XLA:CPU's temporaries."""

import os
import subprocess
import sys
import textwrap

import pytest

from latent_lm import host_memory

SUPPORTED = host_memory.huge_pages_environ({}) is not None


def test_environ_adds_the_tunable_once_and_keeps_the_users(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc_has_hugetlb", lambda: True)
    monkeypatch.setattr(host_memory, "_thp_available", lambda path=None: True)
    monkeypatch.setattr(sys, "platform", "linux")
    assert host_memory.huge_pages_environ({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": host_memory.TUNABLE}
    got = host_memory.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert got["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}"
    assert host_memory.enabled(got) and not host_memory.enabled({})
    assert host_memory.huge_pages_environ(got) is None  # already set: no second re-exec
    assert host_memory.huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice
    assert host_memory.huge_pages_environ({host_memory.OPT_OUT: "0"}) is None
    monkeypatch.setattr(host_memory, "_thp_available", lambda path=None: False)
    assert host_memory.huge_pages_environ({}) is None


def test_thp_mode_is_read_from_the_kernels_file(tmp_path):
    f = tmp_path / "enabled"
    for mode, available in (("always [madvise] never", True), ("[always] madvise never", True),
                            ("always madvise [never]", False)):
        f.write_text(mode + "\n")
        assert host_memory._thp_available(str(f)) is available
    assert not host_memory._thp_available(str(tmp_path / "missing"))


@pytest.mark.skipif(not SUPPORTED, reason="needs Linux, glibc ≥ 2.35 and transparent huge pages not [never]")
def test_cli_reexecutes_with_huge_pages_and_a_big_temporary_stops_faulting():
    """A `cli.main` entry point started without the tunable runs again with it and the same arguments; there a jitted
    program with a 256 MB temporary faults in a fraction of the 4 KB pages it touches on every call."""
    script = textwrap.dedent("""
        import os, resource, sys
        from latent_lm import cli, host_memory
        def main(argv):
            import jax, jax.numpy as jnp
            f = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.outer(x, x)) @ x))  # a 8192² f32 temporary: 256 MB
            x = jnp.ones(8192)
            f(x).block_until_ready()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(3):
                f(x).block_until_ready()
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
            print(host_memory.enabled(), argv, int(faults))
        cli.main(main)
    """)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    runs = {}
    for opt_out in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", script, "--flag=x"], env={**env, host_memory.OPT_OUT: opt_out},
                             capture_output=True, text=True, timeout=300, check=True).stdout.split()
        runs[opt_out] = out
    assert runs["1"][:2] == ["True", "['--flag=x']"] and runs["0"][:2] == ["False", "['--flag=x']"], runs
    four_kb_pages = 256 * 2**20 // 4096
    assert int(runs["0"][2]) > four_kb_pages // 2, runs  # without: every call faults the temporary in again
    assert int(runs["1"][2]) < int(runs["0"][2]) // 4, runs
