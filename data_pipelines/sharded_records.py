"""Sharded, resumable ArrayRecord writing: the machinery behind `latent_cache`, `audio_latents` and `speech_corpus`.

Layout of a directory of shards (docs/design.md §5):
  <prefix>-00000-of-00008.array_record  shard i's records, in order; shard i holds items [start_i, end_i)
  <prefix>-00000-of-00008.json          its sidecar: what it was written for ({start, end, …, fingerprint}) and
                                        what the writer counted while writing it
  meta.json                             written last, once every shard is complete: a directory with it is complete

A shard goes to a temporary name and is renamed when complete (after its sidecar), so a shard file that exists is
complete; a re-run skips complete shards whose sidecar matches and resumes where a killed run stopped
(`write_shard`, `shard_done`). `write_sharded` runs the whole multi-process protocol of a cache: process p writes the
shards i with i % process_count == p, and process 0 removes meta.json first and writes it last (`finalize`), so
readers never see a partial cache (the latent caches use it; the speech corpus, one process with shards per
split, uses the pieces). The directory must be on a filesystem that all processes share, or in a bucket
(gs://...: see `latent_lm.storage`; there each shard is written to a local temporary file and then uploaded).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from latent_lm import storage
from latent_lm.errors import MissingInputError

META_FILE = "meta.json"
RECORD_SUFFIX = ".array_record"

Barrier = Callable[[str], None]


def shard_name(prefix: str, index: int, num_shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{num_shards:05d}{RECORD_SUFFIX}"


def shard_pattern(prefixes: str | Sequence[str]) -> re.Pattern:
    """Matches the shard and sidecar file names of any shard count for `prefixes`."""
    prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    alternatives = "|".join(re.escape(p) for p in prefixes)
    return re.compile(rf"^({alternatives})-(\d{{5}})-of-(\d{{5}})\.(array_record|json)$")


def sidecar(record_path: str) -> str:
    return record_path[:-len(RECORD_SUFFIX)] + ".json"


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) per shard; the first `num_examples % num_shards` shards hold one example more."""
    per, extra = divmod(num_examples, num_shards)
    starts = [i * per + min(i, extra) for i in range(num_shards + 1)]
    return list(zip(starts[:-1], starts[1:]))


def read_json(path: str) -> Any:
    """The JSON at `path`, or None when it does not exist or is not (yet) valid JSON."""
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def default_barrier(explicit_processes: bool) -> Barrier:
    import jax  # here, not at the top: speech_corpus (and its worker processes) use this module without JAX

    if explicit_processes or jax.process_count() == 1:
        return lambda name: None
    from jax.experimental import multihost_utils
    return multihost_utils.sync_global_devices


def shard_done(record: str, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The shard's sidecar if the shard is complete and was written for `expect` (range, count, fingerprint)."""
    if not storage.exists(record):
        return None
    side = read_json(sidecar(record))
    if side is None or any(side.get(k) != v for k, v in expect.items()):
        return None
    return side


def remove_temps(*patterns: str) -> None:
    # Left by a killed writer; only the owner of a shard (this process) ever writes that shard's temporaries.
    for pattern in patterns:
        for tmp in storage.glob(pattern):
            storage.remove(tmp, missing_ok=True)


def write_shard(directory: str, name: str, records: Iterable[bytes], summary: Callable[[], dict[str, Any]]) -> None:
    """Writes the shard `directory/name` atomically from `records` (each one record's bytes), then its sidecar
    `summary()` (called once `records` is exhausted, so it may report what the iteration counted), then renames the
    shard into place. An exception from `records` or `summary` leaves neither the shard nor a temporary behind."""
    from array_record.python.array_record_module import ArrayRecordWriter

    record = storage.join(directory, name)
    # The old shard goes first: a record file must never sit next to a sidecar of a different run.
    for stale in (record, sidecar(record)):
        storage.remove(stale, missing_ok=True)
    remove_temps(storage.join(directory, f".{name}.tmp-*"), sidecar(record) + ".tmp-*", record + ".tmp-*")
    if storage.is_url(directory):  # ArrayRecord writes local files: write one here, upload it when complete
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-")
        os.close(fd)
    else:
        tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    writer = ArrayRecordWriter(tmp, "group_size:1")  # one record per chunk: cheap random access
    try:
        for data in records:
            writer.write(data)
        writer.close()
        storage.write_json_atomic(sidecar(record), summary(), indent=2)
        if storage.is_url(directory):
            storage.upload_file_atomic(tmp, record)
        else:
            os.replace(tmp, record)
    except BaseException:
        writer.close()
        raise
    finally:
        if os.path.exists(tmp):  # a local file: the shard's temporary, or the copy already uploaded
            os.remove(tmp)


def read_all(files: Sequence[str]) -> list[bytes]:
    """Every record of the shard files `files`, in order."""
    from array_record.python.array_record_module import ArrayRecordReader

    records = []
    for f in files:
        reader = ArrayRecordReader(f)
        try:
            records.extend(reader.read_all())
        finally:
            reader.close()
    return records


def add_sums(stats: dict[str, Any], values: np.ndarray) -> None:
    """Adds the sum and the sum of squares of `values` (in float64) to `stats["sum"]` and `stats["sum_sq"]`."""
    stats["sum"] += float(values.sum(dtype=np.float64))
    stats["sum_sq"] += float(np.square(values, dtype=np.float64).sum())


def mean_std(sides: Sequence[dict[str, Any]], values: int) -> tuple[float, float]:
    """Mean and standard deviation of `values` values from the "sum" and "sum_sq" of the shards' sidecars."""
    mean = sum(s["sum"] for s in sides) / values
    var = max(sum(s["sum_sq"] for s in sides) / values - mean ** 2, 0.0)
    return mean, var ** 0.5


def remove_stale_shards(directory: str, pattern: re.Pattern, files: Sequence[str], also: Sequence[str] = ()) -> None:
    """Removes the shards and sidecars matching `pattern` that are not `files` (or theirs), and the files `also`:
    those of an earlier run with another shard count are not part of the cache."""
    keep = set(files) | {sidecar(f) for f in files}
    for f in storage.listdir(directory):
        if (pattern.match(f) and f not in keep) or f in also:
            storage.remove(storage.join(directory, f))


def finalize(path: str, prefix: str, num_examples: int, num_shards: int, fingerprint: Any,
             make_meta: Callable[[list[dict[str, Any]], list[str]], dict[str, Any]], *, what: str, rerun: str,
             also_stale: Sequence[str] = ()) -> None:
    """Writes meta.json, `make_meta(sidecars, shard files)`, once every shard of [0, num_examples) is complete
    (MissingInputError naming `what` and the `rerun` command otherwise), after removing stale shards."""
    sides, missing = [], []
    for i, (start, end) in enumerate(shard_bounds(num_examples, num_shards)):
        side = shard_done(storage.join(path, shard_name(prefix, i, num_shards)),
                          dict(start=start, end=end, num_shards=num_shards, fingerprint=fingerprint))
        (missing.append(i) if side is None else sides.append(side))
    if missing:
        raise MissingInputError(f"{what} at {path} is incomplete: shards {missing} of {num_shards} are missing "
                                f"(did another process fail?); re-run {rerun} to finish it")
    files = [shard_name(prefix, i, num_shards) for i in range(num_shards)]
    meta = make_meta(sides, files)
    remove_stale_shards(path, shard_pattern(prefix), files, also_stale)
    storage.write_json_atomic(storage.join(path, META_FILE), meta, indent=2)


def write_sharded(path: str, prefix: str, *, num_examples: int, num_shards: int, fingerprint: Any,
                  write: Callable[[str, str, int, int, dict[str, Any]], None],
                  make_meta: Callable[[str, int, Any, list[dict[str, Any]], list[str]], dict[str, Any]],
                  what: str, rerun: str, check_files: bool = False, also_stale: Sequence[str] = (),
                  process_index: int | None = None, process_count: int | None = None,
                  barrier: Barrier | None = None) -> dict[str, Any] | None:
    """Writes items [0, num_examples) into `num_shards` (at most one per item) shards at `path`, resumably, with
    every process; returns meta.json (None on processes other than 0 when there is no barrier).

    `write(path, name, start, end, expect)` writes one missing shard (with `write_shard`; its sidecar must hold
    `expect`); `make_meta(path, num_shards, fingerprint, sidecars, files)` builds meta.json from the complete shards'
    sidecars. `fingerprint` (JSON) names what produced the items: shards and a meta.json of another fingerprint are
    rewritten; with `check_files` a meta.json whose shard files are not all there is rewritten too. `what` and
    `rerun` name the cache and the command that rebuilds it in errors and barrier names; `also_stale` are files
    that a complete cache removes. `process_index/process_count` default to JAX's, and `barrier(name)` (default:
    `multihost_utils.sync_global_devices` when JAX has several processes) separates the phases. With explicit
    process values and no barrier, call process 0 last: it checks that every shard exists and writes meta.json.
    """
    from data_pipelines import sharding  # imports grain and JAX

    if num_shards <= 0:
        raise ValueError(f"num_shards must be positive, got {num_shards}")
    explicit = process_index is not None or process_count is not None
    shard = sharding.process_shard(process_index, process_count)
    barrier = barrier or default_barrier(explicit)
    num_shards = min(int(num_shards), int(num_examples))
    fingerprint = json.loads(json.dumps(fingerprint))  # what the sidecars will compare against, after a JSON trip
    path = storage.absolute(path)
    storage.makedirs(path)
    meta_path = storage.join(path, META_FILE)
    meta = read_json(meta_path)
    if (meta is not None and meta.get("fingerprint") == fingerprint and meta.get("count") == num_examples
            and len(meta.get("files", ())) == num_shards
            and (not check_files or all(storage.exists(storage.join(path, f)) for f in meta["files"]))):
        return meta  # complete and current: nothing to do (every process sees the same file)
    if shard.shard_index == 0:
        storage.remove(meta_path, missing_ok=True)  # the cache is about to change: readers must not take the old one
        remove_temps(meta_path + ".tmp-*")
    barrier(f"{what}: start")
    bounds = shard_bounds(num_examples, num_shards)
    for i in range(shard.shard_index, num_shards, shard.shard_count):
        start, end = bounds[i]
        expect = dict(start=start, end=end, num_shards=num_shards, fingerprint=fingerprint)
        name = shard_name(prefix, i, num_shards)
        if shard_done(storage.join(path, name), expect) is None:
            write(path, name, start, end, expect)
    barrier(f"{what}: shards written")
    if shard.shard_index == 0:
        finalize(path, prefix, num_examples, num_shards, fingerprint,
                 lambda sides, files: make_meta(path, num_shards, fingerprint, sides, files),
                 what=what, rerun=rerun, also_stale=also_stale)
    barrier(f"{what}: meta written")
    return read_json(meta_path)
