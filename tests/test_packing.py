"""Packed rows: the attention mask keeps documents apart (and opens bidirectional spans), positions restart per
document, and a packed row computes exactly what each document computes alone."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.models.layers import attention_mask
from latent_lm.training.batches import segment_positions

CFG = LatentLMConfig(width=32, depth=2, num_heads=4, num_kv_heads=2, latent_dim=3, head_depth=1, num_classes=5,
                     max_len=16)


def _brute_mask(seg: np.ndarray, span: np.ndarray | None) -> np.ndarray:
    b, t = seg.shape
    out = np.zeros((b, 1, t, t), bool)
    for r in range(b):
        for i in range(t):
            for j in range(t):
                same = seg[r, i] == seg[r, j]
                bidi = span is not None and span[r, i] > 0 and span[r, i] == span[r, j]
                out[r, 0, i, j] = same and (j <= i or bidi)
    return out


@pytest.mark.parametrize("with_spans", [False, True])
def test_attention_mask_matches_its_definition(with_spans):
    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 4, (3, 12)), axis=1)
    span = None
    if with_spans:
        span = np.zeros_like(seg)
        span[0, 2:5], span[1, 6:11], span[2, 0:3], span[2, 8:10] = 1, 2, 1, 3
    got = np.asarray(attention_mask(jnp.asarray(seg), None if span is None else jnp.asarray(span)))
    np.testing.assert_array_equal(got, _brute_mask(seg, span))
    assert got[:, 0, np.arange(12), np.arange(12)].all()  # everyone sees itself: no all-masked softmax row


def test_segment_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def test_packed_row_equals_documents_alone():
    """Two documents (lengths 5 and 7) and 4 padding slots in one row of 16: the conditions and hidden states at each
    document's positions equal those of the document run alone."""
    model = LatentLM(CFG)
    rng = np.random.default_rng(1)
    lengths = (5, 7)
    docs = []
    for n in lengths:
        toks = rng.integers(0, CFG.num_classes, (1, n)).astype(np.int32)
        lat = rng.standard_normal((1, n, CFG.latent_dim)).astype(np.float32)
        is_lat = np.arange(n)[None] > 0
        docs.append((toks, lat, is_lat))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *map(jnp.asarray, docs[0])))
    pad = 16 - sum(lengths)
    packed = [np.concatenate([d[k] for d in docs] + [np.zeros((1, pad, *docs[0][k].shape[2:]), docs[0][k].dtype)], 1)
              for k in range(3)]
    seg = jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])[None]
                      .astype(np.int32))
    apply = jax.jit(model.apply)
    cond, hidden = apply(params, *map(jnp.asarray, packed), positions=segment_positions(seg), segment_ids=seg)
    start = 0
    for d, n in zip(docs, lengths):
        c_alone, h_alone = apply(params, *map(jnp.asarray, d))
        np.testing.assert_allclose(cond[:, start:start + n], c_alone, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(hidden[:, start:start + n], h_alone, atol=1e-5, rtol=1e-5)
        start += n
    # Without the segment ids the second document would see the first: the outputs differ.
    c_leak, _ = apply(params, *map(jnp.asarray, packed), positions=segment_positions(seg))
    assert not np.allclose(c_leak[:, lengths[0]:sum(lengths)], cond[:, lengths[0]:sum(lengths)], atol=1e-4)


def test_one_segment_is_the_plain_causal_pass():
    model = LatentLM(CFG)
    toks = jnp.zeros((2, 6), jnp.int32)
    lat = jax.random.normal(jax.random.PRNGKey(2), (2, 6, CFG.latent_dim))
    is_lat = jnp.arange(6)[None].repeat(2, 0) > 0
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), toks, lat, is_lat))
    apply = jax.jit(model.apply)
    plain = apply(params, toks, lat, is_lat)
    masked = apply(params, toks, lat, is_lat, segment_ids=jnp.ones((2, 6), jnp.int32))
    for a, b in zip(plain, masked):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
