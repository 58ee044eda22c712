"""PyTorch σ-VAE with ViT encoder and decoder, written from docs/method.md (§2).

Keys, layouts and shapes are those of the official `tokenizer_models/modeling_sigma_vae.SigmaVAE` built with
`encoder_arch='vit-base'` (`modeling_utils.VisionTransformer`, the official SigmaVAE_small): `encoder.*`, `encoder_post_processor.dense`, `decoder.*`,
`decoder_post_processor.fc1/fc2`.
The constructor takes the official (encoder_config, decoder_config, patch_size, latent_size, kl_weight, std);
the LayerNorm epsilon is 1e-6 (the official `get_model_default_params`), or `layer_norm_eps` in a config dict.
Images are (B, C, H, W) in [−1, 1]; latents are (B, latent_size, h, w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
SIGMA_DIVISOR = 0.8


class ViTAttention(nn.Module):
    """MHSA with a bias-free `qkv` plus separate q and v biases (no k bias), and a biased `proj`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2 (timm `Mlp`)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ViTAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Patch embedding, [CLS] + learned positions, pre-LN blocks, `fc_norm` over all tokens, CLS dropped."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, use_cls: bool = True, layer_norm_eps: float = LN_EPS,
                 **unused):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + int(use_cls), embed_dim))
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_norm_eps)
                                     for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor, return_patch_tokens: bool = True) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.fc_norm(x)
        return x[:, int(self.cls_token is not None):] if return_patch_tokens else x


class GaussianDistribution:
    """μ with a fixed σ: `sample()` draws one σ_b ~ N(0, (std/0.8)²) per example (docs/method.md §2.2)."""

    def __init__(self, mean: torch.Tensor, std: float):
        self.mean, self.std = mean, std

    def sample(self, sampling_std: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        if sampling_std is not None:
            return self.mean + sampling_std * eps
        sigma = torch.randn(self.mean.shape[0], generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype) * (self.std / SIGMA_DIVISOR)
        return self.mean + sigma.view(-1, *([1] * (self.mean.dim() - 1))) * eps

    def kl(self) -> torch.Tensor:
        return F.mse_loss(self.mean, torch.zeros_like(self.mean))

    def mode(self) -> torch.Tensor:
        return self.mean


class EncodeHeadBLC(nn.Module):
    def __init__(self, output_dim: int, latent_size: int, patches_shape: tuple[int, int], std: float):
        super().__init__()
        self.dense = nn.Linear(output_dim, latent_size)
        self.patches_shape, self.latent_size, self.std = patches_shape, latent_size, std

    def forward(self, x: torch.Tensor) -> GaussianDistribution:
        x = self.dense(x).reshape(x.shape[0], *self.patches_shape, self.latent_size).permute(0, 3, 1, 2)
        return GaussianDistribution(x, self.std)


class DecodeHeadBLC(nn.Module):
    """fc2(tanh(fc1 x)) viewed per patch in (c, i, j) order and unpatchified to (B, C, H, W)."""

    def __init__(self, decoder_output_dim: int, patch_size: int, output_channels: int, patches_shape: tuple[int, int]):
        super().__init__()
        self.fc1 = nn.Linear(decoder_output_dim, decoder_output_dim)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(decoder_output_dim, patch_size * patch_size * output_channels)
        self.patch_size, self.output_channels, self.patches_shape = patch_size, output_channels, patches_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act(self.fc1(x)))
        (h, w), p, c = self.patches_shape, self.patch_size, self.output_channels
        x = x.view(x.shape[0], h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(x.shape[0], c, h * p, w * p)


class SigmaVAE(nn.Module):
    """`encode(img) -> GaussianDistribution` (mean (B, L, h, w)); `decode(z) -> img`."""

    def __init__(self, encoder_config: dict, decoder_config: dict, patch_size: int, latent_size: int = 16,
                 kl_weight: float = 1e-2, std: float = 0.75):
        super().__init__()
        for name, cfg in (("encoder", encoder_config), ("decoder", decoder_config)):
            if not str(cfg.get("arch", "vit-base")).startswith("vit"):
                raise ValueError(f"{name}_config arch={cfg.get('arch')!r}: only the ViT σ-VAE is implemented here")
        img_size = encoder_config["img_size"]
        self.patches_shape = (img_size // patch_size, img_size // patch_size)
        self.img_size, self.latent_size, self.kl_weight = img_size, latent_size, kl_weight
        self.encoder = VisionTransformer(**encoder_config)
        self.encoder_post_processor = EncodeHeadBLC(encoder_config["embed_dim"], latent_size, self.patches_shape, std)
        self.decoder_pre_processor = nn.Identity()
        self.decoder = VisionTransformer(**decoder_config)
        self.decoder_post_processor = DecodeHeadBLC(decoder_config["embed_dim"], patch_size,
                                                    encoder_config["in_chans"], self.patches_shape)

    def encode(self, img: torch.Tensor) -> GaussianDistribution:
        return self.encoder_post_processor(self.encoder(img, return_patch_tokens=True))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_post_processor(self.decoder(self.decoder_pre_processor(z), return_patch_tokens=True))
