"""Audio features, the audio σ-VAE's losses and its reconstruction metrics (docs/method.md §12): STFT against
torch.stft, the mel filterbank against one built from the Slaney formula, the MR-STFT loss against an independent
PyTorch computation, zero on identical input, finite gradients, the GAN terms, and STOI's known properties (with
values pinned to pystoi 0.4.1)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from latent_lm.audio import features
from latent_lm.errors import ConfigError
from latent_lm.evaluation import audio_metrics
from latent_lm.models.audio_discriminators import CONV_IMPLS, AudioDiscriminator, TimeConv
from latent_lm.training import audio_losses as al

SR = 16_000


def noise(shape, seed=0, scale=0.3):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def torch_mag(x, n_fft, hop, win, center=True):
    return torch.stft(torch.tensor(x, dtype=torch.float64), n_fft, hop, win,
                      window=torch.hann_window(win, dtype=torch.float64), center=center, pad_mode="reflect",
                      return_complex=True).abs().numpy().transpose(0, 2, 1)


def slaney_filterbank(sr, n_fft, n_mels, fmin, fmax):
    """The Slaney mel filterbank straight from its definition, one filter and one bin at a time."""
    def hz2mel(f):
        return f / (200 / 3) if f < 1000 else 15 + np.log(f / 1000) / (np.log(6.4) / 27)

    def mel2hz(m):
        return m * 200 / 3 if m < 15 else 1000 * np.exp((m - 15) * np.log(6.4) / 27)

    m_lo, m_hi = hz2mel(fmin), hz2mel(fmax)
    edges = [mel2hz(m_lo + (m_hi - m_lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_fft // 2 + 1, n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
        for k in range(n_fft // 2 + 1):
            f = k * sr / n_fft
            if lo < f <= c:
                fb[k, m] = (f - lo) / (c - lo)
            elif c < f < hi:
                fb[k, m] = (hi - f) / (hi - c)
        fb[:, m] *= 2 / (hi - lo)
    return fb


def test_stft_magnitude_matches_torch():
    x = noise((2, 3000))
    for n_fft, hop, win in ((256, 64, 256), (512, 128, 400)):
        for center in (True, False):
            ours = np.asarray(jax.jit(features.stft_magnitude, static_argnums=(1, 2, 3, 4))(x, n_fft, hop, win, center))
            ref = torch_mag(x, n_fft, hop, win, center)
            assert ours.shape == ref.shape == (2, features.num_frames(3000, n_fft, hop, center), n_fft // 2 + 1)
            np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())


def test_mel_filterbank_matches_the_slaney_formula():
    assert features.hz_to_mel(1000.0) == pytest.approx(15.0)
    f = np.array([0.0, 440.0, 1000.0, 3000.0, 7999.0])
    np.testing.assert_allclose(features.mel_to_hz(features.hz_to_mel(f)), f, rtol=1e-9, atol=1e-9)
    for sr, n_fft, n_mels, fmin, fmax in ((16_000, 512, 80, 0.0, None), (24_000, 1024, 100, 30.0, 11_000.0)):
        ours = features.mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
        ref = slaney_filterbank(sr, n_fft, n_mels, fmin, fmax if fmax else sr / 2)
        assert ours.shape == (n_fft // 2 + 1, n_mels)
        np.testing.assert_allclose(ours, ref, atol=1e-6 * ref.max())
    with pytest.raises(ValueError, match="fmin < fmax"):
        features.mel_filterbank(16_000, 512, 80, 0.0, 9000.0)


def test_log_mel_matches_torch_and_its_numpy_twin():
    x = noise((2, 4000), seed=1)
    n_fft, hop, n_mels = 512, 128, 40
    ours = np.asarray(jax.jit(features.log_mel, static_argnums=(1, 2, 3, 4))(x, SR, n_fft, hop, n_mels))
    ref = np.log(np.maximum(torch_mag(x, n_fft, hop, n_fft) @ slaney_filterbank(SR, n_fft, n_mels, 0, SR / 2), 1e-5))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    twin = audio_metrics.log_mel_np(x[1], SR, n_fft, hop, n_mels)
    np.testing.assert_allclose(ours[1], twin, atol=1e-4)


def test_resolutions_scale_with_the_sample_rate():
    assert al.stft_resolutions(24_000) == al.BASE_STFT
    assert al.stft_resolutions(16_000) == ((256, 64, 256), (512, 128, 512), (1024, 256, 1024))
    assert al.mel_resolution(16_000) == (512, 128, 80) and al.mel_resolution(24_000) == (1024, 256, 80)


def test_mr_stft_loss_matches_an_independent_torch_computation():
    x, y = noise((2, 3000), 2), noise((2, 3000), 3)
    res = ((256, 64, 256), (512, 128, 400))
    loss, metrics = jax.jit(al.multi_resolution_stft_loss, static_argnums=2)(x, y, res)
    sc, lm = [], []
    for n_fft, hop, win in res:
        a, b = torch_mag(x, n_fft, hop, win), torch_mag(y, n_fft, hop, win)
        sc.append(np.mean([np.linalg.norm(a[i] - b[i]) / np.linalg.norm(a[i]) for i in range(2)]))
        lm.append(np.mean(np.abs(np.log(np.maximum(a, 1e-5)) - np.log(np.maximum(b, 1e-5)))))
    assert float(metrics["stft_sc"]) == pytest.approx(np.mean(sc), rel=1e-4)
    assert float(metrics["stft_logmag"]) == pytest.approx(np.mean(lm), rel=1e-4)
    assert float(loss) == pytest.approx(np.mean(sc) + np.mean(lm), rel=1e-4)


def test_audio_vae_loss_zero_on_identical_input_positive_otherwise_finite_gradients():
    cfg = al.AudioLossConfig(sample_rate=SR, stft_resolutions=((256, 64, 256), (512, 128, 512)),
                             mel_resolution=(512, 128, 40))
    x = jnp.asarray(noise((2, 2048), 4))
    mu = jnp.zeros((2, 4, 3))

    @jax.jit
    def loss_and_grad(recon, mu):
        return jax.value_and_grad(lambda r, m: al.audio_vae_loss(x, {"recon": r, "mu": m}, cfg), (0, 1),
                                  has_aux=True)(recon, mu)

    (loss, metrics), grads = loss_and_grad(x, mu)
    for k in ("loss", "rec_loss", "stft_sc", "stft_logmag", "mel_l1", "l1", "mu_reg"):
        assert abs(float(metrics[k])) < 1e-6, k
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    (loss, metrics), grads = loss_and_grad(jnp.asarray(noise((2, 2048), 5)), mu + 0.5)
    for k in ("stft_sc", "stft_logmag", "mel_l1", "l1"):
        assert float(metrics[k]) > 0.05, k
    assert float(metrics["mu_reg"]) == pytest.approx(0.25)
    assert float(loss) == pytest.approx(float(metrics["rec_loss"]) + 0.01 * 0.25, rel=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0 for g in grads)


def test_loss_config_from_config_and_bad_values():
    config = ml_collections.ConfigDict({"audio_vae": {"sample_rate": 24_000},
                                        "audio_vae_loss": {"mel_weight": 45.0, "disc_weight": 1.0,
                                                           "gan_loss": "hinge", "stft_resolutions": [[64, 16, 64]]}})
    cfg = al.AudioLossConfig.from_config(config)
    assert (cfg.mel_weight, cfg.disc_weight, cfg.gan_loss, cfg.resolutions) == (45.0, 1.0, "hinge", ((64, 16, 64),))
    assert cfg.mel == (1024, 256, 80) and cfg.kl_weight == 0.01
    with pytest.raises(ConfigError, match="gan_loss"):
        al.AudioLossConfig(sample_rate=SR, gan_loss="wgan")
    with pytest.raises(ConfigError, match="≥ 0"):
        al.AudioLossConfig(sample_rate=SR, mel_weight=-1.0)


def test_discriminator_shapes():
    disc = AudioDiscriminator(periods=(2, 3), num_scales=2, period_channels=2, scale_channels=4, max_channels=8)
    t = 1000
    x = jax.ShapeDtypeStruct((2, t), jnp.float32)
    params = jax.eval_shape(lambda a: disc.init(jax.random.PRNGKey(0), a), x)
    logits, feats = jax.eval_shape(disc.apply, params, x)
    assert len(logits) == len(feats) == 4 and all(len(f) == 6 for f in feats[:2]) and len(feats[2]) == 8
    def strided(n, strides):  # "same"-padded odd kernels: ceil(n / s) per layer
        for s in strides:
            n = -(-n // s)
        return n

    assert logits[0].shape == (2, strided(t // 2, (3,) * 4), 2)  # [B, frames, period]
    assert logits[1].shape == (2, strided(-(-t // 3), (3,) * 4), 3)  # reflect-padded to a multiple of 3
    assert logits[2].shape == (2, strided(t, (2, 2, 4, 4)))
    assert logits[3].shape == (2, strided(t // 2 + 1, (2, 2, 4, 4)))  # after AvgPool1d(4, 2, padding=2)


@pytest.mark.parametrize("c_in,features,kernel,stride,groups,kernel_2d", [
    (1, 8, 5, 3, 1, True), (8, 16, 5, 1, 1, True),                 # period discriminator layers ((k, 1) kernels)
    (1, 8, 15, 1, 1, False), (8, 8, 41, 2, 4, False), (8, 16, 41, 4, 8, False), (16, 1, 3, 1, 1, False),  # scale
])
def test_time_conv_is_flax_conv_both_ways(c_in, features, kernel, stride, groups, kernel_2d):
    """`TimeConv` (XLA's convolution, or a matmul over the strided windows) equals `nn.Conv` with the same
    parameters, in value and in gradient (parameters and input)."""
    x = jnp.asarray(noise((2, 101, c_in), 9))
    pad = (kernel - 1) // 2
    if kernel_2d:  # the (k, 1) kernel of a period discriminator, over one column
        conv = nn.Conv(features, (kernel, 1), (stride, 1), padding=((pad, pad), (0, 0)))
        ref = lambda p, x: conv.apply(p, x[:, :, None])[:, :, 0]
    else:
        conv = nn.Conv(features, (kernel,), (stride,), padding=((pad, pad),), feature_group_count=groups)
        ref = conv.apply
    params = jax.jit(TimeConv(features, kernel, stride, groups, kernel_2d).init)(jax.random.PRNGKey(0), x)

    def value_and_grads(f):  # one compile each (op by op, the eager version takes seconds per case)
        return jax.jit(lambda p, x: (f(p, x), jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x))), (0, 1))(p, x)))

    want, want_grads = value_and_grads(ref)(params, x)
    for impl in CONV_IMPLS:
        y, grads = value_and_grads(TimeConv(features, kernel, stride, groups, kernel_2d, impl).apply)(params, x)
        np.testing.assert_allclose(y, want, atol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_discriminators_compute_the_same_with_either_conv():
    """`AudioDiscriminator(conv="matmul")` (the embedded config's) gives the logits and feature maps of
    `conv="native"` from the same parameters."""
    x = jnp.asarray(noise((2, 600), 10))
    native = AudioDiscriminator(periods=(2, 3), num_scales=2, period_channels=2, scale_channels=4, max_channels=8)
    rng = np.random.default_rng(11)  # parameters from the shapes: an eager init compiles op by op
    params = jax.tree.map(lambda a: jnp.asarray(rng.uniform(-0.3, 0.3, a.shape), jnp.float32),
                          jax.eval_shape(native.init, jax.random.PRNGKey(0), x))
    want = jax.jit(native.apply)(params, x)
    got = jax.jit(native.clone(conv="matmul").apply)(params, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_gan_terms_train_each_player_only_on_its_own_loss():
    disc = AudioDiscriminator(periods=(3,), num_scales=0, period_channels=2, max_channels=4)
    t = 512
    x = jnp.asarray(noise((2, t), 6))
    shapes = jax.eval_shape(lambda a: disc.init(jax.random.PRNGKey(0), a), x)
    rng = np.random.default_rng(7)
    dparams = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.3, 0.3, s.shape), jnp.float32), shapes)["params"]
    cfg = al.AudioLossConfig(sample_rate=SR, stft_resolutions=((128, 32, 128),), mel_resolution=(128, 32, 10),
                             disc_weight=0.5, disc_start=10)
    recon = jnp.asarray(noise((2, t), 8))

    @jax.jit
    def run(recon, dparams, step):
        def f(r, p):
            return al.audio_vae_loss(x, {"recon": r, "mu": jnp.zeros((2, 2, 3))}, cfg, disc=disc, disc_params=p,
                                     step=step)
        (loss, m), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(recon, dparams)
        # What the discriminator's gradient must be: that of L_D alone (the generator terms reach its params only
        # through stop_gradient).
        d_only = jax.grad(lambda p: al.discriminator_loss(disc.apply({"params": p}, x)[0],
                                                          disc.apply({"params": p}, recon)[0]))(dparams)
        return loss, m, grads, d_only

    loss_off, m_off, (g_rec_off, g_disc_off), _ = run(recon, dparams, 3)
    assert float(loss_off) == pytest.approx(float(m_off["rec_loss"]), rel=1e-6)  # gated off before disc_start
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_disc_off))
    loss, m, (g_rec, g_disc), d_only = run(recon, dparams, 10)
    gen = 0.5 * (m["g_adv"] + 2.0 * m["feature_matching"])
    assert float(loss) == pytest.approx(float(m["rec_loss"] + gen + m["d_loss"]), rel=1e-5)
    assert np.isfinite(np.asarray(g_rec)).all() and float(jnp.abs(g_rec - g_rec_off).max()) > 0
    for a, b in zip(jax.tree.leaves(g_disc), jax.tree.leaves(d_only)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------- metrics

def speechlike(fs, seconds=3.0, seed=0):
    """A voiced, syllable-modulated harmonic signal (f0 ≈ 120 Hz, 3.5 Hz envelope) with a little breath noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(fs * seconds)) / fs
    phase = 2 * np.pi * np.cumsum(120 + 20 * np.sin(2 * np.pi * 0.7 * t)) / fs
    x = sum(np.sin(k * phase) / k for k in range(1, 30))
    env = np.maximum(0, np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6))) ** 2
    x = x * env + 0.05 * rng.standard_normal(len(t)) * env
    return x / np.abs(x).max() * 0.5


def at_snr(x, snr_db, seed=1):
    n = np.random.default_rng(seed).standard_normal(len(x))
    return x + n * np.sqrt(np.mean(x ** 2) / 10 ** (snr_db / 10))


# pystoi 0.4.1 `stoi(x, at_snr(x, snr), fs)` on `speechlike(fs)`, computed once offline (pystoi is not a dependency).
PYSTOI = {10_000: {-10: 0.58166, -5: 0.69367, 0: 0.79968, 5: 0.88756, 20: 0.99446},
          16_000: {-10: 0.60775, -5: 0.72355, 0: 0.83123, 5: 0.91621, 20: 0.99658}}


def test_stoi_properties_and_pystoi_values():
    for fs, table in PYSTOI.items():
        x = speechlike(fs)
        assert audio_metrics.stoi(x, x, fs) == pytest.approx(1.0, abs=1e-9)
        values = [audio_metrics.stoi(x, at_snr(x, snr), fs) for snr in table]
        assert np.all(np.diff(values) > 0)  # monotone in SNR
        # Exact at 10 kHz (the same algorithm, no resampling); resample_poly vs pystoi's filter elsewhere.
        np.testing.assert_allclose(values, list(table.values()), atol=1e-5 if fs == 10_000 else 1e-4)
    x = speechlike(SR)
    pure_noise = np.random.default_rng(9).standard_normal(len(x)) * 0.1
    # Noise scores ≈ 0.36, not 0: where the noise envelope is far above the clean one, the clipping makes it
    # follow the clean one (pystoi 0.4.1: 0.36053).
    assert audio_metrics.stoi(x, pure_noise, SR) == pytest.approx(0.36053, abs=1e-4)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert audio_metrics.stoi(x[:3000], x[:3000], SR) == 1e-5  # < 384 ms of speech: no segment


def test_reconstruction_metrics():
    refs = [speechlike(SR, 1.0, 0), speechlike(SR, 1.5, 1)]
    same = audio_metrics.reconstruction_metrics(refs, refs, SR, mu=np.ones((2, 5, 4)) * [1, -1, 1, -1], std=0.8)
    assert same["mel_distance"] == 0.0 and same["stoi"] == pytest.approx(1.0) and same["num_utterances"] == 2
    assert same["variance_collapse_ratio"] == pytest.approx(np.sqrt(2 / np.pi))
    noisy = audio_metrics.reconstruction_metrics(refs, [at_snr(r, 5) for r in refs], SR)
    assert noisy["mel_distance"] > 0.1 and 0.5 < noisy["stoi"] < 0.99 and "variance_collapse_ratio" not in noisy
    # Lists of different lengths: each pair is cut to its shorter length.
    assert audio_metrics.mel_distance([refs[1]], [refs[1][:-100]], SR) == pytest.approx(0.0, abs=1e-6)
