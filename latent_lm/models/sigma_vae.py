"""Image σ-VAE: ViT encoder → μ, fixed per-example σ, ViT decoder (spec §1; official_code_facts §4).

Images are NHWC in [-1, 1]; latents are token sequences [B, T, C] in raster order over the (H/p, W/p) grid
(the official code keeps them as (B, C, h, w); see latent_lm/convert for the permutation).

`kind="kl"` turns the model into the learned-variance KL-VAE control of spec §1.5 (paper Fig. 6 "stars"): the
encoder also predicts log σ² per latent value, z = μ + σ ⊙ ε, and the loss carries the true KL to N(0, I). The
extra head is `encoder/logvar_head` (LDM's `quant_conv` emits both moments from one 1×1 conv; two heads are the
same map). The PyTorch export covers the σ-VAE only.

Losses (spec §1.4): `vae_loss` (L1 + L2 + μ penalty or KL) here; LPIPS in `perceptual.py`; PatchGAN and hinge
losses in `discriminator.py`; the adaptive GAN weight helpers below; `training.tasks.VAETask` combines them.

Layout differences from the official PyTorch modules, all handled by the converter:
- Patch pixels are flattened in (i, j, c) order, both in the encoder's patch embedding (official: a Conv2d,
  i.e. (c, i, j)) and in the decoder's pixel head (official `DecodeHeadBLC`: (c, i, j)).
- The fused `qkv` kernel is [width, 3, heads, head_dim]; the official `qkv.weight` [3·width, width] is its
  transpose flattened in the same (3, heads, head_dim) order.
- The CLS token and positions are [width] and [1+T, width] (official: (1, 1, W) and (1, 1+T, W)).
"""

from __future__ import annotations

import dataclasses
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
VAE_KINDS = ("sigma", "kl")
LOGVAR_RANGE = (-30.0, 20.0)  # LDM DiagonalGaussianDistribution clamps log σ² to this range

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


def kl_divergence(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(μ, σ²) ‖ N(0, I)) per latent value, averaged: ½·mean(μ² + σ² − 1 − log σ²) (spec §1.5 KL-VAE).

    LDM sums it over latent values (and sums the reconstruction over pixels); with both terms mean-reduced here,
    LDM's weight w corresponds to w·(latent values)/(pixel values) (see `ldm_equivalent_kl_weight`).
    """
    mu, logvar = mu.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.mean(jnp.square(mu) + jnp.exp(logvar) - 1.0 - logvar)


def ldm_equivalent_kl_weight(num_latent_values: int, num_pixel_values: int, ldm_weight: float = 1e-6) -> float:
    """LDM KL-f16's `kl_weight` (1e-6 on the KL summed per image, next to the summed pixel loss) as a weight of
    `kl_divergence` next to our mean-reduced pixel loss: e.g. 2.5e-7 on MNIST 28×28 with 7×7×4 latents."""
    return ldm_weight * num_latent_values / num_pixel_values


def posterior_regularizer(out: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The σ-VAE's μ penalty mean(μ²), or the KL-VAE's KL when `out` carries "logvar" (spec §1.4, §1.5)."""
    if "logvar" in out:
        kl = kl_divergence(out["mu"], out["logvar"])
        return kl, {"kl": kl, "posterior_std": jnp.mean(jnp.exp(0.5 * out["logvar"].astype(jnp.float32)))}
    reg = mu_regularizer(out["mu"])
    return reg, {"mu_reg": reg}


def pixel_loss(batch_images: jax.Array, recon: jax.Array, l1_weight: float = 1.0,
               l2_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """l1_weight·L1(x, x̂) + l2_weight·MSE(x, x̂) in fp32, with PSNR (data in [-1, 1], range 2)."""
    err = recon.astype(jnp.float32) - batch_images.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(err))
    mse = jnp.mean(jnp.square(err))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))
    return l1_weight * l1 + l2_weight * mse, {"l1": l1, "mse": mse, "psnr": psnr}


def vae_loss(batch_images: jax.Array, out: dict[str, jax.Array], kl_weight: float = 0.01,
             l2_weight: float = 0.0, l1_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """l1_weight·L1(x, x̂) + l2_weight·MSE(x, x̂) + kl_weight·(mean(μ²) | KL), in fp32 (spec §1.4, §1.5).

    `out` is `SigmaVAE.__call__`'s dict; the KL replaces the μ penalty for the KL-VAE (`out` has "logvar").
    The perceptual and GAN terms are added by `training.tasks.VAETask`.
    """
    rec, metrics = pixel_loss(batch_images, out["recon"], l1_weight, l2_weight)
    reg, reg_metrics = posterior_regularizer(out)
    loss = rec + kl_weight * reg
    return loss, {"loss": loss, **metrics, **reg_metrics}


def decoder_last_layer_grad(head_input: jax.Array, image_grad: jax.Array, patch_size: int) -> jax.Array:
    """∂L/∂W of the decoder's last layer (`head_fc2` kernel [width, p²·C]) from ∂L/∂x̂ [B, H, W, C].

    x̂ = unpatchify(h·W + b), so ∂L/∂W = hᵀ·patchify(∂L/∂x̂) with h = `head_input` [B, T, width], the layer's
    input. This gives VQGAN's adaptive-weight gradients from image-space gradients alone: no backward pass
    through the decoder and encoder.
    """
    p = patch_size
    g = einops.rearrange(image_grad.astype(jnp.float32), "b (h i) (w j) c -> b (h w) (i j c)", i=p, j=p)
    return jnp.einsum("btw,btp->wp", head_input.astype(jnp.float32), g)


def adaptive_gan_weight(rec_grad: jax.Array, gan_grad: jax.Array, disc_weight: float,
                        max_weight: float = 1e4) -> jax.Array:
    """VQGAN `calculate_adaptive_weight`: clip(‖∇_W L_rec‖ / (‖∇_W L_GAN‖ + 1e-4), 0, 1e4)·disc_weight, with W
    the decoder's last layer; a constant of the loss (no gradient flows through it)."""
    ratio = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight) * disc_weight)


@dataclasses.dataclass(frozen=True)
class LatentPosterior:
    """How cached tokenizer outputs become the sampled latents z the generators train on (spec §1.1, §1.7, §1.5).

    kind "sigma": the cache holds μ [T, C]; z = μ + σ_b·ε with σ_b ~ N(0, (std/0.8)²) per example.
    kind "kl": the cache holds the posterior's two sigma points [T, 2C] = (μ + σ, μ − σ) (see `sigma_points`);
    z = μ + σ ⊙ ε with the learned σ, as MAR/LDM train on posterior samples.
    """

    kind: str = "sigma"
    std: float = 0.75

    def __post_init__(self):
        if self.kind not in VAE_KINDS:
            raise ValueError(f"vae.kind={self.kind!r} must be one of {list(VAE_KINDS)}")

    @classmethod
    def from_vae_config(cls, vae_config) -> "LatentPosterior":
        return cls(kind=vae_config.get("kind", "sigma"), std=float(vae_config.std))

    def cache_dim(self, latent_dim: int) -> int:
        """Channels per cached token: C for the σ-VAE, 2C for the KL-VAE."""
        return latent_dim * (2 if self.kind == "kl" else 1)

    def sample(self, rng: jax.Array, cached: jax.Array) -> jax.Array:
        """Cached rows [B, T, cache_dim] → sampled latents z [B, T, C] (fp32)."""
        cached = cached.astype(jnp.float32)
        if self.kind == "sigma":
            return sample_latent(rng, cached, self.std)
        mu, sigma = from_sigma_points(cached)
        return mu + sigma * jax.random.normal(rng, mu.shape, jnp.float32)

    def latent_variance(self, cache_std: float) -> float:
        """Var z from the std of all cached values (closed form; `encode` normalises with it).

        σ-VAE: Var z = Var μ + E σ_b², E σ_b² = (std/0.8)². KL-VAE: the cached sigma points μ ± σ have mean E μ and
        second moment E μ² + E σ² over all values, so their variance is already Var z = Var μ + E σ².
        """
        extra = (self.std / SIGMA_DIVISOR) ** 2 if self.kind == "sigma" else 0.0
        return cache_std ** 2 + extra


def sigma_points(mu: jax.Array, logvar: jax.Array) -> jax.Array:
    """A diagonal Gaussian posterior as its two sigma points concat(μ + σ, μ − σ) on the last axis [.., 2C].

    This is what the KL-VAE's latent cache stores, instead of (μ, log σ²): the same information, and the points'
    mean and second moment over all values are exactly E z and E z² of z = μ + σ·ε, so the cache's running moments
    give the closed-form latent normalisation without another pass. σ is recovered as half the difference, to
    about 1e-7·|μ| (fp32), far below any σ that matters for sampling.
    """
    sigma = jnp.exp(0.5 * logvar.astype(jnp.float32))
    mu = mu.astype(jnp.float32)
    return jnp.concatenate([mu + sigma, mu - sigma], axis=-1)


def from_sigma_points(points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `sigma_points`: [.., 2C] → (μ, σ), each [.., C]."""
    upper, lower = jnp.split(points.astype(jnp.float32), 2, axis=-1)
    return 0.5 * (upper + lower), 0.5 * jnp.abs(upper - lower)


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
    """Patchify → Linear(p²·C_in → width) → ViT → Linear(width → latent_dim) = μ [B,T,latent_dim] (spec §1.3).

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
    """Linear(latent_dim → width) → ViT → Linear → tanh → Linear(width → p²·C_out) → unpatchify (spec §1.3).

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
    """σ-VAE (spec §1): encode → μ [B,T,C]; z = μ + σ_b·ε (σ_b per example, `std` = C_σ); decode → image.

    `kind="kl"`: the KL-VAE control (spec §1.5), z = μ + σ ⊙ ε with the learned σ; `std` is then unused.
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

    def setup(self) -> None:
        if self.kind not in VAE_KINDS:
            raise ValueError(f"vae.kind={self.kind!r} must be one of {list(VAE_KINDS)}")
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

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B,H,W,C_in] in [-1,1] → μ [B,T,latent_dim] (the official `mode()`, for both kinds)."""
        return self._moments(images)[0]

    def posterior(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """KL-VAE only: the posterior moments (μ, log σ²), each [B,T,latent_dim]."""
        if self.kind != "kl":
            raise ValueError("SigmaVAE.posterior: a σ-VAE has no learned variance (its σ_b is drawn per example)")
        return self._moments(images)

    def cache_latents(self, images: jax.Array) -> jax.Array:
        """What the latent cache stores per image: μ [B,T,C] (σ-VAE) or sigma points [B,T,2C] (KL-VAE)."""
        mu, logvar = self._moments(images)
        return mu if logvar is None else sigma_points(mu, logvar)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B,T,latent_dim] → images [B,H,W,C_in], not clamped."""
        chex.assert_shape(z, (None, self.grid[0] * self.grid[1], self.latent_dim))
        images = self.decoder(z)
        chex.assert_shape(images, (z.shape[0], self.image_size, self.image_size, self.in_channels))
        return images

    def __call__(self, images: jax.Array, *, rng: jax.Array) -> dict[str, jax.Array]:
        """recon, mu, z (and logvar for the KL-VAE), and `head_input`: the decoder's last-layer input."""
        mu, logvar = self._moments(images)
        if logvar is None:
            z = sample_latent(rng, mu, self.std)
        else:
            eps = jax.random.normal(rng, mu.shape, jnp.float32)
            z = (mu.astype(jnp.float32) + jnp.exp(0.5 * logvar) * eps).astype(mu.dtype)
        recon, head_input = self.decoder(z, return_head_input=True)
        chex.assert_shape(recon, (images.shape[0], self.image_size, self.image_size, self.in_channels))
        out = {"recon": recon, "mu": mu, "z": z, "head_input": head_input}
        if logvar is not None:
            out["logvar"] = logvar
        return out
