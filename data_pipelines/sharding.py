"""Per-process input sharding (docs/design.md §7, docs/scaling_out.md §5): every process yields only its rows of
each global batch; `jax.make_array_from_process_local_data` (parallel/mesh.shard_batch) assembles them.

Two orders, and which one a pipeline has decides whether a run resumes on another number of processes
(docs/scaling_out.md §4.1):

- **Global** (`global_rows`, `GlobalOrder`): the fixed-shape pipelines (cached latents, images, audio crops). The
  whole dataset is shuffled once with the run's seed (grain reshuffles it every epoch), cut into global batches, and
  process p of P yields rows [p·b, (p+1)·b) of every global batch, b = global batch / P. The global batches, and the
  iterator state after n of them, are the same for any P; with one process the stream is the dataset itself, so
  single-process runs are what they were before this order existed.
- **Per process** (`process_shard`, `shard_dataset`, `process_seed`): the packed multimodal and TTS rows
  (data_pipelines/packing.py), which are packed from a stream of documents that each process reads and packs on its
  own. Each process reads a contiguous, equal-sized slice (grain's `ShardOptions(drop_remainder=True)` rule: at most
  `process_count - 1` examples dropped) with its own seed, so every process yields the same number of batches, which
  a single pass over several hosts needs: a host that runs out first would stall the collective step.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import jax

from latent_lm.errors import ConfigError, DataError


def process_shard(process_index: int | None = None, process_count: int | None = None) -> grain.sharding.ShardOptions:
    """This process's shard (`grain.sharding.ShardByJaxProcess`); explicit values simulate other processes."""
    if process_index is None and process_count is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if process_index is None or process_count is None:
        raise ValueError("give both process_index and process_count, or neither (then JAX's are used)")
    return grain.sharding.ShardOptions(int(process_index), int(process_count), drop_remainder=True)


def shard_range(num_examples: int, shard: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of the examples that `shard` reads out of `num_examples` (equal sizes, remainder dropped)."""
    if not shard.drop_remainder:
        raise ValueError("per-process slices must have equal sizes: use ShardOptions(..., drop_remainder=True)")
    per = num_examples // shard.shard_count
    return per * shard.shard_index, per * (shard.shard_index + 1)


def shard_dataset(ds: grain.MapDataset, shard: grain.sharding.ShardOptions) -> grain.MapDataset:
    """The contiguous slice of a finite MapDataset that `shard` reads; raises if the slice would be empty."""
    start, end = shard_range(len(ds), shard)
    if end <= start:
        raise DataError(f"dataset of {len(ds)} examples is too small to give each of {shard.shard_count} "
                         f"processes at least one example")
    return ds if (start, end) == (0, len(ds)) else ds[start:end]


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """Rows of each global batch that one process yields: global / process_count (must divide)."""
    count = jax.process_count() if process_count is None else int(process_count)
    if global_batch_size <= 0 or global_batch_size % count:
        raise ConfigError(f"global batch size {global_batch_size} must be a positive multiple of the "
                         f"{count} processes")
    return global_batch_size // count


def process_seed(seed: int, shard: grain.sharding.ShardOptions) -> int:
    """Shuffle/augmentation seed of a per-process shard: `seed` itself on process 0, a different stream on every
    other process."""
    return (int(seed) + 1_000_003 * shard.shard_index) % (2 ** 31)


def global_seed(seed: int) -> int:
    """Shuffle/augmentation seed of a global-order pipeline: the same on every process (what `process_seed` gives
    process 0, so one-process streams are unchanged)."""
    return int(seed) % (2 ** 31)


class _ProcessRows(grain.MapDataset):
    """This process's rows of every global batch of `parent` (see `global_rows`), as one flat dataset: element k is
    row k mod b of global batch ⌊k / b⌋, offset by this process's p·b rows."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int,
                 drop_remainder: bool):
        super().__init__(parent)
        self._global, self._index, self._count = int(global_batch), int(process_index), int(process_count)
        self._local = self._global // self._count
        self._full, rest = divmod(len(parent), self._global)  # full global batches, rows of a last partial one
        # A partial last global batch (single passes without drop_remainder) is split evenly, its remainder after
        # division by the process count dropped, so every process yields the same number of rows.
        self._tail = 0 if drop_remainder else rest // self._count
        self._parent_length = len(parent)
        self._length = self._full * self._local + self._tail

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        epoch, k = divmod(int(index), self._length)  # grain's convention for indices past the end: next epoch
        batch, row = divmod(k, self._local)
        if batch < self._full:
            start, width = batch * self._global, self._local
        else:
            start, width, row = self._full * self._global, self._tail, k - self._full * self._local
        return epoch * self._parent_length + start + self._index * width + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices: Sequence[int]) -> Sequence[Any]:
        return self._parent._getitems([self._parent_index(i) for i in indices])  # noqa: SLF001 (batching reads)

    def __str__(self) -> str:
        return f"ProcessRows(global_batch={self._global}, process={self._index} of {self._count})"


def global_rows(ds: grain.MapDataset, global_batch_size: int, shard: grain.sharding.ShardOptions,
                drop_remainder: bool = True) -> grain.MapDataset:
    """This process's rows of every global batch of `ds`: batch it with `local_batch_size`. Apply it after every
    per-example random map, so that augmentations are drawn from the global position of each example.

    `ds` is the global stream (shuffled and repeated with `global_seed`); with one process it is returned as it is.
    A finite `ds` yields its full global batches, and without `drop_remainder` an even split of the last partial
    one."""
    count = int(shard.shard_count)
    local_batch_size(global_batch_size, count)
    if len(ds) < count:
        raise DataError(f"dataset of {len(ds)} examples is too small to give each of {count} processes at least "
                         f"one example")
    if count == 1:
        return ds
    return _ProcessRows(ds, global_batch_size, shard.shard_index, count, drop_remainder)


class GlobalOrder(grain.IterDataset):
    """Marks a pipeline whose global batches do not depend on the process count (built with `global_rows`): its
    iterator's state after n batches is the same on every process for any process count, so the train loop may
    continue a checkpoint written by another number of processes (latent_lm/checkpoint.py). Iterates and
    checkpoints exactly as the wrapped pipeline does."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> "GlobalOrderIterator":
        return GlobalOrderIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "GlobalOrder"


class GlobalOrderIterator(grain.DatasetIterator):
    """The iterator of a `GlobalOrder` pipeline; `global_order` is what the train loop reads."""

    global_order = True

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "GlobalOrderIterator"


def with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """Runs everything upstream of this point in `num_workers` processes (0: in this process)."""
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0, got {num_workers}")
    if num_workers == 0:
        return ds
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
