"""LatentLM: one causal Transformer over interleaved discrete tokens and latent vectors (docs/method.md §4–7).

Sequence contract (all arrays [B, T, ...]; position i's hidden state predicts position i+1):
  tokens      int   discrete ids in one table: classes 0..K-1, the null class K, then text ids from K+1
  latents     float input latent vectors (read where `is_latent`)
  is_latent   bool  which input positions are latent vectors (linear projection) vs tokens (embedding)
  text_targets, text_mask      next-token CE targets (raw text ids 0..V-1) and where they apply
  latent_targets, latent_mask  next-latent diffusion targets [B,T,C] and where they apply
Class-conditional image generation is the special case [class][z0..z_{N-2}] → targets z0..z_{N-1} (docs/method.md §7.1).
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.models.diffusion_head import DiffusionHead
from latent_lm.models.layers import Dense, KVCache, attention_mask, rms_norm
from latent_lm.models.transformer import ConditionLayer, Transformer


@dataclasses.dataclass(frozen=True)
class LatentLMConfig:
    """Constructor arguments of LatentLM (built from `config.model` and `config.head`)."""

    width: int
    depth: int
    num_heads: int
    latent_dim: int
    head_depth: int
    num_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    head_mlp_ratio: float | None = None  # None: same as the backbone (official)
    num_classes: int = 0
    text_vocab_size: int = 0
    max_len: int = 256
    posi_scale: float = 1.0
    remat: str = "none"  # a key of transformer.REMAT_POLICIES
    dtype: str = "float32"
    num_timesteps: int = 1000  # the diffusion schedule's steps (config.diffusion.num_train_steps)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def text_offset(self) -> int:
        """Id of text token 0 in the shared embedding table (after the classes and the null class)."""
        return self.num_classes + 1 if self.num_classes else 0

    @property
    def embed_rows(self) -> int:
        return self.text_offset + self.text_vocab_size

    @classmethod
    def from_config(cls, config) -> "LatentLMConfig":
        m, h = config.model, config.head
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in m.items() if k in fields}
        if "diffusion" in config:
            kwargs["num_timesteps"] = config.diffusion.num_train_steps
        return cls(head_depth=h.depth, head_mlp_ratio=h.get("mlp_ratio"), **kwargs)


class LatentLM(nn.Module):
    """Embeddings, causal backbone, ConditionLayer, optional LM head and the per-token diffusion head."""

    config: LatentLMConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.token_embed = nn.Embed(
            cfg.embed_rows, cfg.width, dtype=dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        # x_embedder: per-token Linear(C→D) with a zero bias (official PatchEmbed, patch 1).
        self.latent_embed = Dense(cfg.width, ("latent", "embed"), use_bias=True, dtype=dtype, name="x_embedder")
        self.backbone = Transformer(cfg.depth, cfg.num_heads, cfg.kv_heads, cfg.mlp_ratio, cfg.posi_scale,
                                    cfg.remat, dtype)
        self.condition_layer = ConditionLayer(dtype)
        self.head = DiffusionHead(cfg.latent_dim, cfg.head_depth, cfg.head_mlp_ratio or cfg.mlp_ratio, dtype,
                                  cfg.num_timesteps)
        if cfg.text_vocab_size:
            self.lm_head = Dense(cfg.text_vocab_size, ("embed", "vocab"), dtype=dtype)

    def embed(self, tokens: jax.Array, latents: jax.Array, is_latent: jax.Array) -> jax.Array:
        chex.assert_rank([tokens, latents, is_latent], [2, 3, 2])
        tok = self.token_embed(tokens)
        lat = self.latent_embed(latents)
        return nn.with_logical_constraint(jnp.where(is_latent[..., None], lat, tok), ("batch", "length", "embed"))

    def backbone_forward(self, h: jax.Array, positions: jax.Array, caches: KVCache | None = None,
                         mask: jax.Array | None = None,
                         cache_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array, KVCache | None]:
        """Runs the causal stack; returns (conditions, hidden, caches). Conditions feed the diffusion head.

        With `caches`, `cache_index` and `mask` [B, 1, T, S] (optional) pick the write slot and the visible cache
        slots per row (`layers.Attention`; the multimodal generator, docs/method.md §8.5)."""
        hidden, caches = self.backbone(h, positions, caches, mask, cache_index)
        return self.condition_layer(hidden), hidden, caches

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Text logits from the backbone output: RMSNorm (no gain) → Linear(D→V), in fp32."""
        return self.lm_head(rms_norm(hidden)).astype(jnp.float32)

    def diffuse(self, x_t: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
        return self.head(x_t, t, condition).astype(jnp.float32)

    def __call__(self, tokens, latents, is_latent, positions=None, segment_ids=None):
        """Teacher-forced pass: (conditions [B,T,D], hidden [B,T,D]). Also used by `init`.

        A packed row holds several documents: `segment_ids` [B,T] keeps attention inside each, and `positions` then
        restart at 0 in every document (`training.batches.segment_positions`)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        mask = None if segment_ids is None else attention_mask(segment_ids)
        cond, hidden, _ = self.backbone_forward(self.embed(tokens, latents, is_latent), positions, mask=mask)
        if self.is_initializing():  # create every parameter once
            self.diffuse(latents, jnp.zeros(tokens.shape, jnp.int32), cond)
            if self.config.text_vocab_size:
                self.lm_logits(hidden)
        return cond, hidden


def init_cache(config: LatentLMConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zero KV caches for all layers, [depth, B, n_kv, max_len, d_head] each (docs/method.md §8.1; scanned with the
    blocks)."""
    shape = (config.depth, batch, config.kv_heads, max_len, config.width // config.num_heads)
    return KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))
