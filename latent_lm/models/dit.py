"""The DiT twin baseline: a bidirectional adaLN-Zero Transformer that denoises the whole latent image at once
(docs/method.md §9; official `models/DiT.py`).

Same building blocks as LatentLM (RMSNorm without gain, bias-free SwiGLU and attention, the timestep embedder, the
zero-init final layer) but no causal mask and no RoPE: positions come from a fixed 2-D sin-cos table added to the
latent embeddings, and the condition c = t_emb(t) + y_emb(y) is one vector per image (one timestep per image).
The blocks are one `nn.scan` over a stacked "layers" axis with the backbone's remat policies, so parameters live at
`blocks/<param>` with a leading [depth] axis and the logical sharding rules apply unchanged.

`pos_embed` is not a parameter here (it is a constant); the official class keeps it as a frozen `nn.Parameter`,
the first key of its state dict, so the PyTorch export writes it and the official parameter count includes it.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.errors import ConfigError
from latent_lm.models.diffusion_head import FinalLayer, TimestepEmbedder
from latent_lm.models.layers import Attention, Dense, SwiGLU, modulate, rms_norm, swiglu_hidden
from latent_lm.models.transformer import REMAT_POLICIES


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """MAE's fixed 2-D sin-cos table [grid², dim] in float64, tokens in raster (row-major) order.

    The first dim/2 channels encode the column (w) coordinate and the last dim/2 the row (h), because MAE's
    `np.meshgrid(grid_w, grid_h)` puts w first; each half is [sin ‖ cos] at ω_k = 1/10000^(k/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(grid_w), one_axis(grid_h)], axis=1)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Constructor arguments of the DiT twin (built from `config.model`; `config.head` does not apply)."""

    width: int
    depth: int
    num_heads: int
    latent_dim: int
    num_classes: int
    max_len: int  # latent tokens per image: a square number (the √N×√N grid)
    num_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    remat: str = "none"  # a key of transformer.REMAT_POLICIES
    dtype: str = "float32"

    def __post_init__(self):
        side = math.isqrt(self.max_len)
        if side * side != self.max_len:
            raise ConfigError(f"model.max_len={self.max_len} is not a square number: the DiT twin lays the latent "
                              f"tokens on a √N×√N grid (2-D sin-cos positions)")
        if self.num_classes < 1:
            raise ConfigError(f"model.num_classes={self.num_classes}: the DiT twin is class-conditional (≥ 1 class)")
        if self.width % 4:
            raise ConfigError(f"model.width={self.width} must be divisible by 4 for the DiT twin's 2-D sin-cos "
                              f"position table")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.max_len)

    @classmethod
    def from_config(cls, config) -> "DiTConfig":
        """From `config.model`; `config.head` and the LatentLM-only keys (posi_scale, …) do not apply."""
        if config.model.get("text_vocab_size"):
            raise ConfigError(f"model.text_vocab_size={config.model.text_vocab_size}: the DiT twin generates class-"
                              f"conditional latent images only (set it to 0 or use model.arch='latent_lm')")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.model.items() if k in fields})


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa·Attn(modulate(RMSNorm x)), x += gate_mlp·SwiGLU(modulate(RMSNorm x)).

    The six modulation vectors come from Linear(SiLU c) (zero-init, no bias) in the order shift_msa, scale_msa,
    gate_msa, shift_mlp, scale_mlp, gate_mlp. Scanned: (x, c) → (x, None) with c broadcast over the layers.
    """

    num_heads: int
    num_kv_heads: int
    mlp_ratio: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, None]:
        width = x.shape[-1]
        mod = Dense(6 * width, ("embed", "mlp"), kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                    name="adaLN_modulation")(jax.nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h, _ = Attention(self.num_heads, self.num_kv_heads, dtype=self.dtype, causal=False, rope=False,
                         name="attn")(modulate(rms_norm(x), shift_msa, scale_msa), None)
        x = x + gate_msa * h
        h = SwiGLU(swiglu_hidden(width, self.mlp_ratio), self.dtype, name="mlp")(modulate(rms_norm(x), shift_mlp,
                                                                                           scale_mlp))
        x = x + gate_mlp * h
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class DiT(nn.Module):
    """Predicts ε (or v) for a whole noisy latent image x_t [B, N, C] at one timestep t [B] per image, class y [B]."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x_t: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        cfg = self.config
        chex.assert_shape(x_t, (None, cfg.max_len, cfg.latent_dim))
        chex.assert_shape([t, y], (x_t.shape[0],))
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={cfg.remat!r} must be one of {list(REMAT_POLICIES)}")
        dtype = jnp.dtype(cfg.dtype)
        pos = jnp.asarray(sincos_pos_embed_2d(cfg.width, cfg.grid_size), jnp.float32).astype(dtype)
        # x_embedder: per-token Linear(C→D) with a zero bias (official 1×1 PatchEmbed conv, bias zeroed at init).
        x = Dense(cfg.width, ("latent", "embed"), use_bias=True, dtype=dtype, name="x_embedder")(x_t) + pos
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        y_emb = nn.Embed(cfg.num_classes + 1, cfg.width, dtype=dtype, name="y_embedder",  # + the null class row
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")))(y)
        c = TimestepEmbedder(cfg.width, dtype, name="t_embedder")(t) + y_emb
        c = nn.with_logical_constraint(c[:, None, :], ("batch", "length", "embed"))  # [B, 1, D]: all tokens

        block = DiTBlock
        if cfg.remat != "none":
            block = nn.remat(DiTBlock, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,),
                        out_axes=0, length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(cfg.num_heads, cfg.kv_heads, cfg.mlp_ratio, dtype, name="blocks")(x, c)
        return FinalLayer(cfg.latent_dim, dtype, name="final_layer")(x, c).astype(jnp.float32)
