"""MS-COCO 2014 image–caption pairs from tfds `coco_captions` prepared as ArrayRecord (docs/experiments.md §10.4).

  tfds build coco_captions --file_format=array_record --data_dir=$TFDS     # once: COCO 2014 + Karpathy splits

Splits (Karpathy & Li's, as tfds prepares them): the experiment's "train" is tfds `train` then `restval` (82,783 +
30,504 images), "test" is tfds `test` (5,000 images; `val`'s 5,000 stay unused for model selection). Each record
holds one image and its ≈ 5 human captions.

Reading needs no TensorFlow (data_pipelines/tfds_records.py: the `coco_captions` builder imports it to be
constructed): records are parsed with tfds's NumPy parser, and the stored JPEG bytes are decoded here with PIL
(`convert("RGB")`: COCO has grayscale JPEGs) and center-cropped as ImageNet is (ADM `center_crop_arr`, to the
σ-VAE's `data.image_size`), so `--mode=encode` caches the same kind of latents the ImageNet σ-VAE was trained on.
The latent cache's label of an image is its COCO image id, which ties cache record i to tfds record i
(`data_pipelines/coco_documents.py` checks it).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Iterator

import grain
import numpy as np
from PIL import Image

from data_pipelines.tfds_records import TfdsRecords, field, text
from latent_lm.errors import ConfigError, DataError

NAME = "coco_captions"  # config.data.dataset of the paper-scale multimodal run
BUILDER = "coco_captions/2014"
SPLITS = {"train": ("train", "restval"), "test": ("test",)}  # experiment split → tfds splits, in order


def tfds_splits(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ConfigError(f"coco_captions has the experiment splits {sorted(SPLITS)}, not {split!r}")
    return SPLITS[split]


def records(split: str, data_dir: str = "", image: bool = False) -> TfdsRecords:
    """Random access to an experiment split: record i → {"image/id", "captions": {"text"}} (+ "image": JPEG bytes)."""
    fields = {"image/id": field((), np.int64), "captions": {"text": field((None,), np.str_, sequence=True)}}
    if image:
        fields["image"] = field((), np.bytes_)
    return TfdsRecords(BUILDER, tfds_splits(split), fields, data_dir)


def captions_of(record: dict[str, Any]) -> list[str]:
    """A record's captions, whitespace collapsed (COCO's raw captions carry stray spaces and newlines)."""
    texts = record.get("captions", {}).get("text", [])
    return [c for c in (" ".join(text(t).split()) for t in texts) if c]


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """JPEG bytes → uint8 [S, S, 3]: PIL decode to RGB, then the ADM center crop at S."""
    from data_pipelines.imagenet import center_crop_arr  # imports tfds: only for the tfds image paths

    with Image.open(io.BytesIO(data)) as pil:
        return center_crop_arr(pil.convert("RGB"), image_size)


class CocoImageSource(grain.sources.RandomAccessDataSource):
    """An experiment split's images, center-cropped and indexable: {"image": uint8 [S,S,3], "label": the COCO
    image id}; what `--mode=encode` reads in order."""

    def __init__(self, split: str, image_size: int, data_dir: str = ""):
        self.split, self.image_size = split, int(image_size)
        self._records = records(split, data_dir, image=True)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._records[index]
        image_id = int(record["image/id"])
        if not 0 <= image_id < 2 ** 31:  # the latent cache stores int32 labels
            raise DataError(f"coco_captions/{self.split} record {index}: image id {image_id} does not fit int32")
        return {"image": decode_image(record["image"], self.image_size), "label": np.int32(image_id)}

    def __repr__(self) -> str:
        return f"CocoImageSource(split={self.split!r}, size={self.image_size}, records={len(self)})"


def ordered_images(data, split: str, batch_size: int) -> tuple[int, Callable[[int, int], Iterator]]:
    """(count, read_batches(start, end)) of a split in stored order for `--mode=encode`
    (`image_pipeline.ordered_images`): float32 images in [-1, 1] and int32 COCO image ids."""
    from data_pipelines.imagenet import read_range_batches

    source = CocoImageSource(split, data.image_size, data.get("data_dir", ""))
    workers = data.get("num_workers", 0)
    return len(source), lambda start, end: read_range_batches(source, start, end, batch_size, workers)
