"""The audio σ-VAE's training task (docs/method.md §12): the loss of `training/audio_losses.py` on waveform crops,
with the optional HiFi-GAN discriminators trained in the same step."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from latent_lm.errors import ConfigError
from latent_lm.models.audio_discriminators import CONV_IMPLS, AudioDiscriminator
from latent_lm.models.audio_vae import AudioVAE, make_audio_vae
from latent_lm.training.audio_losses import AudioLossConfig, audio_vae_loss


def audio_crop_samples(config) -> int:
    """Samples per training crop: `audio_vae_train.crop_seconds` rounded to whole latent frames (≥ 1)."""
    a = config.audio_vae
    hop = make_audio_vae(config).hop
    frames = int(round(float(config.audio_vae_train.crop_seconds) * int(a.sample_rate) / hop))
    if frames < 1:
        raise ConfigError(f"audio_vae_train.crop_seconds={config.audio_vae_train.crop_seconds} is shorter than one "
                          f"latent frame ({hop} samples at {a.sample_rate} Hz)")
    return frames * hop


def make_audio_discriminator(config) -> AudioDiscriminator | None:
    """The multi-period + multi-scale discriminator of `audio_vae_loss` (None when disc_weight = 0)."""
    get = (config.get("audio_vae_loss") or {}).get
    if float(get("disc_weight", 0.0)) <= 0:
        return None
    periods = tuple(int(p) for p in get("disc_periods", (2, 3, 5, 7, 11)))
    scales = int(get("disc_scales", 3))
    if any(p < 1 for p in periods) or scales < 0 or not (periods or scales):
        raise ConfigError("audio_vae_loss.disc_periods must be positive and disc_scales ≥ 0, with at least one "
                          "sub-discriminator")
    conv = get("disc_conv", "native")
    if conv not in CONV_IMPLS:
        raise ConfigError(f"audio_vae_loss.disc_conv={conv!r}; choose one of {list(CONV_IMPLS)}")
    return AudioDiscriminator(periods=periods, num_scales=scales,
                              period_channels=int(get("disc_period_channels", 32)),
                              scale_channels=int(get("disc_scale_channels", 128)),
                              max_channels=int(get("disc_max_channels", 1024)), conv=conv,
                              dtype=jnp.dtype(config.audio_vae.get("dtype", "float32")))


@dataclasses.dataclass(frozen=True)
class AudioVAETask:
    """Audio σ-VAE training on waveforms [B, T] in [-1, 1] (batch {"audio"}; docs/method.md §12):

        L = stft·MR-STFT + mel·log-mel L1 + l1·|x − x̂|₁ + kl·mean(μ²)
            (+ disc_weight·(L_adv + fm·L_fm) + L_D with the GAN on, both gated by `batch["step"] ≥ disc_start`).

    Param tree: the AudioVAE's Flax variables {"params": …} (what `encode_audio`, evaluation and export read), plus
    "disc" — the discriminators' params — when `audio_vae_loss.disc_weight > 0`. As `VAETask`, one optimizer step
    trains both players: `audio_vae_loss` stops each player's gradient into the other's params.
    """

    model: AudioVAE
    loss_config: AudioLossConfig
    crop_samples: int
    disc: AudioDiscriminator | None = None

    @classmethod
    def from_config(cls, config) -> "AudioVAETask":
        """The task of `config.audio_vae`, `config.audio_vae_loss` and `config.audio_vae_train.crop_seconds`."""
        return cls(make_audio_vae(config), AudioLossConfig.from_config(config), audio_crop_samples(config),
                   make_audio_discriminator(config))

    def init_params(self, rng):
        x = jnp.zeros((1, self.crop_samples), jnp.float32)
        k_vae, k_disc = jax.random.split(rng)
        return self.add_discriminator(self.model.init({"params": k_vae}, x, rng=k_vae), k_disc)

    def add_discriminator(self, vae_variables, rng):
        """AudioVAE variables → this task's param tree (fresh discriminators added when the GAN is on)."""
        if self.disc is None:
            return vae_variables
        return dict(vae_variables, disc=self.disc.init(rng, jnp.zeros((1, self.crop_samples), jnp.float32))["params"])

    @staticmethod
    def vae_variables(params):
        """The AudioVAE's Flax variables {"params": …} of this task's param tree."""
        return {"params": params["params"]}

    def loss(self, params, batch, rng):
        audio = batch["audio"]
        chex.assert_rank(audio, 2)
        out = self.model.apply(self.vae_variables(params), audio, rng=rng)
        if self.disc is None:
            return audio_vae_loss(audio, out, self.loss_config)
        if "step" not in batch:
            raise ValueError("AudioVAETask with the GAN on needs batch['step'] (the train loop adds the step count) "
                             "for audio_vae_loss.disc_start")
        return audio_vae_loss(audio, out, self.loss_config, disc=self.disc, disc_params=params["disc"],
                              step=batch["step"])
