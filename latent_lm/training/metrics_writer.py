"""Metrics to JSONL (always) and TensorBoard event files (tensorboardX), written by process 0 only."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricsWriter:
    def __init__(self, logdir: str, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.logdir = logdir
        self._tb = None
        if self.enabled:
            os.makedirs(logdir, exist_ok=True)
            self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(logdir)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(logdir: str) -> list[dict]:
    path = os.path.join(logdir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
