"""Embedded English text, no downloads: the documentation topics that ship with CPython (`pydoc_data.topics`,
≈ 465 kB of prose and grammar), split into paragraphs with a deterministic held-out split.

The split is by a stable hash of each paragraph (not its position), so it does not move when the Python version adds
or edits topics; the paragraphs themselves follow the running Python's copy of the docs.
"""

from __future__ import annotations

import hashlib
import re

SPLITS = ("train", "test")
TEST_FRACTION = 0.05


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics  # imported lazily: 0.5 MB of strings

    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            block = block.strip("\n")
            if len(block.strip()) >= 20:
                out.append(block)
    return out


def _in_test(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < TEST_FRACTION


def python_docs_paragraphs(split: str) -> list[str]:
    """The paragraphs of one split ("train" ≈ 95%, "test" ≈ 5%), in a fixed order; never overlapping."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} must be one of {SPLITS}")
    return [p for p in _paragraphs() if _in_test(p) == (split == "test")]
