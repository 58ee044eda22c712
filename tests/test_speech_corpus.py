"""The embedded speech corpus (data_pipelines/speech_corpus.py) and its espeak-ng driver (latent_lm/audio/espeak.py):
determinism, splits, records, caching, and the error without espeak-ng. A corpus of 20 utterances, built in-process."""

import os

import numpy as np
import pytest

from data_pipelines import speech_corpus as sc
from latent_lm.audio import espeak
from latent_lm.errors import MissingInputError
from conftest import requires_espeak


def tiny_config(workers: int = 1):
    c = sc.default_config()
    c.num_speakers, c.num_sentences = 20, 30  # 2 held-out speakers, 3 held-out sentences
    c.utterances.update(dict(train=12, test_sentences=4, test_speakers=4))
    c.records_per_shard = 5  # several shards per split
    c.workers = workers
    return c


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


def _mtimes(d):
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("speech") / "corpus")
    meta = sc.build_corpus(d, tiny_config(), log=lambda _: None)
    return d, meta


@requires_espeak
def test_synthesis_is_a_pure_function_of_its_arguments():
    # libespeak-ng keeps wavegen state across calls in one process (DESIGN.md §3): each call reloads the library.
    text = "The quick brown fox jumps over the lazy dog."
    first = espeak.synthesize(text, "gmw/en-US+f3", rate=160, pitch=40)
    espeak.synthesize("Something else in between.", "gmw/en-GB-scotland+m3", rate=200, pitch=70)
    again = [espeak.synthesize(text, "gmw/en-US+f3", rate=160, pitch=40) for _ in range(2)]
    assert first.dtype == np.int16 and len(first) > espeak.SAMPLE_RATE  # > 1 s of speech
    for a in again:
        np.testing.assert_array_equal(a, first)
    assert np.sqrt(np.mean(first.astype(np.float64) ** 2)) > 300  # not silence
    audio, ipa = espeak.synthesize_with_phonemes(text, "gmw/en-US+f3", rate=160, pitch=40)
    np.testing.assert_array_equal(audio, first)
    assert ipa == espeak.phonemes(text, "gmw/en-US")


@requires_espeak
def test_phonemes_are_ipa_words_without_stress():
    text = "Please put the dusty lamp next to the white cup."
    ipa = espeak.phonemes(text, "gmw/en-US")
    assert ipa and "ˈ" not in ipa and "ˌ" not in ipa and "  " not in ipa and ipa == ipa.strip()
    assert len(ipa.split(" ")) == len(text.split())  # no function words merged in this one
    assert "ð" in ipa and "æ" in ipa  # IPA, not espeak's ASCII mnemonics
    # The phonemes depend on the accent.
    assert espeak.phonemes("Tomato and water.", "gmw/en-US") != espeak.phonemes("Tomato and water.", "gmw/en")
    assert espeak.clean_phonemes("ðə ˈba:skɪt  (en)ˌɪt") == "ðə baːskɪt ɪt"


@requires_espeak
def test_voices_cover_the_english_accents_and_enough_speakers():
    accents, variants = sc.available_accents_and_variants()
    assert {"gmw/en-US", "gmw/en", "gmw/en-GB-scotland"} <= set(accents) and len(variants) >= 40
    speakers = sc.make_speakers(sc.default_config(), accents, variants)
    assert len(speakers) >= 100
    voices = {(s["accent"], s["variant"], s["pitch"], s["rate"]) for s in speakers}
    assert len(voices) == len(speakers)
    assert 0.05 <= np.mean([s["held_out"] for s in speakers]) <= 0.15


@requires_espeak
def test_build_is_deterministic_and_a_rerun_is_a_noop(corpus, tmp_path):
    d, meta = corpus
    before = _mtimes(d)
    again = sc.build_corpus(d, tiny_config(), log=lambda _: None)
    assert again == meta and _mtimes(d) == before  # nothing rewritten
    other = str(tmp_path / "again")
    meta2 = sc.build_corpus(other, tiny_config(), log=lambda _: None)  # a second build in the same process
    assert meta2["fingerprint"] == meta["fingerprint"]
    assert _files(other) == _files(d)  # every byte: shards, sidecars, tables, meta.json


@requires_espeak
def test_a_missing_shard_is_rebuilt_alone(corpus, tmp_path):
    import shutil

    d = str(tmp_path / "copy")
    shutil.copytree(corpus[0], d)
    name = corpus[1]["splits"]["train"]["files"][1]
    reference = _files(d)
    os.remove(os.path.join(d, name))
    before = _mtimes(d)
    sc.build_corpus(d, tiny_config(), log=lambda _: None)
    after = _mtimes(d)
    assert _files(d) == reference
    rewritten = {f for f in after if after[f] != before.get(f)}
    assert rewritten == {name, name[:-len(".array_record")] + ".json", sc.META_FILE}


@requires_espeak
def test_splits_are_disjoint_as_specified(corpus):
    d, meta = corpus
    speakers, sentences = sc.load_speakers(d), sc.load_sentences(d)
    held_spk = {s["id"] for s in speakers if s["held_out"]}
    held_sent = {s["id"] for s in sentences if s["held_out"]}
    assert len(held_spk) == 2 and len(held_sent) == 3
    splits = {s: sc.load_corpus(d, s) for s in sc.SPLITS}
    train, test_sent, test_spk = splits["train"], splits["test_sentences"], splits["test_speakers"]
    assert [len(splits[s]) for s in sc.SPLITS] == [12, 4, 4]
    assert not set(train.speaker) & held_spk and not set(train.sentence) & held_sent
    assert not set(test_sent.speaker) & held_spk and set(test_sent.sentence) <= held_sent
    assert set(test_spk.speaker) <= held_spk and set(test_spk.sentence) <= held_sent
    assert len(set(test_spk.speaker)) == 2  # every held-out speaker speaks
    for split in splits.values():
        assert split.text == [sentences[i]["text"] for i in split.sentence]
    for s in speakers:
        assert set(s) >= {"id", "accent", "variant", "pitch", "rate"} and s["voice"] == f"{s['accent']}+{s['variant']}"


@requires_espeak
def test_records_hold_trimmed_audio_text_and_phonemes(corpus):
    d, meta = corpus
    rate = tiny_config().sample_rate
    assert meta["sample_rate"] == rate == 16000
    frame = rate // 100
    matched = []
    for split in sc.SPLITS:
        s = sc.load_corpus(d, split)
        assert s.sample_rate == rate and len(s.speakers) == 20
        assert np.all((s.durations > 0.8) & (s.durations < 7.0)), s.durations
        for audio, text, ipa in zip(s.audio, s.text, s.phonemes):
            assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
            assert np.sqrt(np.mean(audio ** 2)) > 0.01  # speech, not silence
            # Leading and trailing silence (10 ms frames 40 dB under the loudest) at most 0.1 s (+ one frame).
            rms = np.sqrt(np.mean(audio[:len(audio) // frame * frame].reshape(-1, frame) ** 2, axis=1))
            active = np.flatnonzero(rms > rms.max() / 100)
            assert active[0] * frame <= 0.1 * rate + frame
            assert len(audio) - (active[-1] + 1) * frame <= 0.1 * rate + 2 * frame
            assert ipa and ipa == " ".join(ipa.split()) and "ˈ" not in ipa
            words = len(text.split())
            assert words // 2 <= len(ipa.split()) <= words  # espeak may join function words ("in the")
            matched.append(len(ipa.split()) == words)
    assert np.mean(matched) >= 0.3
    assert np.mean(sc.load_corpus(d, "train").durations) > 1.5


@requires_espeak
def test_grain_source_reads_the_same_records(corpus):
    import grain

    d, _ = corpus
    split = sc.load_corpus(d, "test_speakers")
    source = sc.SpeechCorpusSource(d, "test_speakers")
    assert len(source) == len(split) and "test_speakers" in repr(source)
    ds = grain.MapDataset.source(source)
    for i in range(len(split)):
        item = ds[i]
        np.testing.assert_array_equal(item["audio"], split.audio[i])
        assert (item["text"], item["phonemes"], int(item["speaker"]), int(item["sentence"])) == (
            split.text[i], split.phonemes[i], split.speaker[i], split.sentence[i])


def test_missing_espeak_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(espeak, "_loader_library", lambda: None)
    monkeypatch.setattr(espeak, "_system_library", lambda: None)
    with pytest.raises(MissingInputError, match="pip install espeakng-loader"):
        sc.build_corpus(str(tmp_path / "c"), tiny_config(), log=lambda _: None)
    with pytest.raises(MissingInputError, match="pip install espeakng-loader"):
        espeak.synthesize("hello")
    assert not (tmp_path / "c").exists()


def test_a_missing_corpus_names_the_build_command(tmp_path):
    with pytest.raises(MissingInputError, match="python -m data_pipelines.speech_corpus"):
        sc.load_corpus(str(tmp_path), "train")


def test_numbers_are_spelled_and_pydoc_sentences_are_clean():
    assert [sc.spell_number(n) for n in (0, 7, 13, 40, 99)] == ["zero", "seven", "thirteen", "forty", "ninety-nine"]
    sentences = sc.pydoc_sentences()
    assert len(sentences) > 200
    for s in sentences:
        assert 4 <= len(s.split()) <= 14 and s[0].isupper() and s[-1] in ".?!"
        assert all(ch.isalpha() or ch in " ,;:'-.?!" for ch in s), s
