"""The FID Inception-v3 in Flax Linen, and its weights (issue 5, docs/method.md §10.2).

The network is pytorch-fid's `fid_inception_v3()`: torchvision's `Inception3(num_classes=1008, aux_logits=False)`
with the blocks the TF FID graph (`inception-2015-12-05`, the `classify_image_graph_def.pb` of the TTUR and ADM
evaluators) differs in patched:
  - `Mixed_5b/c/d` (InceptionA), `Mixed_6b..e` (InceptionC), `Mixed_7b` (InceptionE): the pool branch averages a
    3×3 window *without* the zero padding (`count_include_pad=False`), as TF's average pool does;
  - `Mixed_7c` (InceptionE): the pool branch is a 3×3 *max* pool (stride 1, padding 1) instead of an average pool;
  - `Mixed_6a` (InceptionB) and `Mixed_7a` (InceptionD) are torchvision's, unpatched.
Every conv is `BasicConv2d`: conv without bias, BatchNorm with eps 1e-3 (inference: running statistics), ReLU.
Input handling is pytorch-fid's `InceptionV3.forward`: images in [0, 1] are resized to 299×299 with
`F.interpolate(mode='bilinear', align_corners=False)` (no antialiasing), then scaled to [-1, 1]. Here the input is
uint8 NHWC (the samples' format) and is divided by 255 first, as pytorch-fid's `ToTensor` does.

Outputs: `pool` (pool_3, the 2048-d global average of Mixed_7c: FID's features), `logits` (the 1008-way fc, with bias)
and `logits_unbiased` (pool_3 @ fc.weightᵀ without the bias: the TF graph's `softmax/logits/MatMul`, which the
Inception Score of improved-gan and of the ADM evaluator feeds to the softmax; torch-fidelity calls it the same).

Weights are the pytorch-fid file `pt_inception-2015-12-05-6726825d.pth` (a torch state dict, 566 tensors: 94
BasicConv2d × {conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked} + fc.weight,
fc.bias), or the same tensors as .safetensors or .npz (keys = the state-dict keys), which need no torch:
    python -m latent_lm.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \
        --out inception_fid.safetensors
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_lm import cli, storage
from latent_lm.errors import DataError, MissingInputError, UserError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
# Where pytorch-fid (torch.hub) caches the file after its first download: used when no path is given.
DEFAULT_WEIGHTS = os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub", "checkpoints",
                               "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes + 8 unused
BN_EPS = 1e-3
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


class InceptionOutputs(NamedTuple):
    pool: jax.Array             # [B, 2048] pool_3 features (FID)
    logits: jax.Array           # [B, 1008] fc output
    logits_unbiased: jax.Array  # [B, 1008] pool_3 @ fc.weightᵀ (Inception Score)


class BasicConv2d(nn.Module):
    """torchvision `BasicConv2d`: conv (no bias) → BatchNorm(eps 1e-3, running statistics) → ReLU."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                    precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_no_pad_count(x: jax.Array) -> jax.Array:
    # TF's average pool divides by the number of real (unpadded) inputs: pytorch-fid's count_include_pad=False.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """pytorch-fid `FIDInceptionA` (Mixed_5b/c/d): 35×35 grid, 1×1 / 5×5 / double 3×3 / pool branches."""
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # torch's channel order: the next 1×1 convs rely on it


class InceptionB(nn.Module):
    """torchvision `InceptionB` (Mixed_6a): 35×35 → 17×17 reduction."""
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid `FIDInceptionC` (Mixed_6b..e): 17×17 grid with factorised 1×7 / 7×1 convolutions."""
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision `InceptionD` (Mixed_7a): 17×17 → 8×8 reduction."""
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid `FIDInceptionE_1` (pool="avg", Mixed_7b) / `FIDInceptionE_2` (pool="max", Mixed_7c)."""
    pool: str
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_no_pad_count(x)
        elif self.pool == "max":
            # The FID graph's last block max-pools here (likely a bug in that graph, kept for comparable FIDs);
            # flax pads a max pool with -inf, as torch does.
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [B,H,W,C∈{1,3}] → float32 [B,299,299,3] in [-1, 1], as pytorch-fid (ToTensor, bilinear resize, 2x−1)."""
    chex.assert_rank(images, 4)
    if images.shape[-1] not in (1, 3):
        raise DataError(f"images must have 1 or 3 channels (NHWC), got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:  # grayscale → RGB by repetition, as PIL's convert("RGB") in pytorch-fid's loader
        x = jnp.repeat(x, 3, axis=-1)
    # half-pixel centres without antialiasing = torch's F.interpolate(bilinear, align_corners=False); jax's default
    # would antialias when downsampling, which pytorch-fid does not.
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


class InceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 (`fid_inception_v3` + `InceptionV3.forward`), inference only.

    `precision`: "highest" (default) runs convolutions in full fp32, as the reference does; "default" lets TPUs and
    recent GPUs use bf16/TF32 passes, faster but no longer bit-comparable to pytorch-fid.
    """
    precision: str = "highest"

    @nn.compact
    def __call__(self, images: jax.Array) -> InceptionOutputs:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        p = PRECISIONS[self.precision]
        conv = functools.partial(BasicConv2d, precision=p)
        x = preprocess(images)
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)                 # 149×149
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)                           # 147×147
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)                                            # 73×73
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)                          # 71×71
        x = _max_pool_3x3_stride2(x)                                            # 35×35
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)                     # 256 channels
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)                     # 288
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)                     # 288
        x = InceptionB(precision=p, name="Mixed_6a")(x)                         # 768 × 17×17
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)                         # 1280 × 8×8
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)                  # 2048
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))                                         # adaptive avg pool → pool_3
        fc = nn.Dense(NUM_CLASSES, precision=p, name="fc")
        logits = fc(pool)
        logits_unbiased = jnp.dot(pool, fc.variables["params"]["kernel"], precision=p)
        chex.assert_shape(pool, (images.shape[0], NUM_FEATURES))
        chex.assert_shape(logits, (images.shape[0], NUM_CLASSES))
        return InceptionOutputs(pool, logits, logits_unbiased)


# ----------------------------------------------------------------------------------------------------------------
# Weights: torch state-dict keys ↔ the Flax variables.

_BN_VARIABLES = {("params", "scale"): "weight", ("params", "bias"): "bias",
                 ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Flax variable path (collection, *modules, leaf) → (torch key, whether the array is transposed)."""
    collection, *modules, leaf = path
    prefix = ".".join(modules)
    if modules[-1] == "conv" and (collection, leaf) == ("params", "kernel"):
        return f"{prefix}.weight", True                                         # [kh,kw,I,O] ↔ [O,I,kh,kw]
    if modules[-1] == "bn" and (collection, leaf) in _BN_VARIABLES:
        return f"{prefix}.{_BN_VARIABLES[collection, leaf]}", False
    if modules == ["fc"] and collection == "params" and leaf in ("kernel", "bias"):
        return ("fc.weight", True) if leaf == "kernel" else ("fc.bias", False)  # kernel [2048,1008] ↔ [1008,2048]
    raise AssertionError(f"no torch name for Flax variable {'/'.join(path)}")  # a module change without a mapping


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])


def _to_flax_array(torch_array: np.ndarray) -> np.ndarray:
    return torch_array.T if torch_array.ndim == 2 else torch_array.transpose(2, 3, 1, 0)


@functools.lru_cache(maxsize=1)
def torch_layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """torch key → (Flax variable path, torch shape, transposed) for every weight the network uses (472 tensors).

    Derived from the Flax module's variable tree (`jax.eval_shape`, no compute). The file also holds one
    `<bn>.num_batches_tracked` per BatchNorm (94), which inference does not use: see `BN_COUNTERS`.
    """
    shapes = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8))
    layout = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in key_path)
        name, transposed = _torch_name(path)
        layout[name] = (path, _to_torch_shape(leaf.shape) if transposed else tuple(leaf.shape), transposed)
    return layout


def bn_counters() -> set[str]:
    """The `num_batches_tracked` keys a torch ≥ 0.4.1 state dict of this network has (one per BatchNorm)."""
    return {k.rsplit(".", 1)[0] + ".num_batches_tracked" for k in torch_layout() if k.endswith(".bn.running_mean")}


def variables_from_state_dict(state_dict: dict[str, np.ndarray], source: str = "the weights") -> dict[str, Any]:
    """The pytorch-fid state dict (numpy arrays) → Flax variables {"params", "batch_stats"} (float32).

    Every key is accounted for: a weight of the network is transposed into place, a BatchNorm's
    `num_batches_tracked` (a training counter) may be present or not, anything else is one DataError naming the key,
    as is a missing weight or a shape mismatch.
    """
    layout, counters = torch_layout(), bn_counters()
    for key in state_dict:
        if key not in layout and key not in counters:
            raise DataError(f"{source}: unexpected key {key!r}: not a tensor of pytorch-fid's FID Inception-v3 "
                            f"(pt_inception-2015-12-05-6726825d.pth)")
    variables: dict[str, Any] = {}
    for key, (path, shape, transposed) in layout.items():
        if key not in state_dict:
            raise DataError(f"{source}: missing key {key!r} (shape {list(shape)}) of pytorch-fid's FID Inception-v3")
        array = np.asarray(state_dict[key])
        if tuple(array.shape) != shape:
            raise DataError(f"{source}: key {key!r} has shape {list(array.shape)}, the FID Inception-v3 expects "
                            f"{list(shape)}")
        array = array.astype(np.float32)
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(_to_flax_array(array) if transposed else array)
    return variables


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torch state dict from .pth/.pt (needs torch), .safetensors or .npz (numpy only), as numpy arrays.
    `path` may be a URL (gs://...): the file is then read into memory (about 100 MB)."""
    if not path or not storage.exists(path):
        raise MissingInputError(
            f"Inception weights {path!r} not found: download pytorch-fid's FID Inception-v3 weights from "
            f"{FID_WEIGHTS_URL} (sha256 starts with 6726825d) and pass the file; on a host without torch convert "
            f"it once with `python -m latent_lm.evaluation.inception --convert <that .pth> --out "
            f"inception_fid.safetensors`")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        from safetensors.numpy import load, load_file
        return load(storage.read_bytes(path)) if storage.is_url(path) else load_file(path)
    if ext == ".npz":
        with storage.open_file(path) as raw, np.load(raw, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if ext in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as e:
            raise UserError(f"reading {path} needs PyTorch (`pip install torch==2.13.0`); or convert it once on a "
                            f"host that has it: `python -m latent_lm.evaluation.inception --convert {path} --out "
                            f"inception_fid.safetensors`") from e
        with storage.open_file(path) as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise DataError(f"{path} holds a {type(obj).__name__}, not a state dict")
        # torch.from_numpy's inverse rejects bfloat16: widen floating tensors to float32 first.
        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}
    raise DataError(f"Inception weights {path}: unknown extension {ext!r}; use .pth/.pt, .safetensors or .npz")


def load_variables(path: str) -> dict[str, Any]:
    """Flax variables of the FID Inception-v3 from a weight file (see `read_state_dict`)."""
    return variables_from_state_dict(read_state_dict(path), source=path)


def convert(src: str, dst: str) -> int:
    """Rewrites a weight file as .safetensors or .npz (all keys kept, checked first); returns the tensor count."""
    state_dict = read_state_dict(src)
    variables_from_state_dict(state_dict, source=src)
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    ext = os.path.splitext(dst)[1].lower()
    if ext not in (".safetensors", ".npz"):
        raise DataError(f"--out {dst}: use a .safetensors or .npz file name")
    if ext == ".safetensors":
        from safetensors.numpy import save
        storage.write_bytes_atomic(dst, save(arrays))
    else:
        storage.write_npz_atomic(dst, **arrays)
    return len(arrays)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Convert pytorch-fid's FID Inception-v3 weights to a torch-free file.")
    p.add_argument("--convert", required=True, help="input weights (.pth/.pt needs torch; .safetensors/.npz)")
    p.add_argument("--out", required=True, help="output .safetensors or .npz")
    args = p.parse_args(argv)
    n = convert(args.convert, args.out)
    print(f"wrote {args.out} ({n} tensors)")


if __name__ == "__main__":
    cli.main(main)
