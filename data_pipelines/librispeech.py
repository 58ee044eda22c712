"""LibriSpeech (or LibriTTS) as the speech corpus at paper scale (docs/method.md §12.1, docs/experiments.md §11.1).

Reads a tfds dataset prepared once as ArrayRecord (`tfds build librispeech --config=default
--file_format=array_record --data_dir=D`), resamples it to `sample_rate` (24 kHz at paper scale;
`scipy.signal.resample_poly`), phonemises each transcript with espeak-ng (`latent_lm.audio.espeak`, accent `accent`)
and writes the embedded corpus's format (data_pipelines/speech_corpus.py: the same records, speakers.json,
sentences.json, shards and meta.json), so every speech stage reads it unchanged. `config.speech.source =
"librispeech"` selects it (`speech_corpus.build`).

Reading. tfds's `Audio` feature imports TensorFlow even to be constructed, so `tfds.data_source` cannot open an audio
dataset without it. The prepared files need none: `TfdsSpeechSource` reads a split through
data_pipelines/tfds_records.py (the split's files from the builder directory's dataset_info.json, each record parsed
with tfds's NumPy example parser against the fields used here, `DATASETS`). Preparing the dataset does need
TensorFlow (and ffmpeg for LibriSpeech's FLAC files), on any machine; the corpus build only reads.

Splits (by speaker id, as the embedded corpus's):
  test_speakers   the utterances of `test_splits` (LibriSpeech test-clean: the paper's evaluation set, its Table 4)
                  lasting `test_seconds` (4–10 s, the zero-shot TTS subset); their speakers are held out: any of
                  their utterances in `train_splits` is dropped
  test_sentences  a seeded `held_out_utterances` fraction of the other speakers' utterances lasting `test_seconds`
                  (each LibriSpeech utterance is its own sentence: held-out sentences of training voices)
  train           the rest of those speakers' utterances lasting `train_seconds`
`max_utterances.<split>` > 0 keeps a seeded subset of that many. Within a split, utterances keep the tfds order
(`train_splits` in the order given). Speaker ids are positions in speakers.json ({id, source_id, held_out}, sorted
by the dataset's speaker id); sentence ids are positions in sentences.json ({id, text, source, utterance, index,
speaker, split, held_out}: the tfds split, the dataset's utterance id, its record index). Transcripts in capitals
(LibriSpeech's) are lower-cased before phonemisation and stored so: espeak-ng spells a word in capitals out as
letters ("US" → "U S").

Build. An index pass reads every record's speaker, id, transcript and length (in `workers` processes), from which
the tables are planned and written (with tables.json naming their fingerprint, so a resumed build skips the pass);
then the shards are written as the embedded corpus's (`speech_corpus.write_splits`): a re-run with the same
fingerprint is a no-op and a killed build resumes at the first missing shard. The fingerprint covers the content
config, the tfds dataset's identity (name, version, per-split record counts) and the espeak-ng version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from data_pipelines import sharded_records, speech_corpus
from data_pipelines.tfds_records import TfdsRecords, field, text
from latent_lm import storage
from latent_lm.audio import espeak
from latent_lm.errors import ConfigError, DataError

SPLITS = speech_corpus.SPLITS
CORPUS_VERSION = 1  # bump when the content for a given config and dataset changes
TABLES_FILE = "tables.json"  # {"fingerprint"} of the speakers.json and sentences.json beside it
INDEX_CHUNK = 256  # records per index task


@dataclasses.dataclass(frozen=True)
class TfdsSpeech:
    """What is read of a tfds speech dataset: its builder directory under the data dir (name/config), the audio's
    native rate and stored dtype, and the transcript's field."""

    builder: str
    native_rate: int
    dtype: Any
    text_key: str


DATASETS = {
    "librispeech": TfdsSpeech("librispeech/default", 16_000, np.int16, "text"),
    "libritts": TfdsSpeech("libritts", 24_000, np.int64, "text_normalized"),
}


def default_config() -> ml_collections.ConfigDict:
    """LibriSpeech's 960 h of training speech, test-clean's 4–10 s utterances as the held-out speakers, at 24 kHz."""
    c = ml_collections.ConfigDict()
    c.source = "librispeech"
    c.dataset = "librispeech"       # or "libritts" (DATASETS)
    c.data_dir = ""                 # the tfds data dir holding the prepared dataset ("": tfds's default)
    c.train_splits = ("train_clean100", "train_clean360", "train_other500")
    c.test_splits = ("test_clean",)
    c.sample_rate = 24000
    c.accent = "gmw/en-US"          # espeak-ng's accent for the phonemes
    c.held_out_utterances = 0.005   # of the training speakers' `test_seconds` utterances → test_sentences
    c.train_seconds = (1.0, 20.0)
    c.test_seconds = (4.0, 10.0)
    c.max_utterances = ml_collections.ConfigDict({s: 0 for s in SPLITS})  # 0: all
    c.seed = 0
    c.records_per_shard = 1000
    c.workers = 16                  # index and render processes (spawned); ≤ 1 works in this process
    return c


# ---------------------------------------------------------------------------------------------------------------
# Reading the prepared tfds dataset


def _dataset(name: str) -> TfdsSpeech:
    if name not in DATASETS:
        raise ConfigError(f"speech.dataset={name!r} is not supported; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def _fields(spec: TfdsSpeech) -> dict[str, Any]:
    """The features read of each record; the others (LibriSpeech's chapter_id, …) are skipped by the parser."""
    return {"speech": field((None,), spec.dtype), spec.text_key: field((), np.str_),
            "speaker_id": field((), np.int64), "id": field((), np.str_)}


def _records(name: str, splits: Sequence[str], data_dir: str) -> TfdsRecords:
    """The prepared dataset's `splits`; a missing dataset names `tfds build <name>` and `speech.data_dir`."""
    spec = _dataset(name)
    return TfdsRecords(spec.builder, splits, _fields(spec), data_dir, config_key="speech.data_dir")


def source_identity(name: str, data_dir: str, splits: Sequence[str]) -> dict[str, Any]:
    """{dataset, version, split: record count}: what the fingerprint knows of the prepared dataset (keyed by the
    speech.dataset name, as corpora built before tfds_records.py were: the same data keeps its fingerprint)."""
    identity = _records(name, splits, data_dir).identity()
    return {"dataset": name, "version": identity["version"], "splits": identity["splits"]}


class TfdsSpeechSource:
    """Random access to one split of a prepared tfds speech dataset: record i → {"speech": int [T] at the native
    rate, "text": str, "speaker_id": int, "id": str}. Needs no TensorFlow (module docstring)."""

    def __init__(self, name: str, split: str, data_dir: str = ""):
        self.name, self.split, self.spec = name, split, _dataset(name)
        self._records = _records(name, (split,), data_dir)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._records[index]
        speech = np.asarray(ex["speech"])
        if speech.ndim != 1:
            raise DataError(f"{self.name}/{self.split} record {index}: expected mono audio [T], got {speech.shape}")
        return {"speech": speech, "text": text(ex[self.spec.text_key]), "speaker_id": int(ex["speaker_id"]),
                "id": text(ex["id"])}


_SOURCES: dict[tuple[str, str, str], TfdsSpeechSource] = {}  # per process: workers open each split once


def _open(name: str, split: str, data_dir: str) -> TfdsSpeechSource:
    key = (name, split, data_dir)
    if key not in _SOURCES:
        _SOURCES[key] = TfdsSpeechSource(name, split, data_dir)
    return _SOURCES[key]


# ---------------------------------------------------------------------------------------------------------------
# Index and plan


@dataclasses.dataclass(frozen=True)
class _Chunk:
    name: str
    data_dir: str
    split: str
    start: int
    end: int


def _index_chunk(chunk: _Chunk) -> list[tuple[int, str, str, int]]:
    """(speaker_id, id, transcript, samples) of records [start, end) of one split."""
    source = _open(chunk.name, chunk.split, chunk.data_dir)
    out = []
    for i in range(chunk.start, chunk.end):
        r = source[i]
        out.append((r["speaker_id"], r["id"], r["text"], len(r["speech"])))
    return out


def normalize_text(text: str) -> str:
    """The stored and phonemised transcript: one space between words; lower-cased when written in capitals."""
    text = " ".join(text.split())
    return text.lower() if text.isupper() else text


def _within(samples: int, rate: int, seconds: Sequence[float]) -> bool:
    return float(seconds[0]) <= samples / rate <= float(seconds[1])


def _subset(rng: np.random.Generator, items: list, cap: int) -> list:
    """A seeded subset of `cap` items in their order (all when cap is 0 or more than there are)."""
    if cap <= 0 or cap >= len(items):
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=cap, replace=False))]


def plan_tables(config: ml_collections.ConfigDict,
                index: dict[str, list[tuple[int, str, str, int]]]) -> tuple[list[dict], list[dict]]:
    """(speakers, sentences) tables of the corpus (module docstring) from the index of every split read."""
    rate = _dataset(config.dataset).native_rate
    rng = np.random.default_rng([int(config.seed), 4])
    held_speakers = {r[0] for s in config.test_splits for r in index[s]}
    rows: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}  # (tfds split, record index)
    candidates = []
    for split in config.test_splits:
        rows["test_speakers"] += [(split, i) for i, r in enumerate(index[split])
                                  if _within(r[3], rate, config.test_seconds)]
    for split in config.train_splits:
        candidates += [(split, i) for i, r in enumerate(index[split]) if r[0] not in held_speakers]
    testable = [k for k, (split, i) in enumerate(candidates) if _within(index[split][i][3], rate, config.test_seconds)]
    fraction = float(config.held_out_utterances)
    count = min(len(testable), max(1, int(round(fraction * len(testable))))) if testable else 0
    held = set(int(testable[k]) for k in rng.choice(len(testable), size=count, replace=False)) if count else set()
    rows["test_sentences"] = [c for k, c in enumerate(candidates) if k in held]
    rows["train"] = [c for k, c in enumerate(candidates)
                     if k not in held and _within(index[c[0]][c[1]][3], rate, config.train_seconds)]
    for split in SPLITS:
        rows[split] = _subset(rng, rows[split], int(config.max_utterances[split]))
        if not rows[split]:
            raise DataError(f"the {config.dataset} corpus has no {split} utterances: check speech.train_splits="
                            f"{tuple(config.train_splits)}, test_splits={tuple(config.test_splits)} and the "
                            f"train_seconds / test_seconds ranges")

    source_ids = sorted({index[s][i][0] for split in SPLITS for s, i in rows[split]})
    speaker_of = {sid: k for k, sid in enumerate(source_ids)}
    speakers = [dict(id=k, source_id=int(sid), held_out=sid in held_speakers) for k, sid in enumerate(source_ids)]
    sentences = []
    for split in SPLITS:
        for s, i in rows[split]:
            spk, utt, text, _ = index[s][i]
            sentences.append(dict(id=len(sentences), text=normalize_text(text), source=s, utterance=utt, index=i,
                                  speaker=speaker_of[spk], split=split, held_out=split != "train"))
    return speakers, sentences


# ---------------------------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class _Job:
    name: str
    data_dir: str
    split: str  # the tfds split
    index: int
    text: str
    speaker: int
    sentence: int
    sample_rate: int
    accent: str


def render(job: _Job) -> bytes:
    """One utterance's record (speech_corpus.RECORD_FORMAT): resampled to `sample_rate`, with its transcript's
    phonemes in `accent` (a pure function of the job and the prepared dataset)."""
    source = _open(job.name, job.split, job.data_dir)
    speech = source[job.index]["speech"]
    native = np.clip(speech, -32768, 32767).astype(np.int16)
    audio = speech_corpus.resample(native, source.spec.native_rate, job.sample_rate)
    return speech_corpus.encode_record(audio, job.text, espeak.phonemes(job.text, job.accent), job.speaker,
                                       job.sentence)


# ---------------------------------------------------------------------------------------------------------------
# Building


def _check_config(config: ml_collections.ConfigDict) -> None:
    _dataset(config.dataset)
    if int(config.sample_rate) < 8000:
        raise ConfigError(f"speech.sample_rate must be at least 8000 Hz, got {config.sample_rate}")
    if not config.train_splits or not config.test_splits:
        raise ConfigError("speech.train_splits and speech.test_splits must each name at least one tfds split")
    if set(config.train_splits) & set(config.test_splits):
        raise ConfigError(f"speech.train_splits and test_splits share "
                          f"{sorted(set(config.train_splits) & set(config.test_splits))}")
    if not 0.0 < float(config.held_out_utterances) < 1.0:
        raise ConfigError(f"speech.held_out_utterances must be in (0, 1), got {config.held_out_utterances}")
    for key in ("train_seconds", "test_seconds"):
        low, high = (float(v) for v in config[key])
        if not 0.0 <= low <= high:
            raise ConfigError(f"speech.{key}={tuple(config[key])} must be (min, max) seconds with 0 ≤ min ≤ max")
    if int(config.records_per_shard) < 1:
        raise ConfigError(f"speech.records_per_shard must be positive, got {config.records_per_shard}")


def _content_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that change the corpus's bytes (not `data_dir` nor `workers`)."""
    return {"dataset": config.dataset, "train_splits": list(config.train_splits),
            "test_splits": list(config.test_splits), "sample_rate": int(config.sample_rate),
            "accent": config.accent, "held_out_utterances": float(config.held_out_utterances),
            "train_seconds": [float(v) for v in config.train_seconds],
            "test_seconds": [float(v) for v in config.test_seconds],
            "max_utterances": {s: int(config.max_utterances[s]) for s in SPLITS}, "seed": int(config.seed),
            "records_per_shard": int(config.records_per_shard)}


def _fingerprint(content: dict[str, Any], identity: dict[str, Any], espeak_version: str) -> str:
    blob = json.dumps({"corpus_version": CORPUS_VERSION, "espeak": espeak_version, "config": content,
                       "source": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _index(config: ml_collections.ConfigDict, counts: dict[str, int], workers: int,
           log) -> dict[str, list[tuple[int, str, str, int]]]:
    """(speaker_id, id, transcript, samples) of every record of the splits `counts` names, in order."""
    chunks = [_Chunk(config.dataset, config.data_dir, split, a, min(a + INDEX_CHUNK, n))
              for split, n in counts.items() for a in range(0, n, INDEX_CHUNK)]
    index: dict[str, list] = {split: [] for split in counts}
    t = time.perf_counter()
    with speech_corpus.worker_pool(workers) as pool:
        for chunk, rows in zip(chunks, speech_corpus.pool_map(_index_chunk, chunks, pool, chunksize=1)):
            index[chunk.split] += rows
    log(f"speech corpus: indexed {sum(len(v) for v in index.values())} {config.dataset} utterances in "
        f"{time.perf_counter() - t:.1f}s")
    return index


def _tables(out_dir: str, config: ml_collections.ConfigDict, identity: dict[str, Any], fingerprint: str,
            workers: int, log) -> tuple[list[dict], list[dict]]:
    """The speakers and sentences tables: those written for `fingerprint` by an earlier (killed) build, or planned
    from a new index pass and written."""
    if (sharded_records.read_json(storage.join(out_dir, TABLES_FILE)) or {}).get("fingerprint") == fingerprint:
        return speech_corpus.load_speakers(out_dir), speech_corpus.load_sentences(out_dir)
    speakers, sentences = plan_tables(config, _index(config, identity["splits"], workers, log))
    speech_corpus.write_tables(out_dir, speakers, sentences)
    storage.write_json_atomic(storage.join(out_dir, TABLES_FILE), {"fingerprint": fingerprint})
    return speakers, sentences


def build_corpus(out_dir: str, config: ml_collections.ConfigDict | None = None, log=print) -> dict[str, Any]:
    """Builds the LibriSpeech/LibriTTS corpus of `config` into `out_dir` (module docstring) and returns its meta.json;
    a no-op when it is complete with the same fingerprint, a resume when some of its shards are there."""
    config = default_config() if config is None else config
    _check_config(config)
    started = time.perf_counter()
    identity = source_identity(config.dataset, config.data_dir,
                               tuple(config.train_splits) + tuple(config.test_splits))
    espeak.find_library()  # the one-line install hint before any work
    content = _content_config(config)
    espeak_version = espeak.version()
    fingerprint = _fingerprint(content, identity, espeak_version)
    out_dir, meta = speech_corpus.start_build(out_dir, fingerprint)
    if meta is not None:
        return meta

    workers = int(config.workers)
    speakers, sentences = _tables(out_dir, config, identity, fingerprint, workers, log)
    plan = {split: [_Job(config.dataset, config.data_dir, s["source"], s["index"], s["text"], s["speaker"], s["id"],
                         int(config.sample_rate), config.accent) for s in sentences if s["split"] == split]
            for split in SPLITS}
    splits = speech_corpus.write_splits(out_dir, plan, render, records_per_shard=int(config.records_per_shard),
                                        fingerprint=fingerprint, sample_rate=int(config.sample_rate),
                                        workers=workers, log=log)
    meta = {"fingerprint": fingerprint, "corpus_version": CORPUS_VERSION, "source": "librispeech",
            "dataset": identity, "espeak_version": espeak_version, "espeak_source": espeak.find_library().source,
            "sample_rate": int(config.sample_rate), "record_format": speech_corpus.RECORD_FORMAT, "splits": splits,
            "num_speakers": len(speakers), "num_sentences": len(sentences), "config": content}
    storage.write_json_atomic(storage.join(out_dir, speech_corpus.META_FILE), meta, indent=2)  # last
    log(f"speech corpus: {config.dataset} built in {time.perf_counter() - started:.1f}s ({workers} workers)")
    return meta
