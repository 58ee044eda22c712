"""Huge pages for XLA:CPU's temporaries: the entry points re-execute themselves once with glibc's
`glibc.malloc.hugetlb=1` (docs/benchmarks.md §2).

XLA:CPU allocates an executable's temporaries afresh at every call, as one block (397 MB for the embedded default's
train step). glibc serves a block that large with mmap, so on 4 KB pages each step faults all of it in again: 97k page
faults per step, and the step ran 1.5× slower than on huge pages (407 → 273 ms, measured side by side). The tunable
makes glibc's malloc ask for transparent huge pages; glibc reads it only at process start, hence the re-exec. Nothing
happens where the tunable is already set (children of a process that set it, `make` targets), where the kernel's
transparent huge pages are off, on glibc older than 2.35 (no such tunable), off Linux, or with
LATENT_LM_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "LATENT_LM_HUGE_PAGES"


def _glibc_has_hugetlb() -> bool:
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _thp_available(path: str = THP_MODE) -> bool:
    """Whether the kernel grants huge pages to a process that asks (mode `[always]` or `[madvise]`, not `[never]`)."""
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_environ(environ: dict[str, str] | os._Environ) -> dict[str, str] | None:
    """The environment to re-execute with, or None where nothing would change (module docstring)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(OPT_OUT) == "0" or "glibc.malloc.hugetlb" in tunables or not sys.platform.startswith("linux")
            or not _glibc_has_hugetlb() or not _thp_available()):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def enabled(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """Whether this process started with the tunable (what the benchmarks print beside their figures)."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command line with the tunable set; returns where that changes nothing.
    Call it first thing in a `__main__` (not in a library function: it would replace the caller's process)."""
    environ = huge_pages_environ(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)
