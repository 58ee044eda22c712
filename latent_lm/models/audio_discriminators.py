"""HiFi-GAN multi-period and multi-scale discriminators: the optional adversary of the audio σ-VAE
(docs/method.md §12; Kong et al. 2020). Their losses (LS-GAN or hinge, feature matching) are in
`training/audio_losses.py`.

Compact versions of HiFi-GAN's `DiscriminatorP` / `DiscriminatorS` with a configurable base width `channels` (HiFi-GAN:
32 for the period discriminators, 128 for the scale ones, both capped at 1024; `channels` scales both stacks):
- Period p: the waveform, reflect-padded to a multiple of p, is folded to [B, T/p, p] and read by 2-D convs with
  (5, 1) kernels, stride (3, 1), so each of the p phases is a separate column; widths c·(1, 4, 16, 32) then a
  stride-1 conv, then a (3, 1) conv to one logit per position.
- Scale k: the waveform average-pooled k times (kernel 4, stride 2, padding 2) and read by 1-D convs with kernels
  (15, 41, 41, 41, 41, 41, 5), strides (1, 2, 2, 4, 4, 1, 1) and grouped convs, then a 3-tap conv to logits.
LeakyReLU 0.1 everywhere; no weight/spectral norm, PyTorch default init; not causal (it never runs at inference).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.models.layers import torch_default_init

Dtype = Any
LEAKY_SLOPE = 0.1  # HiFi-GAN LRELU_SLOPE


def _conv(features: int, kernel: tuple[int, ...], strides: tuple[int, ...], fan_in: int, groups: int,
          dtype: Dtype, name: str) -> nn.Conv:
    pad = tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel)
    return nn.Conv(features, kernel, strides, padding=pad, feature_group_count=groups,
                   kernel_init=torch_default_init(fan_in), bias_init=torch_default_init(fan_in), dtype=dtype,
                   name=name)


class PeriodDiscriminator(nn.Module):
    """audio [B, T] → (logits [B, T', p], feature maps) for one period p (HiFi-GAN `DiscriminatorP`)."""

    period: int
    channels: int = 32
    max_channels: int = 1024
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        b, t = audio.shape
        p = self.period
        if t % p:
            audio = jnp.pad(audio, ((0, 0), (0, p - t % p)), mode="reflect")
        x = audio.reshape(b, -1, p, 1).astype(self.dtype)
        feats = []
        widths = [min(self.channels * m, self.max_channels) for m in (1, 4, 16, 32)]
        c_in = 1
        for i, w in enumerate(widths + [widths[-1]]):
            stride = 3 if i < len(widths) else 1
            x = _conv(w, (5, 1), (stride, 1), 5 * c_in, 1, self.dtype, f"conv{i}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            feats.append(x)
            c_in = w
        x = _conv(1, (3, 1), (1, 1), 3 * c_in, 1, self.dtype, "conv_post")(x)
        feats.append(x)
        return x[..., 0].astype(jnp.float32), feats


class ScaleDiscriminator(nn.Module):
    """audio [B, T] → (logits [B, T'], feature maps) at one scale (HiFi-GAN `DiscriminatorS`)."""

    channels: int = 128
    max_channels: int = 1024
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        x = audio[..., None].astype(self.dtype)
        c = self.channels
        layers = [(c, 15, 1, 1), (c, 41, 2, 4), (2 * c, 41, 2, 16), (4 * c, 41, 4, 16), (8 * c, 41, 4, 16),
                  (8 * c, 41, 1, 16), (8 * c, 5, 1, 1)]
        feats = []
        c_in = 1
        for i, (w, k, s, g) in enumerate(layers):
            w = min(w, self.max_channels)
            g = math.gcd(g, c_in, w)
            x = _conv(w, (k,), (s,), k * c_in // g, g, self.dtype, f"conv{i}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            feats.append(x)
            c_in = w
        x = _conv(1, (3,), (1,), 3 * c_in, 1, self.dtype, "conv_post")(x)
        feats.append(x)
        return x[..., 0].astype(jnp.float32), feats


def _avg_pool(audio: jax.Array) -> jax.Array:
    """torch AvgPool1d(4, 2, padding=2) (count_include_pad=True): [B, T] → [B, T//2 + 1]."""
    x = jnp.pad(audio, ((0, 0), (2, 2)))
    return nn.avg_pool(x[..., None], (4,), (2,), padding="VALID")[..., 0]


class AudioDiscriminator(nn.Module):
    """Multi-period (`periods`) + multi-scale (`num_scales`) discriminators: audio [B, T] → (list of logits, list of
    feature-map lists), one entry per sub-discriminator, periods first."""

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    num_scales: int = 3
    period_channels: int = 32
    scale_channels: int = 128
    max_channels: int = 1024
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        chex.assert_rank(audio, 2)
        logits, feats = [], []
        for p in self.periods:
            lg, ft = PeriodDiscriminator(p, self.period_channels, self.max_channels, self.dtype, name=f"mpd{p}")(audio)
            logits.append(lg)
            feats.append(ft)
        x = audio.astype(jnp.float32)
        for k in range(self.num_scales):
            if k:
                x = _avg_pool(x)
            lg, ft = ScaleDiscriminator(self.scale_channels, self.max_channels, self.dtype, name=f"msd{k}")(x)
            logits.append(lg)
            feats.append(ft)
        return logits, feats
