"""Causal Transformer backbone and ConditionLayer (spec §2.1–2.2; official `Transformer.blocks`, `ConditionLayer`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.models.layers import Attention, Dense, KVCache, SwiGLU, rms_norm, swiglu_hidden

Dtype = Any


class Block(nn.Module):
    """Pre-norm LLaMA block: x + Attn(RMSNorm x), then x + SwiGLU(RMSNorm x); norms have no gain."""

    num_heads: int
    num_kv_heads: int
    mlp_ratio: float
    posi_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        h, cache = Attention(self.num_heads, self.num_kv_heads, self.posi_scale, self.dtype, name="attn")(
            rms_norm(x), positions, cache)
        x = x + h
        x = x + SwiGLU(swiglu_hidden(x.shape[-1], self.mlp_ratio), self.dtype, name="mlp")(rms_norm(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class Transformer(nn.Module):
    """A stack of causal blocks; no final norm inside (the ConditionLayer / LM head normalise).

    `remat` wraps every block in `jax.checkpoint` (recompute activations in the backward pass).
    """

    depth: int
    num_heads: int
    num_kv_heads: int
    mlp_ratio: float
    posi_scale: float = 1.0
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, caches: list[KVCache] | None = None
                 ) -> tuple[jax.Array, list[KVCache] | None]:
        block_cls = nn.remat(Block, static_argnums=()) if self.remat else Block
        new_caches = []
        for i in range(self.depth):
            x, c = block_cls(self.num_heads, self.num_kv_heads, self.mlp_ratio, self.posi_scale, self.dtype,
                             name=f"blocks_{i}")(x, positions, None if caches is None else caches[i])
            new_caches.append(c)
        return x, (None if caches is None else new_caches)


class ConditionLayer(nn.Module):
    """RMSNorm (no gain) → Linear(D→D, no bias): the per-position condition for the diffusion head."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Dense(x.shape[-1], ("embed", "embed_out"), dtype=self.dtype, name="linear")(rms_norm(x))
