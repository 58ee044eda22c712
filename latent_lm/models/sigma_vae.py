"""Image σ-VAE: ViT encoder → μ, fixed per-example σ, ViT decoder (docs/method.md §2).

Images are NHWC in [-1, 1]; latents are token sequences [B, T, C] in raster order over the (H/p, W/p) grid
(the official code keeps them as (B, C, h, w); see latent_lm/convert for the permutation).

`kind="kl"` turns the model into the learned-variance KL-VAE control of docs/method.md §2.4 (paper Fig. 6 "stars"): the
encoder also predicts log σ² per latent value, z = μ + σ ⊙ ε, and the loss carries the true KL to N(0, I). The
extra head is `encoder/logvar_head` (LDM's `quant_conv` emits both moments from one 1×1 conv; two heads are the
same map). `kind="fsq"` is the discrete tokenizer of docs/method.md §2.5 (the VQ-MLLM baseline): the same ViT, its
encoder output finite-scalar-quantized (`models/fsq.py`) to a grid vector z that the decoder reads, no noise. The
PyTorch export covers the σ-VAE only.

The module only maps images ↔ latents; its losses (docs/method.md §2.3: L1/MSE, μ penalty or KL, LPIPS, PatchGAN with
the adaptive weight) are in `latent_lm/training/vae_losses.py`, and the posterior sampling in `latent_lm/latents.py`.

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

from latent_lm.latents import VAE_KINDS, sample_latent, sigma_points
from latent_lm.models import fsq
from latent_lm.models.layers import Dense, torch_default_init

Dtype = Any
LN_EPS = 1e-6  # docs/method.md §2.1, §11.1 (the ViT's LayerNorm; torchscale BEiT-3 uses 1e-5)
LOGVAR_RANGE = (-30.0, 20.0)  # LDM DiagonalGaussianDistribution clamps log σ² to this range

# timm's trunc_normal_(std=.02) truncates at ±2 *absolute*, i.e. ±100σ: effectively a plain N(0, 0.02²).
trunc_normal = nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def latent_grid(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(h, w) = (H/p, W/p): one latent vector per p×p patch (docs/method.md §2.1)."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if hw[0] % patch_size or hw[1] % patch_size:
        raise ValueError(f"image size {hw} is not divisible by patch size {patch_size}")
    return hw[0] // patch_size, hw[1] // patch_size


def num_latent_tokens(image_size: int | tuple[int, int], patch_size: int) -> int:
    """T = (H/p)·(W/p) latent tokens per image."""
    h, w = latent_grid(image_size, patch_size)
    return h * w


def _scaled(init: nn.initializers.Initializer, scale: float) -> nn.initializers.Initializer:
    def f(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * scale
    return f


def _layer_norm(name: str) -> nn.LayerNorm:
    # Norms run in fp32 whatever the compute dtype (docs/design.md §3).
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class ViTBlock(nn.Module):
    """Pre-LN ViT block: x + proj(MHSA(LN x)), x + fc2(GELU(fc1(LN x))) (docs/method.md §2.1, official modeling_utils).

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
    """Patchify → Linear(p²·C_in → width) → ViT → Linear(width → latent_dim) = μ [B,T,latent_dim] (docs/method.md §2.1).

    Returns (μ, log σ²): log σ² [B,T,latent_dim] from `logvar_head` for kind "kl" (clamped as LDM), else None.
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    latent_dim: int
    mlp_ratio: float = 4.0
    use_cls: bool = True
    dtype: Dtype = jnp.float32
    kind: str = "sigma"

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        p = self.patch_size
        x = einops.rearrange(images.astype(self.dtype), "b (h i) (w j) c -> b (h w) (i j c)", i=p, j=p)
        # The official patch embedding is a Conv2d, which timm/BEiT leave at PyTorch's default init.
        x = Dense(self.width, ("patch", "embed"), use_bias=True, kernel_init=torch_default_init(x.shape[-1]),
                  bias_init=None, dtype=self.dtype, name="patch_embed")(x)
        x = ViTBody(self.width, self.depth, self.num_heads, self.mlp_ratio, self.use_cls, self.dtype,
                    name="vit")(x)
        mu = Dense(self.latent_dim, ("embed", "latent"), use_bias=True, kernel_init=trunc_normal,
                   dtype=self.dtype, name="head")(x)
        if self.kind != "kl":
            return mu, None
        logvar = Dense(self.latent_dim, ("embed", "latent"), use_bias=True, kernel_init=trunc_normal,
                       dtype=self.dtype, name="logvar_head")(x)
        return mu, jnp.clip(logvar.astype(jnp.float32), *LOGVAR_RANGE)


class ViTDecoder(nn.Module):
    """Linear(latent_dim → width) → ViT → Linear → tanh → Linear(width → p²·C_out) → unpatchify (docs/method.md §2.1).

    The per-patch output order is (i, j, c); the official `DecodeHeadBLC` uses (c, i, j). With
    `return_head_input`, also returns the last layer's input tanh(fc1(·)) [B,T,width] (the adaptive GAN weight).
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
    def __call__(self, z: jax.Array, return_head_input: bool = False):
        p = self.patch_size
        # patch_size-1 "conv" over the latent grid == a per-token Linear (PyTorch default init, as a Conv2d).
        x = Dense(self.width, ("latent", "embed"), use_bias=True, kernel_init=torch_default_init(z.shape[-1]),
                  bias_init=None, dtype=self.dtype, name="patch_embed")(z.astype(self.dtype))
        x = ViTBody(self.width, self.depth, self.num_heads, self.mlp_ratio, self.use_cls, self.dtype,
                    name="vit")(x)
        x = Dense(self.width, ("embed", "mlp"), use_bias=True, kernel_init=trunc_normal, dtype=self.dtype,
                  name="head_fc1")(x)
        head_input = jnp.tanh(x)
        x = Dense(p * p * self.out_channels, ("mlp", "patch"), use_bias=True, kernel_init=trunc_normal,
                  dtype=self.dtype, name="head_fc2")(head_input)
        h, w = self.grid
        images = einops.rearrange(x, "b (h w) (i j c) -> b (h i) (w j) c", h=h, w=w, i=p, j=p)
        return (images, head_input) if return_head_input else images


class SigmaVAE(nn.Module):
    """σ-VAE (docs/method.md §2): encode → μ [B,T,C]; z = μ + σ_b·ε (σ_b per example, `std` = C_σ); decode → image.

    `kind="kl"`: the KL-VAE control (docs/method.md §2.4), z = μ + σ ⊙ ε with the learned σ; `std` is then unused.
    `kind="fsq"`: the discrete tokenizer (docs/method.md §2.5), z = FSQ(μ) on the grid of `fsq_levels` (one level
    count per latent channel), no noise; `encode` and `cache_latents` return that grid vector.
    Use `model.apply(params, x, method=SigmaVAE.encode)` / `method=SigmaVAE.decode` for the two halves;
    `method=SigmaVAE.posterior` gives (μ, log σ²) of a KL-VAE, `method=SigmaVAE.cache_latents` the cache rows.
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
    kind: str = "sigma"
    fsq_levels: tuple[int, ...] = ()  # kind "fsq" only: L_i per latent channel, e.g. (8, 5, 5, 5) → 1000 codes

    def setup(self) -> None:
        if self.kind not in VAE_KINDS:
            raise ValueError(f"vae.kind={self.kind!r} must be one of {list(VAE_KINDS)}")
        if self.kind == "fsq" and (problem := fsq.levels_problem(self.fsq_levels, self.latent_dim)):
            raise ValueError(f"vae.kind='fsq': {problem}")
        self.grid = latent_grid(self.image_size, self.patch_size)
        self.encoder = ViTEncoder(self.patch_size, self.width, self.depth, self.num_heads, self.latent_dim,
                                  self.mlp_ratio, self.use_cls, self.dtype, self.kind)
        self.decoder = ViTDecoder(self.grid, self.patch_size, self.in_channels, self.width, self.depth,
                                  self.num_heads, self.mlp_ratio, self.use_cls, self.dtype)

    def _moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        chex.assert_shape(images, (None, self.image_size, self.image_size, self.in_channels))
        mu, logvar = self.encoder(images)
        chex.assert_shape(mu, (images.shape[0], self.grid[0] * self.grid[1], self.latent_dim))
        return mu, logvar

    def _quantize(self, mu: jax.Array) -> jax.Array:
        """FSQ grid vector of the encoder output, float32 [B,T,latent_dim] (docs/method.md §2.5)."""
        return fsq.quantize(mu, self.fsq_levels)

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B,H,W,C_in] in [-1,1] → μ [B,T,latent_dim] (the official `mode()`, σ-VAE and KL-VAE), or the
        quantized grid vector for FSQ: in every case what `decode` reconstructs the image from, without noise."""
        mu = self._moments(images)[0]
        return self._quantize(mu) if self.kind == "fsq" else mu

    def posterior(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """KL-VAE only: the posterior moments (μ, log σ²), each [B,T,latent_dim]."""
        if self.kind != "kl":
            raise ValueError(f"SigmaVAE.posterior: vae.kind={self.kind!r} has no learned variance (a σ-VAE draws its "
                             f"σ_b per example, FSQ has no noise)")
        return self._moments(images)

    def cache_latents(self, images: jax.Array) -> jax.Array:
        """What the latent cache stores per image: μ [B,T,C] (σ-VAE), sigma points [B,T,2C] (KL-VAE), or the FSQ
        grid vector [B,T,C] in float32 (exact codes: `fsq.codes_from_latents` recovers the indices)."""
        if self.kind == "fsq":
            return self.encode(images)
        mu, logvar = self._moments(images)
        return mu if logvar is None else sigma_points(mu, logvar)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B,T,latent_dim] → images [B,H,W,C_in], not clamped."""
        chex.assert_shape(z, (None, self.grid[0] * self.grid[1], self.latent_dim))
        images = self.decoder(z)
        chex.assert_shape(images, (z.shape[0], self.image_size, self.image_size, self.in_channels))
        return images

    def __call__(self, images: jax.Array, *, rng: jax.Array) -> dict[str, jax.Array]:
        """recon, mu, z (and logvar for the KL-VAE; for FSQ, mu is the encoder output before quantization, z its
        grid vector and `codes` int32 [B,T] its code indices), and `head_input`: the decoder's last-layer input."""
        mu, logvar = self._moments(images)
        if self.kind == "fsq":
            z = self._quantize(mu)  # no noise; straight-through gradient to the encoder (§2.5)
        elif logvar is None:
            z = sample_latent(rng, mu, self.std)
        else:
            eps = jax.random.normal(rng, mu.shape, jnp.float32)
            z = (mu.astype(jnp.float32) + jnp.exp(0.5 * logvar) * eps).astype(mu.dtype)
        recon, head_input = self.decoder(z, return_head_input=True)
        chex.assert_shape(recon, (images.shape[0], self.image_size, self.image_size, self.in_channels))
        out = {"recon": recon, "mu": mu, "z": z, "head_input": head_input}
        if logvar is not None:
            out["logvar"] = logvar
        if self.kind == "fsq":
            out["codes"] = fsq.codes_from_latents(jax.lax.stop_gradient(z), self.fsq_levels)
        return out
