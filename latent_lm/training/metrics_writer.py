"""Metrics to JSONL (always) and TensorBoard event files (tensorboardX), written by process 0 only.

A local logdir holds one `metrics.jsonl`, appended line by line (line-buffered: a killed run keeps every row).
Objects in a bucket cannot be appended to, so for a URL logdir (gs://...) each session buffers its rows and, every
`flush_secs` and on close, writes them as a new object `metrics-<session start, UTC>-step<first step>.jsonl`;
TensorBoard events likewise go to numbered parts `events.out.tfevents.<time>.<host>.<part>` (TensorBoard reads
every event file of a run directory, in name order). A run killed without closing its writer loses at most the
last `flush_secs` of rows there. `read_metrics` merges all of them in the order they were written.
"""

from __future__ import annotations

import json
import threading
import time

import jax

from latent_lm import storage

JSONL = "metrics.jsonl"
_PARTS_GLOB = "metrics-*.jsonl"


class _EventParts:
    """A tensorboardX record sink for object stores: each flush writes the records buffered since the last one as
    a new object `<path>.<part>` (tensorboardX's own gs:// writer rewrites one growing object on every flush)."""

    def __init__(self, path: str):
        self.path, self.part, self.buffer = path, 0, bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        if self.buffer:  # whole records only: tensorboardX writes and flushes under one lock
            storage.write_bytes(f"{self.path}.{self.part:05d}", bytes(self.buffer))
            self.part, self.buffer = self.part + 1, bytearray()

    def close(self) -> None:
        self.flush()


class _EventPartsFactory:
    def open(self, path: str) -> _EventParts:
        return _EventParts(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores need no directories


class MetricsWriter:
    def __init__(self, logdir: str, tensorboard: bool = True, flush_secs: float = 60.0):
        self.enabled = jax.process_index() == 0
        self.logdir = logdir
        self.remote = storage.is_url(logdir)
        self.flush_secs = flush_secs
        self._tb = None
        self._rows: list[str] = []
        self._lock = threading.Lock()
        if not self.enabled:
            return
        if self.remote:
            t = time.time()
            self._session = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f"{int(t * 1e6) % 1_000_000:06d}Z"
            self._last_flush = t
        else:
            storage.makedirs(logdir)
            self._jsonl = open(storage.join(logdir, JSONL), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            if self.remote:
                from tensorboardX.record_writer import register_writer_factory
                register_writer_factory(logdir.split("://", 1)[0], _EventPartsFactory())
            self._tb = SummaryWriter(logdir, flush_secs=int(flush_secs))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(row) + "\n"
        if self.remote:
            with self._lock:
                self._rows.append(line)
            if row["time"] - self._last_flush >= self.flush_secs:
                self.flush()
        else:
            self._jsonl.write(line)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def flush(self) -> None:
        """Writes the buffered rows of a URL logdir as one new object (a local metrics.jsonl is line-buffered)."""
        if not (self.enabled and self.remote):
            return
        with self._lock:
            rows, self._rows = self._rows, []
            self._last_flush = time.time()
        if rows:
            first = json.loads(rows[0])["step"]
            name = f"metrics-{self._session}-step{first:09d}.jsonl"
            storage.write_bytes_atomic(storage.join(self.logdir, name), "".join(rows).encode())

    def close(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            self.flush()
        else:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def metrics_files(logdir: str) -> list[str]:
    """The JSONL files of `logdir` in write order: `metrics.jsonl` (local appends), then the parts a URL logdir
    gets (their names sort by session start time, then by first step)."""
    files = [storage.join(logdir, JSONL)] if storage.exists(storage.join(logdir, JSONL)) else []
    return files + sorted(storage.glob(storage.join(logdir, _PARTS_GLOB)))


def read_metrics(logdir: str) -> list[dict]:
    """Every row written to `logdir` (local or URL), in write order; a resumed run repeats the steps it redid."""
    files = metrics_files(logdir)
    if not files:
        raise FileNotFoundError(f"no {JSONL} or {_PARTS_GLOB} under {logdir}")
    return [json.loads(line) for f in files for line in storage.read_text(f).splitlines() if line.strip()]
