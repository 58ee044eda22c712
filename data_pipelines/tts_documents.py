"""Text-to-speech documents over the speech corpus and its audio latents (docs/method.md §12.2).

  single  <bos> x(u) <bod> z(u)_1 … z(u)_n <eod> <eos>
  pair    <bos> x(a) x(u) <bod> z(a) z(u) <eod> <eos>      a: another sentence of u's speaker
x is an utterance's input (its phonemes, or its text: `input`) in the run's BPE ids; z the audio σ-VAE means μ
(the task noises each span with its own σ and normalises them). A pair teaches the reference-utterance mode of
zero-shot TTS: the model hears a speaker say one sentence, then says another in that voice; a single utterance
teaches the continuation of a prefix. With probability `null_prompt_rate` the text is dropped to `<null>`
(classifier-free guidance keeps the audio prompt and drops the text). The LM head ends each span with `<eod>`
(§12.3); documents are packed like the multimodal ones (`data_pipelines.packing.make_packed_dataset`). The ids stay
in memory; the latents are read from the cache when a document is built (`AudioLatentSequence`), and the corpus's
audio is never read.

`continuation_prompt` and `reference_prompt` build the two zero-shot prompts of the evaluation (§12.4), both
`prompt_document`s, which also serve a user's own text and reference audio (`latent_lm.tts_cli`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any, Sequence

import numpy as np

from data_pipelines.audio_latents import AudioLatentSequence
from data_pipelines.speech_corpus import load_corpus
from latent_lm.errors import ConfigError, DataError
from latent_lm.text.tokenizer import SPECIAL_TOKENS, TextTokenizer

BOS, EOS, BOD, EOD, NULL = (SPECIAL_TOKENS.index(t) for t in ("<bos>", "<eos>", "<bod>", "<eod>", "<null>"))
INPUTS = ("phonemes", "text")
ENCODE_CHUNK = 4096  # texts tokenized at a time


@dataclasses.dataclass(frozen=True)
class SpeechDocuments:
    """One split: each utterance's input ids, its audio latents μ [n_i, C] (a list, or an `AudioLatentSequence` that
    reads an utterance's μ when indexed), speaker and text; `frames` (n_i, int64 [N]) is taken from `mu` when not
    given."""

    ids: list[np.ndarray]
    mu: Sequence[np.ndarray]
    speaker: np.ndarray
    text: list[str]
    seq_len: int
    frames: np.ndarray | None = None

    def __post_init__(self):
        frames = getattr(self.mu, "frames", None) if self.frames is None else self.frames
        if frames is None:
            frames = [len(m) for m in self.mu]
        object.__setattr__(self, "frames", np.asarray(frames, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def latent_dim(self) -> int:
        return int(getattr(self.mu, "latent_dim", None) or self.mu[0].shape[-1])


def stack_frames(mu: np.ndarray, k: int) -> np.ndarray:
    """Latent frames [n, C] → [n // k, k·C]: k consecutive frames per sequence position (one autoregressive step,
    docs/method.md §12.2); the last n mod k frames are dropped."""
    n, c = mu.shape
    return np.ascontiguousarray(mu[:n // k * k].reshape(n // k, k * c))


def unstack_frames(z: np.ndarray, k: int) -> np.ndarray:
    """The inverse of `stack_frames`: [m, k·C] → [m·k, C]."""
    m, kc = z.shape
    return np.asarray(z).reshape(m * k, kc // k)


class StackedFrames(collections.abc.Sequence):
    """A sequence of latents [n_i, C] with their `frames` and `latent_dim` (an `AudioLatentSequence`) seen as
    `stack_frames` of each: [n_i // k, k·C] (read when indexed)."""

    def __init__(self, mu: AudioLatentSequence, k: int):
        self.mu, self.k = mu, k
        self.frames = np.asarray(mu.frames, np.int64) // k
        self.latent_dim = int(mu.latent_dim) * k

    def __len__(self) -> int:
        return len(self.mu)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return stack_frames(self.mu[index], self.k)


def load_speech_documents(corpus_dir: str, latents_dir: str, split: str, tokenizer: TextTokenizer, seq_len: int,
                          input: str = "phonemes", frames_per_step: int = 1) -> SpeechDocuments:
    """The corpus split's text and speakers (no audio: `load_corpus` decodes none) joined with its audio latents,
    read when a document needs them (record i of both is utterance i), `frames_per_step` latent frames stacked per
    position (`stack_frames`). In memory: the BPE ids, text and ids, ≈ 1 kB per utterance (docs/experiments.md
    §11.1)."""
    if input not in INPUTS:
        raise ConfigError(f"tts.input={input!r} must be one of {list(INPUTS)}")
    if frames_per_step < 1:
        raise ConfigError(f"tts.frames_per_step={frames_per_step} must be ≥ 1")
    corpus = load_corpus(corpus_dir, split)
    latents = AudioLatentSequence(latents_dir, split)
    if frames_per_step > 1:
        latents = StackedFrames(latents, frames_per_step)
    if len(latents) != len(corpus):
        raise DataError(f"{latents_dir}/{split} holds {len(latents)} utterances but the corpus split has "
                        f"{len(corpus)}: re-run --mode=encode_audio")
    texts = corpus.phonemes if input == "phonemes" else corpus.text
    # In chunks: the tokenizer's encodings (offsets, token strings) are many times the ids they hold.
    ids = [np.asarray(i, np.int32) for lo in range(0, len(texts), ENCODE_CHUNK)
           for i in tokenizer.encode_batch(texts[lo:lo + ENCODE_CHUNK])]
    data = SpeechDocuments(ids, latents, np.asarray(corpus.speaker, np.int32), list(corpus.text), seq_len)
    lengths = 4 + np.array([len(i) for i in ids], np.int64) + data.frames  # document_length of each alone
    longest = int(np.argmax(lengths))
    if lengths[longest] > seq_len:
        raise ConfigError(f"seq_len={seq_len} is too short for the {split} utterance {longest} "
                          f"({lengths[longest]} positions): raise model.max_len")
    return data


def document_length(data: SpeechDocuments, parts: Sequence[int]) -> int:
    return 4 + sum(len(data.ids[u]) + int(data.frames[u]) for u in parts)


def tts_document(data: SpeechDocuments, parts: Sequence[int], null: bool = False) -> dict[str, Any]:
    """`<bos> x(parts…) <bod> z(parts…) <eod> <eos>` (x dropped to `<null>` when `null`)."""
    text = [np.asarray([NULL], np.int32)] if null else [data.ids[u] for u in parts]
    mu = np.concatenate([data.mu[u] for u in parts])
    head = np.concatenate([[BOS], *text, [BOD]]).astype(np.int32)
    n, c = len(mu), data.latent_dim
    tokens = np.concatenate([head, np.zeros(n, np.int32), [EOD, EOS]]).astype(np.int32)
    is_latent = np.zeros(len(tokens), bool)
    is_latent[len(head):len(head) + n] = True
    latents = np.zeros((len(tokens), c), np.float32)
    latents[is_latent] = mu
    return {"tokens": tokens, "is_latent": is_latent, "latents": latents, "kind": "pair" if len(parts) > 1 else "single"}


class TTSDocumentSource:
    """Document i (a function of (seed, i) alone): utterance i mod n, preceded with probability `pair_rate` by another
    sentence of its speaker when both fit a row, its text dropped to `<null>` with probability `null_prompt_rate`."""

    def __init__(self, data: SpeechDocuments, seed: int, pair_rate: float = 0.5, null_prompt_rate: float = 0.1):
        if not (0 <= pair_rate <= 1 and 0 <= null_prompt_rate <= 1):
            raise ConfigError(f"tts.pair_rate={pair_rate} and null_prompt_rate={null_prompt_rate} must lie in [0, 1]")
        self.data, self.seed, self.pair_rate, self.null_prompt_rate = data, seed, pair_rate, null_prompt_rate
        self.same_speaker = {int(s): np.flatnonzero(data.speaker == s) for s in np.unique(data.speaker)}

    def __len__(self) -> int:
        return len(self.data)

    def document(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        u = index % len(self.data)
        parts = [u]
        others = self.same_speaker[int(self.data.speaker[u])]
        if rng.random() < self.pair_rate and len(others) > 1:
            a = int(rng.choice(others[others != u]))
            if document_length(self.data, [a, u]) <= self.data.seq_len:
                parts = [a, u]
        return tts_document(self.data, parts, null=rng.random() < self.null_prompt_rate)


def prompt_document(texts: Sequence[np.ndarray], mu: np.ndarray, null: bool = False) -> dict[str, Any]:
    """A zero-shot prompt `<bos> x… <bod> z…` from input ids and the prompt's audio latents μ [n, C] (n may be 0):
    the model goes on in speech mode (§12.4). `null` drops the text to `<null>`."""
    head = np.concatenate([[BOS], *([[NULL]] if null else texts), [BOD]]).astype(np.int32)
    mu = np.asarray(mu, np.float32)
    n = len(mu)
    is_latent = np.r_[np.zeros(len(head), bool), np.ones(n, bool)]
    latents = np.zeros((len(head) + n, mu.shape[-1]), np.float32)
    latents[len(head):] = mu
    return {"tokens": np.r_[head, np.zeros(n, np.int32)], "is_latent": is_latent, "latents": latents}


def continuation_prompt(data: SpeechDocuments, u: int, prompt_frames: int, null: bool = False) -> dict[str, Any]:
    """Zero-shot continuation (§12.4): the whole text, `<bod>`, and the first `prompt_frames` latents of u."""
    return prompt_document([data.ids[u]], data.mu[u][:min(prompt_frames, len(data.mu[u]) - 1)], null)


def reference_prompt(data: SpeechDocuments, reference: int, target: int, null: bool = False) -> dict[str, Any]:
    """Zero-shot reference-utterance mode (§12.4): x(reference) x(target) `<bod>` z(reference); the model goes on
    with the target sentence in the reference's voice."""
    return prompt_document([data.ids[reference], data.ids[target]], data.mu[reference], null)
