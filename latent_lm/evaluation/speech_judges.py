"""Speech judges trained in the repo on the speech corpus (docs/method.md §12): a CTC phoneme recogniser
(intelligibility: phoneme and word error rate) and a speaker-embedding model (voice: cosine similarity).

Both read a log-mel frontend of the waveform, RMS-normalised per utterance (loudness does not change a verdict) and
standardised per mel bin with statistics of the training audio. A trained judge is one self-contained msgpack-able
dict ("bundle": kind, config, normalisation statistics, params, and the recogniser's phoneme vocabulary), so
`transcribe` / `speaker_embeddings` need nothing but the bundle and the audio.

Phonemes are IPA strings as the corpus stores them (words separated by single spaces, no stress marks); a symbol is
a base character with its combining marks, length marks and modifier letters (`ɜː`, `n̩`, `tʰ`) and tie-barred
pairs (`t͡ʃ`); stress marks are dropped; a space is the word-boundary symbol. CTC blank is id 0.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from latent_lm import storage
from latent_lm.audio.features import log_mel
from latent_lm.errors import ConfigError, DataError

Bundle = dict[str, Any]
BLANK = "<blank>"
WORD_BOUNDARY = " "
_STRESS = frozenset("ˈˌ")
_TIES = frozenset("\u0361\u035c")  # combining double inverted breve / double breve below: join two letters
_TARGET_RMS = 0.1
PREFETCH_THREADS = 2  # training batches read and padded ahead of the step (`_prefetched`)
PREFETCH_BATCHES = 4


# ---------------------------------------------------------------------------------------------------------------
# Phoneme inventory and error rates.

def split_phonemes(phonemes: str) -> list[str]:
    """IPA string → symbols: marks (combining, length, modifier letters) attach to their base, a tie bar joins the
    next letter, stress marks are dropped, any whitespace run is one WORD_BOUNDARY (none at the ends)."""
    symbols: list[str] = []
    join_next = False
    for ch in phonemes:
        if ch.isspace():
            if symbols and symbols[-1] != WORD_BOUNDARY:
                symbols.append(WORD_BOUNDARY)
            join_next = False
            continue
        if ch in _STRESS:
            continue
        attach = (join_next or ch in _TIES or unicodedata.combining(ch) > 0
                  or unicodedata.category(ch) in ("Lm", "Sk"))
        if attach and symbols and symbols[-1] != WORD_BOUNDARY:
            symbols[-1] += ch
        else:
            symbols.append(ch)
        join_next = ch in _TIES
    if symbols and symbols[-1] == WORD_BOUNDARY:
        symbols.pop()
    return symbols


def phoneme_vocab(phoneme_strings: Iterable[str] | Any) -> list[str]:
    """Sorted inventory of the strings' symbols: [BLANK (id 0), WORD_BOUNDARY (id 1), symbols...]. Accepts a list
    of IPA strings or a corpus split (anything with a `.phonemes` list)."""
    strings = getattr(phoneme_strings, "phonemes", phoneme_strings)
    if isinstance(strings, str):
        raise DataError("phoneme_vocab takes a list of phoneme strings, not one string")
    symbols = {s for p in strings for s in split_phonemes(p)} - {WORD_BOUNDARY}
    if not symbols:
        raise DataError("phoneme_vocab: no phoneme symbols in the given strings")
    return [BLANK, WORD_BOUNDARY, *sorted(symbols)]


@functools.lru_cache(maxsize=8)
def _index(vocab: tuple[str, ...]) -> dict[str, int]:
    return {s: i for i, s in enumerate(vocab)}


def encode_phonemes(phonemes: str, vocab: Sequence[str], *, unknown: str = "error") -> list[int]:
    """Symbol ids (never the blank); `unknown`: "error" (DataError) or "skip" for symbols outside the vocab."""
    index = _index(tuple(vocab))
    ids = []
    for s in split_phonemes(phonemes):
        if s in index:
            ids.append(index[s])
        elif unknown == "error":
            raise DataError(f"phoneme symbol {s!r} of {phonemes!r} is not in the vocabulary ({len(vocab)} symbols)")
        elif unknown != "skip":
            raise ConfigError(f"unknown={unknown!r}; choose 'error' or 'skip'")
    return ids


def decode_phonemes(ids: Iterable[int], vocab: Sequence[str]) -> str:
    """Ids → IPA string (blanks dropped, word boundaries as single spaces, none at the ends)."""
    return " ".join("".join(vocab[int(i)] for i in ids if int(i) != 0).split())


def _edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> int:
    """Levenshtein distance (unit substitution, insertion and deletion costs)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def _error_rate(refs: Sequence[Sequence[Any]], hyps: Sequence[Sequence[Any]], what: str) -> float:
    if len(refs) != len(hyps):
        raise DataError(f"{what}: {len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise DataError(f"{what}: the references are empty")
    return sum(_edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def phoneme_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Σ Levenshtein(ref symbols, hyp symbols) / Σ ref symbols; word boundaries are not counted as phonemes."""
    strip = lambda p: [s for s in split_phonemes(p) if s != WORD_BOUNDARY]  # noqa: E731
    return _error_rate([strip(r) for r in refs], [strip(h) for h in hyps], "phoneme_error_rate")


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Σ Levenshtein over words / Σ ref words; a word is a whitespace-separated phoneme string (stress ignored)."""
    words = lambda p: "".join(split_phonemes(p)).split()  # noqa: E731
    return _error_rate([words(r) for r in refs], [words(h) for h in hyps], "word_error_rate")


# ---------------------------------------------------------------------------------------------------------------
# Configs.

def recogniser_config() -> ml_collections.ConfigDict:
    """Defaults for the embedded corpus (16 kHz, ≈ 2,600 training utterances of 1.5–4 s): ≈ 0.2 s a step on this
    2-core CPU when idle. Measured on a 1,000-utterance, 54-speaker slice: 1,500 steps → PER 0.18 / WER 0.70 on
    held-out speakers (0.03 / 0.28 on training audio)."""
    return ml_collections.ConfigDict(dict(
        sample_rate=16000, n_fft=400, hop=160, n_mels=80,  # 25 ms windows, 10 ms hop
        conv_channels=144, conv_layers=2, conv_kernel=5,  # each halves time: 40 ms frames (espeak: ≤ 27 labels/s)
        dim=144, depth=4, num_heads=4, mlp_ratio=4, dropout=0.1,
        spec_time_masks=2, spec_time_width=10, spec_freq_masks=2, spec_freq_width=10,  # SpecAugment, frames/bins
        steps=2000, batch_size=16, lr=1.5e-3, warmup_steps=150, weight_decay=0.01, clip_norm=1.0,
        pad_seconds=0.5,  # pad each batch's length up to a multiple of this: few shapes, few compiles
        eval_batch_size=32, norm_examples=256,
        fast_compile=False))  # XLA backend optimisation level 0: ~40% less compile time, slower steps (tests)


def speaker_config() -> ml_collections.ConfigDict:
    """Defaults for the embedded corpus (≈ 108 training speakers, 16 kHz): ≈ 1 min here. Measured on 54 speakers,
    600 steps: held-out speakers' same-speaker cosine 0.88, different-speaker −0.05."""
    return ml_collections.ConfigDict(dict(
        sample_rate=16000, n_fft=400, hop=160, n_mels=80,
        channels=128, conv_layers=3, conv_kernel=5, strided_layers=1, embed_dim=128,
        margin=0.2, scale=30.0,  # additive-margin softmax over the training speakers
        crop_seconds=1.5,  # training crops (random offset; shorter clips padded and masked): one compiled shape
        # Channel augmentation of the training crops (`_channel_augment`): white noise at an SNR drawn from
        # [noise_snr_min_db, noise_snr_max_db] with probability noise_prob, a random smooth EQ of up to ±eq_db
        # across the mel bands, and SpecAugment masks. A voice is then judged apart from its channel (a codec's
        # resynthesis is the same speaker); 0 turns a part off.
        noise_snr_min_db=10.0, noise_snr_max_db=40.0, noise_prob=0.5, eq_db=6.0, eq_bands=4,
        spec_time_masks=2, spec_time_width=10, spec_freq_masks=2, spec_freq_width=8,
        steps=1000, batch_size=32, lr=2e-3, warmup_steps=100, weight_decay=0.01, clip_norm=1.0,
        pad_seconds=0.5, eval_batch_size=32, norm_examples=256, fast_compile=False))


def _merge(defaults: ml_collections.ConfigDict, config: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
    c = defaults
    for k, v in dict(config or {}).items():
        if k not in c:
            raise ConfigError(f"unknown speech judge config key {k!r}; known: {sorted(c)}")
        c[k] = v
    for k in ("sample_rate", "n_fft", "hop", "n_mels", "batch_size", "eval_batch_size"):
        if int(c[k]) <= 0:
            raise ConfigError(f"speech judge config {k}={c[k]} must be positive")
    if int(c["steps"]) < 0:
        raise ConfigError(f"speech judge config steps={c['steps']} must be ≥ 0 (0: an untrained judge)")
    return c


# ---------------------------------------------------------------------------------------------------------------
# Frontend.

def _features(audio: jax.Array, lengths: jax.Array, c: Mapping[str, Any], norm: Mapping[str, Any] | None
              ) -> tuple[jax.Array, jax.Array]:
    """Zero-padded audio [B,T] and lengths [B] → (log-mels [B,F,M] (standardised if `norm`), frame mask [B,F])."""
    chex.assert_rank(audio, 2)
    mask = jnp.arange(audio.shape[1])[None] < lengths[:, None]
    audio = jnp.where(mask, audio, 0.0)
    rms = jnp.sqrt(jnp.sum(audio ** 2, axis=1) / jnp.maximum(lengths, 1))
    audio = audio * (_TARGET_RMS / jnp.maximum(rms, 1e-4))[:, None]
    mel = log_mel(audio, int(c["sample_rate"]), int(c["n_fft"]), int(c["hop"]), int(c["n_mels"]))
    frames = mel.shape[1]
    valid = jnp.where(lengths > 0, 1 + lengths // int(c["hop"]), 0)  # a clip's own centred frames (features.py)
    frame_mask = jnp.arange(frames)[None] < jnp.minimum(valid, frames)[:, None]
    if norm is not None:
        mel = (mel - norm["mean"]) / norm["std"]
    return jnp.where(frame_mask[..., None], mel, 0.0), frame_mask


def _pad_batch(waves: Sequence[np.ndarray], multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """The waveforms zero-padded to the max length rounded up to `multiple`: (audio [B,T], lengths [B])."""
    lengths = np.array([len(a) for a in waves], np.int32)
    t = max(multiple, -(-int(lengths.max(initial=1)) // multiple) * multiple)
    out = np.zeros((len(waves), t), np.float32)
    for r, a in enumerate(waves):
        out[r, :lengths[r]] = a
    return out, lengths


def _as_audio_list(audio_list: Sequence[Any]) -> list[np.ndarray]:
    out = []
    for a in audio_list:
        a = np.asarray(a, np.float32)
        if a.ndim != 1:
            raise DataError(f"speech judges take mono waveforms (1-D arrays); got shape {a.shape}")
        out.append(a)
    return out


class _Waveforms:
    """Mono waveforms read a batch at a time: a list of arrays (checked once, kept), or a lazy reader, a sequence
    with `lengths` and `take(indices)` (data_pipelines.speech_corpus.SpeechAudio) whose waveforms are decoded when a
    batch reads them and dropped after it, so a split of any size trains and scores in bounded memory. The batches
    are the same either way."""

    def __init__(self, audio: Sequence[Any]):
        if hasattr(audio, "lengths") and hasattr(audio, "take"):
            self.lengths = np.asarray(audio.lengths, np.int64)
            self._take = audio.take
        else:
            items = _as_audio_list(audio)
            self.lengths = np.array([len(a) for a in items], np.int64)
            self._take = lambda rows: [items[int(i)] for i in rows]

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, rows: Sequence[int]) -> list[np.ndarray]:
        return self._take([int(i) for i in rows])


def _prefetched(plan: Sequence[Any], make: Callable[[Any], Any]) -> Iterable[Any]:
    """make(p) for each p of `plan`, in order, built ahead in grain's background threads: reading and padding the
    next batches overlaps the training step, and at most a few batches are held."""
    if not len(plan):
        return iter(())
    import grain

    ds = grain.MapDataset.source(plan).map(make)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=PREFETCH_THREADS,
                                                     prefetch_buffer_size=PREFETCH_BATCHES)))


def _pad_multiple(c: Mapping[str, Any]) -> int:
    return max(int(c["n_fft"]), int(c["hop"]), int(round(float(c["pad_seconds"]) * int(c["sample_rate"]))))


def _norm_stats(waves: _Waveforms, c: Mapping[str, Any], seed: int, rows: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """Per-mel-bin mean and std of (RMS-normalised) log-mels over up to `norm_examples` training utterances (of
    `rows`, all when None)."""
    rows = np.arange(len(waves)) if rows is None else rows
    rng = np.random.default_rng(seed)
    pick = rows[rng.permutation(len(rows))[:int(c["norm_examples"])]]
    feats = _jit(lambda a, n: _features(a, n, c, None), c)
    total, sq, count = 0.0, 0.0, 0.0
    for i in range(0, len(pick), int(c["eval_batch_size"])):
        a, n = _pad_batch(waves.read(pick[i:i + int(c["eval_batch_size"])]), _pad_multiple(c))
        mel, m = (np.asarray(x, np.float64) for x in feats(a, n))
        total = total + (mel * m[..., None]).sum((0, 1))
        sq = sq + (mel ** 2 * m[..., None]).sum((0, 1))
        count += m.sum()
    mean = total / max(count, 1.0)
    std = np.sqrt(np.maximum(sq / max(count, 1.0) - mean ** 2, 1e-6))
    return dict(mean=mean.astype(np.float32), std=std.astype(np.float32))


def _add_noise(key: jax.Array, audio: jax.Array, lengths: jax.Array, c: Mapping[str, Any]) -> jax.Array:
    """White noise on each clip's own samples (the padding stays 0), with probability noise_prob, at an SNR drawn
    uniformly from [noise_snr_min_db, noise_snr_max_db] against the clip's mean power."""
    k_snr, k_on, k_noise = jax.random.split(key, 3)
    b, t = audio.shape
    valid = jnp.arange(t)[None] < lengths[:, None]
    snr = jax.random.uniform(k_snr, (b, 1), minval=float(c["noise_snr_min_db"]), maxval=float(c["noise_snr_max_db"]))
    power = jnp.sum(jnp.square(audio), axis=1, keepdims=True) / jnp.maximum(lengths[:, None], 1)
    on = jax.random.uniform(k_on, (b, 1)) < float(c["noise_prob"])
    noise = jax.random.normal(k_noise, audio.shape) * jnp.sqrt(power * 10.0 ** (-snr / 10.0))
    return jnp.where(valid & on, audio + noise, audio)


def _channel_augment(key: jax.Array, audio: jax.Array, lengths: jax.Array, c: Mapping[str, Any],
                     norm: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """The speaker judge's training features under a random channel (speaker_config): `_add_noise`, then in the
    log-mel domain a smooth EQ (the sum of `eq_bands` cosines over the mel axis with uniform amplitudes, at most
    ±eq_db amplitude dB in all), then SpecAugment. → (standardised log-mels [B,F,M], frame mask [B,F]) as
    `_features`."""
    k_noise, k_eq, k_spec = jax.random.split(key, 3)
    feats, mask = _features(_add_noise(k_noise, audio, lengths, c), lengths, c, norm)
    bands = int(c["eq_bands"])
    if bands and float(c["eq_db"]) > 0:
        m = feats.shape[-1]
        basis = jnp.cos(jnp.pi * jnp.arange(1, bands + 1)[:, None] * (jnp.arange(m)[None] + 0.5) / m)  # [K, M]
        curve = jax.random.uniform(k_eq, (feats.shape[0], bands), minval=-1.0, maxval=1.0) @ basis / bands
        gain = curve * float(c["eq_db"]) * math.log(10.0) / 20.0  # amplitude dB → natural log of the mel magnitude
        feats = jnp.where(mask[..., None], feats + gain[:, None, :] / norm["std"], 0.0)
    return _spec_augment(k_spec, feats, mask, c), mask


def _spec_augment(key: jax.Array, feats: jax.Array, mask: jax.Array, c: Mapping[str, Any]) -> jax.Array:
    """SpecAugment-style masking: a few random time spans (within each utterance) and mel bands set to 0 (=mean)."""
    b, f, m = feats.shape
    keep = jnp.ones((b, f, m), bool)
    t_len = jnp.sum(mask, axis=1)
    for key_i, (axis, n, width) in zip(jax.random.split(key, 2), (
            ("time", int(c["spec_time_masks"]), int(c["spec_time_width"])),
            ("freq", int(c["spec_freq_masks"]), int(c["spec_freq_width"])))):
        for k in jax.random.split(key_i, max(n, 1))[:n]:
            k_w, k_s = jax.random.split(k)
            w = jax.random.randint(k_w, (b,), 0, width + 1)
            size = t_len if axis == "time" else jnp.full((b,), m)
            start = (jax.random.uniform(k_s, (b,)) * jnp.maximum(size - w, 1)).astype(jnp.int32)
            pos = jnp.arange(f if axis == "time" else m)[None]
            hit = (pos >= start[:, None]) & (pos < (start + w)[:, None])
            keep = keep & ~(hit[:, :, None] if axis == "time" else hit[:, None, :])
    return jnp.where(keep, feats, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Models.

def _sinusoid(length: int, dim: int) -> np.ndarray:
    pos = np.arange(length)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, dim, 2) / dim)[None]
    pe = np.zeros((length, dim), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)[:, :dim // 2]
    return pe


def _pad(kernel: int) -> list[tuple[int, int]]:
    """Fixed (left, right) conv padding: output frame j always reads input frames 2j − (k−1)/2 …, whatever the
    padded length ("SAME" with stride 2 shifts its grid by one frame with the parity of the input length, so a
    transcript would depend on the batch it was padded in)."""
    return [((kernel - 1) // 2, kernel // 2)]


class _EncoderBlock(nn.Module):
    """Pre-LN bidirectional transformer block with a key-padding mask."""

    dim: int
    num_heads: int
    mlp_ratio: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dropout_rate=self.dropout,
                                            deterministic=not train)(h, h, mask=nn.make_attention_mask(mask, mask))
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Dense(self.dim * self.mlp_ratio)(nn.LayerNorm()(x))
        h = nn.Dense(self.dim)(nn.gelu(h))
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class PhonemeRecogniser(nn.Module):
    """Log-mels [B,F,M] → CTC logits [B,F',V] (F' = F / 2^conv_layers) and their frame mask [B,F']: stride-2
    1-D convs, then a transformer encoder without a causal mask (docs/method.md §12)."""

    vocab_size: int
    conv_channels: int = 192
    conv_layers: int = 2
    conv_kernel: int = 5
    dim: int = 192
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1

    @nn.compact
    def __call__(self, feats: jax.Array, mask: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        chex.assert_rank(feats, 3)
        chex.assert_equal_shape_prefix((feats, mask), 2)
        x = feats
        for _ in range(self.conv_layers):
            x = nn.Conv(self.conv_channels, (self.conv_kernel,), strides=(2,), padding=_pad(self.conv_kernel))(x)
            x = nn.gelu(x)
            mask = mask[:, ::2]
            x = jnp.where(mask[..., None], x, 0.0)
        x = nn.Dense(self.dim)(x) + _sinusoid(x.shape[1], self.dim)[None]
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for _ in range(self.depth):
            x = _EncoderBlock(self.dim, self.num_heads, self.mlp_ratio, self.dropout)(x, mask, train)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x)), mask


class SpeakerEncoder(nn.Module):
    """Log-mels [B,F,M] → L2-normalised speaker embedding [B,D]: 1-D convs (LayerNorm, ReLU), attentive
    statistics pooling (weighted mean and std over valid frames), a linear layer (docs/method.md §12)."""

    channels: int = 256
    conv_layers: int = 4
    conv_kernel: int = 5
    strided_layers: int = 1
    embed_dim: int = 128

    @nn.compact
    def __call__(self, feats: jax.Array, mask: jax.Array) -> jax.Array:
        chex.assert_rank(feats, 3)
        chex.assert_equal_shape_prefix((feats, mask), 2)
        x = feats
        for i in range(self.conv_layers):
            stride = 2 if i < self.strided_layers else 1
            x = nn.relu(nn.LayerNorm()(nn.Conv(self.channels, (self.conv_kernel,), strides=(stride,),
                                               padding=_pad(self.conv_kernel))(x)))
            mask = mask[:, ::stride]
            x = jnp.where(mask[..., None], x, 0.0)
        score = nn.Dense(1)(jnp.tanh(nn.Dense(self.channels // 2)(x)))[..., 0]
        w = jax.nn.softmax(jnp.where(mask, score, -1e9), axis=1)[..., None]
        mean = jnp.sum(w * x, axis=1)
        std = jnp.sqrt(jnp.maximum(jnp.sum(w * x ** 2, axis=1) - mean ** 2, 1e-5))
        e = nn.Dense(self.embed_dim)(jnp.concatenate([mean, std], axis=-1))
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-6)


def _recogniser(c: Mapping[str, Any], vocab_size: int) -> PhonemeRecogniser:
    return PhonemeRecogniser(vocab_size, int(c["conv_channels"]), int(c["conv_layers"]), int(c["conv_kernel"]),
                             int(c["dim"]), int(c["depth"]), int(c["num_heads"]), int(c["mlp_ratio"]),
                             float(c["dropout"]))


def _speaker_encoder(c: Mapping[str, Any]) -> SpeakerEncoder:
    return SpeakerEncoder(int(c["channels"]), int(c["conv_layers"]), int(c["conv_kernel"]), int(c["strided_layers"]),
                          int(c["embed_dim"]))


def _optimizer(c: Mapping[str, Any]) -> optax.GradientTransformation:
    steps = int(c["steps"])
    lr = optax.warmup_cosine_decay_schedule(0.0, float(c["lr"]), min(int(c["warmup_steps"]), max(steps - 1, 0)),
                                            max(steps, 1), float(c["lr"]) * 0.05)
    return optax.chain(optax.clip_by_global_norm(float(c["clip_norm"])),
                       optax.adamw(lr, weight_decay=float(c["weight_decay"])))


def _jit(fn, c: Mapping[str, Any]):
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0} if c["fast_compile"] else None)


def _init(init_params, tx: optax.GradientTransformation, key: jax.Array, c: Mapping[str, Any]) -> tuple[Any, Any]:
    """(params, optimizer state) in one compiled call: eager Flax init dispatches op by op (seconds on CPU)."""
    return _jit(lambda k: (lambda p: (p, tx.init(p)))(init_params(k)), c)(key)


# Config keys that change the compiled inference function (the rest are training-only).
_RECOGNISER_KEYS = ("sample_rate", "n_fft", "hop", "n_mels", "conv_channels", "conv_layers", "conv_kernel", "dim",
                    "depth", "num_heads", "mlp_ratio", "dropout", "fast_compile")
_SPEAKER_KEYS = ("sample_rate", "n_fft", "hop", "n_mels", "channels", "conv_layers", "conv_kernel",
                 "strided_layers", "embed_dim", "fast_compile")


# ---------------------------------------------------------------------------------------------------------------
# CTC recogniser.

def _ctc_frames(num_samples: int, c: Mapping[str, Any]) -> int:
    frames = 1 + num_samples // int(c["hop"]) if num_samples else 0
    for _ in range(int(c["conv_layers"])):
        frames = -(-frames // 2)
    return frames


def _ctc_min_frames(ids: Sequence[int]) -> int:
    """Frames CTC needs for a label sequence: one per label plus a blank between equal neighbours."""
    return len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))


def _length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches of similar lengths: sort by jittered length, cut into full batches, shuffle them."""
    n = len(lengths)
    if n < batch_size:
        return [rng.choice(n, batch_size, replace=True)]
    order = np.argsort(lengths * rng.uniform(0.9, 1.1, n), kind="stable")
    start = rng.integers(0, n % batch_size + 1)
    batches = [order[start + i:start + i + batch_size] for i in range(0, n - batch_size + 1 - start, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_recogniser(audio_list: Sequence[np.ndarray], phoneme_strings: Sequence[str], sample_rate: int,
                     config: Mapping[str, Any] | None = None, seed: int = 0) -> Bundle:
    """Trains the CTC phoneme recogniser (AdamW, warmup + cosine, `steps` length-bucketed batches) on mono float
    waveforms and their IPA strings; returns the bundle (docs/method.md §12). `audio_list` may be a lazy reader
    (`_Waveforms`): only the lengths and a few prefetched batches are in memory, the labels are encoded per batch."""
    c = _merge(recogniser_config(), config)
    c.sample_rate = int(sample_rate)
    waves = _Waveforms(audio_list)
    if len(waves) != len(phoneme_strings) or not len(waves):
        raise DataError(f"train_recogniser: {len(waves)} waveforms, {len(phoneme_strings)} phoneme strings")
    vocab = phoneme_vocab(phoneme_strings)
    label_len, min_frames = np.zeros(len(waves), np.int64), np.zeros(len(waves), np.int64)
    for i, p in enumerate(phoneme_strings):
        ids = encode_phonemes(p, vocab)
        label_len[i], min_frames[i] = len(ids), _ctc_min_frames(ids)
    ok = np.array([i for i in range(len(waves)) if 0 < min_frames[i] <= _ctc_frames(int(waves.lengths[i]), c)],
                  np.int64)
    if len(ok) < len(waves):
        logging.warning("train_recogniser: %d of %d utterances skipped (empty, or more labels than CTC frames at "
                        "conv_layers=%d)", len(waves) - len(ok), len(waves), c.conv_layers)
    if len(ok) < 0.9 * len(waves):
        raise DataError(f"train_recogniser: only {len(ok)} of {len(waves)} utterances fit CTC (more labels than "
                        f"frames); use fewer conv_layers or a smaller hop")
    max_label = -(-int(label_len[ok].max()) // 16) * 16

    norm = _norm_stats(waves, c, seed, rows=ok)
    model = _recogniser(c, len(vocab))
    rng = jax.random.PRNGKey(seed)
    dummy = jnp.zeros((1, 8, int(c.n_mels)))
    tx = _optimizer(c)
    params, opt_state = _init(lambda k: model.init(k, dummy, jnp.ones((1, 8), bool))["params"], tx, rng, c)
    cfg = c.to_dict()

    @functools.partial(_jit, c=cfg)
    def step(params, opt_state, audio, lengths, lab, lab_pad, key):
        k_aug, k_drop = jax.random.split(key)
        feats, mask = _features(audio, lengths, cfg, norm)
        feats = _spec_augment(k_aug, feats, mask, cfg)

        def loss_fn(p):
            logits, out_mask = model.apply({"params": p}, feats, mask, train=True, rngs={"dropout": k_drop})
            loss = optax.ctc_loss(logits, 1.0 - out_mask.astype(jnp.float32), lab, lab_pad, blank_id=0)
            return jnp.mean(loss / jnp.maximum(jnp.sum(1.0 - lab_pad, axis=1), 1.0))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # The batches (positions in `ok`) are drawn up front from the seed and the lengths alone; each is then read,
    # padded and labelled in the background.
    lengths = waves.lengths[ok]
    np_rng = np.random.default_rng(seed)
    plan: list[np.ndarray] = []
    batches: list[np.ndarray] = []
    for _ in range(int(c.steps)):
        if not batches:
            batches = _length_batches(lengths, int(c.batch_size), np_rng)
        plan.append(batches.pop())
    multiple = _pad_multiple(c)

    def make(idx: np.ndarray) -> tuple[np.ndarray, ...]:
        rows = ok[idx]
        lab = np.zeros((len(rows), max_label), np.int32)
        lab_pad = np.ones((len(rows), max_label), np.float32)
        for r, row in enumerate(rows):
            ids = encode_phonemes(phoneme_strings[row], vocab)
            lab[r, :len(ids)], lab_pad[r, :len(ids)] = ids, 0.0
        return (*_pad_batch(waves.read(rows), multiple), lab, lab_pad)

    for i, (audio, lens, lab, lab_pad) in enumerate(_prefetched(plan, make)):
        params, opt_state, loss = step(params, opt_state, audio, lens, lab, lab_pad, jax.random.fold_in(rng, i))
        if (i + 1) % max(int(c.steps) // 10, 1) == 0:
            logging.info("recogniser step %d: ctc loss per label %.4f", i + 1, float(loss))
    return dict(kind="recogniser", config=cfg, vocab=list(vocab), norm=norm, params=jax.device_get(params))


@functools.lru_cache(maxsize=16)
def _recogniser_apply(cfg_items: tuple, vocab_size: int):
    c = dict(cfg_items)
    model = _recogniser(c, vocab_size)

    @functools.partial(_jit, c=c)
    def apply(params, norm, audio, lengths):
        feats, mask = _features(audio, lengths, c, norm)
        logits, out_mask = model.apply({"params": params}, feats, mask)
        return jnp.argmax(logits, axis=-1), jnp.sum(out_mask, axis=1)

    return apply


def _batched(waves: _Waveforms, c: Mapping[str, Any], fn) -> list[Any]:
    """Runs fn(audio [B,T], lengths [B]) -> per-row results over length-sorted fixed-size batches; input order."""
    order = np.argsort(waves.lengths, kind="stable")
    bs, multiple = int(c["eval_batch_size"]), _pad_multiple(c)
    out: list[Any] = [None] * len(waves)
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        audio, lengths = _pad_batch(waves.read(idx), multiple)
        if len(idx) < bs:  # pad to the fixed batch: one compile per padded length
            audio = np.concatenate([audio, np.zeros((bs - len(idx), audio.shape[1]), np.float32)])
            lengths = np.concatenate([lengths, np.zeros(bs - len(idx), np.int32)])
        for r, res in zip(idx, fn(audio, lengths)):
            out[r] = res
    return out


def _check_bundle(bundle: Bundle, kind: str, sample_rate: int | None) -> None:
    if not isinstance(bundle, Mapping) or bundle.get("kind") != kind:
        raise DataError(f"expected a {kind} bundle (from train_{kind}/load_judge), got "
                        f"{bundle.get('kind') if isinstance(bundle, Mapping) else type(bundle).__name__}")
    if sample_rate is not None and int(sample_rate) != int(bundle["config"]["sample_rate"]):
        raise DataError(f"audio at {sample_rate} Hz but the {kind} judge was trained at "
                        f"{bundle['config']['sample_rate']} Hz: resample it first")


def transcribe(params: Bundle, audio_list: Sequence[np.ndarray], sample_rate: int | None = None) -> list[str]:
    """Greedy CTC decoding (best path, repeats merged, blanks dropped) of each waveform → IPA strings. The audio
    must be at the bundle's sample rate (checked when `sample_rate` is given)."""
    _check_bundle(params, "recogniser", sample_rate)
    c, vocab = params["config"], params["vocab"]
    apply = _recogniser_apply(tuple((k, c[k]) for k in _RECOGNISER_KEYS), len(vocab))

    def run(audio, lengths):
        best, n = (np.asarray(x) for x in apply(params["params"], params["norm"], audio, lengths))
        rows = []
        for path, k in zip(best, n):
            path = path[:k]
            keep = path[np.r_[True, path[1:] != path[:-1]]] if k else path
            rows.append(decode_phonemes(keep[keep != 0], vocab))
        return rows

    return _batched(_Waveforms(audio_list), c, run)


def recogniser_error_rates(params: Bundle, audio_list: Sequence[np.ndarray], phoneme_strings: Sequence[str],
                           sample_rate: int | None = None) -> dict[str, float]:
    """PER and WER of the transcripts against known phonemes; on real held-out audio, the judge's own floor
    (docs/method.md §12)."""
    hyps = transcribe(params, audio_list, sample_rate)
    return dict(per=phoneme_error_rate(phoneme_strings, hyps), wer=word_error_rate(phoneme_strings, hyps))


# ---------------------------------------------------------------------------------------------------------------
# Speaker judge.

def train_speaker_model(audio_list: Sequence[np.ndarray], speakers: Sequence[int], sample_rate: int,
                        config: Mapping[str, Any] | None = None, seed: int = 0) -> Bundle:
    """Trains the speaker encoder with additive-margin softmax over the training speakers on random fixed-length
    crops (speakers sampled uniformly); returns the bundle (docs/method.md §12). `audio_list` may be a lazy reader
    (`_Waveforms`): only the lengths and a few prefetched batches are in memory."""
    c = _merge(speaker_config(), config)
    c.sample_rate = int(sample_rate)
    if not (float(c.noise_snr_min_db) <= float(c.noise_snr_max_db) and 0.0 <= float(c.noise_prob) <= 1.0
            and float(c.eq_db) >= 0 and int(c.eq_bands) >= 0):
        raise ConfigError(f"speaker judge augmentation: need noise_snr_min_db ≤ noise_snr_max_db "
                          f"({c.noise_snr_min_db}, {c.noise_snr_max_db}), noise_prob in [0, 1] ({c.noise_prob}), "
                          f"eq_db ≥ 0 ({c.eq_db}) and eq_bands ≥ 0 ({c.eq_bands})")
    waves = _Waveforms(audio_list)
    speakers = np.asarray(speakers)
    if len(waves) != len(speakers) or not len(waves):
        raise DataError(f"train_speaker_model: {len(waves)} waveforms, {len(speakers)} speaker ids")
    names, spk = np.unique(speakers, return_inverse=True)
    if len(names) < 2:
        raise DataError("train_speaker_model needs at least 2 speakers")
    by_speaker = [np.flatnonzero(spk == k) for k in range(len(names))]
    norm = _norm_stats(waves, c, seed)
    cfg = c.to_dict()
    model = _speaker_encoder(c)
    rng = jax.random.PRNGKey(seed)
    k_init, k_head = jax.random.split(rng)
    tx = _optimizer(c)
    params, opt_state = _init(lambda k: dict(
        encoder=model.init(k, jnp.zeros((1, 8, int(c.n_mels))), jnp.ones((1, 8), bool))["params"],
        head=jax.random.normal(k_head, (int(c.embed_dim), len(names))) / math.sqrt(int(c.embed_dim))), tx, k_init, c)
    margin, scale = float(c.margin), float(c.scale)

    @functools.partial(_jit, c=cfg)
    def step(params, opt_state, audio, lengths, labels, key):
        feats, mask = _channel_augment(key, audio, lengths, cfg, norm)

        def loss_fn(p):
            e = model.apply({"params": p["encoder"]}, feats, mask)
            w = p["head"] / jnp.linalg.norm(p["head"], axis=0, keepdims=True)
            cos = e @ w
            logits = scale * (cos - margin * jax.nn.one_hot(labels, cos.shape[1]))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Each step's speakers, utterances and crop offsets are drawn up front from the seed and the lengths alone;
    # the crops are then read in the background.
    crop = int(round(float(c.crop_seconds) * c.sample_rate))
    np_rng = np.random.default_rng(seed)
    bs = int(c.batch_size)
    plan: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for _ in range(int(c.steps)):
        labels = np_rng.integers(0, len(names), bs)
        rows, offsets = np.zeros(bs, np.int64), np.zeros(bs, np.int64)
        for r, k in enumerate(labels):
            rows[r] = by_speaker[k][np_rng.integers(len(by_speaker[k]))]
            offsets[r] = np_rng.integers(0, max(int(waves.lengths[rows[r]]) - crop, 0) + 1)
        plan.append((labels.astype(np.int32), rows, offsets))

    def make(p: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
        labels, rows, offsets = p
        audio = np.zeros((bs, crop), np.float32)
        lengths = np.zeros(bs, np.int32)
        for r, (a, off) in enumerate(zip(waves.read(rows), offsets)):
            seg = a[off:off + crop]
            audio[r, :len(seg)], lengths[r] = seg, len(seg)
        return audio, lengths, labels

    for i, (audio, lengths, labels) in enumerate(_prefetched(plan, make)):
        params, opt_state, loss = step(params, opt_state, audio, lengths, labels, jax.random.fold_in(rng, i))
        if (i + 1) % max(int(c.steps) // 10, 1) == 0:
            logging.info("speaker model step %d: am-softmax loss %.4f", i + 1, float(loss))
    return dict(kind="speaker_model", config=cfg, norm=norm, params=jax.device_get(params["encoder"]),
                speakers=[int(s) if np.issubdtype(type(s), np.integer) else str(s) for s in names.tolist()])


@functools.lru_cache(maxsize=16)
def _speaker_apply(cfg_items: tuple):
    c = dict(cfg_items)
    model = _speaker_encoder(c)
    return _jit(lambda params, norm, audio, lengths: model.apply({"params": params},
                                                                  *_features(audio, lengths, c, norm)), c)


def speaker_embeddings(params: Bundle, audio_list: Sequence[np.ndarray], sample_rate: int | None = None
                       ) -> np.ndarray:
    """L2-normalised embeddings [N, D] of whole waveforms (at the bundle's sample rate, checked when given)."""
    _check_bundle(params, "speaker_model", sample_rate)
    c = params["config"]
    waves = _Waveforms(audio_list)
    if not len(waves):
        return np.zeros((0, int(c["embed_dim"])), np.float32)
    apply = _speaker_apply(tuple((k, c[k]) for k in _SPEAKER_KEYS))
    rows = _batched(waves, c, lambda a, n: list(np.asarray(apply(params["params"], params["norm"], a, n))))
    return np.stack(rows).astype(np.float32)


def speaker_similarity(params: Bundle, audio_a: Sequence[np.ndarray], audio_b: Sequence[np.ndarray],
                       sample_rate: int | None = None) -> np.ndarray:
    """Cosine similarity [N] of the speaker embeddings of each pair (audio_a[i], audio_b[i])."""
    if len(audio_a) != len(audio_b):
        raise DataError(f"speaker_similarity: {len(audio_a)} vs {len(audio_b)} waveforms")
    e = speaker_embeddings(params, list(audio_a) + list(audio_b), sample_rate)
    return np.sum(e[:len(audio_a)] * e[len(audio_a):], axis=1)


def speaker_baselines(params: Bundle, audio_list: Sequence[np.ndarray], speakers: Sequence[Any],
                      sample_rate: int | None = None) -> dict[str, float]:
    """Real-audio reference points for SIM: mean (and std) cosine over all pairs of distinct utterances of the same
    speaker, and over all pairs of different speakers (docs/method.md §12); NaN where a kind of pair is missing."""
    return embedding_baselines(speaker_embeddings(params, audio_list, sample_rate), speakers)


def embedding_baselines(embeddings: np.ndarray, speakers: Sequence[Any], against: np.ndarray | None = None
                        ) -> dict[str, float]:
    """`speaker_baselines` from embeddings [N, D]: cosines of utterance pairs (i, j ≠ i), split by same or different
    speaker. `against` [N, D] (row j the same utterance as row j of `embeddings`, e.g. its real audio where
    `embeddings` are a codec's resynthesis): j's side of each pair comes from it, so `same` is how close the
    resynthesis of one utterance is to the speaker's other real utterances, comparable to the real audio's `same`."""
    e = np.asarray(embeddings)
    speakers = np.asarray(speakers)
    if len(speakers) != len(e) or len(e) < 2:
        raise DataError(f"speaker_baselines needs ≥ 2 waveforms with a speaker id each; got {len(e)} waveforms, "
                        f"{len(speakers)} ids")
    if against is None:  # symmetric: each unordered pair once
        i, j = np.triu_indices(len(e), k=1)
        other = e
    else:
        if np.shape(against) != e.shape:
            raise DataError(f"embedding_baselines: against has shape {np.shape(against)}, embeddings {e.shape}")
        i, j = np.nonzero(~np.eye(len(e), dtype=bool))
        other = np.asarray(against)
    cos = np.sum(e[i] * other[j], axis=1)
    same = speakers[i] == speakers[j]
    stats = lambda x: (float(x.mean()), float(x.std())) if len(x) else (float("nan"), float("nan"))  # noqa: E731
    (s_mean, s_std), (d_mean, d_std) = stats(cos[same]), stats(cos[~same])
    return dict(same=s_mean, same_std=s_std, n_same=int(same.sum()), different=d_mean, different_std=d_std,
                n_different=int((~same).sum()))


# ---------------------------------------------------------------------------------------------------------------
# Files.

def save_judge(bundle: Bundle, path: str) -> None:
    """Writes a judge bundle as msgpack, atomically (temp file + rename; `path` may be a URL)."""
    storage.write_bytes_atomic(path, flax.serialization.msgpack_serialize(jax.device_get(dict(bundle))))


def load_judge(path: str) -> Bundle:
    """Reads a bundle written by `save_judge`."""
    bundle = flax.serialization.msgpack_restore(storage.read_bytes(path))
    if not isinstance(bundle, dict) or bundle.get("kind") not in ("recogniser", "speaker_model"):
        raise DataError(f"{path} is not a speech judge bundle")
    return bundle
