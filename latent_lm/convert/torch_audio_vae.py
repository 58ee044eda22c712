"""PyTorch audio σ-VAE: causal 1-D conv encoder → μ, causal decoder, streaming decode (docs/method.md §12.1).

The twin of the JAX `AudioVAE` (docs/pytorch.md §2.2), built from standard PyTorch layers: every convolution is a
`Conv1d` (channels first) with causal left padding, a stride-s downsampling is `Conv1d(kernel 2s, stride s)` with s
samples of left padding, a stride-s upsampling is `ConvTranspose1d(kernel 2s, stride s)` whose last s outputs are
trimmed (EnCodec's causal trim). The JAX model computes exactly these as reshapes around kernel-2 convolutions;
`param_mapping.audio_vae_table` re-indexes the kernels. A JAX run trained with weight norm is exported with the
effective kernels g·v/‖v‖ folded in, so the twin has no weight norm.

Waveforms are (B, T) in [−1, 1], T a multiple of hop = prod(strides); latents are (B, N, C), N = T / hop, the layout
of the LM's latent tokens and of the latent caches. `decode_stream(z_chunk, state)` decodes chunk by chunk: each
causal layer keeps its left context (the last (k−1)·d input frames) in `state`, a dict keyed by the layer's name, so
concatenated chunks equal `decode` of the whole.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from latent_lm.convert.torch_sigma_vae import GaussianDistribution

ACTIVATIONS = {"elu": F.elu, "silu": F.silu}
OUTPUTS = ("tanh", "clip", "none")
StreamState = dict[str, torch.Tensor]


def stage_channels(channels: int, num_stages: int, max_channels: int | None) -> list[int]:
    """Widths after the input conv and after each downsample: channels·2^i, capped at `max_channels`."""
    cap = max_channels or channels * 2 ** num_stages
    return [min(channels * 2 ** i, cap) for i in range(num_stages + 1)]


class _Streaming:
    """A causal layer with `context` frames of left context: zeros (the full pass's padding), or in a stream the
    last `context` input frames of the previous chunk, read from and written to `state[self.state_key]`."""

    context: int
    state_key: str = ""  # set by AudioVAE: the layer's module name, unique in the model

    def _with_context(self, x: torch.Tensor, state: StreamState | None) -> torch.Tensor:
        if not self.context:
            return x
        ctx = state.get(self.state_key) if state is not None else None
        if ctx is None:
            ctx = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([ctx, x], dim=-1)
        if state is not None:
            state[self.state_key] = x[..., -self.context:]
        return x


class CausalConv1d(nn.Conv1d, _Streaming):
    """Conv1d (B, C_in, T) → (B, C_out, T / stride) with (k−1)·d + 1 − stride frames of left padding: output t reads
    inputs ≤ (t+1)·stride − 1. Stride 1: the JAX `CausalConv1d`; kernel 2s, stride s: the JAX `Downsample`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        self.context = (kernel_size - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        return super().forward(self._with_context(x, state))


class CausalUpsample(nn.ConvTranspose1d, _Streaming):
    """ConvTranspose1d(kernel 2s, stride s) (B, C, N) → (B, F, N·s) with the last s outputs trimmed: output frame t
    reads input frames t (kernel taps < s) and t − 1 (taps ≥ s), so one frame of left context. The JAX `Upsample`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 2 * stride, stride=stride)
        self.context = 1

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        s = self.stride[0]
        # With the previous frame prepended, output frames 1…N of the (N+2)·s samples are this chunk's.
        return super().forward(self._with_context(x, state))[..., s:-s]


class ResBlock(nn.Module):
    """x + conv2(act(conv1(act(x)))): conv1 kernel 3 dilated to C/2, conv2 kernel 1 back to C (SEANet)."""

    def __init__(self, channels: int, dilation: int, activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.conv1 = CausalConv1d(channels, max(channels // 2, 1), 3, dilation)
        self.conv2 = CausalConv1d(max(channels // 2, 1), channels, 1)

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x), state)), state)


class EncoderStage(nn.Module):
    def __init__(self, channels: int, out_channels: int, stride: int, dilations: Sequence[int], activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.res = nn.ModuleList([ResBlock(channels, d, activation) for d in dilations])
        self.down = CausalConv1d(channels, out_channels, 2 * stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        return self.down(self.act(x))


class DecoderStage(nn.Module):
    def __init__(self, channels: int, out_channels: int, stride: int, dilations: Sequence[int], activation: str):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.up = CausalUpsample(channels, out_channels, stride)
        self.res = nn.ModuleList([ResBlock(out_channels, d, activation) for d in dilations])

    def forward(self, x: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        x = self.up(self.act(x), state)
        for block in self.res:
            x = block(x, state)
        return x


class AudioEncoder(nn.Module):
    """audio (B, 1, T) → μ (B, latent_dim, T / hop): conv_in → stages (res blocks, act, down) → act → conv_out."""

    def __init__(self, strides: Sequence[int], channels: int, latent_dim: int, max_channels: int | None,
                 res_dilations: Sequence[int], kernel_size: int, activation: str):
        super().__init__()
        widths = stage_channels(channels, len(strides), max_channels)
        self.act = ACTIVATIONS[activation]
        self.conv_in = CausalConv1d(1, widths[0], kernel_size)
        self.stages = nn.ModuleList([EncoderStage(widths[i], widths[i + 1], s, res_dilations, activation)
                                     for i, s in enumerate(strides)])
        self.conv_out = CausalConv1d(widths[-1], latent_dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(self.act(x))


class AudioDecoder(nn.Module):
    """z (B, latent_dim, N) → audio (B, N·hop): conv_in → stages in reverse stride order (act, up, res blocks) → act
    → conv_out → tanh | clip | identity."""

    def __init__(self, strides: Sequence[int], channels: int, latent_dim: int, max_channels: int | None,
                 res_dilations: Sequence[int], kernel_size: int, activation: str, output: str):
        super().__init__()
        widths = stage_channels(channels, len(strides), max_channels)
        n = len(strides)
        self.act, self.output = ACTIVATIONS[activation], output
        self.conv_in = CausalConv1d(latent_dim, widths[-1], kernel_size)
        self.stages = nn.ModuleList([DecoderStage(widths[n - k], widths[n - 1 - k], s, res_dilations, activation)
                                     for k, s in enumerate(reversed(strides))])
        self.conv_out = CausalConv1d(widths[0], 1, kernel_size)

    def forward(self, z: torch.Tensor, state: StreamState | None = None) -> torch.Tensor:
        x = self.conv_in(z, state)
        for stage in self.stages:
            x = stage(x, state)
        y = self.conv_out(self.act(x), state)[:, 0].float()
        if self.output == "tanh":
            return torch.tanh(y)
        if self.output == "clip":
            return y.clamp(-1.0, 1.0)
        return y


class AudioVAE(nn.Module):
    """`encode(audio (B, T)) -> μ (B, N, C)`, `sample(μ)`, `decode(z (B, N, C)) -> audio (B, N·hop)`,
    `decode_stream(z_chunk, state) -> (audio_chunk, state)`. The constructor takes the JAX `AudioVAE` fields
    (config.json `kwargs`)."""

    def __init__(self, sample_rate: int, strides: Sequence[int], channels: int, latent_dim: int, std: float = 0.75,
                 max_channels: int | None = None, res_dilations: Sequence[int] = (1, 3, 9), kernel_size: int = 7,
                 activation: str = "elu", output: str = "tanh"):
        super().__init__()
        if not strides or any(int(s) < 1 for s in strides):
            raise ValueError(f"strides={tuple(strides)} must be a non-empty list of positive ints")
        if activation not in ACTIVATIONS or output not in OUTPUTS:
            raise ValueError(f"activation={activation!r} must be one of {list(ACTIVATIONS)} and output={output!r} "
                             f"one of {list(OUTPUTS)}")
        self.sample_rate, self.strides, self.latent_dim, self.std = sample_rate, tuple(strides), latent_dim, std
        common = dict(strides=self.strides, channels=channels, latent_dim=latent_dim, max_channels=max_channels,
                      res_dilations=tuple(res_dilations), kernel_size=kernel_size, activation=activation)
        self.encoder = AudioEncoder(**common)
        self.decoder = AudioDecoder(output=output, **common)
        for name, module in self.decoder.named_modules():
            if isinstance(module, _Streaming):
                module.state_key = name

    @property
    def hop(self) -> int:
        """Waveform samples per latent frame."""
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, T), T a multiple of hop → μ (B, T / hop, C); μ_t reads samples < (t+1)·hop."""
        if audio.dim() != 2 or audio.shape[1] % self.hop:
            raise ValueError(f"audio of shape {list(audio.shape)} must be (B, T) with T a multiple of the hop "
                             f"{self.hop}")
        return self.encoder(audio[:, None]).transpose(1, 2)

    def sample(self, mu: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ_b·ε with one σ_b ~ N(0, (std/0.8)²) per example (docs/method.md §2.2), as training noises μ."""
        return GaussianDistribution(mu, self.std).sample(generator=generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, N, C) → audio (B, N·hop) (fp32); the samples of frame t read latents ≤ t."""
        return self.decoder(z.transpose(1, 2))

    def decode_stream(self, z: torch.Tensor, state: StreamState | None = None
                      ) -> tuple[torch.Tensor, StreamState]:
        """One chunk z (B, n, C) → (audio (B, n·hop), the new state); `state=None` starts a fresh stream. Chunks of
        any sizes, concatenated, equal `decode` of the whole; the given state is not modified."""
        state = dict(state or {})
        return self.decoder(z.transpose(1, 2), state), state
