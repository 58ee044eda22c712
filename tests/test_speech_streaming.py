"""The speech stages read a split without holding its audio (docs/experiments.md §11.1): `load_corpus` keeps the text,
ids and lengths from the shards' sidecars and decodes an utterance only when it is indexed; the text stages (the BPE's
training text, the TTS documents) decode none; the TTS documents read the latent cache a document at a time; the
judges train and score a batch at a time, bit-identical to training on the whole split in a list, with a bounded
number of decoded samples alive at once. On a synthetic corpus written in the corpus format (no espeak-ng needed).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import weakref

import jax
import numpy as np
import pytest

from configs import tts
from data_pipelines import audio_latents, sharded_records, speech_corpus
from data_pipelines.tts_documents import SpeechDocuments, TTSDocumentSource, load_speech_documents
from latent_lm import experiment
from latent_lm.evaluation import speech_judges as sj
from latent_lm.text.tokenizer import train_tokenizer

RATE = 8000
HOP = 320  # 25 latent frames per second at 8 kHz
LATENT_DIM = 3
SYMBOLS = ("a", "i", "u", "ʃ", "ŋ", "ɛː")
COUNTS = {"train": 48, "test_sentences": 6, "test_speakers": 6}


def _utterance(rng: np.random.Generator, speaker: int) -> tuple[np.ndarray, str]:
    """0.5–1.2 s of a speaker's tone with noise (int16), and 3–5 'phonemes' in one or two words."""
    t = np.arange(int(rng.uniform(0.5, 1.2) * RATE)) / RATE
    wave = np.sin(2 * np.pi * (120 + 40 * speaker) * t) + 0.1 * rng.standard_normal(len(t))
    phonemes = "".join(SYMBOLS[int(k)] for k in rng.integers(0, len(SYMBOLS), int(rng.integers(3, 6))))
    return np.round(6000 * wave).astype(np.int16), phonemes[:2] + " " + phonemes[2:]


def _render(job: tuple) -> bytes:
    return speech_corpus.encode_record(*job)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    """A run directory holding a corpus (8 speakers, 6 of them training) and an audio latent cache of random μ, in
    the formats the stages write, with a tiny phoneme BPE."""
    root = str(tmp_path_factory.mktemp("streaming") / "run")
    corpus = f"{root}/speech_corpus"
    os.makedirs(corpus)
    rng = np.random.default_rng(0)
    plan, sentences = {}, []
    for split, n in COUNTS.items():
        speakers = range(6, 8) if split == "test_speakers" else range(6)
        plan[split] = []
        for k in range(n):
            audio, phonemes = _utterance(rng, speakers[k % len(speakers)])
            plan[split].append((audio, f"sentence {len(sentences)}", phonemes, speakers[k % len(speakers)],
                                len(sentences)))
            sentences.append(dict(id=len(sentences), text=f"sentence {len(sentences)}", held_out=split != "train"))
    speech_corpus.write_tables(corpus, [dict(id=i, held_out=i >= 6) for i in range(8)], sentences)
    splits = speech_corpus.write_splits(corpus, plan, _render, records_per_shard=16, fingerprint="synthetic",
                                        sample_rate=RATE, workers=0, log=lambda _: None)
    with open(f"{corpus}/{speech_corpus.META_FILE}", "w") as f:
        json.dump({"fingerprint": "synthetic", "sample_rate": RATE, "splits": splits}, f)
    for split in COUNTS:
        frames = [max(1, -(-len(job[0]) // HOP)) for job in plan[split]]
        mus = [np.random.default_rng([1, i]).normal(size=(n, LATENT_DIM)).astype(np.float32)
               for i, n in enumerate(frames)]
        audio_latents.write_audio_latent_cache(
            f"{root}/audio_latents/{split}", num_examples=len(mus), latent_dim=LATENT_DIM, frame_rate=RATE / HOP,
            std=0.5, num_shards=3, fingerprint="synthetic", process_index=0, process_count=1,
            encode_range=lambda a, b, mus=mus, split=split: ((mus[i], plan[split][i][3], i) for i in range(a, b)))
    train_tokenizer([job[2] for job in plan["train"]], 300, 1).save(f"{root}/text")
    return root


def _eager(corpus: str, split: str) -> list[dict]:
    """What `load_corpus` held before it streamed: every record decoded."""
    _, files = speech_corpus._split_files(corpus, split)
    return [speech_corpus.decode_record(r) for r in sharded_records.read_all(files)]


def _no_audio(*_):
    raise AssertionError("audio decoded")


def _strip_sidecars(directory: str, key: str) -> None:
    """Removes `key` from every shard sidecar in `directory`: a corpus or cache written before they held it."""
    for name in os.listdir(directory):
        if name.endswith(".json") and "-of-" in name:
            side = json.load(open(f"{directory}/{name}"))
            side.pop(key)
            json.dump(side, open(f"{directory}/{name}", "w"))


@pytest.mark.parametrize("sidecars", ["with columns", "before columns"])
def test_corpus_reader_keeps_metadata_and_decodes_audio_when_indexed(workdir, tmp_path, monkeypatch, sidecars):
    corpus = f"{workdir}/speech_corpus"
    if sidecars == "before columns":  # the headers are scanned instead: the same metadata, still no decode
        corpus = str(tmp_path / "old")
        shutil.copytree(f"{workdir}/speech_corpus", corpus)
        _strip_sidecars(corpus, "utterances")
    for split in speech_corpus.SPLITS:
        eager = _eager(corpus, split)
        with monkeypatch.context() as m:
            m.setattr(speech_corpus, "decode_audio", _no_audio)
            s = speech_corpus.load_corpus(corpus, split)
        assert len(s) == len(eager) == COUNTS[split] and s.sample_rate == RATE
        assert s.text == [e["text"] for e in eager] and s.phonemes == [e["phonemes"] for e in eager]
        np.testing.assert_array_equal(s.speaker, [e["speaker"] for e in eager])
        np.testing.assert_array_equal(s.sentence, [e["sentence"] for e in eager])
        np.testing.assert_array_equal(s.samples, [len(e["audio"]) for e in eager])
        np.testing.assert_array_equal(s.durations, [len(e["audio"]) / RATE for e in eager])
        for i, e in enumerate(eager):
            np.testing.assert_array_equal(s.audio[i], e["audio"])
        rows = [3, 0, 3, len(eager) - 1]
        for got, i in zip(s.audio.take(rows), rows):
            np.testing.assert_array_equal(got, eager[i]["audio"])
        np.testing.assert_array_equal(s.audio[-1], eager[-1]["audio"])
        assert [len(a) for a in s.audio[1:3]] == [len(e["audio"]) for e in eager[1:3]]
        with pytest.raises(IndexError):
            s.audio[len(eager)]


def test_text_stages_never_decode_audio_and_documents_match_the_eager_ones(workdir, tmp_path, monkeypatch):
    """The BPE's training text and the TTS documents read no audio; the documents, whose latents are read when
    built, are those of the whole split in memory (lists), also from a cache written before its sidecars held the
    frames per record."""
    from latent_lm.text.tokenizer import TextTokenizer

    train = _eager(f"{workdir}/speech_corpus", "train")
    monkeypatch.setattr(speech_corpus, "decode_audio", _no_audio)
    config = tts.get_config("tiny=1")
    assert experiment._tokenizer_texts(config, workdir) == [e["phonemes"] for e in train]
    tok = TextTokenizer.load(f"{workdir}/text")
    lazy = load_speech_documents(f"{workdir}/speech_corpus", f"{workdir}/audio_latents", "train", tok, 160)
    assert not isinstance(lazy.mu, list) and lazy.latent_dim == LATENT_DIM
    cache = audio_latents.load_audio_latents(f"{workdir}/audio_latents", "train")
    eager = SpeechDocuments([np.asarray(i, np.int32) for i in tok.encode_batch([e["phonemes"] for e in train])],
                            cache.mu, np.array([e["speaker"] for e in train], np.int32), [e["text"] for e in train],
                            160)
    np.testing.assert_array_equal(lazy.frames, eager.frames)
    for a, b in zip(lazy.ids, eager.ids):
        np.testing.assert_array_equal(a, b)
    new, old = TTSDocumentSource(lazy, seed=3), TTSDocumentSource(eager, seed=3)
    for i in range(2 * len(train)):
        a, b = new.document(i), old.document(i)
        assert a["kind"] == b["kind"]
        for k in ("tokens", "is_latent", "latents"):
            np.testing.assert_array_equal(a[k], b[k])
    shutil.copytree(f"{workdir}/audio_latents/train", tmp_path / "train")
    _strip_sidecars(str(tmp_path / "train"), "record_frames")
    np.testing.assert_array_equal(audio_latents.AudioLatentSequence(str(tmp_path), "train").frames, eager.frames)


class _CountingAudio:
    """A lazy reader (lengths, take) that counts the decoded samples alive at once (weakref finalizers)."""

    def __init__(self, audio: speech_corpus.SpeechAudio):
        self.audio, self.lengths = audio, audio.lengths
        self.live = self.peak = self.decoded = 0
        self._lock = threading.Lock()

    def _freed(self, n: int) -> None:
        with self._lock:
            self.live -= n

    def take(self, rows):
        out = self.audio.take(rows)
        with self._lock:
            for a in out:
                self.live += len(a)
                self.decoded += len(a)
                weakref.finalize(a, self._freed, len(a))
            self.peak = max(self.peak, self.live)
        return out


RECOGNISER = dict(n_fft=256, hop=80, n_mels=16, conv_channels=8, conv_layers=2, dim=8, depth=1, num_heads=2,
                  mlp_ratio=2, dropout=0.0, spec_time_masks=1, spec_time_width=3, spec_freq_masks=0, steps=4,
                  batch_size=4, lr=3e-3, warmup_steps=1, pad_seconds=0.5, eval_batch_size=4, norm_examples=8,
                  fast_compile=True)
SPEAKER = dict(n_fft=256, hop=80, n_mels=16, channels=8, conv_layers=2, strided_layers=1, embed_dim=8,
               crop_seconds=0.4, steps=4, batch_size=4, lr=3e-3, warmup_steps=1, pad_seconds=0.5, eval_batch_size=4,
               norm_examples=8, fast_compile=True)


def _same(a: sj.Bundle, b: sj.Bundle) -> bool:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)),
                                          (a["params"], a["norm"]), (b["params"], b["norm"])))
    return all(leaves)


def _judge_on_both(workdir: str, fit, labels: str, config: dict) -> tuple[sj.Bundle, speech_corpus.SpeechSplit]:
    """`fit` on the lazy train split and on its audio in a list: the same bundle; at most a few batches of decoded
    samples alive at once (the prefetch threads' batches of 4, and the one a step reads)."""
    corpus = f"{workdir}/speech_corpus"
    train = speech_corpus.load_corpus(corpus, "train")
    whole = [e["audio"] for e in _eager(corpus, "train")]
    bound = (sj.PREFETCH_THREADS + 1) * 4 * int(train.samples.max())
    assert bound < train.samples.sum() / 2
    counted = _CountingAudio(train.audio)
    lazy = fit(counted, getattr(train, labels), RATE, config, seed=0)
    assert _same(lazy, fit(whole, getattr(train, labels), RATE, config, seed=0))
    assert counted.decoded >= config["steps"] * 4 * train.samples.min()  # every step read its batch
    assert 0 < counted.peak <= bound, (counted.peak, bound)
    return lazy, speech_corpus.load_corpus(corpus, "test_speakers")


def test_speaker_model_trains_and_scores_a_batch_at_a_time_as_on_the_whole_split(workdir):
    bundle, test = _judge_on_both(workdir, sj.train_speaker_model, "speaker", SPEAKER)
    counted = _CountingAudio(test.audio)
    np.testing.assert_array_equal(sj.speaker_embeddings(bundle, counted), sj.speaker_embeddings(bundle, list(test.audio)))
    assert counted.peak <= 4 * int(test.samples.max())  # one batch of eval_batch_size


@pytest.mark.slow  # the CTC step's compile: ≈ 15–25 s here
def test_recogniser_trains_and_scores_a_batch_at_a_time_as_on_the_whole_split(workdir):
    bundle, test = _judge_on_both(workdir, sj.train_recogniser, "phonemes", RECOGNISER)
    counted = _CountingAudio(test.audio)
    assert sj.transcribe(bundle, counted) == sj.transcribe(bundle, list(test.audio))
    assert counted.peak <= 4 * int(test.samples.max())
