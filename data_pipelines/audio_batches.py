"""grain pipeline of audio σ-VAE training batches (docs/method.md §12): random fixed-length crops of the speech corpus's
utterances, zero-padded at the end when an utterance is shorter, each JAX process yielding its rows of every global
batch (data_pipelines.sharding, global order).

One crop per utterance per epoch, the utterances reshuffled every epoch; the crop offset is drawn from the
dataset's seed and the utterance's position in the stream (grain `random_map`), so the iterator's state is its
position and a resumed run sees the same crops.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from data_pipelines import sharding
from data_pipelines.speech_corpus import SpeechCorpusSource

PREFETCH_THREADS = 2
PREFETCH_BATCHES = 8


class RandomCrop(grain.transforms.RandomMap):
    """A corpus record → {"audio": float32 [length]}: a random window of the utterance, or the whole utterance
    followed by zeros when it is shorter."""

    def __init__(self, length: int):
        self.length = int(length)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        audio = np.asarray(element["audio"], np.float32)
        out = np.zeros(self.length, np.float32)
        if len(audio) > self.length:
            start = int(rng.integers(0, len(audio) - self.length + 1))
            out[:] = audio[start:start + self.length]
        else:
            out[:len(audio)] = audio
        return {"audio": out}


def make_audio_training_batches(corpus_dir: str, global_batch_size: int, crop_samples: int, seed: int, *,
                                split: str = "train", process_index: int | None = None,
                                process_count: int | None = None, num_workers: int = 0) -> grain.IterDataset:
    """Yields this process's {"audio": float32 [b, crop_samples]} forever, b = global_batch_size / processes.

    The split's utterances are reshuffled every epoch with `seed` and cut into global batches; process p yields rows
    [p·b, (p+1)·b) of every one (data_pipelines.sharding, global order)."""
    shard = sharding.process_shard(process_index, process_count)
    local = sharding.local_batch_size(global_batch_size, shard.shard_count)
    ds = grain.MapDataset.source(SpeechCorpusSource(corpus_dir, split)).seed(sharding.global_seed(seed))
    # The crop is drawn from the global position of the utterance, so it does not depend on the process count.
    ds = ds.shuffle().repeat().random_map(RandomCrop(crop_samples))
    ds = sharding.global_rows(ds, global_batch_size, shard).batch(local, drop_remainder=True)
    # grain prefetches whole batches (default: 500 of them, 16 threads): a few are plenty for a decode and a crop.
    options = grain.ReadOptions(num_threads=PREFETCH_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
    return sharding.GlobalOrder(sharding.with_workers(ds.to_iter_dataset(options), num_workers))
