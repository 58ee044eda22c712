"""JAX ↔ PyTorch parameter tables: which official PyTorch key holds which JAX parameter, in which layout.

One table per architecture (`TABLES`): a function of the model dimensions returning `Rule`s. A rule ties one or
more PyTorch keys to one or more JAX parameters (paths under `params`, "/"-joined) with a pair of exact layout
transforms (transposes, reshapes, concatenations, slices: no arithmetic, so JAX → PyTorch → JAX is bit-exact).
`layer=i` marks parameters of the scanned backbone, which carry a leading [depth] axis in JAX: the rule then
reads/writes slice i, so an exporter can gather one layer at a time. A rule may have no JAX side: the DiT's fixed
`pos_embed` is written from the formula and, on import, checked against it.

Layouts (PyTorch Linear weights are [out, in]; JAX Dense kernels [in…, out…]):
  Linear          kernel [in, out]                  ↔ weight [out, in]
  fused qkv       q [D, H, hd], k/v [D, Hkv, hd]    ↔ weight [(H + 2·Hkv)·hd, D], rows q heads | k heads | v heads
  attn proj       kernel [H, hd, D]                 ↔ weight [D, H·hd]
  1×1 PatchEmbed  kernel [C, D] + bias              ↔ proj.weight [D, C, 1, 1] + proj.bias
  token table     [K+1+V, D] (classes, null, text) ↔ y_embedder.embedding_table.weight [K+1, D] ‖ text_embedder.weight
  σ-VAE patches   pixels flattened (i, j, c)        ↔ conv weight [D, C, p, p] / pixel head rows (c, i, j)
  DiT pos_embed   (a constant, not a parameter)     ↔ pos_embed [1, N, D], the fixed 2-D sin-cos table
  audio conv      kernel [k, C_in, C_out]           ↔ Conv1d weight [C_out, C_in, k]
  audio down(s)   kernel [2, (i c), F]              ↔ Conv1d(kernel 2s, stride s) weight[f, c, j·s + i] = kernel[j, …]
  audio up(s)     kernel [2, C, (i f)], bias [F]    ↔ ConvTranspose1d(kernel 2s, stride s) weight[c, f, i] = kernel[1],
                                                      weight[c, f, s + i] = kernel[0]; the same bias
The one exception to "no arithmetic": an audio σ-VAE trained with weight norm exports its effective kernels g·v/‖v‖
(the PyTorch twin has no weight norm); its import gives v = the kernel, g = ‖kernel‖, the same function.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from latent_lm.models.dit import sincos_pos_embed_2d

Array = np.ndarray
POS_EMBED_ATOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_keys: tuple[str, ...]
    jax_paths: tuple[str, ...]
    to_torch: Callable[..., tuple[Array, ...]]    # JAX arrays (slice `layer` if set) → PyTorch arrays
    from_torch: Callable[..., tuple[Array, ...]]  # PyTorch arrays → JAX arrays (slice `layer` if set)
    layer: int | None = None


# ---- layout transforms (pure numpy, exact) ----

def _t(x: Array) -> Array:
    return np.ascontiguousarray(x.T)


def linear(torch_key: str, jax_path: str, layer: int | None = None) -> Rule:
    return Rule((torch_key,), (jax_path,), lambda k: (_t(k),), lambda w: (_t(w),), layer)


def same(torch_key: str, jax_path: str, layer: int | None = None, torch_shape: Sequence[int] | None = None,
         jax_shape: Sequence[int] | None = None) -> Rule:
    """Identical values, optionally reshaped (e.g. a [W] CLS token ↔ (1, 1, W))."""
    to_t = (lambda x: (np.ascontiguousarray(x.reshape(torch_shape)),)) if torch_shape else (lambda x: (x,))
    from_t = (lambda x: (np.ascontiguousarray(x.reshape(jax_shape)),)) if jax_shape else (lambda x: (x,))
    return Rule((torch_key,), (jax_path,), to_t, from_t, layer)


def conv1x1(torch_prefix: str, jax_prefix: str) -> list[Rule]:
    return [Rule((f"{torch_prefix}.weight",), (f"{jax_prefix}/kernel",),
                 lambda k: (np.ascontiguousarray(k.T[:, :, None, None]),),
                 lambda w: (np.ascontiguousarray(w[:, :, 0, 0].T),)),
            same(f"{torch_prefix}.bias", f"{jax_prefix}/bias")]


def fused_qkv(torch_key: str, jax_prefix: str, num_heads: int, kv_heads: int, head_dim: int,
              layer: int | None) -> Rule:
    def to_torch(q, k, v):
        d = q.shape[0]
        return (_t(np.concatenate([q.reshape(d, -1), k.reshape(d, -1), v.reshape(d, -1)], axis=1)),)

    def from_torch(w):
        wt = w.T
        d, nq = wt.shape[0], num_heads * head_dim
        q, k, v = np.split(wt, [nq, nq + kv_heads * head_dim], axis=1)
        return tuple(np.ascontiguousarray(a.reshape(d, n, head_dim))
                     for a, n in ((q, num_heads), (k, kv_heads), (v, kv_heads)))

    paths = tuple(f"{jax_prefix}/{n}/kernel" for n in ("query", "key", "value"))
    return Rule((torch_key,), paths, to_torch, from_torch, layer)


def heads_out(torch_key: str, jax_path: str, num_heads: int, head_dim: int, layer: int | None = None) -> Rule:
    """Kernel [H, hd, D] ↔ weight [D, H·hd] (the attention output projection)."""
    return Rule((torch_key,), (jax_path,), lambda k: (_t(k.reshape(num_heads * head_dim, -1)),),
                lambda w: (np.ascontiguousarray(w.T.reshape(num_heads, head_dim, -1)),), layer)


# ---- LatentLM (official `Transformer`) ----

def latent_lm_table(cfg) -> list[Rule]:
    """`cfg` has the `LatentLMConfig` fields (width, depth, num_heads, kv_heads, head_depth, num_classes, …)."""
    hd = cfg.width // cfg.num_heads
    rules = conv1x1("x_embedder.proj", "x_embedder") + conv1x1("noisy_x_embedder.proj", "head/noisy_x_embedder")
    rules += [linear("t_embedder.mlp.0.weight", "head/t_embedder/mlp_0/kernel"),
              linear("t_embedder.mlp.2.weight", "head/t_embedder/mlp_2/kernel")]
    rules.append(_token_table(cfg.num_classes, cfg.text_vocab_size))
    blocks = "backbone/blocks"
    for i in range(cfg.depth):
        rules += [fused_qkv(f"blocks.{i}.attn.qkv.weight", f"{blocks}/attn", cfg.num_heads, cfg.kv_heads, hd, i),
                  heads_out(f"blocks.{i}.attn.proj.weight", f"{blocks}/attn/proj/kernel", cfg.num_heads, hd, i)]
        rules += [linear(f"blocks.{i}.mlp.{n}.weight", f"{blocks}/mlp/{n}/kernel", i) for n in ("fc1", "gate", "fc2")]
    for i in range(cfg.head_depth):
        rules += [linear(f"diffusion_blocks.{i}.mlp.{n}.weight", f"head/blocks_{i}/mlp/{n}/kernel")
                  for n in ("fc1", "gate", "fc2")]
        rules.append(linear(f"diffusion_blocks.{i}.adaLN_modulation.1.weight",
                            f"head/blocks_{i}/adaLN_modulation/kernel"))
    rules += [linear("condition_layer.linear.weight", "condition_layer/linear/kernel"),
              linear("final_layer.linear.weight", "head/final_layer/linear/kernel"),
              linear("final_layer.adaLN_modulation.1.weight", "head/final_layer/adaLN_modulation/kernel")]
    if cfg.text_vocab_size:
        rules.append(linear("lm_head.weight", "lm_head/kernel"))
    return rules


def _token_table(num_classes: int, text_vocab: int) -> Rule:
    """JAX keeps one table [classes, null, text]; PyTorch splits it into the official class table and the text one."""
    keys = (("y_embedder.embedding_table.weight",) if num_classes else ()) + (
        ("text_embedder.weight",) if text_vocab else ())
    split = num_classes + 1 if num_classes else 0

    def to_torch(e):
        parts = ([e[:split]] if num_classes else []) + ([e[split:]] if text_vocab else [])
        return tuple(np.ascontiguousarray(p) for p in parts)

    return Rule(keys, ("token_embed/embedding",), to_torch, lambda *parts: (np.concatenate(parts, axis=0),))


# ---- σ-VAE (official `SigmaVAE`, ViT encoder/decoder) ----

def sigma_vae_table(cfg) -> list[Rule]:
    """`cfg` has depth, width, num_heads, patch_size, in_channels, latent_dim (the `SigmaVAE` fields)."""
    w, h, p, c = cfg.width, cfg.num_heads, cfg.patch_size, cfg.in_channels
    hd = w // h

    def patch_to_torch(k):  # [(i j c), D] → [D, c, i, j]
        return (np.ascontiguousarray(k.reshape(p, p, c, -1).transpose(3, 2, 0, 1)),)

    def patch_from_torch(wt):
        return (np.ascontiguousarray(wt.transpose(2, 3, 1, 0).reshape(p * p * c, -1)),)

    def pixels_to_torch(k, b):  # kernel [W, (i j c)], bias [(i j c)] → rows (c i j)
        return (np.ascontiguousarray(k.reshape(-1, p, p, c).transpose(3, 1, 2, 0).reshape(c * p * p, -1)),
                np.ascontiguousarray(b.reshape(p, p, c).transpose(2, 0, 1).reshape(-1)))

    def pixels_from_torch(wt, b):
        return (np.ascontiguousarray(wt.reshape(c, p, p, -1).transpose(3, 1, 2, 0).reshape(-1, p * p * c)),
                np.ascontiguousarray(b.reshape(c, p, p).transpose(1, 2, 0).reshape(-1)))

    rules = [Rule(("encoder.patch_embed.proj.weight",), ("encoder/patch_embed/kernel",), patch_to_torch,
                  patch_from_torch),
             same("encoder.patch_embed.proj.bias", "encoder/patch_embed/bias")]
    rules += _vit_body("encoder", "encoder/vit", cfg.depth, w, h, hd)
    rules += [linear("encoder_post_processor.dense.weight", "encoder/head/kernel"),
              same("encoder_post_processor.dense.bias", "encoder/head/bias")]
    rules += conv1x1("decoder.patch_embed.proj", "decoder/patch_embed")
    rules += _vit_body("decoder", "decoder/vit", cfg.depth, w, h, hd)
    rules += [linear("decoder_post_processor.fc1.weight", "decoder/head_fc1/kernel"),
              same("decoder_post_processor.fc1.bias", "decoder/head_fc1/bias"),
              Rule(("decoder_post_processor.fc2.weight", "decoder_post_processor.fc2.bias"),
                   ("decoder/head_fc2/kernel", "decoder/head_fc2/bias"), pixels_to_torch, pixels_from_torch)]
    return rules


def _vit_body(tp: str, jp: str, depth: int, w: int, h: int, hd: int) -> list[Rule]:
    rules = [same(f"{tp}.cls_token", f"{jp}/cls_token", torch_shape=(1, 1, w), jax_shape=(w,)),
             same(f"{tp}.pos_embed", f"{jp}/pos_embed", torch_shape=(1, -1, w), jax_shape=(-1, w))]
    for i in range(depth):
        t, j = f"{tp}.blocks.{i}", f"{jp}/blocks_{i}"
        rules += [same(f"{t}.norm1.weight", f"{j}/norm1/scale"), same(f"{t}.norm1.bias", f"{j}/norm1/bias"),
                  same(f"{t}.attn.q_bias", f"{j}/q_bias", torch_shape=(w,), jax_shape=(h, hd)),
                  same(f"{t}.attn.v_bias", f"{j}/v_bias", torch_shape=(w,), jax_shape=(h, hd)),
                  Rule((f"{t}.attn.qkv.weight",), (f"{j}/qkv/kernel",), lambda k: (_t(k.reshape(w, 3 * w)),),
                       lambda wt: (np.ascontiguousarray(wt.T.reshape(w, 3, h, hd)),)),
                  heads_out(f"{t}.attn.proj.weight", f"{j}/proj/kernel", h, hd),
                  same(f"{t}.attn.proj.bias", f"{j}/proj/bias"),
                  same(f"{t}.norm2.weight", f"{j}/norm2/scale"), same(f"{t}.norm2.bias", f"{j}/norm2/bias"),
                  linear(f"{t}.mlp.fc1.weight", f"{j}/fc1/kernel"), same(f"{t}.mlp.fc1.bias", f"{j}/fc1/bias"),
                  linear(f"{t}.mlp.fc2.weight", f"{j}/fc2/kernel"), same(f"{t}.mlp.fc2.bias", f"{j}/fc2/bias")]
    rules += [same(f"{tp}.fc_norm.weight", f"{jp}/fc_norm/scale"), same(f"{tp}.fc_norm.bias", f"{jp}/fc_norm/bias")]
    return rules


# ---- the DiT twin (official `DiT`) ----

def dit_table(cfg) -> list[Rule]:
    """`cfg` has the `DiTConfig` fields (width, depth, num_heads, kv_heads, grid_size, …)."""
    hd = cfg.width // cfg.num_heads
    rules = [_fixed_pos_embed(cfg.width, cfg.grid_size)]
    rules += conv1x1("x_embedder.proj", "x_embedder")
    rules += [linear("t_embedder.mlp.0.weight", "t_embedder/mlp_0/kernel"),
              linear("t_embedder.mlp.2.weight", "t_embedder/mlp_2/kernel"),
              same("y_embedder.embedding_table.weight", "y_embedder/embedding")]
    for i in range(cfg.depth):
        rules += [fused_qkv(f"blocks.{i}.attn.qkv.weight", "blocks/attn", cfg.num_heads, cfg.kv_heads, hd, i),
                  heads_out(f"blocks.{i}.attn.proj.weight", "blocks/attn/proj/kernel", cfg.num_heads, hd, i)]
        rules += [linear(f"blocks.{i}.mlp.{n}.weight", f"blocks/mlp/{n}/kernel", i) for n in ("fc1", "gate", "fc2")]
        rules.append(linear(f"blocks.{i}.adaLN_modulation.1.weight", "blocks/adaLN_modulation/kernel", i))
    rules += [linear("final_layer.linear.weight", "final_layer/linear/kernel"),
              linear("final_layer.adaLN_modulation.1.weight", "final_layer/adaLN_modulation/kernel")]
    return rules


def _fixed_pos_embed(width: int, grid_size: int) -> Rule:
    table = sincos_pos_embed_2d(width, grid_size).astype(np.float32)[None]

    def from_torch(w):
        diff = float(np.abs(np.asarray(w, np.float32) - table).max()) if w.shape == table.shape else np.inf
        if diff > POS_EMBED_ATOL:
            raise ValueError(f"pos_embed differs from the fixed 2-D sin-cos table of width {width} on a "
                             f"{grid_size}×{grid_size} grid (max |diff| {diff:.3g}); the JAX DiT cannot hold "
                             f"another position table")
        return ()

    return Rule(("pos_embed",), (), lambda: (table.copy(),), from_torch)


# ---- the audio σ-VAE (`torch_audio_vae.AudioVAE`) ----

def audio_vae_table(cfg) -> list[Rule]:
    """`cfg` has strides, res_dilations, weight_norm (the JAX `AudioVAE` fields); docs/method.md §12.1."""
    wn = cfg.weight_norm

    def res_blocks(tp: str, jp: str) -> list[Rule]:
        return [r for j in range(len(cfg.res_dilations)) for n in ("conv1", "conv2")
                for r in _audio_conv(f"{tp}.res.{j}.{n}", f"{jp}_res{j}/{n}", wn)]

    rules = _audio_conv("encoder.conv_in", "encoder/conv_in", wn)
    for i, s in enumerate(cfg.strides):
        rules += res_blocks(f"encoder.stages.{i}", f"encoder/stage{i}")
        rules += _audio_conv(f"encoder.stages.{i}.down", f"encoder/stage{i}_down/conv", wn, *_down_layout(s))
    rules += _audio_conv("encoder.conv_out", "encoder/conv_out", wn)
    rules += _audio_conv("decoder.conv_in", "decoder/conv_in", wn)
    for n, s in enumerate(reversed(cfg.strides)):
        rules += _audio_conv(f"decoder.stages.{n}.up", f"decoder/stage{n}_up/conv", wn, *_up_layout(s), bias=False)
        rules.append(same(f"decoder.stages.{n}.up.bias", f"decoder/stage{n}_up/bias"))
        rules += res_blocks(f"decoder.stages.{n}", f"decoder/stage{n}")
    rules += _audio_conv("decoder.conv_out", "decoder/conv_out", wn)
    return rules


def _conv_layout() -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """Stride-1 conv: kernel [k, C_in, C_out] ↔ weight [C_out, C_in, k]."""
    return (lambda k: k.transpose(2, 1, 0)), (lambda w: w.transpose(2, 1, 0))


def _down_layout(s: int) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """Reshape + kernel-2 conv over frames of s samples ↔ Conv1d(kernel 2s, stride s): tap j·s + i ↔ [j, i·C + c]."""
    def to_t(k):
        _, sc, f = k.shape
        return k.reshape(2, s, sc // s, f).transpose(3, 2, 0, 1).reshape(f, sc // s, 2 * s)

    def from_t(w):
        f, c, _ = w.shape
        return w.reshape(f, c, 2, s).transpose(2, 3, 1, 0).reshape(2, s * c, f)

    return to_t, from_t


def _up_layout(s: int) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    """Kernel-2 conv to s·F channels + reshape ↔ ConvTranspose1d(kernel 2s, stride s), last s outputs trimmed: taps
    i < s read the current frame (JAX tap 1), taps s + i the previous one (JAX tap 0)."""
    def to_t(k):
        _, c, sf = k.shape
        return k.reshape(2, c, s, sf // s)[::-1].transpose(1, 3, 0, 2).reshape(c, sf // s, 2 * s)

    def from_t(w):
        c, f, _ = w.shape
        return w.reshape(c, f, 2, s).transpose(2, 0, 3, 1)[::-1].reshape(2, c, s * f)

    return to_t, from_t


def _audio_conv(torch_prefix: str, jax_prefix: str, weight_norm: bool,
                to_t: Callable[[Array], Array] | None = None, from_t: Callable[[Array], Array] | None = None,
                bias: bool = True) -> list[Rule]:
    """One JAX `CausalConv1d` ↔ `{torch_prefix}.weight` (+ `.bias`); with weight norm, kernel and weight_g are folded
    (see the module docstring)."""
    if to_t is None:
        to_t, from_t = _conv_layout()
    paths = (f"{jax_prefix}/kernel",) + ((f"{jax_prefix}/weight_g",) if weight_norm else ())

    def to_torch(kernel, g=None):
        if g is not None:  # the JAX CausalConv1d's effective kernel, with its epsilon
            kernel = kernel * (g / (np.sqrt(np.sum(np.square(kernel), axis=(0, 1))) + 1e-12))
        return (np.ascontiguousarray(to_t(kernel)),)

    def from_torch(w):
        kernel = np.ascontiguousarray(from_t(w))
        return (kernel, np.sqrt(np.sum(np.square(kernel), axis=(0, 1)))) if weight_norm else (kernel,)

    rules = [Rule((f"{torch_prefix}.weight",), paths, to_torch, from_torch)]
    return rules + ([same(f"{torch_prefix}.bias", f"{jax_prefix}/bias")] if bias else [])


# Architecture name (the PyTorch class) → table.
TABLES: dict[str, Callable[..., list[Rule]]] = {"Transformer": latent_lm_table, "SigmaVAE": sigma_vae_table,
                                                "DiT": dit_table, "AudioVAE": audio_vae_table}


def jax_paths(table: Sequence[Rule]) -> set[str]:
    return {p for r in table for p in r.jax_paths}


def torch_keys(table: Sequence[Rule]) -> list[str]:
    return [k for r in table for k in r.torch_keys]
