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


CONV_IMPLS = ("native", "matmul")


class TimeConv(nn.Module):
    """`nn.Conv(features, (k,), (s,), padding (k−1)//2 each side, feature_group_count=groups)` on x [N, T, C] with the
    same parameters (`kernel` [k, C/G, features], or [k, 1, C/G, features] with `kernel_2d`: a period discriminator's
    (k, 1) kernel; `bias`). `impl="native"` is XLA's convolution; `impl="matmul"` a matmul over the k strided windows
    (per group a batched matmul), for XLA:CPU, which runs strided, grouped convolutions and above all their weight
    gradients (window-dilated convolutions) an order of magnitude below its matmul speed (docs/method.md §12.1). The
    windows hold k× the activations, so accelerators keep "native"."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    kernel_2d: bool = False
    impl: str = "native"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, g = self.kernel_size, self.stride, self.groups
        n, t, c_in = x.shape
        cg, og = c_in // g, self.features // g
        shape = (k, 1, cg, self.features) if self.kernel_2d else (k, cg, self.features)
        kernel = self.param("kernel", torch_default_init(k * cg), shape, jnp.float32)
        bias = self.param("bias", torch_default_init(k * cg), (self.features,), jnp.float32)
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"TimeConv impl={self.impl!r}; choose one of {CONV_IMPLS}")
        pad = (k - 1) // 2
        if self.impl == "native":
            y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.reshape(k, cg, -1).astype(self.dtype), (s,),
                                             [(pad, pad)], dimension_numbers=("NWC", "WIO", "NWC"),
                                             feature_group_count=g)
            return y + bias.astype(self.dtype)
        t_out = (t + 2 * pad - k) // s + 1
        # Group-major [G, N, T + 2·pad, C/G], then the k strided windows side by side: [G, N·T', k·C/G].
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (pad, pad), (0, 0))).reshape(n, t + 2 * pad, g, cg)
        x = jnp.transpose(x, (2, 0, 1, 3)) if g > 1 else x.reshape(1, n, t + 2 * pad, cg)
        windows = jnp.stack([x[:, :, j:j + s * (t_out - 1) + 1:s] for j in range(k)], axis=3)
        windows = windows.reshape(g, n * t_out, k * cg)
        w = jnp.transpose(kernel.reshape(k, cg, g, og), (2, 0, 1, 3)).reshape(g, k * cg, og).astype(self.dtype)
        y = jnp.matmul(windows, w)  # [G, N·T', O/G]
        y = jnp.transpose(y.reshape(g, n, t_out, og), (1, 2, 0, 3)) if g > 1 else y.reshape(n, t_out, og)
        return y.reshape(n, t_out, self.features) + bias.astype(self.dtype)


class PeriodDiscriminator(nn.Module):
    """audio [B, T] → (logits [B, T', p], feature maps) for one period p (HiFi-GAN `DiscriminatorP`)."""

    period: int
    channels: int = 32
    max_channels: int = 1024
    conv: str = "native"  # TimeConv.impl
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        b, t = audio.shape
        p = self.period
        if t % p:
            audio = jnp.pad(audio, ((0, 0), (0, p - t % p)), mode="reflect")
        # Each of the p phases is its own sequence: [B·p, T/p, 1] through 1-D convs along time (feature maps
        # [B, p, T', C]; the losses compare them elementwise, so their layout is free).
        x = jnp.swapaxes(audio.reshape(b, -1, p), 1, 2).reshape(b * p, -1, 1).astype(self.dtype)
        feats = []
        widths = [min(self.channels * m, self.max_channels) for m in (1, 4, 16, 32)]
        for i, w in enumerate(widths + [widths[-1]]):
            stride = 3 if i < len(widths) else 1
            x = TimeConv(w, 5, stride, kernel_2d=True, impl=self.conv, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            feats.append(x.reshape(b, p, *x.shape[1:]))
        x = TimeConv(1, 3, kernel_2d=True, impl=self.conv, dtype=self.dtype, name="conv_post")(x)
        feats.append(x.reshape(b, p, *x.shape[1:]))
        return jnp.swapaxes(x.reshape(b, p, -1), 1, 2).astype(jnp.float32), feats


class ScaleDiscriminator(nn.Module):
    """audio [B, T] → (logits [B, T'], feature maps) at one scale (HiFi-GAN `DiscriminatorS`)."""

    channels: int = 128
    max_channels: int = 1024
    conv: str = "native"  # TimeConv.impl
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
            x = TimeConv(w, k, s, g, impl=self.conv, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
            feats.append(x)
            c_in = w
        x = TimeConv(1, 3, impl=self.conv, dtype=self.dtype, name="conv_post")(x)
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
    conv: str = "native"  # TimeConv.impl: "matmul" on CPU
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> tuple[list[jax.Array], list[list[jax.Array]]]:
        chex.assert_rank(audio, 2)
        logits, feats = [], []
        for p in self.periods:
            lg, ft = PeriodDiscriminator(p, self.period_channels, self.max_channels, self.conv, self.dtype,
                                         name=f"mpd{p}")(audio)
            logits.append(lg)
            feats.append(ft)
        x = audio.astype(jnp.float32)
        for k in range(self.num_scales):
            if k:
                x = _avg_pool(x)
            lg, ft = ScaleDiscriminator(self.scale_channels, self.max_channels, self.conv, self.dtype,
                                        name=f"msd{k}")(x)
            logits.append(lg)
            feats.append(ft)
        return logits, feats
