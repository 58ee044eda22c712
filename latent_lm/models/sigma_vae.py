"""Image σ-VAE: ViT encoder → μ, fixed per-example σ, ViT decoder (spec §1; official_code_facts §4).

Images are NHWC in [-1, 1]; latents are token sequences [B, T, C] in raster order over the (H/p, W/p) grid
(the official code keeps them as (B, C, h, w); see latent_lm/convert for the permutation).

Layout differences from the official PyTorch modules, all handled by the converter:
- Patch pixels are flattened in (i, j, c) order, both in the encoder's patch embedding (official: a Conv2d,
  i.e. (c, i, j)) and in the decoder's pixel head (official `DecodeHeadBLC`: (c, i, j)).
- The fused `qkv` kernel is [width, 3, heads, head_dim]; the official `qkv.weight` [3·width, width] is its
  transpose flattened in the same (3, heads, head_dim) order.
- The CLS token and positions are [width] and [1+T, width] (official: (1, 1, W) and (1, 1+T, W)).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.models.layers import Dense, torch_default_init

Dtype = Any
LN_EPS = 1e-6  # spec §1.3 / official_code_facts §7.6 (the ViT's LayerNorm; torchscale BEiT-3 uses 1e-5)
SIGMA_DIVISOR = 0.8  # official GaussianDistribution.sample: σ_b = N(0,1)·std/0.8 (spec §1.1)

# timm's trunc_normal_(std=.02) truncates at ±2 *absolute*, i.e. ±100σ: effectively a plain N(0, 0.02²).
trunc_normal = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def latent_grid(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(h, w) = (H/p, W/p): one latent vector per p×p patch (spec §1.3)."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if hw[0] % patch_size or hw[1] % patch_size:
        raise ValueError(f"image size {hw} is not divisible by patch size {patch_size}")
    return hw[0] // patch_size, hw[1] // patch_size


def num_latent_tokens(image_size: int | tuple[int, int], patch_size: int) -> int:
    """T = (H/p)·(W/p) latent tokens per image."""
    h, w = latent_grid(image_size, patch_size)
    return h * w


def sample_latent(rng: jax.Array, mu: jax.Array, std: float, sampling_std: float | None = None) -> jax.Array:
    """z = μ + σ_b·ε with one σ_b ~ N(0, (std/0.8)²) per example, ε ~ N(0, I) (spec §1.1).

    σ_b is shared by all positions and channels of example b and may be negative (harmless: ε is symmetric);
    E|σ_b| = std·√(2/π)/0.8 ≈ 0.997·std. `sampling_std` replaces the draw by a fixed σ (official `sample`).
    """
    k_sigma, k_eps = jax.random.split(rng)
    batch = mu.shape[0]
    if sampling_std is None:
        sigma = jax.random.normal(k_sigma, (batch,), jnp.float32) * (std / SIGMA_DIVISOR)
    else:
        sigma = jnp.full((batch,), sampling_std, jnp.float32)
    eps = jax.random.normal(k_eps, mu.shape, jnp.float32)
    sigma = sigma.reshape((batch,) + (1,) * (mu.ndim - 1))
    return (mu.astype(jnp.float32) + sigma * eps).astype(mu.dtype)


def mu_regularizer(mu: jax.Array) -> jax.Array:
    """Official `kl()`: MSE(μ, 0) with mean reduction, an L2 pull on μ since σ is fixed (spec §1.4)."""
    return jnp.mean(jnp.square(mu.astype(jnp.float32)))


def vae_loss(batch_images: jax.Array, out: dict[str, jax.Array], kl_weight: float = 0.01,
             l2_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1(x, x̂) + l2_weight·MSE(x, x̂) + kl_weight·mean(μ²), in fp32 (spec §1.4).

    `out` is `SigmaVAE.__call__`'s dict. Perceptual (LPIPS) and GAN terms of the recommended recipe are
    separate, later config options; this function covers the pixel and μ terms only. PSNR assumes data in
    [-1, 1] (data range 2).
    """
    x = batch_images.astype(jnp.float32)
    err = out["recon"].astype(jnp.float32) - x
    l1 = jnp.mean(jnp.abs(err))
    mse = jnp.mean(jnp.square(err))
    reg = mu_regularizer(out["mu"])
    loss = l1 + l2_weight * mse + kl_weight * reg
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
    return loss, {"loss": loss, "l1": l1, "mse": mse, "mu_reg": reg, "psnr": psnr}


def _scaled(init: nn.initializers.Initializer, scale: float) -> nn.initializers.Initializer:
    def f(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * scale
    return f


def _layer_norm(name: str) -> nn.LayerNorm:
    # Norms run in fp32 whatever the compute dtype (DESIGN §3 precision).
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class ViTBlock(nn.Module):
    """Pre-LN ViT block: x + proj(MHSA(LN x)), x + fc2(GELU(fc1(LN x))) (spec §1.3, official modeling_utils).

    qkv has q and v biases but no k bias (BEiT convention). `layer_id` (from 1) applies the official
    `fix_init_weight`: proj and fc2 weights are scaled by 1/√(2·layer_id) at init.
    """

    num_heads: int
    layer_id: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        rescaled = _scaled(trunc_normal, 1.0 / math.sqrt(2.0 * self.layer_id))
        h = _layer_norm("norm1")(x).astype(self.dtype)
        qkv = Dense((3, self.num_heads, head_dim), ("embed", None, "heads", "kv"), kernel_init=trunc_normal,
                    dtype=self.dtype, name="qkv")(h)
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads", "kv"))
        q_bias = self.param("q_bias", bias_init, (self.num_heads, head_dim), jnp.float32)
        v_bias = self.param("v_bias", bias_init, (self.num_heads, head_dim), jnp.float32)
        q = qkv[..., 0, :, :] + q_bias.astype(self.dtype)
        k = qkv[..., 1, :, :]
        v = qkv[..., 2, :, :] + v_bias.astype(self.dtype)
        a = jax.nn.dot_product_attention(q, k, v)  # bidirectional, [B,T,N,H]
        a = nn.with_logical_constraint(a, ("batch", "length", "heads", "kv"))
        x = x + Dense(width, ("heads", "kv", "embed"), contract=2, use_bias=True, kernel_init=rescaled,
                      dtype=self.dtype, name="proj")(a)
        h = _layer_norm("norm2")(x).astype(self.dtype)
        h = Dense(int(width * self.mlp_ratio), ("embed", "mlp"), use_bias=True, kernel_init=trunc_normal,
                  dtype=self.dtype, name="fc1")(h)
        h = jax.nn.gelu(h, approximate=False)  # torch nn.GELU default is the exact erf form
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        x = x + Dense(width, ("mlp", "embed"), use_bias=True, kernel_init=rescaled, dtype=self.dtype,
                      name="fc2")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class ViTBody(nn.Module):
    """[CLS] + tokens + learned positions → blocks → fc_norm (applied to all tokens) → drop CLS."""

    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    use_cls: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, _ = x.shape
        n_pos = tokens + int(self.use_cls)
        pos = self.param("pos_embed", nn.with_logical_partitioning(trunc_normal, ("pos", "embed")),
                         (n_pos, self.width), jnp.float32)
        if self.use_cls:
            cls = self.param("cls_token", nn.with_logical_partitioning(trunc_normal, ("embed",)),
                             (self.width,), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x], axis=1)
        x = x + pos.astype(self.dtype)
        for i in range(self.depth):
            x = ViTBlock(self.num_heads, i + 1, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(x)
        x = _layer_norm("fc_norm")(x).astype(self.dtype)
        return x[:, int(self.use_cls):]


class ViTEncoder(nn.Module):
    """Patchify → Linear(p²·C_in → width) → ViT → Linear(width → latent_dim) = μ [B,T,latent_dim] (spec §1.3)."""

    patch_size: int
    width: int
    depth: int
    num_heads: int
    latent_dim: int
    mlp_ratio: float = 4.0
    use_cls: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        x = einops.rearrange(images.astype(self.dtype), "b (h i) (w j) c -> b (h w) (i j c)", i=p, j=p)
        # The official patch embedding is a Conv2d, which timm/BEiT leave at PyTorch's default init.
        x = Dense(self.width, ("patch", "embed"), use_bias=True, kernel_init=torch_default_init(x.shape[-1]),
                  bias_init=None, dtype=self.dtype, name="patch_embed")(x)
        x = ViTBody(self.width, self.depth, self.num_heads, self.mlp_ratio, self.use_cls, self.dtype,
                    name="vit")(x)
        return Dense(self.latent_dim, ("embed", "latent"), use_bias=True, kernel_init=trunc_normal,
                     dtype=self.dtype, name="head")(x)


class ViTDecoder(nn.Module):
    """Linear(latent_dim → width) → ViT → Linear → tanh → Linear(width → p²·C_out) → unpatchify (spec §1.3).

    The per-patch output order is (i, j, c); the official `DecodeHeadBLC` uses (c, i, j).
    """

    grid: tuple[int, int]
    patch_size: int
    out_channels: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    use_cls: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        p = self.patch_size
        # patch_size-1 "conv" over the latent grid == a per-token Linear (PyTorch default init, as a Conv2d).
        x = Dense(self.width, ("latent", "embed"), use_bias=True, kernel_init=torch_default_init(z.shape[-1]),
                  bias_init=None, dtype=self.dtype, name="patch_embed")(z.astype(self.dtype))
        x = ViTBody(self.width, self.depth, self.num_heads, self.mlp_ratio, self.use_cls, self.dtype,
                    name="vit")(x)
        x = Dense(self.width, ("embed", "mlp"), use_bias=True, kernel_init=trunc_normal, dtype=self.dtype,
                  name="head_fc1")(x)
        x = Dense(p * p * self.out_channels, ("mlp", "patch"), use_bias=True, kernel_init=trunc_normal,
                  dtype=self.dtype, name="head_fc2")(jnp.tanh(x))
        h, w = self.grid
        return einops.rearrange(x, "b (h w) (i j c) -> b (h i) (w j) c", h=h, w=w, i=p, j=p)


class SigmaVAE(nn.Module):
    """σ-VAE (spec §1): encode → μ [B,T,C]; z = μ + σ_b·ε (σ_b per example, `std` = C_σ); decode → image.

    Use `model.apply(params, x, method=SigmaVAE.encode)` / `method=SigmaVAE.decode` for the two halves.
    """

    image_size: int
    in_channels: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    latent_dim: int
    mlp_ratio: float = 4.0
    std: float = 0.75
    use_cls: bool = True
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.grid = latent_grid(self.image_size, self.patch_size)
        self.encoder = ViTEncoder(self.patch_size, self.width, self.depth, self.num_heads, self.latent_dim,
                                  self.mlp_ratio, self.use_cls, self.dtype)
        self.decoder = ViTDecoder(self.grid, self.patch_size, self.in_channels, self.width, self.depth,
                                  self.num_heads, self.mlp_ratio, self.use_cls, self.dtype)

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B,H,W,C_in] in [-1,1] → μ [B,T,latent_dim] (the official `mode()`)."""
        chex.assert_shape(images, (None, self.image_size, self.image_size, self.in_channels))
        mu = self.encoder(images)
        chex.assert_shape(mu, (images.shape[0], self.grid[0] * self.grid[1], self.latent_dim))
        return mu

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B,T,latent_dim] → images [B,H,W,C_in], not clamped."""
        chex.assert_shape(z, (None, self.grid[0] * self.grid[1], self.latent_dim))
        images = self.decoder(z)
        chex.assert_shape(images, (z.shape[0], self.image_size, self.image_size, self.in_channels))
        return images

    def __call__(self, images: jax.Array, *, rng: jax.Array) -> dict[str, jax.Array]:
        mu = self.encode(images)
        z = sample_latent(rng, mu, self.std)
        return {"recon": self.decode(z), "mu": mu, "z": z}
