"""ImageNet (`imagenet2012`) and other tfds image datasets through `tfds.data_source` (ArrayRecord), ADM-style.

Source. `tfds.data_source(name, split=..., data_dir=..., download=False)` reads the prepared ArrayRecord files by
random access, without TensorFlow: tfds parses each record with its numpy example parser and decodes the JPEG
bytes with PIL (OpenCV when installed) in `Image.decode_example_np`, so an example arrives as
{"image": uint8 [H, W, 3], "label": int64, ...}. We keep tfds's decoding rather than
`decoders={"image": tfds.decode.SkipDecoding()}` plus our own PIL decode: the work is the same (one full JPEG
decode; a reduced-size DCT "draft" decode would be faster but is not ADM's BOX/BICUBIC numerics), and
`tfds.testing.mock_data` can exercise this exact path offline, while its SkipDecoding path needs TensorFlow to
encode fake JPEGs. Preparing ImageNet once does need TensorFlow (the builder's CMYK fixes use it):
`tfds build imagenet2012 --file_format=array_record --manual_dir=<ILSVRC2012_img_{train,val}.tar> --data_dir=D`.

Preprocessing (docs/method.md §6.4, guided-diffusion `center_crop_arr`): BOX-downsample by 2 while the
short side is ≥ 2·size, BICUBIC-resize so the short side is `size`, center crop, optional random horizontal flip,
then [0, 255] → [-1, 1]. Crops and flips run per example in the grain workers, on uint8; the float conversion runs
once per batch.

Pipeline. Each source is shuffled as a whole every epoch and repeated; several sources are mixed with weights
(`grain.MapDataset.mix`: exact proportions, e.g. for σ-VAE training on a mixture); the stream is cut into global
batches and each process yields its rows (global batch / process_count) of every one (data_pipelines.sharding,
global order), flips drawn from each example's global position, so the global batches do not depend on the process
count.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import sharding
from latent_lm.errors import ConfigError, MissingInputError
from latent_lm.pixels import to_signed

# The held-out split the experiment's "test" stage reads, for datasets that have no "test" split.
_HELD_OUT_SPLIT = {"imagenet2012": "validation"}


def tfds_split(name: str, split: str) -> str:
    """The tfds split behind the experiment's "train"/"test" (ImageNet's labelled held-out split is validation)."""
    return _HELD_OUT_SPLIT.get(name, split) if split == "test" else split


def center_crop_arr(image: Image.Image | np.ndarray, image_size: int) -> np.ndarray:
    """ADM center crop (guided-diffusion `image_datasets.center_crop_arr`) → uint8 [size, size, C]."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    # BOX halving first, as ADM does by hand (older PIL had no `reducing_gap`): better than one big BICUBIC step.
    while min(*pil.size) >= 2 * image_size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = image_size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def tfds_image_source(name: str, split: str, data_dir: str | None = None):
    """Random-access tfds source of {"image": uint8 [H,W,3], "label": int64, ...}; never downloads.

    A dataset that is not prepared under `data_dir` (tfds's default directory when None) raises one
    FileNotFoundError saying how to prepare it.
    """
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        builder_dir = tfds.builder(name, data_dir=data_dir).data_dir
        if os.path.exists(os.path.join(builder_dir, "dataset_info.json")):
            raise  # prepared, so the error is about something else (split name, file format): keep it
        raise MissingInputError(
            f"tfds dataset {name!r} is not prepared under {builder_dir}: build it once with `tfds build {name} "
            f"--file_format=array_record --data_dir=<dir>` (ImageNet also needs --manual_dir with the ILSVRC2012 "
            f"tars) and set --config.data.data_dir=<dir>") from e


class CenterCrop(grain.transforms.Map):
    """tfds example → {"image": uint8 [S,S,C] (ADM center crop), "label": int32}."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 [H, W, C] image, got {image.dtype} {image.shape}")
        if image.shape[-1] == 1:  # PIL has no [H, W, 1] mode
            return {"image": center_crop_arr(image[..., 0], self.image_size)[..., None],
                    "label": np.int32(example["label"])}
        return {"image": center_crop_arr(image, self.image_size), "label": np.int32(example["label"])}


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2; the draw comes from grain's per-example generator (seeded by the
    pipeline seed and the example's position), so it is reproducible and resumes exactly."""

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if rng.random() < 0.5:
            example = dict(example, image=np.ascontiguousarray(example["image"][:, ::-1]))
        return example


def to_float_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """uint8 images → float32 in [-1, 1] (x/127.5 − 1, as ADM), vectorised over the batch."""
    image = to_signed(batch["image"])
    return {"image": image, "label": batch["label"].astype(np.int32)}


def _check_weights(names: Sequence[str], weights: Sequence[float] | None) -> list[float] | None:
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != len(names) or any(not w > 0 for w in weights):
        raise ConfigError(f"mixture weights {weights} must be one positive number per source {list(names)}")
    return weights


def make_imagenet_dataset(split: str, global_batch_size: int, seed: int, *, image_size: int = 256,
                          names: Sequence[str] = ("imagenet2012",), weights: Sequence[float] | None = None,
                          data_dir: str | None = None, random_flip: bool = True, shuffle: bool = True,
                          repeat: bool = True, num_workers: int = 0, process_index: int | None = None,
                          process_count: int | None = None) -> grain.IterDataset:
    """Yields this process's {"image": float32 [B,S,S,3] in [-1,1], "label": int32 [B]}, B = global/processes.

    `names` (with `weights`) mixes several tfds image datasets with exact proportions; a mixture needs
    `repeat=True` (grain stops a finite mixture at its shortest member). The split is mapped per dataset by
    `tfds_split`. `num_workers` > 0 runs reading, cropping and batching in that many processes.
    """
    names = list(names)
    if not names:
        raise ValueError("make_imagenet_dataset needs at least one tfds dataset name")
    weights = _check_weights(names, weights)
    if len(names) > 1 and not repeat:
        raise ValueError("a mixture of datasets needs repeat=True")
    shard = sharding.process_shard(process_index, process_count)
    batch = sharding.local_batch_size(global_batch_size, shard.shard_count)
    parts = []
    for k, name in enumerate(names):
        ds = grain.MapDataset.source(tfds_image_source(name, tfds_split(name, split), data_dir))
        ds = ds.seed(sharding.global_seed(seed + k))
        if shuffle:
            ds = ds.shuffle()
        parts.append(ds.repeat() if repeat else ds)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    ds = ds.map(CenterCrop(image_size))
    if random_flip:
        # An explicit seed: the mixture has no pipeline seed, and the flips must not repeat the shuffle's stream.
        ds = ds.random_map(RandomFlip(), seed=sharding.global_seed(seed + 1_000_000_007))
    ds = sharding.global_rows(ds, global_batch_size, shard).batch(batch, drop_remainder=True).map(to_float_batch)
    return sharding.GlobalOrder(sharding.with_workers(ds.to_iter_dataset(), num_workers))


class CenterCroppedSource(grain.sources.RandomAccessDataSource):
    """A tfds image split, center-cropped (no flip) and indexable: what `--mode=encode` reads in order."""

    def __init__(self, name: str, split: str, image_size: int, data_dir: str | None = None):
        self.name, self.split, self.image_size = name, tfds_split(name, split), int(image_size)
        self._source = tfds_image_source(name, self.split, data_dir)
        self._crop = CenterCrop(image_size)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._crop.map(self._source[index])

    def __repr__(self) -> str:
        return f"CenterCroppedSource(name={self.name!r}, split={self.split!r}, size={self.image_size})"


def read_range_batches(source: grain.sources.RandomAccessDataSource, start: int, end: int, batch_size: int,
                       num_workers: int = 0):
    """Yields (images float32 [b,S,S,C] in [-1,1], labels int32 [b]) for examples [start, end) in order."""
    ds = grain.MapDataset.source(source)[start:end].batch(batch_size).map(to_float_batch)
    for b in sharding.with_workers(ds.to_iter_dataset(), num_workers):
        yield b["image"], b["label"]
