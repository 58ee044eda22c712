"""Prefetch to device: keeps `size` global batches in flight ahead of the train step (docs/design.md §7).

Assembling and transferring batch k+1 is dispatched before step k finishes (JAX dispatch is asynchronous), so the
host→device copy overlaps compute. For exact resumption, the checkpointed data state is the grain iterator state
*after the last batch the train step consumed*, not after the last batch prefetched: each buffered batch carries the
state recorded when it was read, and `get_state`/`set_state` speak for the consumed position.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Iterator

from jax.sharding import Mesh

from latent_lm.parallel.mesh import shard_batch


class DevicePrefetcher:
    """Iterator of device-sharded global batches over a host-local iterator; checkpointable like a grain iterator
    (orbax's grain handler calls `get_state() -> bytes`, `set_state(bytes)`, `start_prefetch()`)."""

    def __init__(self, iterator: Iterator[dict], mesh: Mesh, size: int = 2):
        self._it, self._mesh, self._size = iterator, mesh, max(int(size), 1)
        self._buffer: collections.deque = collections.deque()
        self._consumed_state = self._read_state()

    def _read_state(self) -> Any:
        return self._it.get_state() if hasattr(self._it, "get_state") else None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self._buffer) < self._size:
            try:
                batch = next(self._it)
            except StopIteration:  # a finite iterator (evaluation): drain what is buffered first
                if not self._buffer:
                    raise
                break
            self._buffer.append((shard_batch(batch, self._mesh), self._read_state()))
        batch, self._consumed_state = self._buffer.popleft()
        return batch

    def get_state(self) -> bytes:
        return json.dumps(self._consumed_state).encode()

    def set_state(self, state: bytes) -> None:
        self._buffer.clear()
        self._consumed_state = json.loads(state)
        self._it.set_state(self._consumed_state)

    def start_prefetch(self) -> None:
        if hasattr(self._it, "start_prefetch"):
            self._it.start_prefetch()
