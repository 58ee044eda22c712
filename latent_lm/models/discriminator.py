"""PatchGAN discriminator: the adversary of the σ-VAE's GAN term (docs/method.md §2.3).

The LDM/VQGAN `NLayerDiscriminator` (taming-transformers, after pix2pix): a 4×4 conv with stride 2 and LeakyReLU
0.2, then `num_layers − 1` blocks of 4×4 conv (stride 2, no bias) → norm → LeakyReLU with channels doubling up to
8×, one more such block with stride 1, and a 4×4 stride-1 conv to one logit per patch. Init as taming's
`weights_init`: convs N(0, 0.02), norm scale N(1, 0.02), biases 0.

Norm: taming uses BatchNorm2d, and the discriminator only ever runs in training mode (it is never evaluated), so only
the batch-statistics path matters. Here it is exactly that: a per-channel normalisation over (batch, height, width)
with a learned scale and bias (flax `LayerNorm` over those axes), with no running averages, hence no mutable state
in the train step. Under data parallelism the statistics are those of the global batch (SyncBatchNorm).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
LEAKY_SLOPE = 0.2
NORM_EPS = 1e-5  # torch BatchNorm2d default


def _scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class PatchDiscriminator(nn.Module):
    """images NHWC [B, H, W, C] in [-1, 1] → patch logits [B, h, w] (taming `NLayerDiscriminator`)."""

    channels: int = 64
    num_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        chex.assert_rank(images, 4)
        conv_init = nn.initializers.normal(0.02)

        def conv(features: int, stride: int, use_bias: bool, name: str):
            return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
                           kernel_init=conv_init, dtype=self.dtype, name=name)

        def norm(x: jax.Array, name: str) -> jax.Array:
            ln = nn.LayerNorm(epsilon=NORM_EPS, reduction_axes=(0, 1, 2), feature_axes=-1, dtype=jnp.float32,
                              scale_init=_scale_init, name=name)
            return ln(x.astype(jnp.float32)).astype(self.dtype)

        x = images.astype(self.dtype)
        x = nn.leaky_relu(conv(self.channels, 2, True, "conv0")(x), LEAKY_SLOPE)
        for n in range(1, self.num_layers + 1):
            stride = 2 if n < self.num_layers else 1
            x = conv(self.channels * min(2 ** n, 8), stride, False, f"conv{n}")(x)
            x = nn.leaky_relu(norm(x, f"norm{n}"), LEAKY_SLOPE)
        logits = conv(1, 1, True, f"conv{self.num_layers + 1}")(x)
        return logits[..., 0].astype(jnp.float32)
