"""Causal Transformer backbone and ConditionLayer (docs/method.md §4.2–4.3; official `Transformer.blocks`,
`ConditionLayer`).

The blocks are one `nn.scan` over a stacked layer axis (logical name "layers"), so the compiled program holds one
block whatever the depth; compile time and HLO size stay flat from 2 to 48 layers. Parameters are stored as
`backbone/blocks/<param>` with a leading [depth] axis; the PyTorch export unstacks them into `blocks.{i}.*`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.models.layers import Attention, Dense, KVCache, SwiGLU, rms_norm, swiglu_hidden

Dtype = Any

# Rematerialisation policies (config `model.remat`): what the backward pass keeps instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


class Block(nn.Module):
    """Pre-norm LLaMA block: x + Attn(RMSNorm x), then x + SwiGLU(RMSNorm x); norms have no gain."""

    num_heads: int
    num_kv_heads: int
    mlp_ratio: float
    posi_scale: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None = None,
                 cache: KVCache | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        h, cache = Attention(self.num_heads, self.num_kv_heads, self.posi_scale, self.dtype, name="attn")(
            rms_norm(x), positions, cache, mask, cache_index)
        x = x + h
        x = x + SwiGLU(swiglu_hidden(x.shape[-1], self.mlp_ratio), self.dtype, name="mlp")(rms_norm(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class Transformer(nn.Module):
    """`depth` causal blocks scanned over a stacked "layers" axis; no final norm (the ConditionLayer and LM head
    normalise). `caches` is one KVCache whose arrays carry a leading [depth] axis (see `init_cache`); `mask`
    (`layers.attention_mask` in training, a mask over cache slots in generation) and `cache_index` (the cache slot
    every row writes at, default positions[0, 0]; `layers.Attention`) are shared by every layer. Returns the
    output and the caches with this step's keys and values written."""

    depth: int
    num_heads: int
    num_kv_heads: int
    mlp_ratio: float
    posi_scale: float = 1.0
    remat: str = "none"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, caches: KVCache | None = None,
                 mask: jax.Array | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} must be one of {list(REMAT_POLICIES)}")
        block_cls = Block
        if self.remat != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), out_axes=0, length=self.depth,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        if caches is not None and cache_index is None:
            cache_index = positions[0, 0]  # every row writes at the same slot (rows aligned: slot = position)
        x, new = stack(self.num_heads, self.num_kv_heads, self.mlp_ratio, self.posi_scale, self.dtype,
                       name="blocks")(x, positions, mask, caches, cache_index)
        if caches is None:
            return x, None
        # The layers read the cache and return only their new entries [depth, B, H_kv, T, d]: one in-place write
        # here instead of a copy of every layer's whole cache per step (the scan would stack its outputs).
        write = lambda cache, entries: jax.lax.dynamic_update_slice_in_dim(cache, entries, cache_index, axis=3)
        return x, KVCache(key=write(caches.key, new.key), value=write(caches.value, new.value))


class ConditionLayer(nn.Module):
    """RMSNorm (no gain) → Linear(D→D, no bias): the per-position condition for the diffusion head."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Dense(x.shape[-1], ("embed", "embed_out"), dtype=self.dtype, name="linear")(rms_norm(x))
