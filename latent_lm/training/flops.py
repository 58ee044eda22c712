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
from latent_lm.models.transfusion import TransfusionConfig


def backbone_matmul_params(cfg: LatentLMConfig) -> int:
    """Weights touched once per token by the backbone (+ latent input projection, ConditionLayer, LM head)."""
    d, hd = cfg.width, cfg.width // cfg.num_heads
    f = swiglu_hidden(d, cfg.mlp_ratio)
    per_layer = d * (cfg.num_heads * hd + 2 * cfg.kv_heads * hd) + cfg.num_heads * hd * d + 3 * d * f
    return cfg.depth * per_layer + cfg.latent_dim * d + d * d + d * cfg.text_vocab_size


def head_matmul_params(cfg: LatentLMConfig, shared_t: bool = False) -> int:
    """Weights touched once per (token, diffusion copy) by the head; `shared_t`: without the timestep embedder,
    which the sampler runs once per solver step for the whole batch (docs/method.md §8.1)."""
    d = cfg.width
    f = swiglu_hidden(d, cfg.head_mlp_ratio or cfg.mlp_ratio)
    t_embedder = 0 if shared_t else FREQ_DIM * d + d * d
    return t_embedder + cfg.latent_dim * d + cfg.head_depth * (3 * d * d + 3 * d * f) + 2 * d * d + d * cfg.latent_dim


def train_flops_per_step(cfg: LatentLMConfig, batch: int, seq_len: int, batch_mul: int,
                         head_tokens: int | None = None) -> dict[str, float]:
    """`head_tokens`: positions per row the head runs on when gathered (docs/method.md §7.3); default all."""
    tokens = batch * seq_len
    backbone = 6 * backbone_matmul_params(cfg) * tokens + 12 * cfg.depth * cfg.width * seq_len * tokens
    head = 6 * head_matmul_params(cfg) * batch * (seq_len if head_tokens is None else head_tokens) * batch_mul
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


def transfusion_matmul_params(cfg: TransfusionConfig) -> dict[str, int]:
    """Transfusion (docs/method.md §9.3): weights touched once per position
    ("layers": the backbone; "in": the latent in-projection, which the model applies at every position before
    selecting; "out": the RMSNorm → Linear(D→C) out-projection; "lm": the LM head) and once per image ("image": the
    timestep MLP, which runs on one t per image slot)."""
    d, hd = cfg.width, cfg.width // cfg.num_heads
    f = swiglu_hidden(d, cfg.mlp_ratio)
    per_layer = d * (cfg.num_heads * hd + 2 * cfg.kv_heads * hd) + cfg.num_heads * hd * d + 3 * d * f
    return {"layers": cfg.depth * per_layer, "in": cfg.latent_dim * d, "out": d * cfg.latent_dim,
            "lm": d * cfg.text_vocab_size, "image": FREQ_DIM * d + d * d}


def transfusion_train_flops_per_step(cfg: TransfusionConfig, batch: int, seq_len: int,
                                     images_per_row: int) -> dict[str, float]:
    """Training FLOPs of `batch` packed rows: backbone, in/out projections and LM head on every position, the timestep
    MLP on `images_per_row` slots, attention over the full T×T square (this module's convention)."""
    w = transfusion_matmul_params(cfg)
    per_position = w["layers"] + w["in"] + w["out"] + w["lm"]
    matmuls = 6 * (per_position * seq_len + w["image"] * images_per_row) * batch
    attention = 12 * cfg.depth * cfg.width * seq_len * seq_len * batch
    return {"matmuls": float(matmuls), "attention": float(attention), "total": float(matmuls + attention)}


def transfusion_sample_flops_per_image(cfg: TransfusionConfig, prefix_len: int, num_latents: int, num_steps: int,
                                       guidance: bool = True) -> dict[str, float]:
    """Forward FLOPs of one text-to-image sample as `transfusion_sampling.sample_image` runs it: the P-position prefix
    once into the KV cache, then `num_steps` backbone passes over the N image positions, each attending to all
    P + N cache slots (the static cache is P + N long, so the prefill's P queries also score P + N slots); doubled
    with classifier-free guidance. The LM head is never evaluated."""
    w = transfusion_matmul_params(cfg)
    p, n, slots = prefix_len, num_latents, prefix_len + num_latents
    prefill = 2 * ((w["layers"] + w["in"]) * p + w["image"]) + 4 * cfg.depth * cfg.width * p * slots
    step = 2 * ((w["layers"] + w["in"] + w["out"]) * n + w["image"]) + 4 * cfg.depth * cfg.width * n * slots
    rows = 2 if guidance else 1
    return {"prefill": float(rows * prefill), "denoise": float(rows * num_steps * step),
            "total": float(rows * (prefill + num_steps * step))}


def vq_matmul_params(cfg: LatentLMConfig) -> dict[str, int]:
    """The VQ-MLLM baseline (docs/method.md §9.4): LatentLM's backbone read through its token embedding alone.
    Weights touched once per position: "layers" the blocks, "lm" the LM head over text and codes
    (D·model.text_vocab_size). No latent projection, ConditionLayer or diffusion head (the task creates none);
    the embedding is a lookup, not counted."""
    d, hd = cfg.width, cfg.width // cfg.num_heads
    f = swiglu_hidden(d, cfg.mlp_ratio)
    per_layer = d * (cfg.num_heads * hd + 2 * cfg.kv_heads * hd) + cfg.num_heads * hd * d + 3 * d * f
    return {"layers": cfg.depth * per_layer, "lm": d * cfg.text_vocab_size}


def vq_train_flops_per_step(cfg: LatentLMConfig, batch: int, seq_len: int) -> dict[str, float]:
    """Training FLOPs of `batch` packed rows of the VQ arm: backbone and LM head at every position, attention over the
    full T×T square (this module's convention). Nothing else: CE is the only loss."""
    w = vq_matmul_params(cfg)
    matmuls = 6 * (w["layers"] + w["lm"]) * seq_len * batch
    attention = 12 * cfg.depth * cfg.width * seq_len * seq_len * batch
    return {"matmuls": float(matmuls), "attention": float(attention), "total": float(matmuls + attention)}


def vq_sample_flops_per_image(cfg: LatentLMConfig, prefix_len: int, num_latents: int, guidance: bool = True,
                              cache_slots: int | None = None) -> dict[str, float]:
    """Forward FLOPs of one text-to-image sample as `generation.generate` runs it in code mode (§8.5) for a
    `prefix_len`-item prompt ending in `<boi>` and max_new = N = `num_latents`: the prompt once into the KV cache,
    then N steps, each the LM head on one position (the next code's logits) and the backbone on one position (the
    code fed back; the N-th one yields the state that scores `<eoi>`). Every query scores all `cache_slots` slots of
    the static cache (default P + N, the loop's P + max_new). Doubled with classifier-free guidance (the null rows
    run everything too)."""
    w = vq_matmul_params(cfg)
    p, n = prefix_len, num_latents
    slots = p + n if cache_slots is None else cache_slots
    prefill = 2 * w["layers"] * p + 4 * cfg.depth * cfg.width * p * slots
    step = 2 * (w["lm"] + w["layers"]) + 4 * cfg.depth * cfg.width * slots
    rows = 2 if guidance else 1
    return {"prefill": float(rows * prefill), "decode": float(rows * n * step),
            "total": float(rows * (prefill + n * step))}


def latent_lm_sample_flops_per_image(cfg: LatentLMConfig, prefix_len: int, num_latents: int, num_steps: int,
                                     guidance: bool = True, cache_slots: int | None = None) -> dict[str, float]:
    """The LatentLM arm's counterpart of `vq_sample_flops_per_image`, as `generation.generate` runs it (§8.5): the
    prompt once into the KV cache (latent projection, backbone and ConditionLayer at every position), then N steps,
    each `num_steps` diffusion-head passes of the solver and one backbone position for the latent fed back; no LM
    head while in latent mode. Doubled with classifier-free guidance (the head runs on [x; x] with both conditions).
    The head's timestep embedding, once per solver step for the whole batch, is left out (1/B of it per image)."""
    per_position = backbone_matmul_params(cfg) - cfg.width * cfg.text_vocab_size  # without the LM head
    p, n = prefix_len, num_latents
    slots = p + n if cache_slots is None else cache_slots
    prefill = 2 * per_position * p + 4 * cfg.depth * cfg.width * p * slots
    step = 2 * per_position + 4 * cfg.depth * cfg.width * slots + num_steps * 2 * head_matmul_params(cfg, shared_t=True)
    rows = 2 if guidance else 1
    return {"prefill": float(rows * prefill), "decode": float(rows * n * step),
            "total": float(rows * (prefill + n * step))}
