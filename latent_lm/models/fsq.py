"""Finite Scalar Quantization (Mentzer et al., 2023): the discrete image tokenizer's codebook (docs/method.md §2.5).

Each of the d = len(levels) latent channels is bounded by a shifted tanh to L_i levels and rounded to the grid with
a straight-through gradient; the codebook is the implicit product grid of ∏ L_i points, and a code index is the
point's mixed-radix number (channel 0 the least significant digit, as in the paper). No parameters, no codebook
loss, no commitment term: the ViT encoder's last Linear is the projection to d channels and the decoder's first
Linear the projection back (`models/sigma_vae.py`, `kind="fsq"`).

Grid values, per channel with L levels and h = L // 2:
  L odd:  {−(L−1)/2, …, (L−1)/2} / h, e.g. L = 5 → {−1, −0.5, 0, 0.5, 1};
  L even: {−L/2, …, L/2 − 1} / h,     e.g. L = 8 → {−1, −0.75, …, 0.75}.
Zero is a grid value for every L, and every value is k/h with small integers k and h, exact in float32.

All functions take `levels` as a static tuple of ints and compute in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

BOUND_EPS = 1e-3  # the paper's ε: the tanh bound stays just inside ±(L−1)/2, so rounding never leaves the grid


def codebook_size(levels: Sequence[int]) -> int:
    """∏ L_i: the number of codes (grid points)."""
    return math.prod(int(n) for n in levels)


def levels_problem(levels: Sequence[int], latent_dim: int) -> str | None:
    """Why `levels` cannot quantize `latent_dim` channels, or None (the config check of `VAETask.from_config`)."""
    levels = tuple(levels)
    if len(levels) != latent_dim:
        return f"vae.latent_dim={latent_dim} must equal len(vae.fsq_levels)={len(levels)} (fsq_levels={levels})"
    # L = 2 has no shift that centres the bound (artanh(o/a) with o/a > 1); the paper's level sets all have L ≥ 5.
    if any(int(n) != n or n < 3 for n in levels):
        return f"vae.fsq_levels={levels} must be integers ≥ 3"
    if codebook_size(levels) >= 2 ** 31:
        return f"vae.fsq_levels={levels} give {codebook_size(levels)} codes, more than an int32 code index holds"
    return None


def _constants(levels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, h = L // 2, mixed-radix basis [1, L_0, L_0·L_1, …]) as NumPy arrays: constants of the traced program."""
    n = np.asarray(levels, np.int64)
    basis = np.concatenate([[1], np.cumprod(n[:-1])])
    return n, n // 2, basis


def bound(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """z [..., d] → tanh(z + s)·a − o in float32, a = (L−1)(1−ε)/2, o = ½ for even L (else 0), s = artanh(o/a).

    Rounding the result gives L integers: {−(L−1)/2 … (L−1)/2} for odd L, {−L/2 … L/2−1} for even L. The shift s
    makes bound(0) = 0 (up to float32 rounding), so an untrained encoder's near-zero outputs land on the code of the
    zero vector. (The paper's listing writes tan(o/a); artanh is what makes bound(0) = 0, and for L ≥ 3 the two differ
    by < 0.1 %.)
    """
    chex.assert_axis_dimension(z, -1, len(levels))
    n, _, _ = _constants(levels)
    half = (n - 1) * (1.0 - BOUND_EPS) / 2.0
    offset = np.where(n % 2 == 1, 0.0, 0.5)
    shift = np.arctanh(offset / half)
    return (jnp.tanh(z.astype(jnp.float32) + shift.astype(np.float32)) * half.astype(np.float32)
            - offset.astype(np.float32))


def round_ste(x: jax.Array) -> jax.Array:
    """round(x) in the forward pass, the identity's gradient in the backward pass (straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def quantize(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Encoder output z [..., d] → its grid point [..., d] in [−1, 1] (float32); the gradient is that of bound(z)/h
    (rounding passes it through unchanged), so the encoder trains on the decoder's loss alone (docs/method.md §2.5)."""
    _, half_width, _ = _constants(levels)
    return round_ste(bound(z, levels)) / half_width.astype(np.float32)


def codes_from_latents(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Grid points [..., d] → code indices int32 [...]: Σ_i digit_i·∏_{j<i} L_j with digit_i = z_i·h_i + h_i ∈ [0, L_i).

    Each digit is rounded and clipped, so any z in the box maps to its nearest grid point's code (e.g. latents that
    went through bfloat16, or a generator's continuous sample); on grid points it is the exact inverse of
    `latents_from_codes`.
    """
    chex.assert_axis_dimension(z, -1, len(levels))
    n, half_width, basis = _constants(levels)
    digits = jnp.round(z.astype(jnp.float32) * half_width.astype(np.float32) + half_width.astype(np.float32))
    digits = jnp.clip(digits, 0, (n - 1).astype(np.float32)).astype(jnp.int32)
    return jnp.sum(digits * basis.astype(np.int32), axis=-1)


def latents_from_codes(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Code indices int [...] in [0, ∏ L_i) → grid points float32 [..., d] (the inverse of `codes_from_latents`)."""
    n, half_width, basis = _constants(levels)
    digits = (codes.astype(jnp.int32)[..., None] // basis.astype(np.int32)) % n.astype(np.int32)
    return (digits.astype(jnp.float32) - half_width.astype(np.float32)) / half_width.astype(np.float32)


def codebook_usage(codes: jax.Array, levels: Sequence[int]) -> dict[str, jax.Array]:
    """Of a batch of codes (int, any shape): `codebook_usage`, the fraction of the ∏ L_i codes that occur at least
    once, and `codebook_perplexity`, exp of the entropy of the empirical code distribution (∏ L_i for uniform use,
    1 when every token has one code). Both are bounded by the number of tokens in the batch, so compare them between
    batches of one size (a 64 × 49-token batch can use at most 3136 codes)."""
    size = codebook_size(levels)
    counts = jnp.bincount(codes.reshape(-1).astype(jnp.int32), length=size).astype(jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"codebook_usage": jnp.mean((counts > 0).astype(jnp.float32)), "codebook_perplexity": jnp.exp(entropy)}
