"""Latent cache: σ-VAE means μ written once to ArrayRecord, read back by a grain pipeline.

Layout of a cache directory:
  latents.array_record   one record per example: int32 label, then float32 latents [T,C], little-endian, C order
  meta.json              {"shape": [T, C], "count": N, "dtype": "float32", "record_format": ..., "metadata": {...}}
A cache is written into a temporary sibling directory and renamed into place, so readers never see a partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

RECORDS_FILE = "latents.array_record"
META_FILE = "meta.json"
RECORD_FORMAT = "int32 label + float32[T,C] latents, little-endian, C order"
_LABEL = np.dtype("<i4")
_LATENT = np.dtype("<f4")


def _encode_record(latent: np.ndarray, label: int) -> bytes:
    return np.asarray(label, _LABEL).tobytes() + np.ascontiguousarray(latent, _LATENT).tobytes()


def _decode_record(record: bytes, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    label = np.frombuffer(record, _LABEL, count=1)[0]
    latent = np.frombuffer(record, _LATENT, offset=_LABEL.itemsize).reshape(shape)
    return {"latents": latent.astype(np.float32), "label": label.astype(np.int32)}


def _missing(path: str) -> FileNotFoundError:
    return FileNotFoundError(f"latent cache not found at {path}: run --mode=encode first")


def write_latent_cache(path: str, latents: np.ndarray, labels: np.ndarray, metadata: dict[str, Any]) -> None:
    """Atomically writes latents float32 [N,T,C] and labels int [N] (replacing any cache at `path`)."""
    latents = np.asarray(latents)
    labels = np.asarray(labels)
    if latents.ndim != 3 or labels.shape != latents.shape[:1]:
        raise ValueError(f"expected latents [N,T,C] and labels [N], got {latents.shape} and {labels.shape}")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        # group_size:1 keeps random access cheap (one record per chunk); the data is small per record.
        writer = ArrayRecordWriter(os.path.join(tmp, RECORDS_FILE), "group_size:1")
        try:
            for latent, label in zip(latents, labels):
                writer.write(_encode_record(latent, int(label)))
        finally:
            writer.close()
        meta = {"shape": list(latents.shape[1:]), "count": int(len(labels)), "dtype": "float32",
                "record_format": RECORD_FORMAT, "metadata": metadata}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        old = None
        if os.path.exists(path):
            # A directory rename cannot replace a non-empty directory: move the old one aside first.
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_latent_cache_meta(path: str) -> dict[str, Any]:
    """Returns the cache's meta.json (shape, count, dtype, record_format, metadata)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path) or not os.path.exists(os.path.join(path, RECORDS_FILE)):
        raise _missing(path)
    with open(meta_path) as f:
        return json.load(f)


def _checked_shape(path: str, meta: dict[str, Any], expected_shape: Sequence[int] | None) -> tuple[int, int]:
    shape = tuple(int(s) for s in meta["shape"])
    if expected_shape is not None and tuple(expected_shape) != shape:
        raise ValueError(f"latent cache at {path} holds latents of shape {shape} but the config expects "
                         f"{tuple(expected_shape)}: re-run --mode=encode with this config")
    return shape


def load_latent_cache(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads a whole (small) cache into memory: (latents float32 [N,T,C], labels int32 [N])."""
    meta = read_latent_cache_meta(path)
    shape = _checked_shape(path, meta, None)
    reader = ArrayRecordReader(os.path.join(path, RECORDS_FILE))
    try:
        records = reader.read_all()
    finally:
        reader.close()
    decoded = [_decode_record(r, shape) for r in records]
    latents = np.stack([d["latents"] for d in decoded]) if decoded else np.zeros((0, *shape), np.float32)
    labels = np.array([d["label"] for d in decoded], np.int32)
    return latents, labels


class _Decode(grain.transforms.Map):
    def __init__(self, shape: tuple[int, int]):
        self.shape = shape

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        return _decode_record(record, self.shape)


def make_latent_dataset(path: str, batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True,
                        expected_shape: Sequence[int] | None = None,
                        drop_remainder: bool = True) -> grain.IterDataset:
    """Yields {"latents": float32 [B,T,C], "label": int32 [B]} from a cache; reshuffled every epoch."""
    meta = read_latent_cache_meta(path)
    shape = _checked_shape(path, meta, expected_shape)
    source = grain.sources.ArrayRecordDataSource([os.path.join(path, RECORDS_FILE)])
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    ds = ds.map(_Decode(shape)).batch(batch_size, drop_remainder=drop_remainder)
    return ds.to_iter_dataset()
