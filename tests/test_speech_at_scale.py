"""Speech at paper scale (docs/experiments.md §11): the LibriSpeech corpus (data_pipelines/librispeech.py) built by the
build_corpus stage from a tfds dataset prepared here, offline, in tfds's own ArrayRecord format (tfds's serializer and
dataset_info proto), and `configs/tts.py:scale=paper`, which validates and whose train step lowers in the planner.

tfds's `Audio` feature needs TensorFlow to be constructed, so neither `tfds.data_source` nor `tfds.testing.mock_data`
can open an audio dataset here; the prepared files are what a `tfds build librispeech --file_format=array_record`
leaves, and the corpus reads exactly those (the module docstring says how).
"""

import math
import os

import numpy as np
import pytest
from scipy.signal import resample_poly

from configs import tts
from data_pipelines import librispeech, speech_corpus
from latent_lm import experiment, speech_stages
from latent_lm.audio import espeak
from latent_lm.config_validation import validate
from latent_lm.errors import ConfigError, MissingInputError
from latent_lm.planning import plan_memory
from conftest import ESPEAK_PROBLEM, requires_espeak

RATE = 16_000  # LibriSpeech's
WORDS = ("the red cat sat on a mat", "we walked to the old mill by the river", "she sold seven green apples",
         "a quiet morning in the small village", "they painted the blue door again", "he read the letter twice")




def _utterance(rng, speaker: int, seconds: float) -> np.ndarray:
    """A voice-like tone: the speaker's pitch, a wobble, noise; int16 at 16 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 90 + 15 * (speaker % 7)
    wave = np.sin(2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(len(t))
    return np.round(8000 * wave).astype(np.int16)


def prepare_librispeech(data_dir: str, splits: dict[str, list[tuple[int, float]]], seed: int = 0) -> None:
    """Writes `librispeech/default/2.1.1/` under `data_dir` as `tfds build --file_format=array_record` does:
    tfds-serialized examples {speech int16 [T], text, speaker_id, chapter_id, id} and dataset_info.json. `splits`:
    {tfds split: [(speaker id, seconds)]}; transcripts in capitals, as LibriSpeech's."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from google.protobuf import json_format
    from tensorflow_datasets.core import example_serializer, naming
    from tensorflow_datasets.core.features import feature as feature_lib
    from tensorflow_datasets.core.proto import dataset_info_pb2

    builder_dir = os.path.join(data_dir, "librispeech", "default", "2.1.1")
    os.makedirs(builder_dir)
    serializer = example_serializer.ExampleSerializer({
        "speech": feature_lib.TensorInfo(shape=(None,), dtype=np.int16),
        "text": feature_lib.TensorInfo(shape=(), dtype=np.str_),
        "speaker_id": feature_lib.TensorInfo(shape=(), dtype=np.int64),
        "chapter_id": feature_lib.TensorInfo(shape=(), dtype=np.int64),
        "id": feature_lib.TensorInfo(shape=(), dtype=np.str_)})
    info = dataset_info_pb2.DatasetInfo(name="librispeech", config_name="default", version="2.1.1",
                                        file_format="array_record")
    rng = np.random.default_rng(seed)
    for split, rows in splits.items():
        template = naming.ShardedFileTemplate(data_dir=builder_dir, dataset_name="librispeech", split=split,
                                              filetype_suffix="array_record")
        writer = ArrayRecordWriter(os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
        for i, (speaker, seconds) in enumerate(rows):
            writer.write(serializer.serialize_example({
                "speech": _utterance(rng, speaker, seconds), "text": WORDS[(i + speaker) % len(WORDS)].upper(),
                "speaker_id": speaker, "chapter_id": 7, "id": f"{speaker}-7-{i:04d}"}))
        writer.close()
        info.splits.append(dataset_info_pb2.SplitInfo(name=split, shard_lengths=[len(rows)], num_bytes=0))
    with open(os.path.join(builder_dir, "dataset_info.json"), "w") as f:
        f.write(json_format.MessageToJson(info))


# Training speakers 1000–1003 (≤ 4.5 s: some are test_sentences candidates), held-out speakers 2000–2001 (test-clean:
# one 2 s utterance too short for the 4–10 s subset), and one utterance of a held-out speaker in the train split.
SPLITS = {"train_clean100": [(1000 + k % 4, 1.2 + 0.3 * k) for k in range(12)] + [(2000, 2.0)],
          "test_clean": [(2000, 4.2), (2001, 4.5), (2000, 4.8), (2001, 2.0), (2001, 5.0)]}


def paper_config(data_dir: str):
    c = tts.get_config("scale=paper")
    c.speech.update(dict(data_dir=data_dir, train_splits=("train_clean100",), held_out_utterances=0.2,
                         records_per_shard=4, workers=1))
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The build_corpus stage of the paper config on the prepared LibriSpeech: (config, workdir, summary, log)."""
    if ESPEAK_PROBLEM is not None:
        pytest.skip(ESPEAK_PROBLEM)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_librispeech(data_dir, SPLITS)
    config, workdir = paper_config(data_dir), str(tmp_path_factory.mktemp("run"))
    log: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speech_stages, "_log", log.append)
        summary = speech_stages.build_corpus(config, workdir, None, None)
    return config, workdir, summary, log


@requires_espeak
def test_librispeech_corpus_splits_by_speaker(corpus):
    """test_speakers: test-clean's 4–10 s utterances; their speakers never in train (a train-split utterance of one is
    dropped); test_sentences: held-out utterances of training speakers; the tables index every record."""
    config, workdir, summary, log = corpus
    cdir = speech_stages.corpus_dir(config, workdir)
    splits = {s: speech_corpus.load_corpus(cdir, s) for s in speech_corpus.SPLITS}
    speakers, sentences = speech_corpus.load_speakers(cdir), speech_corpus.load_sentences(cdir)
    source_id = {s["id"]: s["source_id"] for s in speakers}
    assert [s["id"] for s in speakers] == list(range(len(speakers)))
    assert [s["source_id"] for s in speakers] == [1000, 1001, 1002, 1003, 2000, 2001]
    assert {source_id[int(k)] for k in splits["test_speakers"].speaker} == {2000, 2001}
    assert {source_id[int(k)] for k in splits["train"].speaker} == {1000, 1001, 1002, 1003}
    assert set(splits["test_sentences"].speaker) <= set(splits["train"].speaker)
    assert len(splits["test_speakers"]) == 4
    assert len(splits["test_sentences"]) == 1  # 0.2 of the two 4–10 s ones, at least 1
    assert len(splits["train"]) == 11  # 12 minus the held-out one; 2000's train utterance dropped
    assert all(4.0 <= d <= 10.0 for s in ("test_speakers", "test_sentences") for d in splits[s].durations)
    assert summary["corpus_utterances"] == 16 and len(sentences) == 16
    ids = np.concatenate([splits[s].sentence for s in speech_corpus.SPLITS])
    assert sorted(ids) == list(range(16))
    assert all(sentences[i]["split"] == s for s in speech_corpus.SPLITS for i in splits[s].sentence)
    assert any("indexed 18 librispeech utterances" in line for line in log)


@requires_espeak
def test_records_are_resampled_and_phonemised(corpus):
    """Each record: the tfds audio resampled 16 → 24 kHz (resample_poly), the transcript lower-cased, its espeak-ng
    phonemes in the configured accent; the grain source reads the same records."""
    config, workdir, _, _ = corpus
    cdir = speech_stages.corpus_dir(config, workdir)
    test = speech_corpus.load_corpus(cdir, "test_speakers")
    entry = speech_corpus.load_sentences(cdir)[int(test.sentence[0])]
    source = librispeech.TfdsSpeechSource("librispeech", entry["source"], config.speech.data_dir)
    raw = source[entry["index"]]
    assert raw["id"] == entry["utterance"] and raw["text"].isupper()
    expected = np.clip(np.round(resample_poly(raw["speech"].astype(np.float64), 3, 2)), -32768, 32767) / 32768.0
    assert test.sample_rate == 24_000 and len(test.audio[0]) == math.ceil(len(raw["speech"]) * 3 / 2)
    np.testing.assert_array_equal(test.audio[0], expected.astype(np.float32))
    assert test.text[0] == raw["text"].lower() == entry["text"]
    assert test.phonemes[0] == espeak.phonemes(test.text[0], config.speech.accent) and " " in test.phonemes[0]
    grain_source = speech_corpus.SpeechCorpusSource(cdir, "test_speakers")
    np.testing.assert_array_equal(grain_source[0]["audio"], test.audio[0])


@requires_espeak
def test_rebuild_is_a_noop_and_a_missing_shard_is_rebuilt_alone(corpus):
    """Same fingerprint: nothing is read again. A lost shard: the tables are reused (no index pass) and only that
    shard is written, with the same bytes as before, here by 2 worker processes (the records are a pure function of
    the job, whatever the worker count)."""
    config, workdir, _, _ = corpus
    cdir = speech_stages.corpus_dir(config, workdir)
    meta = speech_corpus.read_meta(cdir)
    log: list[str] = []
    assert librispeech.build_corpus(cdir, config.speech, log=log.append) == meta and not log
    lost = meta["splits"]["train"]["files"][1]
    os.remove(os.path.join(cdir, lost))
    config.speech.workers = 2
    try:
        assert librispeech.build_corpus(cdir, config.speech, log=log.append) == meta
    finally:
        config.speech.workers = 1
    assert [line.split(" (")[0] for line in log[:-1]] == [f"speech corpus: {lost}"]


def test_missing_dataset_and_bad_source_are_one_clear_error(tmp_path):
    config = paper_config(str(tmp_path))
    with pytest.raises(MissingInputError, match=r"tfds build librispeech --file_format=array_record"):
        speech_corpus.build(str(tmp_path / "corpus"), config.speech)
    config.speech.source = "voxpopuli"
    with pytest.raises(ConfigError, match="speech.source='voxpopuli'"):
        speech_corpus.build(str(tmp_path / "corpus"), config.speech)
    with pytest.raises(ConfigError, match="scale=paper"):
        tts.get_config("scale=paper,tiny=1")


def test_paper_config_validates_and_its_train_step_lowers():
    """24 kHz, 7.5 Hz latents of 64 channels, LibriSpeech; rows hold a pair of the longest training utterances; the
    TTS train step lowers on 8 fake devices with the packed-row batch (latent_lm/planning.py)."""
    config = tts.get_config("scale=paper")
    assert validate(config, experiment.STAGES) == []
    assert config.speech.source == "librispeech" and config.speech.sample_rate == config.audio_vae.sample_rate == 24_000
    assert config.speech.sample_rate / math.prod(config.audio_vae.strides) == 7.5
    assert config.model.latent_dim == config.audio_vae.latent_dim == 64
    assert config.tts.max_frames == 2 * 20 * 7.5 < config.model.max_len
    assert config.audio_vae_train.crop_seconds * 7.5 == 15
    plan = plan_memory(config, 8, stage="lower", hbm_bytes=80e9)
    assert 4.4e8 < plan.num_params < 4.8e8  # Medium (455M as LatentLM) with the TTS vocabulary
    rows = 256 // 8
    assert plan.batch == rows * 1024 * (4 + 1 + 64 * 4 + 4 + 4)  # tokens, is_latent, latents, segments, positions
    assert plan.activation_source == "lowered only (analytic)" and plan.fits()
