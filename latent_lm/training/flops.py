"""Training FLOPs of LatentLM and its DiT twin, counted from the model shape (for MFU and scaling-law compute).

Convention: a matmul of [n, a]·[a, b] costs 2nab forward and 6nab forward+backward. Attention scores and the
weighted sum cost 2·2·T·D per token per layer forward (the full T×T square, PaLM's convention, no causal
discount). The diffusion head runs on every token `batch_mul` times (docs/method.md §6.2), so it is counted ×batch_mul.
The DiT (docs/method.md §9) has no multiplier; its conditioning path (timestep MLP, every adaLN modulation) acts on one
vector per image, so it is counted once per image, not per token. Embedding lookups, norms and elementwise ops
are not counted.
"""

from __future__ import annotations

from latent_lm.models.diffusion_head import FREQ_DIM
from latent_lm.models.dit import DiTConfig
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.layers import swiglu_hidden


def backbone_matmul_params(cfg: LatentLMConfig) -> int:
    """Weights touched once per token by the backbone (+ latent input projection, ConditionLayer, LM head)."""
    d, hd = cfg.width, cfg.width // cfg.num_heads
    f = swiglu_hidden(d, cfg.mlp_ratio)
    per_layer = d * (cfg.num_heads * hd + 2 * cfg.kv_heads * hd) + cfg.num_heads * hd * d + 3 * d * f
    return cfg.depth * per_layer + cfg.latent_dim * d + d * d + d * cfg.text_vocab_size


def head_matmul_params(cfg: LatentLMConfig) -> int:
    """Weights touched once per (token, diffusion copy) by the head."""
    d = cfg.width
    f = swiglu_hidden(d, cfg.head_mlp_ratio or cfg.mlp_ratio)
    return (FREQ_DIM * d + d * d + cfg.latent_dim * d + cfg.head_depth * (3 * d * d + 3 * d * f)
            + 2 * d * d + d * cfg.latent_dim)


def train_flops_per_step(cfg: LatentLMConfig, batch: int, seq_len: int, batch_mul: int) -> dict[str, float]:
    tokens = batch * seq_len
    backbone = 6 * backbone_matmul_params(cfg) * tokens + 12 * cfg.depth * cfg.width * seq_len * tokens
    head = 6 * head_matmul_params(cfg) * tokens * batch_mul
    return {"backbone": float(backbone), "head": float(head), "total": float(backbone + head)}


def dit_matmul_params(cfg: DiTConfig) -> dict[str, int]:
    """Weights touched once per token ("token": x_embedder, attention, SwiGLU, output linear) and once per image
    ("image": timestep MLP, every adaLN modulation)."""
    d, hd = cfg.width, cfg.width // cfg.num_heads
    f = swiglu_hidden(d, cfg.mlp_ratio)
    per_layer = d * (cfg.num_heads * hd + 2 * cfg.kv_heads * hd) + cfg.num_heads * hd * d + 3 * d * f
    token = cfg.latent_dim * d + cfg.depth * per_layer + d * cfg.latent_dim
    image = FREQ_DIM * d + d * d + cfg.depth * 6 * d * d + 2 * d * d
    return {"token": token, "image": image}


def dit_train_flops_per_step(cfg: DiTConfig, batch: int) -> dict[str, float]:
    n = cfg.max_len
    w = dit_matmul_params(cfg)
    matmuls = 6 * (w["token"] * n + w["image"]) * batch
    attention = 12 * cfg.depth * cfg.width * n * n * batch
    return {"matmuls": float(matmuls), "attention": float(attention), "total": float(matmuls + attention)}
