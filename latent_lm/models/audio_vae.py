"""Audio σ-VAE: a causal 1-D convolutional encoder → μ, fixed per-example σ, causal decoder (docs/method.md §12).

Waveforms are [B, T] float32 in [-1, 1]; latents are [B, T/hop, latent_dim] with hop = prod(strides), the same
[B, T, C] layout as the image σ-VAE's tokens, so `latents.sample_latent`, the latent caches and the LM task apply
unchanged. Training samples z = μ + σ_b·ε with one σ_b ~ N(0, (std/0.8)²) per example (`latents.sample_latent`,
docs/method.md §2.2); the μ penalty and the audio losses are in `training/audio_losses.py`.

Architecture (SEANet/EnCodec-like, all convolutions causal):
  encoder  x[B,T,1] → conv7(C) → per stride s: [ResBlock(C, d) for d in res_dilations] → act → Down(s, 2C)
           → act → conv3(latent_dim) = μ            (widths double per downsample, capped at `max_channels`)
  decoder  z → conv7(C_top) → per stride s (reversed): act → Up(s, C/2) → [ResBlock(C/2, d) …]
           → act → conv7(1) → tanh | clip | identity
  ResBlock(C, d): x + conv1(C)(act(conv3_dilated_d(C/2)(act(x))))

Every convolution is a stride-1 causal conv over frames at its own rate (left zero padding of (k−1)·d frames);
the rate changes are reshapes:
- `Down(s)`: "b (t s) c -> b t (s c)", then a causal conv of kernel 2 (frames t−1, t). This is exactly a PyTorch
  Conv1d(kernel 2s, stride s) with s samples of left padding: weight[f, c, j·s + i] = kernel[j, i·C + c, f].
- `Up(s)`: a bias-free causal conv of kernel 2 to s·F channels, "b t (s f) -> b (t s) f", plus a bias [F]. This is
  exactly a PyTorch ConvTranspose1d(kernel 2s, stride s) whose last s outputs are trimmed (EnCodec's causal
  trim): weight[c, f, i] = kernel[1, c, i·F + f] (current frame), weight[c, f, s + i] = kernel[0, c, i·F + f].
So audio samples [t·hop, (t+1)·hop) of the decode depend on latents ≤ t only, and μ_t on samples < (t+1)·hop only
(both tested). Streaming decode (`decode_stream`) keeps each conv's last (k−1)·d input frames as state in the
Flax collection "stream"; chunk outputs concatenated equal the full decode.

Conv params: `kernel` [k, C_in, C_out] (PyTorch weight [C_out, C_in, k] transposed), `bias` [C_out], PyTorch's
default init. With `weight_norm`, the kernel is v and a `weight_g` [C_out] gain is added (torch `weight_norm`
dim=0 on Conv1d: kernel = g·v/‖v‖ per output channel), g initialised to ‖v‖ so the init function is unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.errors import ConfigError, DataError
from latent_lm.latents import sample_latent
from latent_lm.models.layers import torch_default_init

Dtype = Any
STREAM = "stream"  # the Flax collection holding the streaming decoder's conv contexts
ACTIVATIONS = {"elu": jax.nn.elu, "silu": jax.nn.silu}
OUTPUTS = ("tanh", "clip", "none")

# Stride presets by frame rate (encoder order, first applied to the waveform). hop = prod(strides).
STRIDE_PRESETS: dict[str, tuple[tuple[int, ...], int]] = {
    "embedded_25hz": ((4, 4, 5, 8), 16_000),       # 640× at 16 kHz → 25 Hz
    "embedded_12.5hz": ((4, 4, 5, 8, 2), 16_000),  # 1280× → 12.5 Hz
    "embedded_50hz": ((4, 4, 5, 4), 16_000),       # 320× → 50 Hz
    "paper_7.5hz": ((4, 4, 5, 5, 8), 24_000),      # 3200× at 24 kHz → 7.5 Hz (the paper's tokenizer)
    "paper_15hz": ((2, 4, 5, 5, 8), 24_000),       # 1600× → 15 Hz
    "paper_30hz": ((2, 4, 5, 5, 4), 24_000),       # 800× → 30 Hz
    "paper_75hz": ((2, 4, 5, 8), 24_000),          # 320× → 75 Hz (the codec-LM frame rate)
}


def hop_length(strides: Sequence[int]) -> int:
    """Waveform samples per latent frame: prod(strides)."""
    return int(math.prod(strides))


def frame_rate(sample_rate: int, strides: Sequence[int]) -> float:
    """Latent frames per second: sample_rate / prod(strides)."""
    return sample_rate / hop_length(strides)


class CausalConv1d(nn.Module):
    """Causal 1-D conv [B, T, C_in] → [B, T, features]: left zero padding of (k−1)·dilation frames, stride 1.

    `stream=True` replaces the zero padding by the last (k−1)·dilation input frames of the previous call, kept in
    the "stream" collection (zeros at first), and updates them: chunked calls then equal one call on the whole.
    """

    features: int
    kernel_size: int
    dilation: int = 1
    use_bias: bool = True
    weight_norm: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, stream: bool = False) -> jax.Array:
        chex.assert_rank(x, 3)
        batch, _, c_in = x.shape
        x = x.astype(self.dtype)
        pad = (self.kernel_size - 1) * self.dilation
        if pad and stream:
            context = self.variable(STREAM, "context", jnp.zeros, (batch, pad, c_in), self.dtype)
            x = jnp.concatenate([context.value.astype(self.dtype), x], axis=1)
            context.value = x[:, -pad:]
        elif pad:
            x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0)))
        fan_in = c_in * self.kernel_size
        kernel = self.param("kernel", torch_default_init(fan_in), (self.kernel_size, c_in, self.features),
                            jnp.float32)
        bias = self.param("bias", torch_default_init(fan_in), (self.features,), jnp.float32) if self.use_bias else None
        if self.weight_norm:  # created last: the kernel and bias draw the same init keys with or without it
            v_norm = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=(0, 1)))
            g = self.param("weight_g", lambda _key, _shape: v_norm, (self.features,))
            kernel = kernel * (g / (v_norm + 1e-12))
        y = jax.lax.conv_general_dilated(x, kernel.astype(self.dtype), window_strides=(1,), padding="VALID",
                                         rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"))
        return y if bias is None else y + bias.astype(self.dtype)


class ResBlock(nn.Module):
    """x + conv1(C)(act(conv3_dilated(C/2)(act(x)))), both convs causal (SEANet residual unit)."""

    channels: int
    dilation: int
    activation: str = "elu"
    weight_norm: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, stream: bool = False) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        h = CausalConv1d(max(self.channels // 2, 1), 3, self.dilation, weight_norm=self.weight_norm,
                         dtype=self.dtype, name="conv1")(act(x), stream)
        h = CausalConv1d(self.channels, 1, weight_norm=self.weight_norm, dtype=self.dtype, name="conv2")(act(h), stream)
        return x + h


class Downsample(nn.Module):
    """[B, T, C] → [B, T/s, features]: PyTorch Conv1d(kernel 2s, stride s, left pad s) as a reshape + causal conv."""

    stride: int
    features: int
    weight_norm: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = einops.rearrange(x, "b (t s) c -> b t (s c)", s=self.stride)
        return CausalConv1d(self.features, 2, weight_norm=self.weight_norm, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """[B, T, C] → [B, T·s, features]: PyTorch ConvTranspose1d(kernel 2s, stride s, last s outputs trimmed) as a
    causal conv to s·features channels + reshape + one bias per feature."""

    stride: int
    features: int
    weight_norm: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, stream: bool = False) -> jax.Array:
        y = CausalConv1d(self.stride * self.features, 2, use_bias=False, weight_norm=self.weight_norm,
                         dtype=self.dtype, name="conv")(x, stream)
        y = einops.rearrange(y, "b t (s f) -> b (t s) f", s=self.stride)
        bias = self.param("bias", torch_default_init(self.features * 2 * self.stride), (self.features,), jnp.float32)
        return y + bias.astype(self.dtype)


def stage_channels(channels: int, num_stages: int, max_channels: int | None) -> list[int]:
    """Widths after the input conv and after each downsample: channels·2^i, capped at `max_channels`."""
    cap = max_channels or channels * 2 ** num_stages
    return [min(channels * 2 ** i, cap) for i in range(num_stages + 1)]


class AudioEncoder(nn.Module):
    """audio [B, T] → μ [B, T/hop, latent_dim] (causal: μ_t reads samples < (t+1)·hop)."""

    strides: tuple[int, ...]
    channels: int
    latent_dim: int
    max_channels: int | None = None
    res_dilations: tuple[int, ...] = (1, 3, 9)
    kernel_size: int = 7
    activation: str = "elu"
    weight_norm: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        widths = stage_channels(self.channels, len(self.strides), self.max_channels)
        wn = self.weight_norm
        x = CausalConv1d(widths[0], self.kernel_size, weight_norm=wn, dtype=self.dtype,
                         name="conv_in")(audio[..., None])
        for i, s in enumerate(self.strides):
            for j, d in enumerate(self.res_dilations):
                x = ResBlock(widths[i], d, self.activation, wn, self.dtype, name=f"stage{i}_res{j}")(x)
            x = Downsample(s, widths[i + 1], wn, self.dtype, name=f"stage{i}_down")(act(x))
        return CausalConv1d(self.latent_dim, 3, weight_norm=wn, dtype=self.dtype, name="conv_out")(act(x))


class AudioDecoder(nn.Module):
    """z [B, N, latent_dim] → audio [B, N·hop] (causal: samples of frame t read latents ≤ t). `stream=True`: one
    chunk of a streaming decode (state in the "stream" collection)."""

    strides: tuple[int, ...]
    channels: int
    max_channels: int | None = None
    res_dilations: tuple[int, ...] = (1, 3, 9)
    kernel_size: int = 7
    activation: str = "elu"
    weight_norm: bool = False
    output: str = "tanh"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, stream: bool = False) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        widths = stage_channels(self.channels, len(self.strides), self.max_channels)
        wn = self.weight_norm
        x = CausalConv1d(widths[-1], self.kernel_size, weight_norm=wn, dtype=self.dtype, name="conv_in")(z, stream)
        for n, s in enumerate(reversed(self.strides)):
            i = len(self.strides) - 1 - n  # the matching encoder stage
            x = Upsample(s, widths[i], wn, self.dtype, name=f"stage{n}_up")(act(x), stream)
            for j, d in enumerate(self.res_dilations):
                x = ResBlock(widths[i], d, self.activation, wn, self.dtype, name=f"stage{n}_res{j}")(x, stream)
        y = CausalConv1d(1, self.kernel_size, weight_norm=wn, dtype=self.dtype, name="conv_out")(act(x), stream)
        y = y[..., 0].astype(jnp.float32)
        if self.output == "tanh":
            return jnp.tanh(y)
        if self.output == "clip":
            return jnp.clip(y, -1.0, 1.0)
        return y


class AudioVAE(nn.Module):
    """Audio σ-VAE (docs/method.md §12): encode → μ [B, T/hop, C]; z = μ + σ_b·ε (σ_b per example, `std` = C_σ);
    decode → waveform [B, T]. Use `model.apply(variables, x, method=AudioVAE.encode)` / `AudioVAE.decode`;
    streaming: `decode_stream` below."""

    sample_rate: int
    strides: tuple[int, ...]
    channels: int
    latent_dim: int
    std: float = 0.75
    max_channels: int | None = None
    res_dilations: tuple[int, ...] = (1, 3, 9)
    kernel_size: int = 7
    activation: str = "elu"
    weight_norm: bool = False
    output: str = "tanh"
    dtype: Dtype = jnp.float32

    @property
    def hop(self) -> int:
        return hop_length(self.strides)

    def setup(self) -> None:
        if not self.strides or any(int(s) < 1 for s in self.strides):
            raise ConfigError(f"audio_vae.strides={tuple(self.strides)} must be a non-empty list of positive ints")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"audio_vae.activation={self.activation!r} must be one of {list(ACTIVATIONS)}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"audio_vae.output={self.output!r} must be one of {list(OUTPUTS)}")
        common = dict(strides=tuple(self.strides), channels=self.channels, max_channels=self.max_channels,
                      res_dilations=tuple(self.res_dilations), kernel_size=self.kernel_size,
                      activation=self.activation, weight_norm=self.weight_norm, dtype=self.dtype)
        self.encoder = AudioEncoder(latent_dim=self.latent_dim, **common)
        self.decoder = AudioDecoder(output=self.output, **common)

    def encode(self, audio: jax.Array) -> jax.Array:
        """audio [B, T] (T a multiple of hop) → μ [B, T/hop, latent_dim], what `decode` reconstructs from."""
        chex.assert_rank(audio, 2)
        if audio.shape[1] % self.hop:
            raise DataError(f"audio length {audio.shape[1]} is not a multiple of the audio σ-VAE's hop {self.hop}")
        mu = self.encoder(audio)
        chex.assert_shape(mu, (audio.shape[0], audio.shape[1] // self.hop, self.latent_dim))
        return mu

    def cache_latents(self, audio: jax.Array) -> jax.Array:
        """What a latent cache stores per utterance: μ [B, N, C] (as the image σ-VAE)."""
        return self.encode(audio)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, N, latent_dim] → audio [B, N·hop] (fp32; in [-1, 1] unless output="none")."""
        chex.assert_shape(z, (None, None, self.latent_dim))
        audio = self.decoder(z)
        chex.assert_shape(audio, (z.shape[0], z.shape[1] * self.hop))
        return audio

    def decode_chunk(self, z: jax.Array) -> jax.Array:
        """One chunk of a streaming decode: apply with mutable=["stream"] (see `decode_stream`)."""
        chex.assert_shape(z, (None, None, self.latent_dim))
        return self.decoder(z, stream=True)

    def __call__(self, audio: jax.Array, *, rng: jax.Array) -> dict[str, jax.Array]:
        """{"recon": [B, T], "mu": [B, N, C], "z": [B, N, C]} with z = μ + σ_b·ε."""
        mu = self.encode(audio)
        z = sample_latent(rng, mu, self.std)
        return {"recon": self.decode(z), "mu": mu, "z": z}


def _variables(params) -> dict:
    """Accept either Flax variables {"params": …} or the bare param tree."""
    return {"params": params["params"]} if "params" in params else {"params": params}


def decode_stream(model: AudioVAE, params, latents_chunk: jax.Array, state=None):
    """Streaming decode: (latents [B, n, C], state) → (audio [B, n·hop], new state). `state=None` starts a fresh
    stream (zero left context, as the full decode's padding); concatenated chunk outputs equal
    `model.apply(params, z, method=AudioVAE.decode)`. Jittable with `model` static; the state is a pytree of
    [B, (k−1)·d, C] arrays (`init_stream_state` gives it up front, e.g. for a `lax.scan` carry)."""
    variables = _variables(params)
    if state is not None:
        variables = dict(variables, **{STREAM: state})
    audio, mutated = model.apply(variables, latents_chunk, method=AudioVAE.decode_chunk, mutable=[STREAM])
    return audio, mutated[STREAM]


def init_stream_state(model: AudioVAE, params, batch_size: int):
    """The zero state of a fresh stream (the same as `state=None` in `decode_stream`)."""
    z = jax.ShapeDtypeStruct((batch_size, 1, model.latent_dim), jnp.float32)
    shapes = jax.eval_shape(lambda p, zz: decode_stream(model, p, zz)[1], params, z)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def make_audio_vae(config) -> AudioVAE:
    """The AudioVAE of the `audio_vae` ConfigDict (sample_rate, strides, channels, latent_dim, std; optional
    max_channels, res_dilations, kernel_size, activation, weight_norm, output, dtype). Accepts the whole config
    or its `audio_vae` section."""
    a = config.audio_vae if "audio_vae" in config else config
    max_channels = a.get("max_channels")
    return AudioVAE(sample_rate=int(a.sample_rate), strides=tuple(int(s) for s in a.strides),
                    channels=int(a.channels), latent_dim=int(a.latent_dim), std=float(a.std),
                    max_channels=int(max_channels) if max_channels else None,
                    res_dilations=tuple(int(d) for d in a.get("res_dilations", (1, 3, 9))),
                    kernel_size=int(a.get("kernel_size", 7)), activation=a.get("activation", "elu"),
                    weight_norm=bool(a.get("weight_norm", False)), output=a.get("output", "tanh"),
                    dtype=jnp.dtype(a.get("dtype", "float32")))
