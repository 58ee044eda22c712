"""grain pipeline over the embedded 28×28 image datasets."""

from __future__ import annotations

import grain
import numpy as np

from data_pipelines.embedded import load_embedded


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
    image = batch["image"].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return {"image": image, "label": batch["label"].astype(np.int32)}


def make_image_dataset(name: str, split: str, batch_size: int, seed: int, shuffle: bool = True,
                       repeat: bool = True, drop_remainder: bool = True) -> grain.IterDataset:
    """Yields {"image": float32 [B,28,28,1] in [-1,1], "label": int32 [B]}; reshuffled every epoch."""
    ds = grain.MapDataset.source(EmbeddedImageSource(name, split)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    # Scale after batching: one vectorised op per batch instead of one per example.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(_to_float)
    return ds.to_iter_dataset()
