"""Transfusion: LatentLM's backbone with whole-image diffusion in place of next-token diffusion (docs/method.md §9.3).

Sequence contract (arrays [B, T, ...]; `models/latent_lm.py` for the shared fields):
  tokens, latents, is_latent   as LatentLM; `latents` holds the *noised* image x_t at latent positions
  timesteps   int   [B, K]  one diffusion step per image slot k = 1..K of the row
  image_ids   int   [B, T]  which slot's timestep a latent position takes: 1..K, 0 at tokens
A latent enters as Linear(C→D)(x_t) + t_emb(t of its image); the hidden state at a latent position predicts the noise
target (ε or v) of that *same* position through RMSNorm → Linear(D→C), and the hidden state at a token position the
next token through LatentLM's LM head. Attention is causal, except bidirectional inside each image
(`transfusion_mask`).
"""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.models.diffusion_head import TimestepEmbedder
from latent_lm.models.layers import Dense, KVCache, attention_mask, rms_norm
from latent_lm.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class TransfusionConfig:
    """Constructor arguments of Transfusion: LatentLM's backbone fields (`config.model`), no diffusion head."""

    width: int
    depth: int
    num_heads: int
    latent_dim: int
    text_vocab_size: int
    num_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    max_len: int = 256
    posi_scale: float = 1.0
    remat: str = "none"
    dtype: str = "float32"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @classmethod
    def from_config(cls, config) -> "TransfusionConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.model.items() if k in fields})


def image_ids_of(is_latent: jax.Array) -> jax.Array:
    """Numbers the contiguous runs of latent positions of each row 1, 2, … (0 at tokens), int32 [B, T]: one image
    slot per image (= `training.batches.image_span_ids`; the models package imports nothing from training/)."""
    chex.assert_rank(is_latent, 2)
    starts = is_latent & ~jnp.pad(is_latent, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(is_latent, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)


def transfusion_mask(segment_ids: jax.Array, is_latent: jax.Array) -> jax.Array:
    """bool [B, 1, T, T]: causal inside each packed document, bidirectional inside each image (docs/method.md §4.1).

    Image ids are unique within a row, and `attention_mask` compares them within a row only, so two images never
    see each other's later positions, nor across documents."""
    return attention_mask(segment_ids, bidirectional_spans=image_ids_of(is_latent))


class Transfusion(nn.Module):
    """Token embedding, latent in-projection + timestep embedding, LatentLM's backbone, LM head and out-projection."""

    config: TransfusionConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.token_embed = nn.Embed(
            cfg.text_vocab_size, cfg.width, dtype=dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        # LatentLM's x_embedder (zero bias); the timestep embedding is the diffusion head's (docs/method.md §5.2).
        self.latent_embed = Dense(cfg.width, ("latent", "embed"), use_bias=True, dtype=dtype, name="x_embedder")
        self.t_embedder = TimestepEmbedder(cfg.width, dtype)
        self.backbone = Transformer(cfg.depth, cfg.num_heads, cfg.kv_heads, cfg.mlp_ratio, cfg.posi_scale,
                                    cfg.remat, dtype)
        self.lm_head = Dense(cfg.text_vocab_size, ("embed", "vocab"), dtype=dtype)
        # Zero-initialised like the diffusion head's output layer (docs/method.md §5.3): the prediction starts at 0.
        self.out_proj = Dense(cfg.latent_dim, ("embed", "latent"), kernel_init=nn.initializers.zeros_init(),
                              dtype=dtype, name="final_layer")

    def embed(self, tokens: jax.Array, latents: jax.Array, is_latent: jax.Array, timesteps: jax.Array,
              image_ids: jax.Array) -> jax.Array:
        """[B, T, D]: token rows, or Linear(x_t) + t_emb(t of the position's image) at latent positions.

        The timestep MLP runs once per image slot ([B, K]), not once per position."""
        chex.assert_rank([tokens, latents, is_latent, timesteps, image_ids], [2, 3, 2, 2, 2])
        chex.assert_equal_shape([tokens, is_latent, image_ids])
        t_emb = self.t_embedder(timesteps)  # [B, K, D]
        t_emb = jnp.concatenate([jnp.zeros_like(t_emb[:, :1]), t_emb], axis=1)  # slot 0: tokens
        t_pos = jnp.take_along_axis(t_emb, image_ids[..., None], axis=1, mode="clip")
        lat = self.latent_embed(latents) + t_pos
        tok = self.token_embed(tokens)
        return nn.with_logical_constraint(jnp.where(is_latent[..., None], lat, tok), ("batch", "length", "embed"))

    def backbone_forward(self, h: jax.Array, positions: jax.Array, caches: KVCache | None = None,
                         mask: jax.Array | None = None,
                         cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """The stack alone: (hidden [B, T, D], caches); `mask` and `cache_index` as `layers.Attention`."""
        return self.backbone(h, positions, caches, mask, cache_index)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Next-token logits: RMSNorm (no gain) → Linear(D→V), fp32 (LatentLM's head, docs/method.md §4.4)."""
        return self.lm_head(rms_norm(hidden)).astype(jnp.float32)

    def denoise(self, hidden: jax.Array) -> jax.Array:
        """The ε or v prediction of each latent position itself: RMSNorm (no gain) → Linear(D→C), fp32."""
        return self.out_proj(rms_norm(hidden)).astype(jnp.float32)

    def __call__(self, tokens, latents, is_latent, timesteps, image_ids, positions=None, segment_ids=None):
        """Teacher-forced pass over packed rows: hidden [B, T, D] (`lm_logits`, `denoise` read it). Also `init`.

        `segment_ids` None means one document per row; positions then default to 0…T−1."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        h = self.embed(tokens, latents, is_latent, timesteps, image_ids)
        hidden, _ = self.backbone_forward(h, positions, mask=transfusion_mask(segment_ids, is_latent))
        if self.is_initializing():  # create every parameter once
            self.lm_logits(hidden)
            self.denoise(hidden)
        return hidden


def init_cache(config: TransfusionConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """Zero KV caches, [depth, B, n_kv, max_len, d_head] each (scanned with the blocks, docs/method.md §8.1)."""
    shape = (config.depth, batch, config.kv_heads, max_len, config.width // config.num_heads)
    return KVCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))
