"""The audio σ-VAE's loss (docs/method.md §12): multi-resolution STFT + log-mel L1 + waveform L1 + the σ-VAE μ
penalty (docs/method.md §2.3), and optionally the HiFi-GAN adversarial and feature-matching terms of
`models/audio_discriminators.py`:

    L = stft·Σ_r (SC_r + logmag_r)/R + mel·|log-mel x − log-mel x̂|₁ + l1·|x − x̂|₁ + kl·mean(μ²)
        + disc_weight·(L_adv + fm_ratio·L_fm)                                    (generator, GAN on)
        + L_D                                                                    (discriminator, GAN on)

SC_r = ‖|X| − |X̂|‖_F / ‖|X|‖_F per example (Parallel WaveGAN's spectral convergence) and logmag_r =
mean|log|X| − log|X̂|| (magnitudes floored at 1e-5), both at resolution r = (n_fft, hop, win) with the features of
`latent_lm.audio.features` (centred Hann STFT, Slaney mel). Resolutions are given at 24 kHz and scaled to the
sample rate (`stft_resolutions`).

As `training/tasks/vae.py`, one optimizer step trains both players: the generator terms see the discriminator's
params through `stop_gradient`, the discriminator's loss sees x̂ through `stop_gradient`, so each parameter set
receives only its own player's gradient. Both GAN terms are off until `step ≥ disc_start` (a `lax.cond`: the
discriminators do not run before; their terms and metrics are 0).
All terms are fp32.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from latent_lm.audio.features import BASE_RATE, log_mel, mel_resolution, scale_fft, stft_magnitude
from latent_lm.errors import ConfigError
from latent_lm.training.vae_losses import mu_regularizer

BASE_STFT = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))  # (n_fft, hop, win) at 24 kHz
GAN_LOSSES = ("lsgan", "hinge")
LOG_MAG_FLOOR = 1e-5  # |X| floor of the log-magnitude term


def stft_resolutions(sample_rate: int, base: Sequence[Sequence[int]] = BASE_STFT,
                     base_rate: int = BASE_RATE) -> tuple[tuple[int, int, int], ...]:
    """(n_fft, hop, win) per resolution scaled from `base_rate`: n_fft to the nearest power of two, hop and win in
    the same ratio to n_fft as in `base`. 16 kHz: (256, 64, 256), (512, 128, 512), (1024, 256, 1024)."""
    out = []
    for n_fft, hop, win in base:
        n = scale_fft(n_fft, sample_rate, base_rate)
        out.append((n, max(1, n * hop // n_fft), n * win // n_fft))
    return tuple(out)


def spectral_convergence(mag_ref: jax.Array, mag_est: jax.Array) -> jax.Array:
    """mean over examples of ‖|X| − |X̂|‖_F / ‖|X|‖_F (magnitudes [B, frames, freq])."""
    sq = jnp.sum(jnp.square(mag_ref - mag_est), axis=(1, 2))
    # The double `where`: exactly 0 with a zero (not 0/0) gradient where x̂ = x.
    num = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    den = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(mag_ref), axis=(1, 2)), 1e-14))
    return jnp.mean(num / den)


def log_magnitude_loss(mag_ref: jax.Array, mag_est: jax.Array) -> jax.Array:
    """mean |log max(|X|, 1e-5) − log max(|X̂|, 1e-5)|. The floor (DAC's; ≈ −100 dB of a full-scale sine's peak
    bin at n_fft = 1024, below 16-bit quantisation noise) keeps silent bins from dominating the loss."""
    return jnp.mean(jnp.abs(jnp.log(jnp.maximum(mag_ref, LOG_MAG_FLOOR))
                            - jnp.log(jnp.maximum(mag_est, LOG_MAG_FLOOR))))


def multi_resolution_stft_loss(audio: jax.Array, recon: jax.Array, resolutions: Sequence[Sequence[int]]
                               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ_r (SC_r + logmag_r) / R over resolutions (n_fft, hop, win): audio, recon [B, T] → (loss, metrics)."""
    sc, lm = [], []
    for n_fft, hop, win in resolutions:
        ref = stft_magnitude(audio, n_fft, hop, win)
        est = stft_magnitude(recon, n_fft, hop, win)
        sc.append(spectral_convergence(ref, est))
        lm.append(log_magnitude_loss(ref, est))
    sc, lm = jnp.mean(jnp.stack(sc)), jnp.mean(jnp.stack(lm))
    return sc + lm, {"stft_sc": sc, "stft_logmag": lm}


def mel_l1_loss(audio: jax.Array, recon: jax.Array, sample_rate: int,
                resolution: Sequence[int] | None = None) -> jax.Array:
    """mean |log-mel(x) − log-mel(x̂)| at `resolution` = (n_fft, hop, n_mels) (default `mel_resolution`)."""
    n_fft, hop, n_mels = resolution or mel_resolution(sample_rate)
    return jnp.mean(jnp.abs(log_mel(audio, sample_rate, n_fft, hop, n_mels)
                            - log_mel(recon, sample_rate, n_fft, hop, n_mels)))


def waveform_l1_loss(audio: jax.Array, recon: jax.Array) -> jax.Array:
    """mean |x − x̂| over samples."""
    return jnp.mean(jnp.abs(audio.astype(jnp.float32) - recon.astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------------- GAN terms

def discriminator_loss(logits_real: Sequence[jax.Array], logits_fake: Sequence[jax.Array],
                       kind: str = "lsgan") -> jax.Array:
    """Mean over sub-discriminators of LS-GAN mean((1 − D(x))²) + mean(D(x̂)²) (HiFi-GAN) or hinge
    mean(relu(1 − D(x))) + mean(relu(1 + D(x̂)))."""
    terms = []
    for real, fake in zip(logits_real, logits_fake, strict=True):
        real, fake = real.astype(jnp.float32), fake.astype(jnp.float32)
        if kind == "lsgan":
            terms.append(jnp.mean(jnp.square(1.0 - real)) + jnp.mean(jnp.square(fake)))
        else:
            terms.append(jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    return jnp.mean(jnp.stack(terms))


def generator_loss(logits_fake: Sequence[jax.Array], kind: str = "lsgan") -> jax.Array:
    """Mean over sub-discriminators of LS-GAN mean((1 − D(x̂))²) or hinge −mean(D(x̂))."""
    terms = [jnp.mean(jnp.square(1.0 - f.astype(jnp.float32))) if kind == "lsgan" else -jnp.mean(f.astype(jnp.float32))
             for f in logits_fake]
    return jnp.mean(jnp.stack(terms))


def feature_matching_loss(feats_real: Sequence[Sequence[jax.Array]],
                          feats_fake: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """Mean over all feature maps of all sub-discriminators of mean |f(x) − f(x̂)|, the real features held
    constant (HiFi-GAN sums the same terms; the mean keeps the scale independent of the discriminator count)."""
    terms = [jnp.mean(jnp.abs(jax.lax.stop_gradient(r).astype(jnp.float32) - f.astype(jnp.float32)))
             for rs, fs in zip(feats_real, feats_fake, strict=True) for r, f in zip(rs, fs, strict=True)]
    return jnp.mean(jnp.stack(terms))


# ---------------------------------------------------------------------------------------------------- the loss

@dataclasses.dataclass(frozen=True)
class AudioLossConfig:
    """Weights and resolutions of `audio_vae_loss`. `from_config` reads `config.audio_vae` (sample_rate) and the
    optional `config.audio_vae_loss` section (every key below; `kl_weight` falls back to `audio_vae.kl_weight`)."""

    sample_rate: int
    stft_weight: float = 1.0
    mel_weight: float = 1.0
    l1_weight: float = 0.1
    kl_weight: float = 0.01  # the image σ-VAE's 0.01·mean(μ²) (docs/method.md §2.3)
    stft_resolutions: tuple[tuple[int, int, int], ...] | None = None  # None: `stft_resolutions(sample_rate)`
    mel_resolution: tuple[int, int, int] | None = None  # None: `mel_resolution(sample_rate)`
    disc_weight: float = 0.0  # 0: no GAN; DAC's ratio to a unit mel weight is ≈ 1/15
    fm_ratio: float = 2.0  # feature matching weight relative to the adversarial term (HiFi-GAN, DAC: 2)
    disc_start: int = 0
    gan_loss: str = "lsgan"

    def __post_init__(self):
        if self.gan_loss not in GAN_LOSSES:
            raise ConfigError(f"audio_vae_loss.gan_loss={self.gan_loss!r} must be one of {list(GAN_LOSSES)}")
        weights = (self.stft_weight, self.mel_weight, self.l1_weight, self.kl_weight, self.disc_weight, self.fm_ratio)
        if min(weights) < 0 or self.disc_start < 0:
            raise ConfigError("audio_vae_loss weights and disc_start must be ≥ 0")

    @property
    def resolutions(self) -> tuple[tuple[int, int, int], ...]:
        return self.stft_resolutions or stft_resolutions(self.sample_rate)

    @property
    def mel(self) -> tuple[int, int, int]:
        return self.mel_resolution or mel_resolution(self.sample_rate)

    @classmethod
    def from_config(cls, config) -> "AudioLossConfig":
        a = config.audio_vae
        get = (config.get("audio_vae_loss") or {}).get
        stft = get("stft_resolutions")
        mel = get("mel_resolution")
        return cls(sample_rate=int(a.sample_rate), stft_weight=float(get("stft_weight", 1.0)),
                   mel_weight=float(get("mel_weight", 1.0)), l1_weight=float(get("l1_weight", 0.1)),
                   kl_weight=float(get("kl_weight", a.get("kl_weight", 0.01))),
                   stft_resolutions=tuple(tuple(int(v) for v in r) for r in stft) if stft else None,
                   mel_resolution=tuple(int(v) for v in mel) if mel else None,
                   disc_weight=float(get("disc_weight", 0.0)), fm_ratio=float(get("fm_ratio", 2.0)),
                   disc_start=int(get("disc_start", 0)), gan_loss=str(get("gan_loss", "lsgan")))


def reconstruction_loss(audio: jax.Array, recon: jax.Array, cfg: AudioLossConfig
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """stft·MR-STFT + mel·log-mel L1 + l1·waveform L1 (fp32) and its metrics."""
    audio, recon = audio.astype(jnp.float32), recon.astype(jnp.float32)
    stft, metrics = multi_resolution_stft_loss(audio, recon, cfg.resolutions)
    mel = mel_l1_loss(audio, recon, cfg.sample_rate, cfg.mel)
    l1 = waveform_l1_loss(audio, recon)
    rec = cfg.stft_weight * stft + cfg.mel_weight * mel + cfg.l1_weight * l1
    return rec, {**metrics, "stft": stft, "mel_l1": mel, "l1": l1, "rec_loss": rec}


def audio_vae_loss(audio: jax.Array, out: dict[str, jax.Array], cfg: AudioLossConfig, *, disc=None,
                   disc_params=None, step: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The audio σ-VAE's loss from `AudioVAE.__call__`'s output {"recon", "mu", …} and the input audio [B, T].

    With `disc` (an `AudioDiscriminator`) and `disc_params` (its param tree, not the {"params": …} wrapper) and
    cfg.disc_weight > 0, the loss also carries both GAN players' terms (module doc); `step` gates them
    (`step ≥ disc_start`; None means on).
    """
    recon = out["recon"]
    rec, metrics = reconstruction_loss(audio, recon, cfg)
    reg = mu_regularizer(out["mu"])
    loss = rec + cfg.kl_weight * reg
    metrics = dict(metrics, mu_reg=reg)
    if disc is not None and cfg.disc_weight > 0:
        if disc_params is None:
            raise ValueError("audio_vae_loss: the GAN is on (disc_weight > 0) but no disc_params were given")

        def gan(recon, disc_params):
            live = {"params": disc_params}
            frozen = {"params": jax.lax.stop_gradient(disc_params)}
            logits_real, feats_real = disc.apply(live, audio.astype(jnp.float32))
            logits_fake_d, _ = disc.apply(live, jax.lax.stop_gradient(recon).astype(jnp.float32))
            logits_fake_g, feats_fake = disc.apply(frozen, recon.astype(jnp.float32))
            g_adv = generator_loss(logits_fake_g, cfg.gan_loss)
            fm = feature_matching_loss(feats_real, feats_fake)
            d_loss = discriminator_loss(logits_real, logits_fake_d, cfg.gan_loss)
            terms = dict(g_adv=g_adv, feature_matching=fm, d_loss=d_loss,
                         logits_real=jnp.mean(jnp.stack([jnp.mean(x) for x in logits_real])),
                         logits_fake=jnp.mean(jnp.stack([jnp.mean(x) for x in logits_fake_d])))
            return cfg.disc_weight * (g_adv + cfg.fm_ratio * fm) + d_loss, terms

        if step is None:
            gate = jnp.float32(1.0)
            term, terms = gan(recon, disc_params)
        else:
            # A conditional, not a multiplication by the gate: before disc_start the step runs no discriminator
            # (there 5× faster on XLA:CPU, docs/method.md §12.1).
            on = step >= cfg.disc_start
            gate = on.astype(jnp.float32)

            def off(recon, disc_params):
                return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(gan, recon, disc_params))

            term, terms = jax.lax.cond(on, gan, off, recon, disc_params)
        loss = loss + term
        metrics = dict(metrics, **terms, gan_gate=gate)
    return loss, dict(metrics, loss=loss)
