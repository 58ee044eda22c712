"""The embedded speech corpus: English speech synthesised with espeak-ng, deterministically, no downloads and no root
(docs/method.md §12).

Speakers are espeak-ng's English accents × voice variants × pitch × rate (120 by default, seeded); sentences come
from seeded templates (names, colours, objects, animals, places, numbers spelled out) and from English sentences of
the documentation that ships with Python (`pydoc_data.topics`). Each utterance holds its waveform, text, IPA
phonemes (espeak's, per accent: no stress marks, words separated by single spaces), speaker id and sentence id.

Splits (held-out fractions of speakers and of sentences, ~10% each):
  train           train speakers × train sentences
  test_sentences  train speakers × held-out sentences
  test_speakers   held-out speakers × held-out sentences
Audio: espeak's 22,050 Hz int16 → leading/trailing silence trimmed to ≤ `max_silence_s` → `sample_rate` with
`scipy.signal.resample_poly` → int16 on disk; float32 in [-1, 1] (int16 / 32768) when read.

Layout of a corpus directory (the ArrayRecord conventions of `data_pipelines/latent_cache.py`):
  speakers.json                              [{id, accent, variant, pitch, rate, voice, held_out}]
  sentences.json                             [{id, text, source ("template"|"pydoc"), held_out}]
  <split>-00000-of-00003.array_record        one record per utterance (RECORD_FORMAT), in utterance order
  <split>-00000-of-00003.json                the shard's range, fingerprint, record count, seconds and sha256, and
                                             its records' headers and lengths as COLUMNS ("utterances")
  meta.json                                  fingerprint, espeak version, sample rate, per-split files and counts;
                                             written last: a directory with meta.json is complete
A shard goes to a temporary name and is renamed once complete (after its sidecar: `data_pipelines.sharded_records`);
a re-run with the same fingerprint is a no-op, and a killed build resumes at the first missing shard. The
fingerprint covers the config fields that change the content, the speaker table, the sentences and the espeak-ng
version (audio is byte-identical only within one espeak build). Each utterance is a pure function of (text, voice, rate, pitch)
(see `latent_lm.audio.espeak`), so neither the worker count nor the order of work changes a byte.

  python -m data_pipelines.speech_corpus --out=runs/speech_corpus [--config.seed=1 --config.workers=2 ...]

Reading (`load_corpus`) keeps a split's text, phonemes, ids and lengths in memory, from the sidecars, and decodes an
utterance's audio only when it is indexed (`SpeechAudio`); `SpeechCorpusSource` is the same records as a grain source.

`build` builds the corpus that `config.source` names: this one, or LibriSpeech/LibriTTS in the same format
(data_pipelines/librispeech.py), which shares the shard writing (`write_splits`) and the reading below.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import operator
import re
import struct
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from data_pipelines import sharded_records
from latent_lm import storage
from latent_lm.audio import espeak
from latent_lm.errors import ConfigError, DataError, MissingInputError

SPLITS = ("train", "test_sentences", "test_speakers")
CORPUS_VERSION = 1  # bump when the content for a given config changes (templates, trimming, record format)
META_FILE = "meta.json"
SPEAKERS_FILE = "speakers.json"
SENTENCES_FILE = "sentences.json"
RECORD_FORMAT = "uint32 header length + UTF-8 JSON {text, phonemes, speaker, sentence} + int16 audio, little-endian"
# Each shard's sidecar holds its records' headers and lengths as columns ("utterances"), so the stages that need text,
# phonemes, ids or durations read them without the audio (`load_corpus`).
COLUMNS = ("text", "phonemes", "speaker", "sentence", "samples")
NATIVE_RATE = espeak.SAMPLE_RATE
_SHARD_RE = sharded_records.shard_pattern(SPLITS)

# English accents of espeak-ng 1.52 (gmw/en-Shaw, the Shavian alphabet, is left out); intersected with what the
# installed library lists.
ACCENTS = ("gmw/en", "gmw/en-029", "gmw/en-GB-scotland", "gmw/en-GB-x-gbclan", "gmw/en-GB-x-gbcwmd",
           "gmw/en-GB-x-rp", "gmw/en-US", "gmw/en-US-nyc")
# Voice variants that sound like a person (robotic, whispered, croaking and demonic ones are left out).
VARIANTS = (
    "f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "klatt3", "klatt4", "klatt5",
    "klatt6", "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo",
    "Jacky", "Lee", "Mario", "Michael", "Mike", "Nguyen", "Reed", "RicishayMax", "adam", "anika", "announcer",
    "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "edward2", "grandma",
    "grandpa", "gustave", "ian", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta", "linda", "marcelo", "max",
    "michel", "miguel", "mike2", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby",
    "steph", "steph2", "steph3", "travis", "victor", "zac")
PITCHES = tuple(range(30, 71, 5))   # espeak pitch 0–100, 50 = the voice's own
RATES = tuple(range(150, 211, 10))  # words per minute (espeak's default is 175)


def default_config() -> ml_collections.ConfigDict:
    """The embedded corpus: 3,000 utterances (2.6 s on average) of 120 speakers, ≈ 2.2 h of audio, 200 MB at 16 kHz;
    ≈ 40 s to build with 2 workers on this (busy) 2-core machine."""
    c = ml_collections.ConfigDict()
    c.source = "espeak"             # `build` dispatches on it; "librispeech": data_pipelines/librispeech.py
    c.sample_rate = 16000           # paper scale: 24,000
    c.num_speakers = 120
    c.num_sentences = 1600
    c.pydoc_fraction = 0.2          # of the sentences, at most (there are ≈ 360 clean ones)
    c.held_out_speakers = 0.1
    c.held_out_sentences = 0.1
    c.utterances = ml_collections.ConfigDict({"train": 2600, "test_sentences": 200, "test_speakers": 200})
    c.seed = 0
    c.max_silence_s = 0.1           # leading and trailing silence kept
    c.records_per_shard = 1000
    c.workers = 2                   # synthesis processes (spawned); ≤ 1 synthesises in this process
    return c


# ---------------------------------------------------------------------------------------------------------------
# Sentences


_NAMES = ("Alice", "Benjamin", "Clara", "Daniel", "Emily", "Frank", "Grace", "Henry", "Isabel", "James", "Karen",
          "Louis", "Maria", "Nathan", "Olivia", "Peter", "Rachel", "Samuel", "Sophie", "Thomas", "Victor", "William",
          "Zoe", "Oliver", "Hannah", "George", "Lucy", "Martin", "Nora", "Oscar")
_COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "brown", "black", "white", "grey", "pink",
            "golden", "silver")
_OBJECTS = (("cup", "cups"), ("book", "books"), ("chair", "chairs"), ("lamp", "lamps"), ("basket", "baskets"),
            ("bottle", "bottles"), ("jacket", "jackets"), ("pencil", "pencils"), ("umbrella", "umbrellas"),
            ("box", "boxes"), ("key", "keys"), ("plate", "plates"), ("blanket", "blankets"), ("ribbon", "ribbons"),
            ("candle", "candles"), ("kite", "kites"), ("shoe", "shoes"), ("hat", "hats"), ("clock", "clocks"),
            ("bicycle", "bicycles"), ("letter", "letters"), ("map", "maps"))
_ANIMALS = (("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("rabbit", "rabbits"), ("fox", "foxes"),
            ("bird", "birds"), ("goat", "goats"), ("duck", "ducks"), ("mouse", "mice"), ("tiger", "tigers"),
            ("whale", "whales"), ("owl", "owls"), ("frog", "frogs"))
_PLACES = ("kitchen", "garden", "library", "station", "market", "museum", "harbour", "village", "school", "bakery",
           "park", "hospital", "cinema", "office", "river", "forest", "beach", "bridge")
_ADJECTIVES = ("small", "large", "old", "new", "heavy", "light", "quiet", "bright", "soft", "strange",
               "beautiful", "broken", "clean", "empty", "warm", "cold", "tiny", "famous", "lovely", "dusty")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_FOODS = ("bread", "cheese", "apples", "soup", "rice", "oranges", "tea", "coffee", "chocolate", "pasta", "honey",
          "carrots")
_RELATIONS = ("brother", "sister", "uncle", "aunt", "cousin", "friend", "neighbour", "teacher", "grandmother",
              "grandfather")
_CITIES = ("London", "Paris", "Boston", "Dublin", "Sydney", "Toronto", "Madrid", "Berlin", "Chicago", "Edinburgh",
           "Vienna", "Denver")
_FOUND = ("found", "painted", "carried", "dropped", "cleaned", "borrowed", "sold", "hid", "repaired", "lost",
          "wrapped", "moved")
_WENT = ("walked", "drove", "cycled", "ran", "travelled", "hurried")
_POSSESSIVES = ("his", "her", "their")

_TEMPLATES = (
    "{name} bought {count} {colour} {objects} at the {place}.",
    "Please put the {adj} {object} next to the {colour} {object2}.",
    "On {day} morning, {name} {went} to the {place} with {poss} {relation}.",
    "The {adj} {animal} ran quickly across the {place}.",
    "Can you see the {colour} {object} near the {place}?",
    "{name} said that the {object} was too {adj}.",
    "We will meet at {hour} o'clock on {day}.",
    "There are {count} {animals} in the {place} today.",
    "My {relation} lives in {city} and likes {food}.",
    "{name} {found} the {adj} {object} in the {place}.",
    "It takes {count} minutes to walk from the {place} to the {place2}.",
    "{name} and {name2} shared some {food} by the {place}.",
    "The {colour} {animal} is sleeping under the {object}.",
    "In {month}, {name} visited {city} for {count} days.",
    "Why did {name} leave the {colour} {object} at the {place}?",
    "{name} counted {count} {colour} {objects} and {count2} {animals}.",
    "Our {relation} arrives from {city} on the {ordinal} of {month}.",
    "I think the {object} belongs to {name}.",
)

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
             "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
             "eighteenth", "nineteenth", "twentieth")


def spell_number(n: int) -> str:
    """0–99 in words: 42 → "forty-two"."""
    if not 0 <= n < 100:
        raise ValueError(f"spell_number takes 0–99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def _template_sentence(rng: np.random.Generator) -> str:
    def pick(options):
        return options[int(rng.integers(len(options)))]

    obj, obj2 = pick(_OBJECTS), pick(_OBJECTS)
    animal = pick(_ANIMALS)
    name, name2 = rng.choice(len(_NAMES), size=2, replace=False)
    place, place2 = rng.choice(len(_PLACES), size=2, replace=False)
    count = int(rng.integers(2, 100))
    slots = dict(
        name=_NAMES[name], name2=_NAMES[name2], colour=pick(_COLOURS), object=obj[0], objects=obj[1],
        object2=obj2[0], animal=animal[0], animals=animal[1], place=_PLACES[place], place2=_PLACES[place2],
        adj=pick(_ADJECTIVES), day=pick(_DAYS), month=pick(_MONTHS), food=pick(_FOODS), relation=pick(_RELATIONS),
        city=pick(_CITIES), found=pick(_FOUND), went=pick(_WENT), poss=pick(_POSSESSIVES),
        count=spell_number(count), count2=spell_number(int(rng.integers(2, 30))),
        hour=spell_number(int(rng.integers(1, 13))), ordinal=pick(_ORDINALS))
    return pick(_TEMPLATES).format(**slots)


_PYDOC_WORD = re.compile(r"^(?:[A-Z]?[a-z]+(?:-[a-z]+)?|I|A)(?:'[a-z]+)?[,;:]?$")


def pydoc_sentences(min_words: int = 4, max_words: int = 14) -> list[str]:
    """Clean English sentences of the Python documentation topics: `min_words`–`max_words` words of letters (an
    initial capital at most, no one-letter names but "a"/"I") and basic punctuation; sorted, unique."""
    from pydoc_data.topics import topics  # 0.5 MB of strings: imported lazily

    out = set()
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            paragraph = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.?!])\s+", paragraph):
                words = sentence[:-1].split()
                if (sentence.endswith((".", "?", "!")) and min_words <= len(words) <= max_words
                        and words[0][0].isupper() and not words[-1].endswith((",", ";", ":"))
                        and all(_PYDOC_WORD.match(w) for w in words)):
                    out.add(sentence)
    return sorted(out)


def make_sentences(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """[{id, text, source, held_out}]: seeded, unique; ids are positions."""
    rng = np.random.default_rng([int(config.seed), 2])
    total = int(config.num_sentences)
    if total < 2:
        raise ConfigError(f"num_sentences must be at least 2 (one train, one held out), got {total}")
    pydoc = pydoc_sentences()
    num_pydoc = min(len(pydoc), int(round(float(config.pydoc_fraction) * total)))
    chosen = [pydoc[i] for i in sorted(rng.choice(len(pydoc), size=num_pydoc, replace=False))]
    sources = ["pydoc"] * num_pydoc
    seen = set(chosen)
    attempts = 0
    while len(chosen) < total:
        text = _template_sentence(rng)
        attempts += 1
        if text not in seen:
            seen.add(text)
            chosen.append(text)
            sources.append("template")
        elif attempts > 100 * total:
            raise ConfigError(f"cannot make {total} distinct sentences from the templates")
    order = rng.permutation(total)
    held = _held_out(rng, total, float(config.held_out_sentences), "held_out_sentences")
    return [dict(id=i, text=chosen[j], source=sources[j], held_out=bool(i in held)) for i, j in enumerate(order)]


# ---------------------------------------------------------------------------------------------------------------
# Speakers


def _held_out(rng: np.random.Generator, n: int, fraction: float, name: str) -> set[int]:
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"{name} must be in (0, 1), got {fraction}")
    k = min(max(1, int(round(fraction * n))), n - 1)
    return set(int(i) for i in rng.choice(n, size=k, replace=False))


def available_accents_and_variants() -> tuple[list[str], list[str]]:
    """ACCENTS and VARIANTS that the installed espeak-ng has."""
    have_accents = {v.identifier for v in espeak.english_voices()}
    have_variants = set(espeak.variants())
    accents = [a for a in ACCENTS if a in have_accents]
    variants = [v for v in VARIANTS if v in have_variants]
    if not accents or not variants:
        raise MissingInputError(f"espeak-ng at {espeak.find_library().path} has no English voices or variants "
                                f"(accents {sorted(have_accents)}): reinstall it, {espeak.INSTALL_HINT}")
    return accents, variants


def make_speakers(config: ml_collections.ConfigDict, accents: Sequence[str],
                  variants: Sequence[str]) -> list[dict[str, Any]]:
    """[{id, accent, variant, pitch, rate, voice, held_out}]: distinct (accent, variant) pairs while they last, each
    with a seeded pitch and rate; no two speakers alike."""
    rng = np.random.default_rng([int(config.seed), 1])
    n = int(config.num_speakers)
    if n < 2:
        raise ConfigError(f"num_speakers must be at least 2 (one train, one held out), got {n}")
    pairs = [(a, v) for a in accents for v in variants]
    if n > len(pairs) * len(PITCHES) * len(RATES):
        raise ConfigError(f"num_speakers={n} is more than the {len(pairs) * len(PITCHES) * len(RATES)} distinct "
                          f"accent × variant × pitch × rate voices")
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(math.ceil(n / len(pairs)))])
    speakers, seen = [], set()
    for i in range(n):
        accent, variant = pairs[int(order[i])]
        while True:
            pitch, rate = PITCHES[int(rng.integers(len(PITCHES)))], RATES[int(rng.integers(len(RATES)))]
            if (accent, variant, pitch, rate) not in seen:
                break
        seen.add((accent, variant, pitch, rate))
        speakers.append(dict(id=i, accent=accent, variant=variant, pitch=pitch, rate=rate,
                             voice=f"{accent}+{variant}", held_out=False))
    for i in _held_out(rng, n, float(config.held_out_speakers), "held_out_speakers"):
        speakers[i]["held_out"] = True
    return speakers


# ---------------------------------------------------------------------------------------------------------------
# Utterances


@dataclasses.dataclass(frozen=True)
class _Job:
    text: str
    voice: str  # accent+variant; the phonemes are the accent's
    rate: int
    pitch: int
    speaker: int
    sentence: int
    sample_rate: int
    max_silence_s: float


def _pairs(rng: np.random.Generator, speakers: Sequence[int], sentences: Sequence[int],
           count: int) -> list[tuple[int, int]]:
    """`count` (speaker, sentence) pairs: speakers in balanced rounds, sentences in balanced rounds, no pair twice
    while unused pairs remain."""
    if count <= 0:
        return []
    if not speakers or not sentences:
        raise ConfigError("a split with utterances needs speakers and sentences")
    out, used = [], set()
    sentence_stream: list[int] = []
    capacity = len(speakers) * len(sentences)
    for r in range(math.ceil(count / len(speakers))):
        for spk in (int(s) for s in rng.permutation(speakers)):
            if len(out) == count:
                return out
            for attempt in range(len(sentences) + 1):
                if not sentence_stream:
                    sentence_stream = [int(s) for s in rng.permutation(sentences)]
                sent = sentence_stream.pop()
                if (spk, sent) not in used or len(used) >= capacity or attempt == len(sentences):
                    break
            used.add((spk, sent))
            out.append((spk, sent))
    return out


def plan_utterances(config: ml_collections.ConfigDict, speakers: list[dict[str, Any]],
                    sentences: list[dict[str, Any]]) -> dict[str, list[_Job]]:
    rng = np.random.default_rng([int(config.seed), 3])
    train_spk = [s["id"] for s in speakers if not s["held_out"]]
    test_spk = [s["id"] for s in speakers if s["held_out"]]
    train_sent = [s["id"] for s in sentences if not s["held_out"]]
    test_sent = [s["id"] for s in sentences if s["held_out"]]
    which = {"train": (train_spk, train_sent), "test_sentences": (train_spk, test_sent),
             "test_speakers": (test_spk, test_sent)}
    plan = {}
    for split in SPLITS:
        count = int(config.utterances[split])
        if count < 0:
            raise ConfigError(f"utterances.{split} must be ≥ 0, got {count}")
        plan[split] = [
            _Job(text=sentences[sent]["text"], voice=speakers[spk]["voice"], rate=speakers[spk]["rate"],
                 pitch=speakers[spk]["pitch"], speaker=spk, sentence=sent,
                 sample_rate=int(config.sample_rate), max_silence_s=float(config.max_silence_s))
            for spk, sent in _pairs(rng, *which[split], count)]
    return plan


def trim_silence(audio: np.ndarray, sample_rate: int, max_silence_s: float, frame_s: float = 0.01,
                 threshold_db: float = -40.0) -> np.ndarray:
    """`audio` without the leading/trailing silence beyond `max_silence_s`: silence is a frame whose RMS is
    `threshold_db` below the loudest frame's."""
    frame = max(1, int(round(frame_s * sample_rate)))
    n = len(audio) // frame
    if n == 0:
        return audio
    x = audio[:n * frame].astype(np.float64).reshape(n, frame)
    rms = np.sqrt(np.mean(x * x, axis=1))
    active = np.flatnonzero(rms > rms.max() * 10.0 ** (threshold_db / 20.0))
    if rms.max() == 0 or len(active) == 0:
        return audio[:0]
    pad = int(round(max_silence_s * sample_rate))
    start = max(0, active[0] * frame - pad)
    end = min(len(audio), (active[-1] + 1) * frame + pad)
    return audio[start:end]


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """int16 → int16 at `to_rate` (scipy.signal.resample_poly, deterministic); rounded and clipped."""
    if from_rate == to_rate:
        return audio.astype(np.int16)
    from scipy.signal import resample_poly  # imported lazily: ≈ 1 s

    g = math.gcd(from_rate, to_rate)
    y = resample_poly(audio.astype(np.float64), to_rate // g, from_rate // g)
    return np.clip(np.round(y), -32768, 32767).astype(np.int16)


def encode_record(audio: np.ndarray, text: str, phonemes: str, speaker: int, sentence: int) -> bytes:
    header = json.dumps({"text": text, "phonemes": phonemes, "speaker": int(speaker), "sentence": int(sentence)},
                        sort_keys=True, ensure_ascii=False).encode("utf-8")
    return struct.pack("<I", len(header)) + header + np.ascontiguousarray(audio, "<i2").tobytes()


def parse_header(record: bytes) -> tuple[dict[str, Any], int]:
    """(the record's {text, phonemes, speaker, sentence}, the byte offset of its int16 audio): the audio is not
    decoded, so a reader of text and ids costs no more memory than the header."""
    if len(record) < 4:
        raise DataError(f"speech corpus record of {len(record)} bytes is damaged: rebuild the corpus")
    (size,) = struct.unpack_from("<I", record)
    if 4 + size > len(record) or (len(record) - 4 - size) % 2:
        raise DataError(f"speech corpus record of {len(record)} bytes is damaged: rebuild the corpus")
    return json.loads(record[4:4 + size].decode("utf-8")), 4 + size


def decode_audio(record: bytes, offset: int) -> np.ndarray:
    """The record's audio from `offset` (parse_header's), float32 [T] in [-1, 1]."""
    return np.frombuffer(record, "<i2", offset=offset).astype(np.float32) / 32768.0


def decode_record(record: bytes) -> dict[str, Any]:
    """{"audio": float32 [T] in [-1, 1], "text", "phonemes", "speaker": int32, "sentence": int32}."""
    header, offset = parse_header(record)
    return {"audio": decode_audio(record, offset), "text": header["text"], "phonemes": header["phonemes"],
            "speaker": np.int32(header["speaker"]), "sentence": np.int32(header["sentence"])}


def render(job: _Job) -> bytes:
    """One utterance's record: synthesised, trimmed, resampled, with its accent's phonemes (a pure function)."""
    native, phonemes = espeak.synthesize_with_phonemes(job.text, job.voice, rate=job.rate, pitch=job.pitch)
    audio = resample(trim_silence(native, NATIVE_RATE, job.max_silence_s), NATIVE_RATE, job.sample_rate)
    if len(audio) == 0:
        raise DataError(f"espeak-ng produced silence for {job.text!r} in voice {job.voice}")
    return encode_record(audio, job.text, phonemes, job.speaker, job.sentence)


# ---------------------------------------------------------------------------------------------------------------
# Building


def shard_name(split: str, index: int, num_shards: int) -> str:
    return sharded_records.shard_name(split, index, num_shards)


def _shard_bounds(count: int, per_shard: int) -> list[tuple[int, int]]:
    if count == 0:
        return []
    return sharded_records.shard_bounds(count, math.ceil(count / per_shard))


def _content_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that change the corpus's bytes (not `workers`)."""
    return {"sample_rate": int(config.sample_rate), "num_speakers": int(config.num_speakers),
            "num_sentences": int(config.num_sentences), "pydoc_fraction": float(config.pydoc_fraction),
            "held_out_speakers": float(config.held_out_speakers),
            "held_out_sentences": float(config.held_out_sentences),
            "utterances": {s: int(config.utterances[s]) for s in SPLITS}, "seed": int(config.seed),
            "max_silence_s": float(config.max_silence_s), "records_per_shard": int(config.records_per_shard)}


def _check_config(config: ml_collections.ConfigDict) -> None:
    if int(config.sample_rate) < 8000:
        raise ConfigError(f"sample_rate must be at least 8000 Hz, got {config.sample_rate}")
    if int(config.records_per_shard) < 1:
        raise ConfigError(f"records_per_shard must be positive, got {config.records_per_shard}")
    if not 0.0 <= float(config.max_silence_s) <= 1.0:
        raise ConfigError(f"max_silence_s must be in [0, 1], got {config.max_silence_s}")
    missing = [s for s in SPLITS if s not in config.utterances]
    if missing:
        raise ConfigError(f"utterances must give a count for every split {SPLITS}; missing {missing}")


def _fingerprint(content: dict[str, Any], espeak_version: str, speakers: list, sentences: list) -> str:
    blob = json.dumps({"corpus_version": CORPUS_VERSION, "espeak": espeak_version, "config": content,
                       "speakers": speakers, "sentences": sentences}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _complete(out_dir: str, meta: dict[str, Any] | None, fingerprint: str) -> bool:
    """Whether `meta` (the directory's meta.json, or None) is of a finished build with `fingerprint` whose files are
    all there."""
    if meta is None or meta.get("fingerprint") != fingerprint:
        return False
    files = [f for s in SPLITS for f in meta.get("splits", {}).get(s, {}).get("files", [])]
    return all(storage.exists(storage.join(out_dir, f)) for f in files + [SPEAKERS_FILE, SENTENCES_FILE])


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Any]:
    """`workers` spawned processes, or None for `workers` ≤ 1 (the work then runs in this process)."""
    if workers <= 1:
        yield None
        return
    # spawn, not fork: the caller may be a multithreaded JAX process.
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield pool
    finally:
        pool.close()
        pool.join()


def pool_map(fn: Callable[[Any], Any], items: Sequence[Any], pool, chunksize: int = 8) -> Iterable[Any]:
    """`fn` over `items` in order, in `pool` when there is one."""
    return map(fn, items) if pool is None else pool.imap(fn, items, chunksize=chunksize)


def _write_shard(out_dir: str, name: str, jobs: Sequence[Any], expect: dict[str, Any], pool,
                 render: Callable[[Any], bytes]) -> None:
    stats = {"digest": hashlib.sha256(), "samples": 0, "count": 0}
    columns: dict[str, list] = {k: [] for k in COLUMNS}

    def records() -> Iterable[bytes]:
        for data in pool_map(render, jobs, pool):
            yield data
            stats["digest"].update(hashlib.sha256(data).digest())
            header, offset = parse_header(data)
            samples = (len(data) - offset) // 2
            for k, v in zip(COLUMNS, (header["text"], header["phonemes"], header["speaker"], header["sentence"],
                                      samples)):
                columns[k].append(v)
            stats["samples"] += samples
            stats["count"] += 1

    sharded_records.write_shard(out_dir, name, records(), lambda: dict(
        expect, count=stats["count"], sha256=stats["digest"].hexdigest(),
        seconds=stats["samples"] / expect["sample_rate"], utterances=columns))


def write_splits(out_dir: str, plan: dict[str, Sequence[Any]], render: Callable[[Any], bytes], *,
                 records_per_shard: int, fingerprint: str, sample_rate: int, workers: int,
                 log=print) -> dict[str, Any]:
    """Writes each split's `plan` (jobs, `render(job)` → one record in RECORD_FORMAT) into shards of at most
    `records_per_shard` records: only the shards not already complete for `fingerprint`, in `workers` processes;
    removes stale shards and returns meta.json's "splits": {split: {files, count, seconds, sha256}}. Shared by the
    embedded corpus and data_pipelines/librispeech.py."""
    shards = []  # (split, name, [start, end))
    for split in SPLITS:
        bounds = _shard_bounds(len(plan[split]), int(records_per_shard))
        shards += [(split, shard_name(split, i, len(bounds)), b) for i, b in enumerate(bounds)]
    todo = []
    for split, name, (start, end) in shards:
        expect = dict(split=split, start=start, end=end, fingerprint=fingerprint, sample_rate=int(sample_rate))
        if sharded_records.shard_done(storage.join(out_dir, name), expect) is None:
            todo.append((split, name, start, end, expect))

    with worker_pool(workers if todo else 0) as pool:
        for split, name, start, end, expect in todo:
            t = time.perf_counter()
            _write_shard(out_dir, name, plan[split][start:end], expect, pool, render)
            log(f"speech corpus: {name} ({end - start} utterances) in {time.perf_counter() - t:.1f}s")

    sharded_records.remove_stale_shards(out_dir, _SHARD_RE, [name for _, name, _ in shards])
    splits = {}
    for split in SPLITS:
        files = [name for s, name, _ in shards if s == split]
        sides = [sharded_records.read_json(sharded_records.sidecar(storage.join(out_dir, f))) for f in files]
        splits[split] = {"files": files, "count": sum(s["count"] for s in sides),
                         "seconds": round(sum(s["seconds"] for s in sides), 3),
                         "sha256": hashlib.sha256("".join(s["sha256"] for s in sides).encode()).hexdigest()}
    return splits


def write_tables(out_dir: str, speakers: list[dict[str, Any]], sentences: list[dict[str, Any]]) -> None:
    """speakers.json and sentences.json, rewritten only when they change."""
    for path, obj in ((SPEAKERS_FILE, speakers), (SENTENCES_FILE, sentences)):
        if sharded_records.read_json(storage.join(out_dir, path)) != obj:
            storage.write_json_atomic(storage.join(out_dir, path), obj, indent=1, ensure_ascii=False)


def start_build(out_dir: str, fingerprint: str) -> tuple[str, dict[str, Any] | None]:
    """(absolute out_dir, its meta.json when the build with `fingerprint` is complete, else None). An incomplete or
    other build's meta.json is removed: the corpus is about to change and readers must not take it for complete."""
    out_dir = storage.absolute(out_dir)
    storage.makedirs(out_dir)
    meta_path = storage.join(out_dir, META_FILE)
    meta = sharded_records.read_json(meta_path)
    if _complete(out_dir, meta, fingerprint):
        return out_dir, meta
    if storage.exists(meta_path):
        storage.remove(meta_path)
    return out_dir, None


def build_corpus(out_dir: str, config: ml_collections.ConfigDict | None = None,
                 log=print) -> dict[str, Any]:
    """Synthesises the corpus into `out_dir` (see the module docstring) and returns its meta.json; a no-op when a
    complete corpus with the same fingerprint is there, a resume when some of its shards are."""
    config = default_config() if config is None else config
    _check_config(config)
    started = time.perf_counter()
    espeak.find_library()  # the one-line install hint first
    accents, variants = available_accents_and_variants()
    speakers = make_speakers(config, accents, variants)
    sentences = make_sentences(config)
    plan = plan_utterances(config, speakers, sentences)
    content = _content_config(config)
    espeak_version = espeak.version()
    fingerprint = _fingerprint(content, espeak_version, speakers, sentences)

    out_dir, meta = start_build(out_dir, fingerprint)
    if meta is not None:
        return meta
    write_tables(out_dir, speakers, sentences)
    workers = int(config.get("workers", 2))
    splits = write_splits(out_dir, plan, render, records_per_shard=int(config.records_per_shard),
                          fingerprint=fingerprint, sample_rate=int(config.sample_rate), workers=workers, log=log)
    meta = {"fingerprint": fingerprint, "corpus_version": CORPUS_VERSION, "espeak_version": espeak_version,
            "espeak_source": espeak.find_library().source, "sample_rate": int(config.sample_rate),
            "record_format": RECORD_FORMAT, "splits": splits, "num_speakers": len(speakers),
            "num_sentences": len(sentences), "config": content}
    storage.write_json_atomic(storage.join(out_dir, META_FILE), meta, indent=2)  # last, the same bytes every build
    log(f"speech corpus: built in {time.perf_counter() - started:.1f}s ({workers} workers)")
    return meta


def build(out_dir: str, config: ml_collections.ConfigDict, log=print) -> dict[str, Any]:
    """The corpus that `config.source` names: "espeak" (this module, the default) or "librispeech"
    (data_pipelines/librispeech.py: LibriSpeech or LibriTTS prepared by tfds); returns its meta.json."""
    source = config.get("source", "espeak")
    if source == "espeak":
        return build_corpus(out_dir, config, log)
    if source == "librispeech":
        from data_pipelines import librispeech  # here: it imports this module

        return librispeech.build_corpus(out_dir, config, log)
    raise ConfigError(f"speech.source={source!r} is not a speech corpus; choose 'espeak' or 'librispeech'")


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_meta(corpus_dir: str) -> dict[str, Any]:
    """meta.json of a complete corpus; MissingInputError (with the build command) otherwise."""
    meta = sharded_records.read_json(storage.join(corpus_dir, META_FILE))
    if meta is None:
        raise MissingInputError(f"speech corpus not found at {corpus_dir}: build it with "
                                f"`python -m data_pipelines.speech_corpus --out={corpus_dir}`")
    return meta


def _split_files(corpus_dir: str, split: str) -> tuple[dict[str, Any], list[str]]:
    if split not in SPLITS:
        raise ConfigError(f"speech corpus split {split!r} must be one of {SPLITS}")
    meta = read_meta(corpus_dir)
    files = [storage.join(corpus_dir, f) for f in meta["splits"][split]["files"]]
    absent = [f for f in files if not storage.exists(f)]
    if absent:
        raise MissingInputError(f"speech corpus at {corpus_dir} is missing {len(absent)} shard files (first: "
                                f"{absent[0]}): rebuild it")
    return meta, files


def _load_table(corpus_dir: str, name: str) -> list[dict[str, Any]]:
    table = sharded_records.read_json(storage.join(corpus_dir, name))
    if table is None:
        read_meta(corpus_dir)  # a missing corpus says so first
        raise MissingInputError(f"speech corpus at {corpus_dir} has no {name}: rebuild it")
    return table


def load_speakers(corpus_dir: str) -> list[dict[str, Any]]:
    """The speaker table, indexed by speaker id: {id, accent, variant, pitch, rate, voice, held_out}."""
    return _load_table(corpus_dir, SPEAKERS_FILE)


def load_sentences(corpus_dir: str) -> list[dict[str, Any]]:
    """The sentence table, indexed by sentence id: {id, text, source, held_out}."""
    return _load_table(corpus_dir, SENTENCES_FILE)


SCAN_CHUNK = 64  # records read at a time by a header scan (`_scan_headers`)


def _scan_headers(path: str) -> dict[str, list]:
    """COLUMNS of one shard read from its records' headers, `SCAN_CHUNK` records at a time: for a corpus whose
    sidecars predate the columns (it reads the audio's bytes, but never decodes or keeps them)."""
    import grain

    source = grain.sources.ArrayRecordDataSource([path])
    columns: dict[str, list] = {k: [] for k in COLUMNS}
    for lo in range(0, len(source), SCAN_CHUNK):
        for record in source.__getitems__(range(lo, min(lo + SCAN_CHUNK, len(source)))):
            header, offset = parse_header(record)
            for k in COLUMNS[:-1]:
                columns[k].append(header[k])
            columns["samples"].append((len(record) - offset) // 2)
    return columns


def _shard_columns(path: str) -> dict[str, list]:
    """COLUMNS of the records of the shard at `path`: from its sidecar, else from a header scan."""
    side = sharded_records.read_json(sharded_records.sidecar(path)) or {}
    columns = side.get("utterances")
    if isinstance(columns, dict) and all(len(columns.get(k, ())) == side.get("count") for k in COLUMNS):
        return columns
    return _scan_headers(path)


class SpeechAudio(collections.abc.Sequence):
    """A split's waveforms, float32 [T_i] in [-1, 1], each decoded from its record when indexed and not kept: what
    stays in memory is `lengths` (samples per utterance, int64 [N]). `take(indices)` reads several records at once
    (array_record's parallel reads). The judges train on it a batch at a time (evaluation/speech_judges.py)."""

    def __init__(self, files: Sequence[str], lengths: np.ndarray):
        self.files = list(files)
        self.lengths = np.asarray(lengths, np.int64)
        self._opened = None  # the shards are opened at the first read: a text-only stage never touches them

    def _source(self) -> Any:
        if self._opened is None:
            import grain  # imported lazily: synthesis workers never need it

            source = grain.sources.ArrayRecordDataSource(self.files)
            if len(source) != len(self.lengths):
                raise DataError(f"speech corpus shards {self.files[0]}… hold {len(source)} records but their "
                                f"sidecars list {len(self.lengths)}: rebuild the corpus")
            self._opened = source
        return self._opened

    def __len__(self) -> int:
        return len(self.lengths)

    def _key(self, index: int) -> int:
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"utterance {index} of {len(self)}")
        return i

    def __getitem__(self, index):  # int → one waveform; slice → a list of them
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        return _decode(self._source()[self._key(index)])

    def take(self, indices: Iterable[int]) -> list[np.ndarray]:
        """The waveforms of `indices` (repeats allowed), in that order."""
        keys = [self._key(i) for i in indices]
        return [_decode(r) for r in self._source().__getitems__(keys)] if keys else []

    def __repr__(self) -> str:
        return f"SpeechAudio({len(self)} utterances in {len(self.files)} shards)"


def _decode(record: bytes) -> np.ndarray:
    return decode_audio(record, parse_header(record)[1])


@dataclasses.dataclass
class SpeechSplit:
    """One split: per-utterance metadata in memory and the audio read when indexed (`SpeechAudio`)."""
    name: str
    audio: SpeechAudio
    text: list[str]
    phonemes: list[str]
    speaker: np.ndarray   # int32 [N]
    sentence: np.ndarray  # int32 [N]
    sample_rate: int
    speakers: list[dict[str, Any]]  # the whole table, indexed by speaker id
    samples: np.ndarray   # int64 [N]: audio samples per utterance

    def __len__(self) -> int:
        return len(self.text)

    @property
    def durations(self) -> np.ndarray:
        """Seconds per utterance, float64 [N]."""
        return self.samples / self.sample_rate


def load_corpus(corpus_dir: str, split: str) -> SpeechSplit:
    """A split's text, phonemes, ids and lengths from its shards' sidecars (no record is read; a corpus built before
    they held them has its headers scanned); the audio is decoded when indexed (`SpeechAudio`). In memory: ≈ 0.7 kB
    per utterance, ≈ 0.2 GB for LibriSpeech's 281k training utterances (docs/experiments.md §11.1)."""
    meta, files = _split_files(corpus_dir, split)
    columns: dict[str, list] = {k: [] for k in COLUMNS}
    for f in files:
        shard = _shard_columns(f)
        for k in COLUMNS:
            columns[k] += shard[k]
    count = len(columns["samples"])
    if count != meta["splits"][split]["count"]:
        raise DataError(f"speech corpus at {corpus_dir} holds {count} {split} utterances but meta.json says "
                        f"{meta['splits'][split]['count']}: rebuild it")
    samples = np.asarray(columns["samples"], np.int64)
    return SpeechSplit(name=split, audio=SpeechAudio(files, samples), text=columns["text"],
                       phonemes=columns["phonemes"], speaker=np.asarray(columns["speaker"], np.int32),
                       sentence=np.asarray(columns["sentence"], np.int32), sample_rate=int(meta["sample_rate"]),
                       speakers=load_speakers(corpus_dir), samples=samples)


class SpeechCorpusSource:
    """grain random-access source over one split's shards (`grain.MapDataset.source(SpeechCorpusSource(d, s))`):
    record i → {"audio": float32 [T_i], "text", "phonemes", "speaker": int32, "sentence": int32}. Lengths vary:
    crop or pad before batching."""

    def __init__(self, corpus_dir: str, split: str):
        import grain  # imported lazily: synthesis workers never need it

        meta, files = _split_files(corpus_dir, split)
        self.corpus_dir, self.split = corpus_dir, split
        self.sample_rate = int(meta["sample_rate"])
        self._source = grain.sources.ArrayRecordDataSource(files)
        if len(self._source) != meta["splits"][split]["count"]:
            raise DataError(f"speech corpus at {corpus_dir} holds {len(self._source)} {split} records but meta.json "
                            f"says {meta['splits'][split]['count']}: rebuild it")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __repr__(self) -> str:
        # grain keys iterator checkpoints on this string: no object ids.
        return f"SpeechCorpusSource(corpus_dir={self.corpus_dir!r}, split={self.split!r}, len={len(self)})"


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    import sys

    from absl import flags
    from ml_collections import config_flags

    from latent_lm import cli

    flags.DEFINE_string("out", "runs/speech_corpus", "Directory of the corpus.")
    try:  # config_flags reads the --config.KEY overrides from sys.argv here, not when the flags are parsed
        config_flags.DEFINE_config_dict("config", default_config(), "Corpus config; --config.KEY=VALUE overrides.")
    except (AttributeError, KeyError) as e:
        key = str(e).strip("'\"")
        culprit = [a.split("=")[0] for a in sys.argv if a.startswith("--config.") and f".{key}" in a.split("=")[0]]
        cli.fail(f"unknown config key {key!r} in {culprit[0] if culprit else 'a --config override'}; see "
                 f"data_pipelines/speech_corpus.py:default_config for the valid keys")


def main(argv: Sequence[str] | None = None) -> None:
    from absl import flags

    started = time.perf_counter()
    out = flags.FLAGS.out
    meta = build_corpus(out, flags.FLAGS.config)
    counts = ", ".join(f"{s} {meta['splits'][s]['count']} ({meta['splits'][s]['seconds'] / 60:.1f} min)"
                       for s in SPLITS)
    print(f"speech corpus at {storage.absolute(out)}: {counts}; {meta['num_speakers']} speakers, "
          f"{meta['num_sentences']} sentences, espeak-ng {meta['espeak_version']}, fingerprint "
          f"{meta['fingerprint']} ({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    from latent_lm import cli

    _define_flags()
    cli.absl_main(main)
