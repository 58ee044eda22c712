"""Per-process input sharding (docs/design.md §7, multi-host): every process reads only its slice of a dataset and
yields its rows of each global batch; `jax.make_array_from_process_local_data` (parallel/mesh.shard_batch) assembles
them.

Slices are contiguous and of equal size (grain's `ShardOptions(drop_remainder=True)` rule: at most
`process_count - 1` examples dropped), so every process yields the same number of batches, which a single pass
(`repeat=False`) over several hosts needs: a host that runs out first would stall the collective step.
"""

from __future__ import annotations

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
    """Shuffle/augmentation seed of a shard: `seed` itself on process 0 (single-process runs are unchanged), a
    different stream on every other process."""
    return (int(seed) + 1_000_003 * shard.shard_index) % (2 ** 31)


def with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """Runs everything upstream of this point in `num_workers` processes (0: in this process)."""
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be ≥ 0, got {num_workers}")
    if num_workers == 0:
        return ds
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
