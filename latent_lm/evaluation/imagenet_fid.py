"""ImageNet FID and Inception Score of generated samples (issue 5; docs/method.md §10.2).

    # FID-50k / IS of the sampler's npz against the ADM reference batch
    python -m latent_lm.evaluation.imagenet_fid --samples runs/in256/samples/final.npz \
        --ref VIRTUAL_imagenet256_labeled.npz --weights pt_inception-2015-12-05-6726825d.pth
    # a reference npz (mu, sigma) of real images: a folder (ADM center crop to --image_size) or an image npz
    python -m latent_lm.evaluation.imagenet_fid --make_ref /data/imagenet/val --out imagenet256_val_ref.npz \
        --weights inception_fid.safetensors

Features are pool_3 of pytorch-fid's FID Inception-v3 (`inception.py`, weights supplied by the user), run as one
jitted function over a fixed batch shape (the last batch is zero-padded, so there is one compile per image size)
with the batch split over all local devices (data parallel, `NamedSharding`). Sample npz files are read in batches
straight from the zip, so 50k 256² images (9.8 GB) never sit in memory at once. Every path may be a URL (gs://...,
`latent_lm.storage`).

Metrics:
  - FID: `frechet.frechet_distance` between the samples' pool_3 mean/covariance and the reference `mu`/`sigma`.
  - IS: exp(E_x KL(p(y|x) ‖ p(y))) with p(y|x) the softmax over all 1008 logits of pool_3 @ fc.weightᵀ, *without*
    the fc bias: that is what the TF graph's `softmax/logits/MatMul` gives and what improved-gan's Inception Score
    and the ADM evaluator (`_create_softmax_graph`) use (torch-fidelity: `logits_unbiased`). The samples are cut into
    `num_splits` (10) equal contiguous parts (remainder dropped, as improved-gan/torch-fidelity do; for 50k samples
    these are ADM's 5,000-sample splits); the score is the mean over parts, with their standard deviation.
Known difference from the ADM TF evaluator: the 299×299 resize is pytorch-fid's (bilinear, half-pixel centres),
not TF1's legacy ResizeBilinear, so FIDs against ADM's TF-computed reference statistics are pytorch-fid FIDs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import scipy.special
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from latent_lm import cli, storage
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.evaluation import inception
from latent_lm.evaluation.frechet import feature_stats, frechet_distance

DEFAULT_BATCH = 256  # a multiple of the usual local device counts; 2.0 GB of temporaries (XLA:CPU analysis)
IS_SPLITS = 10
IMAGE_KEYS = ("images", "arr_0")  # our sampler's npz; ADM's sample and reference batches
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------------------------
# Image sources: uint8 [N,H,W,C] in batches.

class NpzImages:
    """The uint8 [N,H,W,C] array under `images` (our sampler) or `arr_0` (ADM batches) of an .npz, read in batches
    from the zip member without loading the whole array."""

    def __init__(self, path: str):
        if not storage.exists(path):
            raise MissingInputError(f"image npz {path} not found")
        self.path = path
        try:
            with storage.open_file(path) as raw, zipfile.ZipFile(raw) as z:
                names = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} is not an .npz file") from e
        keys = [k for k in IMAGE_KEYS if k in names]
        if not keys:
            raise DataError(f"{path} has no image array: expected one of {list(IMAGE_KEYS)}, found {names}")
        self.key = keys[0]
        with storage.open_file(path) as raw, zipfile.ZipFile(raw) as z, z.open(f"{self.key}.npy") as f:
            header = self._header(f)
        self._array = None
        if header is None:  # a layout the streaming path does not read (npy format 3, Fortran order): load it
            with storage.open_file(path) as raw, np.load(raw, allow_pickle=False) as f:
                self._array = f[self.key]
            shape, dtype = self._array.shape, self._array.dtype
        else:
            shape, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise DataError(f"{path}:{self.key} must be uint8 [N, H, W, 1 or 3] images, got {dtype} {list(shape)}")
        self.shape = tuple(shape)

    @staticmethod
    def _header(f) -> tuple[tuple[int, ...], np.dtype] | None:
        """(shape, dtype) of a C-ordered npy stream positioned at its data, or None if it cannot be streamed."""
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
        if read is None:
            return None
        shape, fortran, dtype = read(f)
        return None if fortran or dtype.hasobject else (shape, dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self._array is not None:
            for i in range(0, len(self._array), batch_size):
                yield np.ascontiguousarray(self._array[i:i + batch_size])
            return
        per_image = int(np.prod(self.shape[1:]))  # uint8: one byte per value
        with storage.open_file(self.path) as raw, zipfile.ZipFile(raw) as z, z.open(f"{self.key}.npy") as f:
            self._header(f)
            for start in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - start)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise DataError(f"{self.path}:{self.key} is truncated at image {start}")
                yield np.frombuffer(data, np.uint8).reshape(n, *self.shape[1:])


class FolderImages:
    """Image files under a folder (recursive, sorted), decoded as RGB and ADM-center-cropped to `image_size`
    (`data_pipelines.imagenet.center_crop_arr`, the crop the ImageNet training pipeline uses)."""

    def __init__(self, path: str, image_size: int, num_threads: int = 8):
        self.files = sorted(f for f in storage.walk_files(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
        self.image_size, self.num_threads = image_size, num_threads

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: str) -> np.ndarray:
        from PIL import Image

        from data_pipelines.imagenet import center_crop_arr
        with storage.open_file(path) as f, Image.open(f) as im:
            return center_crop_arr(im.convert("RGB"), self.image_size)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        # PIL decodes with the GIL released: threads overlap JPEG decoding with the device's work.
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            for i in range(0, len(self.files), batch_size):
                yield np.stack(list(pool.map(self._load, self.files[i:i + batch_size])))


def open_images(path: str, image_size: int = 256) -> NpzImages | FolderImages:
    if not storage.exists(path):
        raise MissingInputError(f"images {path} not found (an .npz with {' or '.join(IMAGE_KEYS)}, or a folder)")
    return FolderImages(path, image_size) if storage.isdir(path) else NpzImages(path)


# ----------------------------------------------------------------------------------------------------------------
# The network over all local devices.

@functools.cache
def _forward(precision: str) -> Callable:
    """One jitted forward per precision; jax caches its compilations per input shape and sharding."""
    model = inception.InceptionV3(precision=precision)

    def f(variables, images):
        out = model.apply(variables, images)
        return out.pool, out.logits_unbiased

    return jax.jit(f)


class InceptionFeatures:
    """pool_3 features [N,2048] and unbiased logits [N,1008] of uint8 image batches, data-parallel over `devices`
    (default: all local devices), at a fixed global batch (the last one zero-padded, its padding dropped)."""

    def __init__(self, variables: dict[str, Any], batch_size: int = DEFAULT_BATCH, precision: str = "highest",
                 devices: list[jax.Device] | None = None):
        devices = list(devices or jax.local_devices())
        if batch_size <= 0 or batch_size % len(devices):
            raise ConfigError(f"batch size {batch_size} must be a positive multiple of the {len(devices)} local "
                              f"devices it is split over (e.g. {len(devices) * max(1, batch_size // len(devices))})")
        if precision not in inception.PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(inception.PRECISIONS)}, got {precision!r}")
        mesh = Mesh(np.asarray(devices), ("data",))
        self.variables = jax.device_put(variables, NamedSharding(mesh, P()))
        self.sharding = NamedSharding(mesh, P("data"))
        self.batch_size, self.num_devices = batch_size, len(devices)
        self.fn = _forward(precision)

    def __call__(self, batches: Iterator[np.ndarray], progress: Callable[[int], None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        pools, logits, pending, done = [], [], None, 0

        def collect(item):
            out, n = item
            pools.append(np.asarray(out[0])[:n])
            logits.append(np.asarray(out[1])[:n])

        for batch in batches:
            n = len(batch)
            if n > self.batch_size:
                raise ValueError(f"a batch of {n} exceeds the compiled batch {self.batch_size}")
            if n < self.batch_size:
                batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)])
            out = self.fn(self.variables, jax.device_put(batch, self.sharding))  # async: overlaps the next read
            if pending is not None:
                collect(pending)
            pending, done = (out, n), done + n
            if progress is not None:
                progress(done)
        if pending is not None:
            collect(pending)
        if not pools:
            raise DataError("no images to score")
        return np.concatenate(pools), np.concatenate(logits)


# ----------------------------------------------------------------------------------------------------------------
# Metrics and reference statistics.

def inception_score(logits: np.ndarray, num_splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over `num_splits` equal contiguous parts of exp(E KL(p(y|x) ‖ p(y))), p = softmax(logits).

    Log-probabilities come from a float64 log-softmax, so a class with underflowing probability contributes
    0·log 0 = 0 instead of NaN.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise DataError(f"logits must be [N, classes], got shape {list(logits.shape)}")
    part = len(logits) // num_splits
    if num_splits < 1 or part < 1:
        raise DataError(f"the Inception Score needs at least {num_splits} samples ({num_splits} splits), "
                        f"got {len(logits)}")
    log_p = scipy.special.log_softmax(logits, axis=1)
    scores = []
    for k in range(num_splits):
        lp = log_p[k * part:(k + 1) * part]
        log_py = scipy.special.logsumexp(lp, axis=0) - np.log(part)  # log of the split's marginal p(y)
        kl = np.sum(np.exp(lp) * (lp - log_py), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def load_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048,2048]) from an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: arr_0, mu,
    sigma, mu_s, sigma_s) or any npz holding `mu` and `sigma`."""
    if not storage.exists(path):
        raise MissingInputError(
            f"reference statistics {path} not found: use ADM's "
            f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
            f"VIRTUAL_imagenet256_labeled.npz, or make one from real images with --make_ref")
    with storage.open_file(path) as raw:
        try:
            f = np.load(raw, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"reference {path} is not a readable .npz: {e}") from e
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise DataError(f"reference {path} is a single array, not an .npz holding 'mu' and 'sigma'")
        with f:  # arrays load lazily: an ADM batch's 10k reference images (arr_0) are never read
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise DataError(f"reference {path} lacks {missing} (has {f.files}): it must hold the pool_3 "
                                f"statistics 'mu' [2048] and 'sigma' [2048, 2048]")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    d = inception.NUM_FEATURES
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise DataError(f"reference {path}: mu {list(mu.shape)} / sigma {list(sigma.shape)} are not pool_3 "
                        f"statistics ([{d}] / [{d}, {d}])")
    return mu, sigma


def _write_json(path: str, obj: dict[str, Any]) -> None:
    storage.write_json_atomic(path, obj, indent=2, sort_keys=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with storage.open_file(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress_printer(total: int, what: str) -> Callable[[int], None]:
    t0, last = time.time(), [0.0]

    def report(done: int) -> None:
        now = time.time()
        if done == total or now - last[0] > 30:
            last[0] = now
            print(f"{what}: {done}/{total} images, {done / max(now - t0, 1e-9):.1f} images/s", flush=True)

    return report


def _features(images, weights: str, batch_size: int, precision: str, what: str, verbose: bool):
    variables = inception.load_variables(weights)
    extractor = InceptionFeatures(variables, batch_size, precision)
    t0 = time.time()
    pool, logits = extractor(images.batches(batch_size), _progress_printer(len(images), what) if verbose else None)
    return pool, logits, time.time() - t0, extractor.num_devices


def evaluate_samples(samples: str, reference: str, weights: str = inception.DEFAULT_WEIGHTS, *,
                     out: str | None = None, batch_size: int = DEFAULT_BATCH, num_splits: int = IS_SPLITS,
                     precision: str = "highest", verbose: bool = False) -> dict[str, Any]:
    """FID and IS of the sampler's npz against reference statistics; writes JSON (default: next to the samples,
    `<name>_imagenet_fid.json`) atomically and returns the same dict."""
    mu_ref, sigma_ref = load_reference(reference)  # fail on a bad reference before the long feature pass
    images = NpzImages(samples)
    if len(images) < max(2, num_splits):
        raise DataError(f"{samples} holds {len(images)} images: FID needs ≥ 2 and IS ≥ {num_splits} (its splits)")
    pool, logits, seconds, num_devices = _features(images, weights, batch_size, precision, "inception", verbose)
    fid = frechet_distance(*feature_stats(pool), mu_ref, sigma_ref)
    is_mean, is_std = inception_score(logits, num_splits)
    result = {
        "fid": fid,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_splits": num_splits,
        "num_samples": len(images),
        "image_shape": list(images.shape[1:]),
        "samples": storage.absolute(samples),
        "reference": storage.absolute(reference),
        "weights": storage.absolute(weights),
        "weights_sha256": _sha256(weights),
        "network": "pytorch-fid FID Inception-v3 (pt_inception-2015-12-05), pool_3; IS: softmax of the 1008 "
                   "logits without the fc bias (improved-gan / ADM evaluator)",
        "resize": "bilinear to 299x299, align_corners=False, no antialiasing (pytorch-fid)",
        "precision": precision,
        "feature_seconds": seconds,
        "images_per_sec": len(images) / seconds,
        "num_devices": num_devices,
        "device_kind": jax.local_devices()[0].device_kind,
    }
    out = out or f"{os.path.splitext(samples)[0]}_imagenet_fid.json"
    _write_json(out, result)
    result["out"] = out
    return result


def make_reference(images_path: str, out: str, weights: str = inception.DEFAULT_WEIGHTS, *, image_size: int = 256,
                   batch_size: int = DEFAULT_BATCH, precision: str = "highest", verbose: bool = False
                   ) -> dict[str, Any]:
    """Writes an npz with `mu`, `sigma` (pool_3 statistics, float64) and `num_images` of real images: an image
    npz as it is, or a folder ADM-center-cropped to `image_size`. Returns a summary."""
    if os.path.splitext(out)[1].lower() != ".npz":
        raise ConfigError(f"--out {out}: the reference statistics are written as an .npz")
    images = open_images(images_path, image_size)
    if len(images) < 2:
        raise DataError(f"{images_path}: a covariance needs at least 2 images, found {len(images)}")
    pool, _, seconds, _ = _features(images, weights, batch_size, precision, "reference", verbose)
    mu, sigma = feature_stats(pool)
    storage.write_npz_atomic(out, mu=mu, sigma=sigma, num_images=np.int64(len(pool)))
    return {"out": out, "num_images": len(pool), "images_per_sec": len(pool) / seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", help="sampler npz (`images` uint8 [N,H,W,3], or ADM's `arr_0`) to score")
    p.add_argument("--ref", help="reference npz with `mu`/`sigma` (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--make_ref", metavar="IMAGES", help="instead of scoring: write reference statistics of these "
                   "real images (a folder, center-cropped to --image_size, or an npz of uint8 images) to --out")
    p.add_argument("--weights", default=inception.DEFAULT_WEIGHTS,
                   help="pytorch-fid Inception weights: .pth (needs torch), .safetensors or .npz (default: the "
                        "torch.hub cache path pytorch-fid downloads to)")
    p.add_argument("--out", help="output JSON (scoring; default <samples>_imagenet_fid.json) or npz (--make_ref)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help="global batch, split over local devices")
    p.add_argument("--num_splits", type=int, default=IS_SPLITS, help="Inception Score splits")
    p.add_argument("--image_size", type=int, default=256, help="--make_ref on a folder: ADM center-crop size")
    p.add_argument("--precision", choices=sorted(inception.PRECISIONS), default="highest",
                   help="conv precision: highest = fp32 (reference numerics); default = bf16/TF32 passes")
    args = p.parse_args(argv)
    if args.make_ref:
        if args.samples or not args.out:
            raise ConfigError("--make_ref IMAGES writes to --out REF.npz and takes no --samples")
        r = make_reference(args.make_ref, args.out, args.weights, image_size=args.image_size,
                           batch_size=args.batch_size, precision=args.precision, verbose=True)
        print(f"wrote {r['out']}: statistics of {r['num_images']} images ({r['images_per_sec']:.1f} images/s)")
    else:
        if not args.samples or not args.ref:
            raise ConfigError("pass --samples SAMPLES.npz and --ref REF.npz (or --make_ref IMAGES --out REF.npz)")
        r = evaluate_samples(args.samples, args.ref, args.weights, out=args.out, batch_size=args.batch_size,
                             num_splits=args.num_splits, precision=args.precision, verbose=True)
        print(f"FID {r['fid']:.3f}  IS {r['inception_score']:.2f} ± {r['inception_score_std']:.2f}  "
              f"({r['num_samples']} samples, {r['images_per_sec']:.1f} images/s on {r['num_devices']} "
              f"{r['device_kind']}) → {r['out']}", flush=True)


if __name__ == "__main__":
    cli.main(main)
