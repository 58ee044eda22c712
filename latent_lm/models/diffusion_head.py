"""Per-token diffusion head: timestep embedding, adaLN SwiGLU blocks, zero-init final layer (docs/method.md §5.1–5.3).

The head never mixes tokens: every row of x_t [..., C] is denoised independently given its condition [..., D].
Its width is the backbone width D; with the zero-init adaLN and output linears it outputs exactly 0 at init.
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.models.layers import Dense, SwiGLU, modulate, rms_norm, swiglu_hidden

Dtype = Any
FREQ_DIM = 256


def timestep_sinusoid(t: jax.Array, dim: int = FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
    """[cos ‖ sin] of the raw timestep (0…999 as float) at frequencies exp(−ln(max_period)·k/half)
    (docs/method.md §5.2)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    """sinusoid(256) → Linear(256→D) → SiLU → Linear(D→D), no biases, weights N(0, 0.02).

    With `num_timesteps` set, integer timesteps 0…num_timesteps−1 that outnumber the schedule's steps are embedded
    through a table: the MLP runs on every step of the schedule once and each t gathers its row, the same values at
    a fraction of the work (docs/method.md §5.2)."""

    width: int
    dtype: Dtype = jnp.float32
    num_timesteps: int = 0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        mlp_0 = Dense(self.width, ("freq", "embed"), kernel_init=init, dtype=self.dtype, name="mlp_0")
        mlp_2 = Dense(self.width, ("embed", "embed_out"), kernel_init=init, dtype=self.dtype, name="mlp_2")
        embed = lambda steps: mlp_2(jax.nn.silu(mlp_0(timestep_sinusoid(steps))))
        if jnp.issubdtype(t.dtype, jnp.integer) and 0 < self.num_timesteps < t.size:
            # mode="fill": a timestep past the schedule embeds as NaN rather than as the last row.
            return jnp.take(embed(jnp.arange(self.num_timesteps)), t, axis=0, mode="fill")
        return embed(t)


class MLPBlock(nn.Module):
    """x + gate ⊙ SwiGLU(modulate(RMSNorm x, shift, scale)); (shift, scale, gate) = Linear(SiLU c), zero-init."""

    mlp_ratio: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        width = x.shape[-1]
        mod = Dense(3 * width, ("embed", "mlp"), kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                    name="adaLN_modulation")(jax.nn.silu(c))
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = SwiGLU(swiglu_hidden(width, self.mlp_ratio), self.dtype, name="mlp")(modulate(rms_norm(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    """Linear(modulate(RMSNorm x, shift, scale)) with (shift, scale) = Linear(SiLU c); both zero-init."""

    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        width = x.shape[-1]
        mod = Dense(2 * width, ("embed", "mlp"), kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                    name="adaLN_modulation")(jax.nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        return Dense(self.out_dim, ("embed", "latent"), kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                     name="linear")(modulate(rms_norm(x), shift, scale))


class DiffusionHead(nn.Module):
    """Predicts ε (or v) for noisy latents x_t [..., C] at timesteps t [...] given conditions [..., D]."""

    latent_dim: int
    depth: int
    mlp_ratio: float
    dtype: Dtype = jnp.float32
    num_timesteps: int = 0  # the training schedule's steps: integer t embed through a table (TimestepEmbedder)

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
        """`t` is one timestep per row ([...], training) or a scalar shared by every row (the sampler's solver
        steps), whose embedding is then computed once and broadcast."""
        chex.assert_equal_shape_prefix([x_t, t, condition], t.ndim)
        chex.assert_axis_dimension(x_t, -1, self.latent_dim)
        width = condition.shape[-1]
        # Rows of the head (tokens × batch multiplier) follow the batch sharding, whatever the leading rank.
        rows = lambda x: nn.with_logical_constraint(x, ("batch", *["length"] * (x.ndim - 2), "embed"))
        t_emb = TimestepEmbedder(width, self.dtype, self.num_timesteps, name="t_embedder")(t)
        c = rows(condition.astype(self.dtype) + (rows(t_emb) if t.ndim else t_emb))
        # noisy_x_embedder keeps PyTorch's default bias init (official initialize_weights zeroes only x_embedder's).
        h = Dense(width, ("latent", "embed"), use_bias=True, bias_init=None, dtype=self.dtype,
                  name="noisy_x_embedder")(x_t)
        for i in range(self.depth):
            h = rows(MLPBlock(self.mlp_ratio, self.dtype, name=f"blocks_{i}")(h, c))
        return FinalLayer(self.latent_dim, self.dtype, name="final_layer")(h, c)
