"""Backbone building blocks (docs/method.md §4, §5.3, §11).

Every parameter carries logical axis names; the logical→mesh mapping lives in the config (`mesh.rules`).
Parameters are stored in `param_dtype` (fp32) and cast to the compute `dtype` (e.g. bf16) at use.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = nn.initializers.Initializer

RMS_EPS = 1e-6


def torch_default_init(fan_in: int) -> Initializer:
    """PyTorch's default Linear/Conv init, Kaiming-uniform(a=√5) = U(±1/√fan_in) (docs/method.md §5.3, §11)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Dense(nn.Module):
    """Linear map contracting the last `contract` axes of x into `features` (a bias-free default).

    The kernel has shape `x.shape[-contract:] + features` and logical names `axes` (one per kernel dim).
    Default init is PyTorch's (U(±1/√fan_in)); `bias_init=None` means PyTorch's default bias too.
    """

    features: int | Sequence[int]
    axes: Sequence[str | None]
    contract: int = 1
    use_bias: bool = False
    kernel_init: Initializer | None = None
    bias_init: Initializer | None = nn.initializers.zeros_init()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.contract:]
        fan_in = int(np.prod(in_shape))
        chex.assert_equal(len(self.axes), len(in_shape) + len(features))
        init = self.kernel_init or torch_default_init(fan_in)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.axes)),
                            in_shape + features, self.param_dtype)
        x = x.astype(self.dtype)
        # One 2-D matmul over the flattened rows: a contraction over several leading axes makes XLA:CPU write each
        # weight gradient's operand transposed (docs/benchmarks.md §2; 1.3× on the embedded train step).
        lead = x.shape[:x.ndim - self.contract]
        y = jnp.dot(x.reshape(-1, fan_in), kernel.astype(self.dtype).reshape(fan_in, -1)).reshape(lead + features)
        if self.use_bias:
            binit = self.bias_init or torch_default_init(fan_in)
            bias = self.param("bias", nn.with_logical_partitioning(binit, tuple(self.axes[len(in_shape):])),
                              features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def rms_norm(x: jax.Array, eps: float = RMS_EPS) -> jax.Array:
    """RMSNorm without gain, computed in fp32 and cast back (docs/method.md §4.2; official `RMSNorm(affine=False)`)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation x·(1+scale)+shift (official `modulate`)."""
    return x * (1 + scale) + shift


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """SwiGLU hidden size ⌊D·ratio·2/3/64⌋·64 (docs/method.md §4.2); e.g. 768→2048, 1024→2688 at ratio 4."""
    return int(width * mlp_ratio * 2 / 3 / 64) * 64


def rope_frequencies(head_dim: int, posi_scale: float = 1.0) -> np.ndarray:
    """Official RoPE angles 1/(10000·s)^linspace(0, 1, d/2): the grid *includes* the endpoint (docs/method.md §4.3)."""
    return 1.0 / (10000.0 * posi_scale) ** np.linspace(0.0, 1.0, head_dim // 2, dtype=np.float64)


def apply_rope(x: jax.Array, positions: jax.Array, posi_scale: float = 1.0) -> jax.Array:
    """Interleaved (GPT-J) rotary embedding on x [B,T,N,H] at integer positions [B,T] (docs/method.md §4.3).

    Pairs (2i, 2i+1) rotate together. Angles are computed in fp32 and the rotation is done in fp32;
    the official code casts the tables to x.dtype first, which only differs under bf16.
    """
    chex.assert_rank(x, 4)
    chex.assert_equal_shape_prefix([x, positions], 2)
    freqs = jnp.asarray(rope_frequencies(x.shape[-1], posi_scale), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [B,T,1,H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x_even, x_odd = xf[..., 0], xf[..., 1]
    out = jnp.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class SwiGLU(nn.Module):
    """fc2(SiLU(fc1 x) ⊙ gate x), bias-free (official `SwiGLU`: the SiLU is on fc1)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        a = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        g = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
        h = nn.with_logical_constraint(jax.nn.silu(a) * g, ("batch", "length", "mlp"))
        return Dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


def attention_mask(segment_ids: jax.Array, bidirectional_spans: jax.Array | None = None) -> jax.Array:
    """Which keys each query may attend to in a packed row (docs/method.md §4.1): bool [B, 1, T, T].

    Query i sees key j when both are in the same document (`segment_ids` [B, T], one id per packed document) and
    j ≤ i (causal), or when both lie in the same bidirectional span (`bidirectional_spans` [B, T]: a span id > 0 per
    position, 0 outside any span; Transfusion's image spans). Every position sees itself, padding included.
    """
    chex.assert_rank(segment_ids, 2)
    t = segment_ids.shape[1]
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None]
    if bidirectional_spans is not None:
        chex.assert_equal_shape([segment_ids, bidirectional_spans])
        span = bidirectional_spans[:, :, None]
        allowed = allowed | ((span == bidirectional_spans[:, None, :]) & (span > 0))
    return (same_doc & allowed)[:, None]


@flax.struct.dataclass
class KVCache:
    """Static-size per-layer cache of *rotated* keys and values, [B, n_kv, max_len, d_head] each (head-major, so
    attention reads it in place: `cached_attention`); also the T new entries of one step, [B, n_kv, T, d_head]."""

    key: jax.Array
    value: jax.Array


def kv_major(x: jax.Array) -> jax.Array:
    """[B, T, N, H] → the cache layout [B, N, T, H]."""
    return jnp.swapaxes(x, 1, 2)


def cached_attention(q: jax.Array, cache: KVCache, new: KVCache, mask: jax.Array, start: jax.Array) -> jax.Array:
    """Softmax attention of q [B, T, N, H] over a head-major cache [B, N_kv, S, H] whose slots start…start+T−1 are
    being replaced by `new` [B, N_kv, T, H], under mask [B, 1, T, S] (over the slots after the write).

    One query (decoding) reads the cache in place and attends to `new` beside it: no copy of the cache per layer and
    token (`Transformer` writes every layer's new entries once, after the layers). Several queries (a prefill, a
    Transfusion image) attend over a written copy instead, which their number amortises and which does not score
    the replaced slots twice. The query heads sharing a KV head are folded into the query axis, so every contraction
    batches over (B, N_kv) and never transposes the S·H cache."""
    b, t, n, h = q.shape
    n_kv, s = cache.key.shape[1], cache.key.shape[2]
    rep = n // n_kv
    qg = q.reshape(b, t, n_kv, rep, h).transpose(0, 2, 3, 1, 4).reshape(b, n_kv, rep * t, h)  # [B,Nkv,rep·T,H]
    if t == 1:
        replaced = jnp.arange(s) == start
        parts = [(cache, mask & ~replaced), (new, jax.lax.dynamic_slice_in_dim(mask, start, 1, 3))]
    else:
        write = lambda c, e: jax.lax.dynamic_update_slice_in_dim(c, e, start, axis=2)
        parts = [(KVCache(key=write(cache.key, new.key), value=write(cache.value, new.value)), mask)]
    logits = jnp.concatenate([jnp.einsum("bkqh,bksh->bkqs", qg, kv.key.astype(q.dtype),
                                         preferred_element_type=jnp.float32) for kv, _ in parts], -1) / np.sqrt(h)
    allowed = jnp.concatenate([jnp.broadcast_to(m[:, :, None], (*m.shape[:2], rep, *m.shape[2:])).reshape(
        b, 1, rep * t, -1) for _, m in parts], -1)
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1).astype(q.dtype)
    out, offset = 0, 0
    for kv, _ in parts:
        width = kv.value.shape[2]
        out = out + jnp.einsum("bkqs,bksh->bkqh", probs[..., offset:offset + width], kv.value.astype(q.dtype))
        offset += width
    return out.reshape(b, n_kv, rep, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nn.Module):
    """Causal multi-head attention with GQA, interleaved RoPE and an optional static KV cache (docs/method.md §4.2).

    q/k/v are separate kernels ([D, heads, d_head]) so tensor parallelism can shard whole heads; the official
    fused `qkv.weight` is their row-concatenation [q | k | v] (see latent_lm/convert).
    With a cache, every query attends to the cache slots whose index ≤ its own position, the new keys/values
    standing in the slots from `positions` on, which is exactly causal attention over the filled prefix; the cache
    is only read, and the new entries are returned in its place for `Transformer` to write.
    `causal=False, rope=False` is the DiT twin's attention (docs/method.md §9): bidirectional, positions unused, no
    cache. Without a cache, `mask` ([B, 1, T, T] bool, `attention_mask`) replaces the plain causal mask: packed
    documents, bidirectional spans. With a cache, `cache_index` (the scalar slot all rows write at, required) and
    `mask` ([B, 1, T, S] bool over the S cache slots, default "slot ≤ position") place the new entries; an explicit
    mask serves the multimodal generator's left-padded rows, whose RoPE positions differ from their slots
    (docs/method.md §8.5).
    """

    num_heads: int
    num_kv_heads: int
    posi_scale: float = 1.0
    dtype: Dtype = jnp.float32
    causal: bool = True
    rope: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array | None, cache: KVCache | None = None,
                 mask: jax.Array | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs causal attention")
        if cache is None and cache_index is not None:
            raise ValueError("cache_index needs a KV cache")
        width = x.shape[-1]
        head_dim = width // self.num_heads
        q = Dense((self.num_heads, head_dim), ("embed", "heads", "kv"), dtype=self.dtype, name="query")(x)
        k = Dense((self.num_kv_heads, head_dim), ("embed", "kv_heads", "kv"), dtype=self.dtype, name="key")(x)
        v = Dense((self.num_kv_heads, head_dim), ("embed", "kv_heads", "kv"), dtype=self.dtype, name="value")(x)
        if self.rope:
            q = apply_rope(q, positions, self.posi_scale)
            k = apply_rope(k, positions, self.posi_scale)
        if cache is None and mask is not None:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        elif cache is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            if cache_index is None:
                raise ValueError("a KV cache needs cache_index (Transformer passes it, default positions[0, 0])")
            new = KVCache(key=kv_major(k).astype(cache.key.dtype), value=kv_major(v).astype(cache.value.dtype))
            if mask is None:
                slots = jnp.arange(cache.key.shape[2])
                mask = slots[None, None, None, :] <= positions[:, None, :, None]  # [B,1,T,S]
            chex.assert_shape(mask, (x.shape[0], 1, x.shape[1], cache.key.shape[2]))
            out = cached_attention(q, cache, new, mask, cache_index)
            cache = new
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        out = Dense(width, ("heads", "kv", "embed"), contract=2, dtype=self.dtype, name="proj")(out)
        return out, cache
