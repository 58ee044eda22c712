"""Paths on local disks and on object stores (`gs://bucket/...`, `s3://...`) behind one set of helpers.

A workdir may be a cloud URL (a TPU pod writes to `--workdir=gs://bucket/runs/x`), so file I/O that is not orbax's
goes through here. URLs are handled by `etils.epath`, which uses TensorFlow's gfile when TensorFlow is installed
and otherwise fsspec (`gcsfs` for gs://: `pip install latent-lm[gcs]`). Local paths keep plain `os` semantics.

Atomic writes write a temporary name next to the target and rename it onto the target, so a reader never sees a
half-written file. Locally the rename is atomic (`os.replace`). An object store has no rename: epath copies the
object to the new name (on GCS a server-side copy, no data through this host) and deletes the temporary one, so
the target still appears only once complete; the temporary name is what protects against a writer that fails
half-way, since an fsspec file publishes whatever it holds when it is closed. Object stores have no directories
either: `makedirs` only checks that a URL is reachable, and a "directory" exists while an object lies under it.
"""

from __future__ import annotations

import contextlib
import functools
import glob as _glob
import importlib.util
import json
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
import numpy as np
from etils import epath

from latent_lm.errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # a scheme of 2+ characters: "C:\\x" is a Windows path


class MissingBackendError(UserError, ImportError):
    """A URL whose storage client is not installed here."""


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (gs://, s3://, ...), False for local paths."""
    return bool(_URL.match(os.fspath(path)))


@functools.cache
def _check_scheme(scheme: str) -> None:
    if (importlib.util.find_spec("tensorflow") is not None
            and os.environ.get("EPATH_USE_TF", "").lower() not in ("false", "no", "f", "0")):
        return  # epath goes through tf.io.gfile
    try:
        fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
    except (ImportError, ValueError) as e:
        raise MissingBackendError(f"{scheme}:// paths need an fsspec filesystem for {scheme!r} ({e}); for gs:// "
                                  f"install the [gcs] extra: pip install 'latent-lm[gcs]'") from None


def require_backend(path: str) -> None:
    """One clear error, early, if `path` is a URL this host cannot reach (e.g. gs:// without gcsfs)."""
    if is_url(path):
        _check_scheme(os.fspath(path).split("://", 1)[0])


def _epath(path: str) -> epath.Path:
    require_backend(path)
    return epath.Path(path)


def join(base: str, *parts: str) -> str:
    """`os.path.join` for local paths; '/'-joined for URLs (whatever the local OS)."""
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def absolute(path: str) -> str:
    """An absolute local path; a URL unchanged (`os.path.abspath("gs://b/x")` would give "<cwd>/gs:/b/x")."""
    return path if is_url(path) else os.path.abspath(path)


def makedirs(path: str) -> None:
    """Creates a local directory and its parents; for a URL only checks that it is reachable (object stores have
    no directories)."""
    if is_url(path):
        require_backend(path)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names of the entries of a directory (unsorted, like `os.listdir`)."""
    return [p.name for p in _epath(path).iterdir()] if is_url(path) else os.listdir(path)


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern`, whose wildcards must lie in the last component (one listing on a bucket)."""
    if not is_url(pattern):
        return _glob.glob(pattern)
    parent, name = posixpath.split(pattern)
    return [os.fspath(p) for p in _epath(parent).glob(name)]


def walk_files(root: str) -> Iterator[str]:
    """Every file below `root`, recursively (one listing per directory on a bucket)."""
    if not is_url(root):
        for d, _, names in os.walk(root):
            yield from (os.path.join(d, n) for n in names)
        return
    scheme = root.split("://", 1)[0] + "://"
    for d, _, names in _epath(root).walk():
        d = os.fspath(d)
        # epath's fsspec backend yields roots without the scheme ("bucket/dir"), its gfile backend with it.
        d = d if is_url(d) else scheme + d.lstrip("/")
        yield from (posixpath.join(d, n) for n in names)


def remove(path: str, missing_ok: bool = False) -> None:
    try:
        _epath(path).unlink() if is_url(path) else os.remove(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(path: str) -> None:
    """Removes a directory tree; a missing one is no error."""
    if is_url(path):
        if _epath(path).exists():
            _epath(path).rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace(src: str, dst: str) -> None:
    """Renames a file or directory onto `dst`: `os.replace` locally; copy + delete on an object store."""
    if is_url(src) != is_url(dst):
        raise ValueError(f"cannot rename across storage systems: {src} -> {dst}")
    if not is_url(src):
        os.replace(src, dst)
    elif _epath(src).is_dir():
        _epath(src).rename(dst)  # fsspec: recursive copy + delete; fails if dst exists, as os.replace would
    else:
        _epath(src).replace(dst)


def open_file(path: str, mode: str = "rb") -> IO:
    """A file object for reading (`np.load`, `zipfile`, PIL and torch accept it)."""
    return _epath(path).open(mode) if is_url(path) else open(path, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    with open_file(path, "r") as f:
        return f.read()


def temporary_name(path: str) -> str:
    """The name atomic writes use before renaming onto `path` (`<path>.tmp-<hex>`: easy to find and clean up)."""
    return f"{path}.tmp-{uuid.uuid4().hex}"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Yields a file object writing a temporary name that is renamed onto `path` when the block succeeds; on an
    exception the temporary file is removed and `path` is untouched. Creates local parent directories."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    makedirs(dirname(absolute(path)))
    tmp = temporary_name(path)
    try:
        with open_file(tmp, mode) as f:
            yield f
        replace(tmp, path)
    except BaseException:
        remove(tmp, missing_ok=True)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` in one call, without a temporary name: for files whose readers pick up every name in a
    directory (TensorBoard). A bucket publishes an object only when its upload completes."""
    if is_url(path):
        _epath(path).write_bytes(data)
    else:
        makedirs(os.path.dirname(os.path.abspath(path)))
        with open(path, "wb") as f:
            f.write(data)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json_atomic(path: str, obj: Any, **dumps_kwargs) -> None:
    """`json.dumps(obj, **dumps_kwargs)` written atomically (serialised first: a bad value leaves no file)."""
    write_text_atomic(path, json.dumps(obj, **dumps_kwargs))


def write_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """`np.savez` to `path` atomically, streamed (zipfile writes unseekable object-store files with data
    descriptors), through a file object so numpy adds no `.npz` to the temporary name."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def upload_file_atomic(local_path: str, dst: str) -> None:
    """Copies a finished local file to `dst` (local or URL) atomically."""
    with open(local_path, "rb") as src, atomic_open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)
