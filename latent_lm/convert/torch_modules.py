"""PyTorch LatentLM `Transformer` and its `DiT` twin, written from docs/method.md (§4–§8, §9, §11).

Module names, parameter keys, tensor layouts and forward signatures are those of the official
`LatentLM/models/Transformer.py` (microsoft/unilm), so `Transformer(**kwargs).load_state_dict(sd, strict=True)`
accepts an official state dict and the official class accepts ours (for the arguments the official class has).
Pure PyTorch, CPU friendly: attention is `F.scaled_dot_product_attention`, RoPE is plain tensor math.

Extensions (off by default, so the defaults reproduce the official class exactly):
  diffusion_mlp_ratio  SwiGLU ratio of the diffusion head when it differs from the backbone's (JAX `head.mlp_ratio`)
  text_vocab_size      adds `text_embedder.weight [V, D]` and `lm_head.weight [V, D]` (multimodal/text models)
  max_len              sequence length (RoPE table, KV cache) when it is not `input_size²`
The general interleaved-sequence pass is `forward_tokens` (the JAX `LatentLM.__call__` contract, packed rows with
`positions` and `segment_ids` included) plus `lm_logits` and the per-token head `diffuse_tokens` (docs/pytorch.md §2.1).

Only the configuration the JAX model implements is supported: patch_size 1 with `flatten_input=False` (per-token
latents through a 1×1 conv with bias) and no norm layer in the patch embedding. The same holds for `DiT`
(official `models/DiT.py`: bidirectional adaLN-Zero blocks, fixed 2-D sin-cos `pos_embed`, whole-image sampling).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RMS_EPS = 1e-6
FREQ_DIM = 256


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """⌊D·ratio·2/3/64⌋·64 (docs/method.md §4.2)."""
    return int(width * mlp_ratio * 2 / 3 / 64) * 64


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMSNorm without gain, in fp32 and cast back (official `RMSNorm(elementwise_affine=False)`); no parameters."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class PatchEmbed(nn.Module):
    """timm `PatchEmbed` (strict_img_size=False, no norm): Conv2d(C→D, p, stride p) with bias, output (B, N, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """[cos ‖ sin](t·exp(−ln(10⁴)·k/128)) → Linear → SiLU → Linear, no biases (docs/method.md §5.2)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQ_DIM):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=False), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=False))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb.to(t.dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class table with a null row (id `num_classes`) when `dropout_prob > 0`; labels dropped only in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class SwiGLU(nn.Module):
    """fc2(SiLU(fc1 x) ⊙ gate x), bias-free (the SiLU is on fc1)."""

    def __init__(self, embed_dim: int, ffn_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=False)
        self.gate = nn.Linear(embed_dim, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=False)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.silu(self.fc1(x)) * self.gate(x))))


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE on x (B, N, H, hd) with tables (N, hd/2), or per row (B, N, hd/2), in x's dtype
    (docs/method.md §4.3)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos = cos.repeat_interleave(2, dim=-1)[:, :, None, :]
    sin = sin.repeat_interleave(2, dim=-1)[:, :, None, :]
    return x * cos + rotate_every_two(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, S, hd) → (B, n_kv·n_rep, S, hd); kv head j serves q heads j·n_rep … j·n_rep + n_rep − 1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    """Causal GQA attention with a fused `qkv` ([q heads | k heads | v heads] rows), RoPE, optional KV cache."""

    def __init__(self, dim: int, num_heads: int = 8, num_kv_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.n_rep = num_heads // num_kv_heads
        self.qkv = nn.Linear(dim, dim + 2 * num_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, start_pos: int, rel_pos: tuple[torch.Tensor, torch.Tensor],
                incremental_state: dict | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, 1, N, N) bool, optional and only without a cache, replaces the causal mask (packed rows)."""
        if mask is not None and incremental_state is not None:
            raise ValueError("an attention mask is supported without a KV cache only")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = torch.split(qkv, [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k = apply_rotary_emb(q, *rel_pos), apply_rotary_emb(k, *rel_pos)
        if incremental_state is not None:
            incremental_state["key"][:b, start_pos:start_pos + n] = k
            incremental_state["value"][:b, start_pos:start_pos + n] = v
            k = incremental_state["key"][:b, :start_pos + n]
            v = incremental_state["value"][:b, :start_pos + n]
            if n > 1:  # several new tokens at once: causal over the cached prefix (the official code feeds one)
                mask = (torch.arange(n, device=x.device)[:, None] + start_pos
                        >= torch.arange(start_pos + n, device=x.device)[None, :])
        q = q.transpose(1, 2)
        k = repeat_kv(k.transpose(1, 2), self.n_rep)
        v = repeat_kv(v.transpose(1, 2), self.n_rep)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             is_causal=incremental_state is None and mask is None,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    """Pre-norm LLaMA block: x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, mlp_ratio: float = 4.0,
                 proj_drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, num_kv_heads, qkv_bias=False, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio), drop=proj_drop)

    def forward(self, x, start_pos, rel_pos, incremental_state=None, mask=None):
        x = x + self.attn(self.norm1(x), start_pos, rel_pos, incremental_state, mask)
        return x + self.mlp(self.norm2(x))


class MLPBlock(nn.Module):
    """Diffusion-head block: x + gate ⊙ SwiGLU(modulate(norm x, shift, scale)), (shift, scale, gate) from c."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio), drop=drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size, bias=False))

    def forward(self, x, c):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class ConditionLayer(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        return self.linear(self.norm_final(x))


class FinalLayer(nn.Module):
    """linear(modulate(norm x, shift, scale)), (shift, scale) from c."""

    def __init__(self, hidden_size: int, output_size: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, output_size, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, channels: int, patch_size: int) -> torch.Tensor:
    """(B, T, p²·C) → (B, C, H, W), T = h·w row-major (official `unpatchify`)."""
    c, p = channels, patch_size
    h = w = int(x.shape[1] ** 0.5)
    if h * w != x.shape[1]:
        raise ValueError(f"{x.shape[1]} tokens do not form a square grid")
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
    return x.reshape(x.shape[0], c, h * p, w * p)


def _check_supported(patch_size: int, flatten_input: bool, norm_layer, hidden_size: int, num_heads: int) -> None:
    if patch_size != 1 or flatten_input or norm_layer is not None:
        raise ValueError("only patch_size=1, flatten_input=False, norm_layer=None is supported (the configuration "
                         f"of the JAX model); got patch_size={patch_size}, flatten_input={flatten_input}, "
                         f"norm_layer={norm_layer}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size={hidden_size} must split into num_heads={num_heads} heads of even size")


class Transformer(nn.Module):
    """Causal Transformer + per-token diffusion head (the official constructor, plus the extensions above)."""

    def __init__(self, input_size: int = 32, patch_size: int = 1, flatten_input: bool = False, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, diffusion_depth: int = 3, num_heads: int = 16,
                 num_kv_heads: int | None = None, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, posi_scale: float = 1, drop: float = 0.0, norm_layer=None,
                 diffusion_mlp_ratio: float | None = None, text_vocab_size: int = 0, max_len: int | None = None):
        super().__init__()
        _check_supported(patch_size, flatten_input, norm_layer, hidden_size, num_heads)
        self.in_channels = self.out_channels = in_channels
        self.input_size, self.patch_size = input_size, patch_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = hidden_size // num_heads
        self.hidden_size = hidden_size
        self.flatten_input_size = max_len if max_len is not None else input_size * input_size
        self.flatten_input = flatten_input
        self.posi_scale = posi_scale
        self.num_classes, self.text_vocab_size = num_classes, text_vocab_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.noisy_x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes else None
        self._precomputed_freqs_cis = None
        self.blocks = nn.ModuleList([
            Block(hidden_size, num_heads, self.num_kv_heads, mlp_ratio=mlp_ratio, proj_drop=drop, attn_drop=drop)
            for _ in range(depth)])
        head_ratio = diffusion_mlp_ratio if diffusion_mlp_ratio is not None else mlp_ratio
        self.diffusion_blocks = nn.ModuleList([MLPBlock(hidden_size, head_ratio) for _ in range(diffusion_depth)])
        self.condition_layer = ConditionLayer(hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        if text_vocab_size:
            self.text_embedder = nn.Embedding(text_vocab_size, hidden_size)
            self.lm_head = nn.Linear(hidden_size, text_vocab_size, bias=False)
        self.initialize_weights()

    def initialize_weights(self):
        """The official init (docs/method.md §5.3): PyTorch defaults, zero x_embedder bias, N(0, 0.02) tables and t-MLP,
        zero adaLN and output linears."""
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.diffusion_blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        if self.text_vocab_size:
            nn.init.normal_(self.text_embedder.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p²·C) → (B, C, H, W), T = h·w row-major."""
        return unpatchify(x, self.out_channels, self.patch_size)

    def _rope_angles(self, device: torch.device) -> torch.Tensor:
        return 1.0 / ((10000 * self.posi_scale) ** torch.linspace(0, 1, self.head_dim // 2, dtype=torch.float,
                                                                  device=device))

    def build_rel_pos(self, x: torch.Tensor, start_pos: int = 0, positions: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables for positions start_pos … start_pos+N−1, angles 1/(10⁴·s)^linspace(0, 1, hd/2); with
        `positions` (B, N) integer, per-row tables (B, N, hd/2) at those positions (packed documents restart at 0)."""
        if positions is not None:
            freqs = positions.to(x.device, torch.float)[..., None] * self._rope_angles(x.device)
            return torch.cos(freqs).to(x.dtype), torch.sin(freqs).to(x.dtype)
        if self._precomputed_freqs_cis is None or self._precomputed_freqs_cis.device != x.device:
            angle = self._rope_angles(x.device)
            index = torch.arange(self.flatten_input_size, device=x.device).to(angle)
            self._precomputed_freqs_cis = index[:, None] * angle
        if start_pos + x.size(1) > self.flatten_input_size:
            raise ValueError(f"positions up to {start_pos + x.size(1)} exceed the sequence length "
                             f"{self.flatten_input_size}")
        freqs = self._precomputed_freqs_cis[start_pos:start_pos + x.size(1)]
        return torch.cos(freqs).to(x.dtype), torch.sin(freqs).to(x.dtype)

    def forward(self, x_noise: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor, y: torch.Tensor,
                batch_mul: int = 1) -> torch.Tensor:
        """Training forward: head outputs (B·mul, C, H, W) for x_noise at per-token t (B·mul, H·W)."""
        condition = self.forward_parallel(x_start, y).repeat_interleave(batch_mul, dim=0)
        return self.forward_diffusion(x_noise, t, condition)

    def _run_blocks(self, x: torch.Tensor, start_pos: int = 0, incremental_state: dict | None = None,
                    positions: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        rel_pos = self.build_rel_pos(x, start_pos, positions)
        for idx, block in enumerate(self.blocks):
            cache = None
            if incremental_state is not None:
                if idx not in incremental_state:
                    shape = (x.shape[0], self.flatten_input_size, self.num_kv_heads, self.head_dim)
                    incremental_state[idx] = {"key": torch.zeros(shape, device=x.device, dtype=x.dtype),
                                              "value": torch.zeros(shape, device=x.device, dtype=x.dtype)}
                cache = incremental_state[idx]
            x = block(x, start_pos, rel_pos, cache, mask)
        return x

    def forward_parallel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Teacher-forced conditions (B, N, D) for latents x (B, C, H, W) and labels y (B,): [y, z₀ … z_{N−2}]."""
        x = self.x_embedder(x)
        y = self.y_embedder(y, self.training)
        x = torch.cat((y.unsqueeze(1), x[:, :-1]), dim=1)
        return self.condition_layer(self._run_blocks(x))

    def forward_recurrent(self, x: torch.Tensor, start_pos: int = 0, incremental_state: dict | None = None
                          ) -> torch.Tensor:
        """One decoding step: labels (B,) at start_pos 0, else the previous latent (B, C, 1, 1); returns the
        condition (B, 1, D) of the next token. `incremental_state` ({} at first) holds per-layer KV caches."""
        x = self.y_embedder(x, self.training).unsqueeze(1) if start_pos == 0 else self.x_embedder(x)
        x = self._run_blocks(x, start_pos, incremental_state)
        return self.condition_layer(x[:, -1:])

    def forward_diffusion(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Head output for noisy x (B, C, H, W) at t (B,) or (B, S) given conditions (B, S, D); per token."""
        bsz, seq_len = t.shape if t.dim() > 1 else (t.shape[0], 1)
        c = condition + self.t_embedder(t.reshape(-1)).view(bsz, seq_len, -1)
        x = self.noisy_x_embedder(x)
        for block in self.diffusion_blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, cfg_scale: float
                         ) -> torch.Tensor:
        """Guided head output u + s·(c − u) on the first half of x, returned for both halves."""
        half = x[: len(x) // 2]
        out = self.forward_diffusion(torch.cat([half, half], dim=0), t, condition)
        cond_out, uncond_out = torch.split(out, len(out) // 2, dim=0)
        guided = uncond_out + cfg_scale * (cond_out - uncond_out)
        return torch.cat([guided, guided], dim=0)

    def sample_with_cfg(self, prev_token: torch.Tensor, cfg_scale: float, sample_func: Callable,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """Autoregressive CFG sampling (docs/method.md §8.1). `prev_token` = [labels; null labels] (2B,); `sample_func(
        model_fn, z)` runs the solver from z. `noise` (N, B, C), optional, fixes the initial x_T of every position
        (the layout of the JAX sampler); by default it is drawn with torch.randn as the official code does.
        Returns latents (B, C, H, W)."""
        bsz, half = prev_token.shape[0], prev_token.shape[0] // 2
        state: dict = {}
        samples = []
        for i in range(self.flatten_input_size):
            if noise is None:
                z = torch.randn(bsz, self.in_channels, 1, 1, device=self.device, dtype=self.dtype)
            else:
                z = noise[i].to(device=self.device, dtype=self.dtype).reshape(half, self.in_channels, 1, 1)
                z = torch.cat([z, z], dim=0)
            recurrent_input = torch.cat([prev_token, prev_token], dim=0) if i != 0 else prev_token
            condition = self.forward_recurrent(recurrent_input, start_pos=i, incremental_state=state)
            prev_token = sample_func(functools.partial(self.forward_with_cfg, condition=condition,
                                                       cfg_scale=cfg_scale), z)
            prev_token, _ = prev_token.chunk(2, dim=0)
            samples.append(prev_token)
        h = w = self.input_size
        return torch.stack(samples, 2).reshape(half, self.in_channels, h, w)

    # ---- extensions: interleaved token/latent sequences (the JAX `LatentLM` contract) ----

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids in the JAX table order: classes 0…K−1, null K, then text ids from K+1 (docs/method.md §7.2)."""
        offset = self.num_classes + 1 if self.num_classes else 0
        out = torch.zeros(*tokens.shape, self.hidden_size, device=tokens.device, dtype=self.dtype)
        if self.num_classes:
            is_class = tokens < offset
            out = torch.where(is_class[..., None], self.y_embedder.embedding_table(tokens.clamp(0, offset - 1)), out)
        if self.text_vocab_size:
            text = (tokens - offset).clamp(0, self.text_vocab_size - 1)
            out = torch.where((tokens >= offset)[..., None], self.text_embedder(text), out)
        return out

    def forward_tokens(self, tokens: torch.Tensor, latents: torch.Tensor, is_latent: torch.Tensor,
                       start_pos: int = 0, incremental_state: dict | None = None,
                       positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditions, hidden), each (B, T, D), for tokens (B, T), latents (B, T, C), is_latent (B, T).

        A packed row (docs/method.md §4.1): `segment_ids` (B, T) keeps attention inside each document and
        `positions` (B, T) are the RoPE positions, restarting at 0 in each document (no KV cache then)."""
        lat = self.x_embedder.proj(latents.permute(0, 2, 1)[..., None]).flatten(2).transpose(1, 2)
        h = torch.where(is_latent[..., None], lat, self.embed_tokens(tokens))
        mask = None
        if segment_ids is not None:
            t = segment_ids.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
            mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
        hidden = self._run_blocks(h, start_pos, incremental_state, positions, mask)
        return self.condition_layer(hidden), hidden

    def diffuse_tokens(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The diffusion head per token, in the JAX layout (`LatentLM.diffuse`): x_t (B, T, C) at t (B, T) given
        conditions (B, T, D) → (B, T, C), any T (`forward_diffusion` takes a square image grid)."""
        bsz, seq_len = t.shape
        c = condition + self.t_embedder(t.reshape(-1)).view(bsz, seq_len, -1)
        x = self.noisy_x_embedder.proj(x_t.permute(0, 2, 1)[..., None]).flatten(2).transpose(1, 2)
        for block in self.diffusion_blocks:
            x = block(x, c)
        return self.final_layer(x, c)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Text logits: RMSNorm (no gain) → lm_head, in fp32."""
        if not self.text_vocab_size:
            raise ValueError("this model has no text head (text_vocab_size=0)")
        return self.lm_head(RMSNorm(self.hidden_size)(hidden)).float()


# ---- the DiT twin (official `models/DiT.py`) ----

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's 2-D sin-cos table (grid², D) in float64: `meshgrid(grid_w, grid_h)` puts w first, so the first D/2
    channels encode the column and the last D/2 the row; each half is [sin ‖ cos], ω = 1/10000^(k/(D/4))."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), 0)

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000**omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(embed_dim // 2, grid[0]), one_axis(embed_dim // 2, grid[1])], axis=1)


class BidirectionalAttention(nn.Module):
    """DiT attention: the fused `qkv` / `proj` layout of `Attention`, no RoPE, no mask, no cache."""

    def __init__(self, dim: int, num_heads: int = 8, num_kv_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.n_rep = num_heads // num_kv_heads
        self.qkv = nn.Linear(dim, dim + 2 * num_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = torch.split(qkv, [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q = q.transpose(1, 2)
        k = repeat_kv(k.transpose(1, 2), self.n_rep)
        v = repeat_kv(v.transpose(1, 2), self.n_rep)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class DiTBlock(nn.Module):
    """adaLN-Zero: (shift, scale, gate)_msa and (shift, scale, gate)_mlp from Linear(SiLU c), in that order."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, mlp_ratio: float = 4.0,
                 drop: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = BidirectionalAttention(hidden_size, num_heads, num_kv_heads, attn_drop=drop, proj_drop=drop)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio), drop=drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    """Bidirectional DiT twin with the official constructor and state-dict keys (`pos_embed` first)."""

    def __init__(self, input_size: int = 32, patch_size: int = 1, flatten_input: bool = False, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, num_kv_heads: int | None = None,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, num_classes: int = 1000,
                 drop: float = 0.0, norm_layer=None):
        super().__init__()
        _check_supported(patch_size, flatten_input, norm_layer, hidden_size, num_heads)
        self.in_channels = self.out_channels = in_channels
        self.input_size, self.patch_size = input_size, patch_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.hidden_size, self.num_classes = hidden_size, num_classes
        self.flatten_input_size = input_size * input_size  # tokens per image (the sampler's noise layout)

        self.pos_embed = nn.Parameter(torch.zeros(1, self.flatten_input_size, hidden_size), requires_grad=False)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, self.num_kv_heads, mlp_ratio, drop)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """The official init: the fixed pos_embed, PyTorch defaults, zero x_embedder bias, N(0, 0.02) table and
        t-MLP, zero adaLN-Zero modulations and zero final layer."""
        table = get_2d_sincos_pos_embed(self.hidden_size, self.input_size)
        if self.pos_embed.device.type != "meta":
            self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x_noise: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """Model output (B, C, H, W) for noisy latents (B, C, H, W) at one timestep per image t (B,), labels y (B,)."""
        x = self.x_embedder(x_noise) + self.pos_embed
        c = (self.t_embedder(t) + self.y_embedder(y, self.training)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, c)
        return unpatchify(self.final_layer(x, c), self.out_channels, self.patch_size)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Guided output u + s·(c − u) on the first half of x (y = [labels; null]), returned for both halves."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        cond_out, uncond_out = torch.split(out, len(out) // 2, dim=0)
        guided = uncond_out + cfg_scale * (cond_out - uncond_out)
        return torch.cat([guided, guided], dim=0)

    def sample_with_cfg(self, y: torch.Tensor, cfg_scale: float, sample_func: Callable,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
        """Whole-image CFG sampling: one `sample_func(model_fn, z)` solve from z (2B, C, H, W). `y` = [labels; null]
        (2B,). `noise` (N, B, C), optional, fixes x_T (the layout `Transformer.sample_with_cfg` takes); by default
        it is drawn with torch.randn. Returns latents (B, C, H, W)."""
        half, side = y.shape[0] // 2, self.input_size
        if noise is None:
            z = torch.randn(y.shape[0], self.in_channels, side, side, device=self.device, dtype=self.dtype)
        else:
            z = noise.to(device=self.device, dtype=self.dtype).permute(1, 2, 0).reshape(half, self.in_channels,
                                                                                        side, side)
            z = torch.cat([z, z], dim=0)
        out = sample_func(functools.partial(self.forward_with_cfg, y=y, cfg_scale=cfg_scale), z)
        return out[:half]
