"""grain pipeline over the embedded 28×28 image datasets, each JAX process yielding its rows of every global batch
(data_pipelines.sharding, global order)."""

from __future__ import annotations

from typing import Callable, Iterator

import grain
import numpy as np

from data_pipelines import sharding
from data_pipelines.embedded import dataset_names, load_embedded
from latent_lm.errors import ConfigError
from latent_lm.pixels import to_signed


class EmbeddedImageSource(grain.sources.RandomAccessDataSource):
    """Random-access source of {"image": uint8 [28,28,1], "label": int32} records."""

    def __init__(self, name: str, split: str):
        self.name, self.split = name, split
        self._images, self._labels = load_embedded(name, split)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        # grain keys iterator checkpoints on this string: it must not contain object ids.
        return f"EmbeddedImageSource(name={self.name!r}, split={self.split!r}, len={len(self)})"


def _to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = to_signed(batch["image"])
    return {"image": image, "label": batch["label"].astype(np.int32)}


def make_image_dataset(name: str, split: str, batch_size: int, seed: int, shuffle: bool = True,
                       repeat: bool = True, drop_remainder: bool = True, process_index: int | None = None,
                       process_count: int | None = None, num_workers: int = 0) -> grain.IterDataset:
    """Yields this process's {"image": float32 [b,28,28,1] in [-1,1], "label": int32 [b]}, reshuffled every epoch.

    `batch_size` is the global batch; b = batch_size / process_count: process p yields rows [p·b, (p+1)·b) of every
    global batch, which do not depend on the process count (data_pipelines.sharding, global order).
    """
    shard = sharding.process_shard(process_index, process_count)
    local = sharding.local_batch_size(batch_size, shard.shard_count)
    ds = grain.MapDataset.source(EmbeddedImageSource(name, split)).seed(sharding.global_seed(seed))
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    # Scale after batching: one vectorised op per batch instead of one per example.
    ds = sharding.global_rows(ds, batch_size, shard, drop_remainder).batch(local, drop_remainder=drop_remainder)
    return sharding.GlobalOrder(sharding.with_workers(ds.map(_to_float).to_iter_dataset(), num_workers))


def _is_embedded(name: str) -> bool:
    return name in dataset_names()


def make_training_images(data, global_batch_size: int, seed: int, *, process_index: int | None = None,
                         process_count: int | None = None) -> grain.IterDataset:
    """σ-VAE training images for the config's `data` block: an embedded dataset, or tfds image datasets
    (`data.dataset`, or the weighted `data.mixture` of (name, weight) pairs) with ADM crops at `data.image_size`."""
    if data.dataset == "coco_captions":
        raise ConfigError("the paper-scale multimodal run reads the ImageNet σ-VAE (configs/imagenet_vae.py trains "
                          "it) and does not train one on COCO: run encode, not train_vae (docs/experiments.md §10.4)")
    if _is_embedded(data.dataset) and not data.get("mixture"):
        return make_image_dataset(data.dataset, "train", global_batch_size, seed, process_index=process_index,
                                  process_count=process_count, num_workers=data.get("num_workers", 0))
    from data_pipelines.imagenet import make_imagenet_dataset  # tfds is imported only for tfds datasets

    mixture = data.get("mixture") or ((data.dataset, 1.0),)
    return make_imagenet_dataset("train", global_batch_size, seed, image_size=data.image_size,
                                 names=[name for name, _ in mixture], weights=[w for _, w in mixture],
                                 data_dir=data.get("data_dir") or None, random_flip=data.get("random_flip", True),
                                 num_workers=data.get("num_workers", 0), process_index=process_index,
                                 process_count=process_count)


def ordered_images(data, split: str, batch_size: int) -> tuple[int, Callable[[int, int], Iterator]]:
    """(number of examples, read_batches(start, end)) of a split in stored order, unaugmented (ADM center crop
    for tfds datasets and COCO): what `--mode=encode` reads. Batches are (float32 images in [-1,1], int32 labels)."""
    if _is_embedded(data.dataset):
        images, labels = load_embedded(data.dataset, split)

        def read_embedded(start: int, end: int):
            for i in range(start, end, batch_size):
                stop = min(i + batch_size, end)
                b = _to_float({"image": images[i:stop], "label": labels[i:stop]})
                yield b["image"], b["label"]

        return len(labels), read_embedded
    if data.dataset == "coco_captions":  # paper-scale image–caption pairs (docs/experiments.md §10.4)
        from data_pipelines import coco_captions

        return coco_captions.ordered_images(data, split, batch_size)
    from data_pipelines.imagenet import CenterCroppedSource, read_range_batches

    source = CenterCroppedSource(data.dataset, split, data.image_size, data.get("data_dir") or None)
    workers = data.get("num_workers", 0)
    return len(source), lambda start, end: read_range_batches(source, start, end, batch_size, workers)
