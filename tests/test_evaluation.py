"""Fréchet distance, image metrics, the evaluation classifier and image grids."""

import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines.embedded import load_embedded
from latent_lm.evaluation import classifier as clf
from latent_lm.evaluation.frechet import feature_stats, frechet_distance
from latent_lm.evaluation.grids import save_image_grid
from latent_lm.evaluation.image_metrics import psnr, variance_collapse_ratio
from latent_lm.pixels import to_uint8


def _psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fd(x, y):
    """Independent route: Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½), all symmetric, via eigh."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r = _psd_sqrt(s1)
    return np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r @ s2 @ r))


def test_frechet_distance_matches_reference():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(2000, d)) @ rng.normal(size=(d, d)) * 0.5
    b = rng.normal(size=(1500, d)) * 1.3 + 0.4
    fd = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert fd == pytest.approx(_reference_fd(a, b), rel=1e-6)
    assert abs(frechet_distance(*feature_stats(a), *feature_stats(a))) < 1e-6
    # Closed form for diagonal Gaussians: ‖Δμ‖² + Σ (σ1 − σ2)².
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    fd = frechet_distance(mu1, np.diag([1.0, 4.0, 9.0]), mu2, np.diag([4.0, 1.0, 9.0]))
    assert fd == pytest.approx(5.0 + 1.0 + 1.0)


def test_frechet_distance_singular_covariance():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))  # fewer samples than dims: rank-deficient Σ
    fd = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert np.isfinite(fd) and fd > 0


def test_psnr_known_values():
    a = np.zeros((2, 4, 4, 1), np.float32)
    b = np.stack([np.full((4, 4, 1), 0.2), np.full((4, 4, 1), 0.02)]).astype(np.float32)
    # MSE 0.04 → 10·log10(4/0.04) = 20 dB; MSE 4e-4 → 40 dB; mean over images = 30 dB.
    assert psnr(a, b) == pytest.approx(30.0, abs=1e-4)
    assert psnr(a[:1], b[:1], data_range=1.0) == pytest.approx(10 * np.log10(1 / 0.04), abs=1e-4)
    assert np.isfinite(psnr(a, a))


def test_variance_collapse_ratio_and_to_uint8():
    mu = np.random.default_rng(0).normal(size=(1000, 8, 4)) * 2.0
    assert variance_collapse_ratio(0.1, mu) == pytest.approx(0.05, rel=0.02)
    assert variance_collapse_ratio(np.full((10, 4), -0.1), mu) == pytest.approx(0.05, rel=0.02)
    out = to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 2.0]))
    assert out.dtype == np.uint8 and out.tolist() == [0, 0, 128, 255, 255]


def test_classifier_learns_mnist(tmp_path):
    """Trained on the embedded digits it classifies the held-out ones (150 of the runs' 1,500 steps suffice to show
    it), saves and loads, and classifies a partial batch as the full one."""
    x, y = load_embedded("mnist", "train")
    tx, ty = load_embedded("mnist", "test")
    params = clf.train_classifier(x, y, 10, steps=150, seed=0)  # 94.4% here (96.6% at 300 steps, 97.2% at 500)
    logits, feats = clf.classify(params, tx, 10)
    assert logits.shape == (1000, 10) and feats.shape == (1000, 128)
    acc = float((logits.argmax(-1) == ty).mean())
    assert acc >= 0.92, acc  # chance: 0.1
    path = str(tmp_path / "eval" / "classifier.msgpack")
    clf.save_classifier(params, path)
    assert os.listdir(tmp_path / "eval") == ["classifier.msgpack"]
    small_logits, small_feats = clf.classify(clf.load_classifier(path), tx[:7], 10)  # padded partial batch
    np.testing.assert_allclose(small_logits, logits[:7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small_feats, feats[:7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid(tmp_path, channels, mode):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 28, 28, channels), dtype=np.uint8)
    path = str(tmp_path / "samples" / "grid.png")
    save_image_grid(images, path, ncols=10)
    assert os.listdir(tmp_path / "samples") == ["grid.png"]
    with Image.open(path) as im:
        assert im.mode == mode and im.size == (10 * 30 + 2, 3 * 30 + 2)  # 2-px padding around 28-px tiles
        arr = np.asarray(im).reshape(92, 302, channels)
    np.testing.assert_array_equal(arr[2:30, 2:30], images[0])
    np.testing.assert_array_equal(arr[62:90, 32:60], images[21])
