"""Audio latent cache: the audio σ-VAE's means μ of every utterance of a speech corpus split, one variable-length
record per utterance in ArrayRecord shards (docs/method.md §12), written once (resumably), read by the TTS task.

Layout of `<tokenizer dir>/audio_latents/<split>/` (the conventions of `data_pipelines/latent_cache.py`):
  audio_latents-00000-of-00004.array_record  one record per utterance (RECORD_FORMAT); shard i holds utterances
                                             [start_i, end_i) of the corpus split, in corpus order
  audio_latents-00000-of-00004.json          shard i's range, frame count (in all and per record), μ sums and the
                                             writer's fingerprint
  meta.json                                  {"count", "latent_dim", "frame_rate", "frames", "moments",
                                              "fingerprint", "files", "record_format", "metadata"}; written last
Record i of a split is utterance i of the corpus split (text and phonemes stay in the corpus, joined by index).

`moments` are those of the σ-sampled latents z = μ + σ_b·ε over the split, in closed form as the image encode stage
computes them (docs/method.md §3.1): E z = E μ, Var z = Var μ + (std/0.8)², with "mu_std" = std(μ) beside them.
The encode stage puts the train split's LM-space normalisation {"scale", "bias"} into every split's
`metadata["latent_norm"]`.

Writing (`write_audio_latent_cache`): process p writes the shards i with i % process_count == p; a shard goes to a
temporary name and is renamed when complete (after its sidecar), so a shard file that exists is complete; a re-run
skips complete shards with the same fingerprint and resumes where a killed run stopped; meta.json is written last by
process 0, once every shard exists, so readers never see a partial cache. A re-run with another fingerprint removes
meta.json first, then rewrites the shards. This is `data_pipelines.sharded_records.write_sharded`, as for the image
latent cache.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import operator
from typing import Any, Callable, Iterable

import numpy as np

from data_pipelines import sharded_records
from latent_lm import storage
from latent_lm.errors import DataError, MissingInputError

META_FILE = sharded_records.META_FILE
SHARD_PREFIX = "audio_latents"
RECORD_FORMAT = "int32 n, int32 speaker, int32 sentence, float32[n,C] mu; little-endian, C order"
SIGMA_DIVISOR = 0.8  # σ_b ~ N(0, (std/0.8)²): latent_lm.latents.SIGMA_DIVISOR (data_pipelines does not import it)
_HEADER = np.dtype("<i4")
_MU = np.dtype("<f4")

# encode_range(start, end) yields (μ [n_i, C], speaker, sentence) for utterances start..end-1, in order.
EncodeRange = Callable[[int, int], Iterable[tuple[np.ndarray, int, int]]]
Barrier = sharded_records.Barrier
shard_bounds = sharded_records.shard_bounds  # contiguous [start, end) per shard


def shard_name(index: int, num_shards: int) -> str:
    return sharded_records.shard_name(SHARD_PREFIX, index, num_shards)


def encode_record(mu: np.ndarray, speaker: int, sentence: int) -> bytes:
    mu = np.asarray(mu)
    if mu.ndim != 2:
        raise ValueError(f"an utterance's latents must be [n, C], got shape {mu.shape}")
    return (np.asarray([len(mu), speaker, sentence], _HEADER).tobytes()
            + np.ascontiguousarray(mu, _MU).tobytes())


def decode_record(record: bytes, latent_dim: int) -> tuple[np.ndarray, int, int]:
    """record → (μ float32 [n, C], speaker, sentence)."""
    if len(record) < 3 * _HEADER.itemsize:
        raise DataError(f"audio latent record of {len(record)} bytes is shorter than its header: the cache is "
                        f"damaged; re-run --mode=encode_audio")
    n, speaker, sentence = (int(v) for v in np.frombuffer(record, _HEADER, count=3))
    expected = 3 * _HEADER.itemsize + n * latent_dim * _MU.itemsize
    if n < 0 or len(record) != expected:
        raise DataError(f"audio latent record of {len(record)} bytes does not hold {n} frames of {latent_dim} "
                        f"channels: the cache is damaged; re-run --mode=encode_audio")
    mu = np.frombuffer(record, _MU, offset=3 * _HEADER.itemsize).reshape(n, latent_dim).astype(np.float32)
    return mu, speaker, sentence


def _write_shard(path: str, name: str, start: int, end: int, encode_range: EncodeRange, latent_dim: int,
                 expect: dict[str, Any]) -> None:
    stats = {"count": 0, "frames": 0, "sum": 0.0, "sum_sq": 0.0}
    record_frames: list[int] = []  # per utterance: the TTS documents plan rows without reading the latents

    def records() -> Iterable[bytes]:
        for mu, speaker, sentence in encode_range(start, end):
            mu = np.asarray(mu, np.float32)
            if mu.ndim != 2 or mu.shape[1] != latent_dim:
                raise ValueError(f"encode_range must yield latents [n, {latent_dim}], got {mu.shape}")
            yield encode_record(mu, int(speaker), int(sentence))
            stats["count"] += 1
            stats["frames"] += len(mu)
            record_frames.append(len(mu))
            sharded_records.add_sums(stats, mu)
        if stats["count"] != end - start:
            raise ValueError(f"encode_range({start}, {end}) yielded {stats['count']} utterances, "
                             f"expected {end - start}")

    sharded_records.write_shard(path, name, records(), lambda: dict(
        expect, frames=stats["frames"], sum=stats["sum"], sum_sq=stats["sum_sq"], record_frames=record_frames))


def sampled_moments(mu_mean: float, mu_std: float, std: float, values: int) -> dict[str, float]:
    """Moments of z = μ + σ_b·ε, σ_b ~ N(0, (std/0.8)²), from those of μ (docs/method.md §3.1)."""
    return {"mean": mu_mean, "std": float((mu_std ** 2 + (std / SIGMA_DIVISOR) ** 2) ** 0.5), "mu_std": mu_std,
            "values": values}


def _make_meta(path: str, num_examples: int, latent_dim: int, frame_rate: float, std: float, fingerprint: Any,
               metadata: dict[str, Any] | Callable[[dict[str, float]], dict[str, Any]],
               sides: list[dict[str, Any]], files: list[str]) -> dict[str, Any]:
    frames = sum(s["frames"] for s in sides)
    values = frames * latent_dim
    if values == 0:
        raise DataError(f"audio latent cache at {path} holds no latent frames")
    moments = sampled_moments(*sharded_records.mean_std(sides, values), std, values)
    return {"count": num_examples, "latent_dim": latent_dim, "frame_rate": frame_rate, "frames": frames,
            "sigma_std": std, "moments": moments, "fingerprint": fingerprint, "files": files, "dtype": "float32",
            "record_format": RECORD_FORMAT,
            "metadata": metadata(moments) if callable(metadata) else dict(metadata)}


def write_audio_latent_cache(path: str, *, num_examples: int, encode_range: EncodeRange, latent_dim: int,
                             frame_rate: float, std: float, num_shards: int = 4, fingerprint: Any = None,
                             metadata: dict[str, Any] | Callable[[dict[str, float]], dict[str, Any]] | None = None,
                             process_index: int | None = None, process_count: int | None = None,
                             barrier: Barrier | None = None) -> dict[str, Any] | None:
    """Writes utterances [0, num_examples) into a sharded cache at `path` (resumable) and returns its meta.json.

    `encode_range(start, end)` yields (μ [n_i, latent_dim], speaker, sentence) per utterance in order; `std` is the
    σ-VAE's C_σ (for the σ-sampled moments); `metadata` (a dict, or a function of the moments) goes to meta.json;
    `fingerprint` (JSON) names what produced the latents: shards and a meta.json of another fingerprint are
    rewritten. Every process calls this with the same arguments; with explicit process values and no barrier,
    call process 0 last (it checks every shard and writes meta.json; the others return None).
    """
    if num_examples <= 0:
        raise DataError(f"cannot cache an empty split (num_examples={num_examples})")
    metadata = {} if metadata is None else metadata
    return sharded_records.write_sharded(
        path, SHARD_PREFIX, num_examples=num_examples, num_shards=num_shards, fingerprint=fingerprint,
        write=lambda path, name, start, end, expect: _write_shard(path, name, start, end, encode_range,
                                                                  latent_dim, expect),
        make_meta=lambda path, num_shards, fingerprint, sides, files: _make_meta(
            path, num_examples, latent_dim, frame_rate, std, fingerprint, metadata, sides, files),
        what="audio latent cache", rerun="--mode=encode_audio", check_files=True,
        process_index=process_index, process_count=process_count, barrier=barrier)


@dataclasses.dataclass
class AudioLatents:
    """One split of the cache in memory: μ per utterance (float32 [n_i, C]) and its ids, in corpus order."""

    mu: list[np.ndarray]
    speaker: np.ndarray   # int32 [N]
    sentence: np.ndarray  # int32 [N]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.mu)

    @property
    def frames(self) -> np.ndarray:
        """Latent frames per utterance, int32 [N]."""
        return np.array([len(m) for m in self.mu], np.int32)


def read_audio_latents_meta(cache_dir: str, split: str) -> dict[str, Any]:
    """meta.json of the complete cache `cache_dir/split`; MissingInputError (run encode_audio) otherwise."""
    path = storage.join(cache_dir, split)
    meta = sharded_records.read_json(storage.join(path, META_FILE))
    if meta is None:
        raise MissingInputError(f"audio latent cache not found at {path} (or incomplete): run "
                                f"--mode=encode_audio first")
    absent = [f for f in meta["files"] if not storage.exists(storage.join(path, f))]
    if absent:
        raise MissingInputError(f"audio latent cache at {path} is missing {len(absent)} of its {len(meta['files'])} "
                                f"shard files (first: {absent[0]}): re-run --mode=encode_audio")
    return meta


def audio_latent_files(cache_dir: str, split: str) -> tuple[dict[str, Any], list[str]]:
    """(meta.json, the shard paths in order) of a complete cache split."""
    meta = read_audio_latents_meta(cache_dir, split)
    return meta, [storage.join(cache_dir, split, f) for f in meta["files"]]


def load_audio_latents(cache_dir: str, split: str) -> AudioLatents:
    """The whole split `cache_dir/split` in memory (the embedded corpus at 25 Hz × 16 channels is ≈ 15 MB; at paper
    scale read it as an `AudioLatentSequence`)."""
    meta, files = audio_latent_files(cache_dir, split)
    records = sharded_records.read_all(files)
    if len(records) != meta["count"]:
        raise DataError(f"audio latent cache at {storage.join(cache_dir, split)} holds {len(records)} records but "
                        f"meta.json says {meta['count']}: re-run --mode=encode_audio")
    decoded = [decode_record(r, int(meta["latent_dim"])) for r in records]
    return AudioLatents(mu=[d[0] for d in decoded], speaker=np.array([d[1] for d in decoded], np.int32),
                        sentence=np.array([d[2] for d in decoded], np.int32), meta=meta)


def _shard_frames(path: str, latent_dim: int) -> list[int]:
    """Latent frames per record of the shard at `path`: from its sidecar, else (a cache written before the sidecars
    held them) from the records' headers."""
    side = sharded_records.read_json(sharded_records.sidecar(path)) or {}
    frames = side.get("record_frames")
    if isinstance(frames, list) and len(frames) == side.get("end", -1) - side.get("start", 0):
        return [int(n) for n in frames]
    import grain

    source = grain.sources.ArrayRecordDataSource([path])
    return [decode_record(source[i], latent_dim)[0].shape[0] for i in range(len(source))]


class AudioLatentSequence(collections.abc.Sequence):
    """One cache split as a sequence of μ float32 [n_i, C] in corpus order, each read from its record when indexed
    and not kept: what stays in memory is `frames` (int64 [N], from the shards' sidecars). The TTS documents read
    it (data_pipelines/tts_documents.py): LibriSpeech's train split at 7.5 Hz × 64 channels is ≈ 6.6 GB of μ."""

    def __init__(self, cache_dir: str, split: str):
        import grain

        self.meta, self.files = audio_latent_files(cache_dir, split)
        self.latent_dim = int(self.meta["latent_dim"])
        self.frames = np.asarray([n for f in self.files for n in _shard_frames(f, self.latent_dim)], np.int64)
        self._source = grain.sources.ArrayRecordDataSource(self.files)
        if not len(self._source) == len(self.frames) == self.meta["count"]:
            raise DataError(f"audio latent cache at {storage.join(cache_dir, split)} holds {len(self._source)} "
                            f"records but meta.json says {self.meta['count']}: re-run --mode=encode_audio")

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index):  # int → μ [n, C]; slice → a list of them
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"utterance {index} of {len(self)}")
        return decode_record(self._source[i], self.latent_dim)[0]

    def __repr__(self) -> str:
        return f"AudioLatentSequence({len(self)} utterances, {self.latent_dim} channels)"


class AudioLatentSource:
    """grain random-access source over one cache split: record i → {"latents": float32 [n_i, C], "speaker": int32,
    "sentence": int32, "index": int32} (i is also the utterance's index in the corpus split). Lengths vary: pack
    or pad before batching."""

    def __init__(self, cache_dir: str, split: str):
        import grain

        meta, files = audio_latent_files(cache_dir, split)
        self.cache_dir, self.split, self.meta = cache_dir, split, meta
        self._latent_dim = int(meta["latent_dim"])
        self._source = grain.sources.ArrayRecordDataSource(files)
        if len(self._source) != meta["count"]:
            raise DataError(f"audio latent cache at {storage.join(cache_dir, split)} holds {len(self._source)} "
                            f"records but meta.json says {meta['count']}: re-run --mode=encode_audio")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        mu, speaker, sentence = decode_record(self._source[index], self._latent_dim)
        return {"latents": mu, "speaker": np.int32(speaker), "sentence": np.int32(sentence),
                "index": np.int32(index)}

    def __repr__(self) -> str:  # grain keys iterator checkpoints on this string: no object ids
        return f"AudioLatentSource(cache_dir={self.cache_dir!r}, split={self.split!r}, len={len(self)})"
