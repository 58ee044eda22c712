"""Image metrics: PSNR, the σ-VAE variance-collapse ratio (docs/method.md §2.4), uint8 conversion."""

from __future__ import annotations

import numpy as np


def psnr(images_a: np.ndarray, images_b: np.ndarray, data_range: float = 2.0) -> float:
    """Mean over images of per-image PSNR in dB, images [N,...] (default range 2 for [-1,1] floats).

    Per-image PSNR = 10·log10(data_range² / MSE) with the MSE over all pixels of that image; the per-image MSE is
    floored at 1e-10 so identical images give a large finite value instead of inf.
    """
    a = np.asarray(images_a, np.float64)
    b = np.asarray(images_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    mse = np.mean((a - b).reshape(len(a), -1) ** 2, axis=1)
    return float(np.mean(10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-10))))


def variance_collapse_ratio(mean_abs_sigma: float | np.ndarray, mu: np.ndarray) -> float:
    """r = mean posterior |σ| / std(μ), std over all entries of μ [N,...] (the scale latent normalisation uses).

    r ≪ 0.05 means the posterior noise is negligible next to the latent signal: a collapsed, deterministic latent
    space (docs/method.md §2.4).
    """
    std = float(np.std(np.asarray(mu, np.float64)))
    return float(np.mean(np.abs(np.asarray(mean_abs_sigma, np.float64)))) / max(std, 1e-12)


