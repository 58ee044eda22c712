"""LPIPS(VGG16) perceptual distance in Flax, the perceptual term of the σ-VAE loss (docs/method.md §2.3).

LPIPS v0.1 (Zhang et al. 2018, `lpips.LPIPS(net="vgg")`, as used by the LDM/VQGAN autoencoder losses):
  1. scale images in [-1, 1] by the fixed ImageNet shift/scale (`ScalingLayer`);
  2. torchvision VGG16 `features` up to relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the 5 taps);
  3. per tap: unit-normalise every spatial feature vector over channels, square the difference of the two images,
     weight the channels by the learned non-negative 1×1 "lin" layer, average over space;
  4. sum over the 5 taps → one distance per image pair.

Weights are user-supplied files (nothing is downloaded): the torchvision VGG16 `features.{i}.{weight,bias}` and the
LPIPS `lin{k}.model.1.weight`; the `lpips`/taming full-model names `net.slice{s}.{i}.*` are accepted for the VGG part.
`.pth` files are read with torch (if installed); `.npz` and `.safetensors` with the same key names need no torch.
Random weights (`init_lpips_params`) exist for tests only: they are not a perceptual metric.

The network is a frozen constant of the loss: its parameters never enter the train state or the optimizer.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_lm.errors import ConfigError, DataError, MissingInputError

Dtype = Any

# torchvision vgg16 `features`: the (index, out channels) of its 13 3×3 convs; "M" = 2×2 max-pool (stride 2).
VGG16_LAYOUT: tuple[tuple[int, int] | str, ...] = (
    (0, 64), (2, 64), "M", (5, 128), (7, 128), "M", (10, 256), (12, 256), (14, 256), "M",
    (17, 512), (19, 512), (21, 512), "M", (24, 512), (26, 512), (28, 512))
# The LPIPS taps: outputs of the ReLUs after these convs (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
LPIPS_TAPS = (2, 7, 14, 21, 28)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# lpips.pretrained_networks.ScalingLayer: x' = (x − shift) / scale for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor

WEIGHTS_HELP = (
    "LPIPS(VGG16) needs (1) the torchvision VGG16 ImageNet weights, e.g. vgg16-397923af.pth from "
    "https://download.pytorch.org/models/ (torchvision.models.vgg16(weights='IMAGENET1K_V1')), and (2) the LPIPS "
    "v0.1 linear layers, lpips/weights/v0.1/vgg.pth of https://github.com/richzhang/PerceptualSimilarity (also in "
    "the `lpips` pip package). Set vae.perceptual_weights to both paths, comma-separated (.pth needs torch; "
    ".npz/.safetensors files with the same key names do not)")


def _conv_indices() -> list[int]:
    return [layer[0] for layer in VGG16_LAYOUT if layer != "M"]


class VGG16Features(nn.Module):
    """torchvision VGG16 `features` (3×3 convs, ReLU, 2×2 max-pools) → the 5 LPIPS tap activations, NHWC.

    Conv `features.{i}` of torchvision is the Flax module `features_{i}` (kernel [3, 3, in, out]).
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        taps = []
        # torchvision VGG._initialize_weights: Kaiming-normal (fan_out, ReLU), zero bias.
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        for layer in VGG16_LAYOUT:
            if layer == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # floors odd sizes, as torch
                continue
            index, channels = layer
            x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init, dtype=self.dtype,
                        name=f"features_{index}")(x)
            x = jax.nn.relu(x)
            if index in LPIPS_TAPS:
                taps.append(x)
        return taps


def _unit_normalize(f: jax.Array) -> jax.Array:
    """f / (‖f‖₂ over channels + 1e-10), as lpips.normalize_tensor, with a finite gradient where ‖f‖ = 0.

    The double `where` keeps the forward values of the reference while avoiding √0's infinite derivative (a ReLU
    feature vector that is exactly zero would otherwise turn the whole gradient into NaN).
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + NORM_EPS)


def _lin_init(key, shape, dtype=jnp.float32):
    # Random but non-negative, like the trained (clamped) LPIPS weights, so that random-init distances are ≥ 0.
    return jnp.abs(jax.random.normal(key, shape, dtype)) / shape[0]


class LPIPS(nn.Module):
    """LPIPS(VGG16) distance d(x0, x1) ≥ 0 per image pair; images NHWC in [-1, 1], 1 or 3 channels.

    Grey images are repeated to 3 channels. Features run in `dtype`; normalisation and distances in fp32.
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        chex.assert_equal_shape((x0, x1))
        chex.assert_rank(x0, 4)
        if x0.shape[-1] not in (1, 3):
            raise ValueError(f"LPIPS needs 1- or 3-channel images, got {x0.shape[-1]} channels")
        x = jnp.concatenate([x0, x1]).astype(jnp.float32)  # one VGG pass over both batches
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        x = (x - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
        taps = VGG16Features(self.dtype, name="vgg")(x.astype(self.dtype))
        batch = x0.shape[0]
        total = jnp.zeros((batch,), jnp.float32)
        for k, (f, channels) in enumerate(zip(taps, LPIPS_CHANNELS)):
            w = self.param(f"lin{k}", _lin_init, (channels,), jnp.float32)
            f = _unit_normalize(f.astype(jnp.float32))
            diff = jnp.square(f[:batch] - f[batch:])
            total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", diff, w), axis=(1, 2))
        return total


def lpips_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat "vgg/features_{i}/kernel"-style names → shapes of the LPIPS parameters (NHWC, Flax layout)."""
    shapes, in_ch = {}, 3
    for layer in VGG16_LAYOUT:
        if layer == "M":
            continue
        index, ch = layer
        shapes[f"vgg/features_{index}/kernel"] = (3, 3, in_ch, ch)
        shapes[f"vgg/features_{index}/bias"] = (ch,)
        in_ch = ch
    for k, ch in enumerate(LPIPS_CHANNELS):
        shapes[f"lin{k}"] = (ch,)
    return shapes


def init_lpips_params(seed: int = 0) -> dict:
    """Random LPIPS parameters {"params": …} (numpy fp32), with the modules' initialisers' distributions (VGG:
    Kaiming-normal fan-out, zero bias; lin: |N(0, 1)|/C). Drawn in numpy: no 15 M-parameter init program to
    compile. For tests only: random features are no perceptual metric."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in lpips_param_shapes().items():
        if name.endswith("/kernel"):
            flat[name] = rng.normal(0.0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape)
        elif name.endswith("/bias"):
            flat[name] = np.zeros(shape)
        else:
            flat[name] = np.abs(rng.normal(size=shape)) / shape[0]
    return _unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    params: dict = {}
    for name, value in flat.items():
        node = params
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(value, np.float32)
    return {"params": params}


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise MissingInputError(f"perceptual weights file {path!r} not found. {WEIGHTS_HELP}")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    if path.endswith((".pth", ".pt", ".ckpt")):
        try:
            import torch
        except ImportError as e:
            raise ConfigError(f"reading {path!r} needs PyTorch (pip install -e .[torch]); or convert it to .npz "
                              f"with the same key names") from e
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, Mapping) else state
        return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
    raise ConfigError(f"perceptual weights {path!r}: unknown format (use .pth, .npz or .safetensors)")


def _torch_name(key: str) -> str | None:
    """Maps the accepted PyTorch names to torchvision `features.{i}.*` / LPIPS `lin{k}.model.1.weight`."""
    parts = key.split(".")
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):  # lpips / taming full model
        return f"features.{parts[2]}.{parts[3]}"
    if parts[0] == "features" or (parts[0].startswith("lin") and parts[1:] == ["model", "1", "weight"]):
        return key
    return None


def load_lpips_params(paths: str | Sequence[str]) -> dict:
    """LPIPS parameters {"params": …} (numpy fp32) from PyTorch-named weight files (see the module docstring).

    `paths`: one path, a comma-separated string of paths, or a sequence; keys of all files are merged. One clear
    error names a missing file (`MissingInputError`), a missing key or a wrong shape (`DataError`).
    """
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    if not paths:
        raise ConfigError(f"no perceptual weight files given. {WEIGHTS_HELP}")
    torch_sd: dict[str, np.ndarray] = {}
    for path in paths:
        for key, value in _read_state_dict(path).items():
            name = _torch_name(key)
            if name is not None:
                torch_sd[name] = np.asarray(value, np.float32)
    shapes = lpips_param_shapes()
    flat = {}
    for index in _conv_indices():
        for torch_suffix, jax_suffix in (("weight", "kernel"), ("bias", "bias")):
            key = f"features.{index}.{torch_suffix}"
            if key not in torch_sd:
                raise DataError(f"perceptual weights {list(paths)} have no {key!r} (torchvision VGG16 features). "
                                f"{WEIGHTS_HELP}")
            value = torch_sd[key]
            flat[f"vgg/features_{index}/{jax_suffix}"] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    for k in range(len(LPIPS_CHANNELS)):
        key = f"lin{k}.model.1.weight"
        if key not in torch_sd:
            raise DataError(f"perceptual weights {list(paths)} have no {key!r} (LPIPS v0.1 linear layers). "
                            f"{WEIGHTS_HELP}")
        flat[f"lin{k}"] = torch_sd[key].reshape(-1)
    for name, shape in shapes.items():
        if flat[name].shape != shape:
            raise DataError(f"perceptual weights {list(paths)}: {name} has shape {flat[name].shape}, LPIPS(VGG16) "
                            f"needs {shape}")
    return _unflatten(flat)


def lpips_torch_state_dict(params: dict) -> dict[str, np.ndarray]:
    """The inverse of `load_lpips_params`: torchvision/LPIPS key names → numpy arrays (e.g. to write an .npz)."""
    p = params["params"]
    sd = {}
    for index in _conv_indices():
        conv = p["vgg"][f"features_{index}"]
        sd[f"features.{index}.weight"] = np.ascontiguousarray(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1))
        sd[f"features.{index}.bias"] = np.asarray(conv["bias"])
    for k, ch in enumerate(LPIPS_CHANNELS):
        sd[f"lin{k}.model.1.weight"] = np.asarray(p[f"lin{k}"]).reshape(1, ch, 1, 1)
    return sd
