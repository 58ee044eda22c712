"""Latent cache: σ-VAE means μ in ArrayRecord shards, written once by many processes (resumably), read by grain.

Layout of a cache directory (docs/design.md §5):
  latents-00000-of-00008.array_record  one record per example: int32 label, then float32 latents [T,C],
                                       little-endian, C order; shard i holds examples [start_i, end_i)
  latents-00000-of-00008.json          shard i's range, latent shape, μ moments and the writer's fingerprint
  meta.json                            {"shape", "count", "dtype", "record_format", "files", "moments",
                                        "fingerprint", "metadata"}; present only when every shard is
Shards are contiguous ranges of the source, so reading them in order gives the source order.

Writing (`encode_to_latent_cache`): process p encodes the shards i with i % process_count == p. A shard goes to a
temporary name and is renamed when complete (after its .json), so a shard file that exists is complete; a re-run
skips complete shards with the same fingerprint and resumes where a killed run stopped. meta.json is written last
by process 0, once every shard exists: readers need it, so they never see a partial cache. A re-run with another
fingerprint (a retrained σ-VAE, another config) removes meta.json first, then rewrites the shards. The directory
must be on a filesystem that all processes share, or in a bucket (gs://...: see `latent_lm.storage`; there each
shard is written to a local temporary file and then uploaded, and ArrayRecord reads gs:// shards itself). The
sharding, sidecar and meta-last machinery is `data_pipelines.sharded_records`, shared with the audio latent cache
and the speech corpus.

Reading (`make_latent_dataset`): the cache is shuffled as a whole and cut into global batches; each process yields
its rows (global batch / process_count) of every one (data_pipelines.sharding, global order), so a run resumes on
any number of processes; the grain iterator checkpoints.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np

from data_pipelines import sharded_records, sharding
from latent_lm import storage
from latent_lm.errors import DataError, MissingInputError

META_FILE = sharded_records.META_FILE
SHARD_PREFIX = "latents"
LEGACY_RECORDS_FILE = "latents.array_record"  # single-file caches written before sharding
RECORD_FORMAT = "int32 label + float32[T,C] latents, little-endian, C order"
_LABEL = np.dtype("<i4")
_LATENT = np.dtype("<f4")

ReadBatches = Callable[[int, int], Iterable[tuple[np.ndarray, np.ndarray]]]
Barrier = sharded_records.Barrier
shard_bounds = sharded_records.shard_bounds  # contiguous [start, end) per shard


def shard_name(index: int, num_shards: int) -> str:
    return sharded_records.shard_name(SHARD_PREFIX, index, num_shards)


def _encode_record(latent: np.ndarray, label: int) -> bytes:
    return np.asarray(label, _LABEL).tobytes() + np.ascontiguousarray(latent, _LATENT).tobytes()


def _decode_record(record: bytes, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    expected = _LABEL.itemsize + _LATENT.itemsize * shape[0] * shape[1]
    if len(record) != expected:
        raise DataError(f"latent cache record of {len(record)} bytes does not hold latents of shape {shape} "
                         f"({expected} bytes): the cache is damaged; re-run --mode=encode")
    label = np.frombuffer(record, _LABEL, count=1)[0]
    latent = np.frombuffer(record, _LATENT, offset=_LABEL.itemsize).reshape(shape)
    return {"latents": latent.astype(np.float32), "label": label.astype(np.int32)}


def _missing(path: str) -> MissingInputError:
    return MissingInputError(f"latent cache not found at {path}: run --mode=encode first")


def _encode_shard(path: str, name: str, start: int, end: int, read_batches: ReadBatches,
                  encode_fn: Callable[[np.ndarray], np.ndarray], expect: dict[str, Any]) -> None:
    stats = {"count": 0, "sum": 0.0, "sum_sq": 0.0, "shape": None}

    def records() -> Iterable[bytes]:
        for images, labels in read_batches(start, end):
            labels = np.asarray(labels)
            latents = np.asarray(encode_fn(images), np.float32)
            if latents.ndim != 3 or len(latents) != len(labels):
                raise ValueError(f"encode_fn must return latents [B,T,C] for {len(labels)} examples, "
                                 f"got {latents.shape}")
            if stats["shape"] is None:
                stats["shape"] = latents.shape[1:]
            elif latents.shape[1:] != stats["shape"]:
                raise ValueError(f"encode_fn returned latents of shape {latents.shape[1:]} after {stats['shape']}")
            for latent, label in zip(latents, labels):
                yield _encode_record(latent, int(label))
            stats["count"] += len(labels)
            sharded_records.add_sums(stats, latents)
        if stats["count"] != end - start:
            raise ValueError(f"read_batches({start}, {end}) yielded {stats['count']} examples, "
                             f"expected {end - start}")

    sharded_records.write_shard(path, name, records(), lambda: dict(
        expect, shape=list(stats["shape"]), sum=stats["sum"], sum_sq=stats["sum_sq"]))


def _make_meta(path: str, num_examples: int, num_shards: int, fingerprint: Any,
               metadata: dict[str, Any] | Callable[[dict[str, float]], dict[str, Any]],
               sides: list[dict[str, Any]], files: list[str]) -> dict[str, Any]:
    shapes = {tuple(s["shape"]) for s in sides}
    if len(shapes) != 1:
        raise DataError(f"latent cache at {path} has shards of different latent shapes {sorted(shapes)}")
    values = num_examples * int(np.prod(sides[0]["shape"]))
    mean, std = sharded_records.mean_std(sides, values)
    moments = {"mean": mean, "std": std, "values": values}
    return {"shape": list(sides[0]["shape"]), "count": num_examples, "dtype": "float32",
            "record_format": RECORD_FORMAT, "files": files, "moments": moments, "fingerprint": fingerprint,
            "metadata": metadata(moments) if callable(metadata) else dict(metadata)}


def encode_to_latent_cache(path: str, *, num_examples: int, read_batches: ReadBatches,
                           encode_fn: Callable[[np.ndarray], np.ndarray], num_shards: int,
                           metadata: dict[str, Any] | Callable[[dict[str, float]], dict[str, Any]] | None = None,
                           fingerprint: Any = None, process_index: int | None = None,
                           process_count: int | None = None,
                           barrier: Barrier | None = None) -> dict[str, Any] | None:
    """Encodes examples [0, num_examples) into a sharded cache at `path`; resumable; returns meta.json.

    read_batches(start, end) yields (inputs, labels) batches covering examples [start, end) in order;
    encode_fn(inputs) returns latents [b, T, C]. `metadata` (a dict, or a function of the μ moments
    {"mean", "std", "values"} over the whole cache) goes to meta.json. `fingerprint` (JSON) identifies what
    produced the latents: shards with another fingerprint are re-encoded. Every process calls this with the same
    arguments; `process_index/process_count` default to JAX's, and `barrier(name)` (default:
    `multihost_utils.sync_global_devices` when JAX has several processes) separates the phases. With explicit
    process values and no barrier, call process 0 last: it checks that every shard exists and writes meta.json
    (the others return None, as meta.json does not exist yet).
    """
    if num_examples <= 0:
        raise ValueError(f"cannot cache an empty dataset (num_examples={num_examples})")
    metadata = {} if metadata is None else metadata
    return sharded_records.write_sharded(
        path, SHARD_PREFIX, num_examples=num_examples, num_shards=num_shards, fingerprint=fingerprint,
        write=lambda path, name, start, end, expect: _encode_shard(path, name, start, end, read_batches,
                                                                   encode_fn, expect),
        make_meta=lambda path, num_shards, fingerprint, sides, files: _make_meta(
            path, num_examples, num_shards, fingerprint, metadata, sides, files),
        what="latent cache", rerun="--mode=encode", also_stale=(LEGACY_RECORDS_FILE,),
        process_index=process_index, process_count=process_count, barrier=barrier)


def write_latent_cache(path: str, latents: np.ndarray, labels: np.ndarray, metadata: dict[str, Any],
                       num_shards: int = 1) -> None:
    """Atomically writes in-memory latents float32 [N,T,C] and labels [N], replacing any cache at `path`.

    In a bucket the directory renames are copies (see `latent_lm.storage`): readers may briefly find no cache, or
    a meta.json whose shards are not all there yet (`read_latent_cache_meta` then says so), never a wrong one.
    """
    latents, labels = np.asarray(latents), np.asarray(labels)
    if latents.ndim != 3 or labels.shape != latents.shape[:1]:
        raise ValueError(f"expected latents [N,T,C] and labels [N], got {latents.shape} and {labels.shape}")
    path = storage.absolute(path).rstrip("/")
    parent, name = storage.dirname(path), storage.basename(path)
    storage.makedirs(parent)
    tmp = storage.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        encode_to_latent_cache(tmp, num_examples=len(labels), encode_fn=lambda x: x, num_shards=num_shards,
                               read_batches=lambda start, end: [(latents[start:end], labels[start:end])],
                               metadata=metadata, process_index=0, process_count=1)
        old = None
        if storage.exists(path):
            # A directory rename cannot replace a non-empty directory: move the old one aside first.
            old = storage.join(parent, f".{name}.old-{uuid.uuid4().hex}")
            storage.replace(path, old)
        storage.replace(tmp, path)
        if old is not None:
            storage.rmtree(old)
    except BaseException:
        storage.rmtree(tmp)
        raise


def read_latent_cache_meta(path: str) -> dict[str, Any]:
    """The meta.json of a complete cache (shape, count, files, moments, metadata, …); clear errors otherwise."""
    meta = sharded_records.read_json(storage.join(path, META_FILE))
    if meta is None:
        raise _missing(path)
    meta.setdefault("files", [LEGACY_RECORDS_FILE])
    absent = [f for f in meta["files"] if not storage.exists(storage.join(path, f))]
    if absent:
        raise MissingInputError(f"latent cache at {path} is missing {len(absent)} of its {len(meta['files'])} "
                                f"shard files (first: {absent[0]}): re-run --mode=encode")
    return meta


def _checked_shape(path: str, meta: dict[str, Any], expected_shape: Sequence[int] | None) -> tuple[int, int]:
    shape = tuple(int(s) for s in meta["shape"])
    if expected_shape is not None and tuple(expected_shape) != shape:
        raise DataError(f"latent cache at {path} holds latents of shape {shape} but the config expects "
                         f"{tuple(expected_shape)}: re-run --mode=encode with this config")
    return shape


def _files(path: str, meta: dict[str, Any]) -> list[str]:
    return [storage.join(path, f) for f in meta["files"]]


def load_latent_cache(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole (small) cache into memory: (latents float32 [N,T,C], labels int32 [N]), in source order."""
    meta = read_latent_cache_meta(path)
    shape = _checked_shape(path, meta, None)
    decoded = [_decode_record(r, shape) for r in sharded_records.read_all(_files(path, meta))]
    latents = np.stack([d["latents"] for d in decoded]) if decoded else np.zeros((0, *shape), np.float32)
    labels = np.array([d["label"] for d in decoded], np.int32)
    return latents, labels


class LatentCacheSource(grain.sources.RandomAccessDataSource):
    """Random access to a complete cache, for data too large to hold in memory (the paper-scale multimodal
    documents, docs/experiments.md §10.4): record i → {"latents": float32 [T,C], "label": int32}, in source order."""

    def __init__(self, path: str):
        meta = read_latent_cache_meta(path)
        self.path, self.shape = path, _checked_shape(path, meta, None)
        self._source = grain.sources.ArrayRecordDataSource(_files(path, meta))
        if len(self._source) != meta["count"]:
            raise DataError(f"latent cache at {path} holds {len(self._source)} records but meta.json says "
                             f"{meta['count']}: re-run --mode=encode")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return _decode_record(self._source[int(index)], self.shape)

    def __repr__(self) -> str:
        return f"LatentCacheSource({self.path!r}, records={len(self)}, shape={self.shape})"


class _Decode(grain.transforms.Map):
    def __init__(self, shape: tuple[int, int]):
        self.shape = shape

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return _decode_record(record, self.shape)


def make_latent_dataset(path: str, batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True,
                        expected_shape: Sequence[int] | None = None, drop_remainder: bool = True,
                        process_index: int | None = None, process_count: int | None = None,
                        num_workers: int = 0) -> grain.IterDataset:
    """Yields this process's {"latents": float32 [b,T,C], "label": int32 [b]}, b = batch_size / processes.

    `batch_size` is the global batch. The cache is shuffled with `seed` (reshuffled every epoch) and cut into
    global batches; process p yields rows [p·b, (p+1)·b) of each (`process_index/process_count` default to JAX's),
    so the global batches do not depend on the process count (data_pipelines.sharding, global order).
    """
    meta = read_latent_cache_meta(path)
    shape = _checked_shape(path, meta, expected_shape)
    shard = sharding.process_shard(process_index, process_count)
    local = sharding.local_batch_size(batch_size, shard.shard_count)
    source = grain.sources.ArrayRecordDataSource(_files(path, meta))
    if len(source) != meta["count"]:
        raise DataError(f"latent cache at {path} holds {len(source)} records but meta.json says {meta['count']}: "
                         f"re-run --mode=encode")
    ds = grain.MapDataset.source(source).seed(sharding.global_seed(seed))
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    ds = sharding.global_rows(ds.map(_Decode(shape)), batch_size, shard, drop_remainder)
    ds = ds.batch(local, drop_remainder=drop_remainder)
    return sharding.GlobalOrder(sharding.with_workers(ds.to_iter_dataset(), num_workers))


def make_split_dataset(path: str, split: str, batch_size: int, seed: int, expected_shape: Sequence[int],
                       num_workers: int = 0) -> grain.IterDataset:
    """The cache under `path`/`split` as a generator task reads it: "train" shuffled and repeated with `seed`,
    "test" once in order (full batches only: the held-out loss)."""
    if split == "train":
        return make_latent_dataset(f"{path}/train", batch_size, seed=seed, expected_shape=expected_shape,
                                   num_workers=num_workers)
    return make_latent_dataset(f"{path}/{split}", batch_size, seed=seed, shuffle=False, repeat=False,
                               drop_remainder=True, expected_shape=expected_shape)
