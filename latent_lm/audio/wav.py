"""WAV files of the speech stages and CLIs: float waveforms in [-1, 1] ↔ 16-bit PCM (numpy and scipy only, so the
PyTorch-only TTS path uses them too)."""

from __future__ import annotations

import io
from math import gcd

import numpy as np
import scipy.io.wavfile
import scipy.signal

from latent_lm import storage
from latent_lm.errors import DataError, MissingInputError


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes of a float waveform in [-1, 1]."""
    pcm = np.round(np.clip(np.asarray(audio, np.float32), -1.0, 32767 / 32768) * 32768).astype(np.int16)
    buf = io.BytesIO()
    scipy.io.wavfile.write(buf, int(sample_rate), pcm)
    return buf.getvalue()


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV of a float waveform in [-1, 1], written atomically."""
    storage.write_bytes_atomic(path, wav_bytes(audio, sample_rate))


def read_wav(path: str) -> np.ndarray:
    """A 16-bit PCM WAV that `write_wav` wrote → float32 in [-1, 1]."""
    with storage.open_file(path) as f:
        _, pcm = scipy.io.wavfile.read(io.BytesIO(f.read()))
    return pcm.astype(np.float32) / 32768.0


def read_recording(path: str, sample_rate: int) -> np.ndarray:
    """A WAV file (PCM or float, mono or multi-channel, any rate) → mono float32 in [-1, 1] at `sample_rate`."""
    if not storage.exists(path):
        raise MissingInputError(f"--prompt={path} not found")
    try:
        with storage.open_file(path) as f:
            rate, data = scipy.io.wavfile.read(io.BytesIO(f.read()))
    except ValueError as e:
        raise DataError(f"--prompt={path} is not a WAV file scipy can read: {e}") from None
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        data = (data.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    audio = np.asarray(data, np.float64)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.size == 0:
        raise DataError(f"--prompt={path} holds no samples")
    if rate != sample_rate:
        g = gcd(int(rate), int(sample_rate))
        audio = scipy.signal.resample_poly(audio, sample_rate // g, rate // g)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)

