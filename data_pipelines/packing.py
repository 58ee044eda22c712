"""Packing multimodal documents into fixed-length rows (docs/method.md §4.1, §7.3), and the train/eval iterator.

A packed row of length T (`seq_len`) holds whole documents one after another, then padding:
  tokens int32 [T], is_latent bool [T], latents float32 [T,C]   the documents' arrays (0 / False on padding)
  segment_ids int32 [T]   1, 2, … per document in the row, 0 on padding
  positions   int32 [T]   0, 1, … restarting at each document's start (0 on padding)
A document is never split across rows. A row also holds at most `latent_capacity` latent positions: the train step
gathers that many latent targets per row for the diffusion head, so a document that would overflow it goes to
another row instead. A document longer than T or with more latents than the capacity is an error
(`make_document_dataset` checks the longest document of every kind in the mix before reading any).

The packer is grain's `FirstFitPackIterDataset`: each feature is packed against its own length, and a document goes
into a row only if every feature fits, so an extra feature `latent_slots` (one slot per latent position, capacity
`latent_capacity`, dropped after packing) enforces the latent capacity. Its iterator state is the upstream state
at the start of the current pack plus the rows already emitted (plain JSON), so the train loop checkpoints and
resumes it exactly.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import grain
import numpy as np

from data_pipelines import sharding
from data_pipelines.mllm_documents import KINDS, DocumentSource, MultimodalSplit, max_document_shape
from latent_lm.errors import ConfigError, DataError

PACKED_KEYS = ("tokens", "is_latent", "latents", "segment_ids", "positions")


def packed_batch_shapes(batch_size: int, seq_len: int, latent_dim: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of a batch of packed rows (`PACKED_KEYS`, as the module docstring lays them out)."""
    b, t = batch_size, seq_len
    return {"tokens": ((b, t), np.int32), "is_latent": ((b, t), np.bool_), "latents": ((b, t, latent_dim), np.float32),
            "segment_ids": ((b, t), np.int32), "positions": ((b, t), np.int32)}


class _Packable(grain.transforms.Map):
    """A document → the features the packer fits (checked against T and the latent capacity)."""

    def __init__(self, seq_len: int, latent_capacity: int):
        self.seq_len, self.latent_capacity = seq_len, latent_capacity

    def map(self, doc: dict[str, Any]) -> dict[str, np.ndarray]:
        length, latents = len(doc["tokens"]), int(np.count_nonzero(doc["is_latent"]))
        kind = doc.get("kind", "a")
        if length > self.seq_len:
            raise DataError(f"{kind} document of {length} positions does not fit a packed row of "
                            f"seq_len={self.seq_len}")
        if latents > self.latent_capacity:
            raise DataError(f"{kind} document with {latents} latent positions exceeds "
                            f"latent_capacity={self.latent_capacity}")
        return {"tokens": doc["tokens"], "is_latent": doc["is_latent"], "latents": doc["latents"],
                "latent_slots": np.zeros(latents, np.int8)}


class _Row(grain.transforms.Map):
    """grain's packed row → the row keys (`PACKED_KEYS`)."""

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"tokens": row["tokens"].astype(np.int32), "is_latent": row["is_latent"].astype(bool),
                "latents": row["latents"].astype(np.float32), "segment_ids": row["tokens_segment_ids"],
                "positions": row["tokens_positions"]}


def pack_documents(documents: grain.IterDataset, *, seq_len: int, latent_capacity: int, num_bins: int,
                   seed: int = 0, shuffle_bins: bool = True) -> grain.IterDataset:
    """Packs a stream of documents into single rows of `seq_len` (module doc), first fit over `num_bins` open rows;
    `shuffle_bins` permutes each pack's rows with `seed`."""
    if seq_len <= 0 or latent_capacity < 0 or num_bins <= 0:
        raise ConfigError(f"packing needs seq_len > 0, latent_capacity ≥ 0 and bins > 0, got {seq_len}, "
                          f"{latent_capacity} and {num_bins}")
    lengths = {"tokens": seq_len, "is_latent": seq_len, "latents": seq_len, "latent_slots": latent_capacity}
    packed = grain.experimental.FirstFitPackIterDataset(
        documents.map(_Packable(seq_len, latent_capacity)), length_struct=lengths, num_packing_bins=num_bins,
        seed=seed, shuffle_bins=shuffle_bins)
    return packed.map(_Row())


def check_fits(data: MultimodalSplit, mix: Mapping[str, float], latent_capacity: int) -> None:
    """Raises ConfigError if the longest document of a kind in `mix` (weight > 0) would not fit a row of
    `data.seq_len` or `latent_capacity`."""
    for kind, w in (mix.items() if hasattr(mix, "items") else mix):
        if kind in KINDS and float(w) > 0:
            length, latents = max_document_shape(data, kind)
            if length > data.seq_len:
                raise ConfigError(f"seq_len={data.seq_len} is too short for {kind} documents (up to {length} "
                                  f"positions): raise seq_len or drop {kind} from the mix")
            if latents > latent_capacity:
                raise ConfigError(f"latent_capacity={latent_capacity} is below the {latents} latent positions of a "
                                  f"{kind} document: raise it or drop {kind} from the mix")


class _EpochDocument:
    """(position k in the repeated stream, record) → document record + epoch·num_documents: every epoch draws new
    documents (fresh images, templates and null prompts) while staying a function of (seed, index)."""

    def __init__(self, source: "DocumentStream", per_epoch: int):
        self.source, self.per_epoch = source, per_epoch

    def __call__(self, k: int, record: int) -> dict[str, Any]:
        return self.source.document(int(record) + (int(k) // self.per_epoch) * len(self.source))


def make_document_dataset(data: MultimodalSplit, batch_size: int, seed: int, *, mix: Mapping[str, float],
                          latent_capacity: int, null_prompt_rate: float = 0.1, num_documents: int | None = None,
                          shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
                          packing_bins: int | None = None, process_index: int | None = None,
                          process_count: int | None = None, num_workers: int = 0) -> grain.IterDataset:
    """Yields this process's packed rows of each global batch of multimodal documents (`make_packed_dataset`) from
    `DocumentSource(data, seed, mix, null_prompt_rate, num_documents)`, after checking that the longest document of
    every kind in the mix fits a row."""
    check_fits(data, mix, latent_capacity)
    return make_packed_dataset(DocumentSource(data, seed, mix, null_prompt_rate, num_documents), data.seq_len,
                               batch_size, seed, latent_capacity=latent_capacity, shuffle=shuffle, repeat=repeat,
                               drop_remainder=drop_remainder, packing_bins=packing_bins, process_index=process_index,
                               process_count=process_count, num_workers=num_workers)


class DocumentStream(Protocol):
    """What `make_packed_dataset` reads: `len()` documents, document i a function of (seed, i) alone."""

    def __len__(self) -> int: ...

    def document(self, index: int) -> dict[str, Any]: ...


def make_packed_dataset(source: DocumentStream, seq_len: int, batch_size: int, seed: int, *, latent_capacity: int,
                        shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
                        packing_bins: int | None = None, process_index: int | None = None,
                        process_count: int | None = None, num_workers: int = 0) -> grain.IterDataset:
    """Yields this process's packed rows of each global batch: {tokens int32, is_latent bool, latents float32 [..,C],
    segment_ids int32, positions int32}, each [b, T, ...], b = batch_size / processes, T = seq_len.

    Each process reads a contiguous slice of the source's record indices (data_pipelines.sharding), shuffled per epoch
    with its own seed; with `repeat`, epoch e's record i is document i + e·len(source), so epochs differ. The packer
    is stateful and per process, so this order is per process (not `sharding.GlobalOrder`): a checkpoint of it resumes
    on the same number of processes only; another count stops with one `ProcessCountChangedError` line
    (latent_lm/checkpoint.py, docs/scaling_out.md §4.1).
    `packing_bins` open rows (default b) are filled first fit. `iter(...)` is a grain iterator whose
    get_state/set_state the train loop checkpoints (latent_lm/training/train_loop.py).
    """
    shard = sharding.process_shard(process_index, process_count)
    local = sharding.local_batch_size(batch_size, shard.shard_count)
    shard_seed = sharding.process_seed(seed, shard)
    records = sharding.shard_dataset(grain.MapDataset.range(len(source)), shard).seed(shard_seed)
    per_epoch = len(records)
    if shuffle:
        records = records.shuffle()
    if repeat:
        records = records.repeat()
    docs = sharding.with_workers(records.map_with_index(_EpochDocument(source, per_epoch)).to_iter_dataset(),
                                 num_workers)
    rows = pack_documents(docs, seq_len=seq_len, latent_capacity=latent_capacity,
                          num_bins=int(packing_bins or local), seed=shard_seed, shuffle_bins=shuffle)
    return rows.batch(local, drop_remainder=drop_remainder)
