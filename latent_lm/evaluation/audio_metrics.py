"""Audio reconstruction metrics (docs/method.md §12): mel distance, STOI, and the σ-VAE variance-collapse ratio.

All numpy, on host, one utterance at a time (utterances have different lengths; nothing here recompiles).
- `mel_distance`: mean |log-mel(x) − log-mel(x̂)|, the features of `latent_lm.audio.features` (centred Hann STFT,
  Slaney mel, log of the magnitude floored at 1e-5) at the mel loss's resolution (`features.mel_resolution`).
- `stoi`: short-time objective intelligibility, Taal et al. 2011 ("An algorithm for intelligibility prediction of
  time–frequency weighted noisy speech", IEEE TASLP 19(7)), as the reference MATLAB code and `pystoi` compute it:
  resample to 10 kHz, drop frames more than 40 dB below the loudest (256-sample frames, hop 128, OLA back), STFT
  (256-sample Hann frames, hop 128, 512-point FFT), 15 one-third-octave bands from 150 Hz, 30-frame (384 ms)
  segments, the degraded envelope normalised to the clean one's energy and clipped at 1 + 10^(15/20) times it
  (signal-to-distortion ≥ −15 dB), then the mean correlation over bands and segments. Resampling here is
  `scipy.signal.resample_poly` (pystoi and MATLAB use their own polyphase filter), so values can differ from
  pystoi in the third decimal.
- `variance_collapse_ratio`: the image side's r = E|σ_b| / std(μ) (`image_metrics.variance_collapse_ratio`), with
  E|σ_b| = std/0.8·√(2/π) for σ_b ~ N(0, (std/0.8)²) (docs/method.md §2.4).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import scipy.signal

from latent_lm.audio.features import LOG_MEL_FLOOR, MAG_FLOOR, hann_window, mel_filterbank, mel_resolution
from latent_lm.evaluation.image_metrics import variance_collapse_ratio
from latent_lm.latents import SIGMA_DIVISOR

STOI_FS = 10_000
STOI_FRAME = 256
STOI_NFFT = 512
STOI_BANDS = 15
STOI_MIN_FREQ = 150.0
STOI_SEGMENT = 30  # frames: 30 × 128 / 10 kHz = 384 ms
STOI_BETA = -15.0  # lower signal-to-distortion bound, dB
STOI_DYN_RANGE = 40.0  # dB below the loudest frame counted as silence
EPS = np.finfo(np.float64).eps


# ---------------------------------------------------------------------------------------------------- mel distance

def log_mel_np(audio: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """numpy twin of `features.log_mel` for one waveform [T] → [frames, n_mels] (float64)."""
    x = np.pad(np.asarray(audio, np.float64), (n_fft // 2, n_fft // 2), mode="reflect")
    n = 1 + (len(x) - n_fft) // hop
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop][:n] * hann_window(n_fft)
    mag = np.maximum(np.abs(np.fft.rfft(frames, axis=-1)), MAG_FLOOR)
    return np.log(np.maximum(mag @ mel_filterbank(sample_rate, n_fft, n_mels).astype(np.float64), LOG_MEL_FLOOR))


def _pairs(refs, ests) -> list[tuple[np.ndarray, np.ndarray]]:
    """Utterance pairs from [B, T] arrays or lists of 1-D arrays, each pair cut to its shorter length."""
    if len(refs) != len(ests):
        raise ValueError(f"{len(refs)} reference utterances vs {len(ests)} estimates")
    out = []
    for r, e in zip(refs, ests):
        r, e = np.asarray(r, np.float64).reshape(-1), np.asarray(e, np.float64).reshape(-1)
        n = min(len(r), len(e))
        out.append((r[:n], e[:n]))
    return out


def mel_distance(refs, ests, sample_rate: int, resolution: Sequence[int] | None = None) -> float:
    """Mean over utterances of mean |log-mel(x) − log-mel(x̂)|; `resolution` = (n_fft, hop, n_mels), default the mel
    loss's (`features.mel_resolution`)."""
    n_fft, hop, n_mels = resolution or mel_resolution(sample_rate)
    return float(np.mean([np.mean(np.abs(log_mel_np(r, sample_rate, n_fft, hop, n_mels)
                                          - log_mel_np(e, sample_rate, n_fft, hop, n_mels)))
                          for r, e in _pairs(refs, ests)]))


# ---------------------------------------------------------------------------------------------------- STOI

def _stoi_window() -> np.ndarray:
    return np.hanning(STOI_FRAME + 2)[1:-1]  # MATLAB hanning(256): no zero end points


def third_octave_bands(fs: int = STOI_FS, nfft: int = STOI_NFFT, num_bands: int = STOI_BANDS,
                       min_freq: float = STOI_MIN_FREQ) -> np.ndarray:
    """The one-third-octave band matrix [num_bands, nfft/2 + 1] of 0/1 (Taal's `thirdoct`): band k spans the FFT bins
    nearest to min_freq·2^((2k−1)/6) (inclusive) up to min_freq·2^((2k+1)/6) (exclusive)."""
    f = np.linspace(0, fs, nfft + 1)[: nfft // 2 + 1]
    k = np.arange(num_bands, dtype=np.float64)
    lo = min_freq * 2.0 ** ((2 * k - 1) / 6)
    hi = min_freq * 2.0 ** ((2 * k + 1) / 6)
    obm = np.zeros((num_bands, len(f)))
    for i in range(num_bands):
        obm[i, np.argmin(np.square(f - lo[i])):np.argmin(np.square(f - hi[i]))] = 1.0
    return obm


def _frames(x: np.ndarray, hop: int) -> np.ndarray:
    """Windowed frames starting at 0, hop, … < len(x) − 256 (MATLAB `1:hop:length(x)−N`)."""
    starts = range(0, len(x) - STOI_FRAME, hop)
    return np.array([_stoi_window() * x[i:i + STOI_FRAME] for i in starts]).reshape(-1, STOI_FRAME)


def _remove_silent_frames(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hop = STOI_FRAME // 2
    xf, yf = _frames(x, hop), _frames(y, hop)
    if not len(xf):
        return x[:0], y[:0]
    energy = 20 * np.log10(np.linalg.norm(xf, axis=1) + EPS)
    keep = (np.max(energy) - STOI_DYN_RANGE - energy) < 0
    xf, yf = xf[keep], yf[keep]
    n = len(xf)
    out_len = (n - 1) * hop + STOI_FRAME
    x_sil, y_sil = np.zeros(out_len), np.zeros(out_len)
    for i in range(n):
        x_sil[i * hop:i * hop + STOI_FRAME] += xf[i]
        y_sil[i * hop:i * hop + STOI_FRAME] += yf[i]
    return x_sil, y_sil


def _resample(x: np.ndarray, fs: int) -> np.ndarray:
    if fs == STOI_FS:
        return x
    g = math.gcd(int(fs), STOI_FS)
    return scipy.signal.resample_poly(x, STOI_FS // g, int(fs) // g)


def stoi(clean: np.ndarray, degraded: np.ndarray, sample_rate: int) -> float:
    """STOI of one degraded waveform against its clean reference (1-D, same length; module doc), in about
    [0, 1]: identical signals give 1. Under 384 ms of non-silent speech there is no segment: warns and gives 1e-5
    (as pystoi)."""
    x, y = np.asarray(clean, np.float64).reshape(-1), np.asarray(degraded, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"stoi: clean and degraded lengths differ, {x.shape} vs {y.shape}")
    x, y = _remove_silent_frames(_resample(x, sample_rate), _resample(y, sample_rate))
    hop = STOI_FRAME // 2
    x_spec = np.fft.rfft(_frames(x, hop), n=STOI_NFFT, axis=-1).T  # [bins, frames]
    y_spec = np.fft.rfft(_frames(y, hop), n=STOI_NFFT, axis=-1).T
    if x_spec.shape[1] < STOI_SEGMENT:
        warnings.warn("stoi: under 30 frames (384 ms) of non-silent speech; returning 1e-5", RuntimeWarning,
                      stacklevel=2)
        return 1e-5
    obm = third_octave_bands()
    x_tob = np.sqrt(obm @ np.square(np.abs(x_spec)))  # [bands, frames]
    y_tob = np.sqrt(obm @ np.square(np.abs(y_spec)))
    win = np.lib.stride_tricks.sliding_window_view
    x_seg = np.moveaxis(win(x_tob, STOI_SEGMENT, axis=1), 1, 0)  # [M, bands, N]
    y_seg = np.moveaxis(win(y_tob, STOI_SEGMENT, axis=1), 1, 0)
    norm = np.linalg.norm(x_seg, axis=2, keepdims=True) / (np.linalg.norm(y_seg, axis=2, keepdims=True) + EPS)
    y_prime = np.minimum(y_seg * norm, x_seg * (1 + 10 ** (-STOI_BETA / 20)))
    y_prime = y_prime - y_prime.mean(axis=2, keepdims=True)
    x_c = x_seg - x_seg.mean(axis=2, keepdims=True)
    y_prime /= np.linalg.norm(y_prime, axis=2, keepdims=True) + EPS
    x_c /= np.linalg.norm(x_c, axis=2, keepdims=True) + EPS
    return float(np.sum(x_c * y_prime) / (x_c.shape[0] * x_c.shape[1]))


def mean_stoi(refs, ests, sample_rate: int) -> float:
    """Mean STOI over utterance pairs ([B, T] arrays or lists of 1-D arrays; each pair cut to its shorter length)."""
    return float(np.mean([stoi(r, e, sample_rate) for r, e in _pairs(refs, ests)]))


# ---------------------------------------------------------------------------------------------------- collapse

def sigma_vae_collapse_ratio(std: float, mu: np.ndarray) -> float:
    """The σ-VAE's variance-collapse ratio E|σ_b| / std(μ) with σ_b ~ N(0, (std/0.8)²) (as the image evaluation)."""
    return variance_collapse_ratio(std / SIGMA_DIVISOR * math.sqrt(2 / math.pi), mu)


def reconstruction_metrics(refs, ests, sample_rate: int, *, mu: np.ndarray | None = None,
                           std: float | None = None) -> dict[str, float]:
    """{"mel_distance", "stoi", "num_utterances"} of reconstructions against references, plus
    "variance_collapse_ratio" when the encoder means `mu` (any shape, e.g. [B, N, C] or concatenated frames) and
    the σ-VAE's `std` are given: one row of the tokenizer table by frame rate."""
    out = {"mel_distance": mel_distance(refs, ests, sample_rate), "stoi": mean_stoi(refs, ests, sample_rate),
           "num_utterances": len(refs)}
    if mu is not None and std is not None:
        out["variance_collapse_ratio"] = sigma_vae_collapse_ratio(std, mu)
    return out
