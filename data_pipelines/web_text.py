"""Web text for the text-only documents at paper scale: a tfds text corpus prepared as ArrayRecord, read without
TensorFlow (data_pipelines/tfds_records.py; docs/experiments.md §10.4).

`c4` (the default) is C4's English web text (`c4/en`, ≈ 365 M documents): the kind of corpus LLaMA-style 1B models
pretrain on, with a held-out validation split. `lm1b` (≈ 30 M shuffled single sentences, a small build) is for trials.
Both store one feature, "text".

  tfds build c4 --config=en --file_format=array_record --data_dir=$TFDS   # an Apache Beam pipeline (run it on Dataflow)
  tfds convert_format --dataset_version_dir=$TFDS/c4/en/3.1.0 --out_file_format=array_record   # a TFRecord copy
  tfds build lm1b --file_format=array_record --data_dir=$TFDS
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.tfds_records import TfdsRecords, field, text
from latent_lm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """A tfds text corpus: its builder directory under the data dir, the tfds splits behind the experiment's
    "train" and "test", and how to prepare it."""

    builder: str
    train: str
    test: str
    build: str


DATASETS = {
    "c4": TextCorpus("c4/en", "train", "validation", "tfds build c4 --config=en --file_format=array_record"),
    "lm1b": TextCorpus("lm1b", "train", "test", "tfds build lm1b --file_format=array_record"),
}


def corpus(name: str) -> TextCorpus:
    if name not in DATASETS:
        raise ConfigError(f"documents.text_dataset={name!r} is not supported; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


class WebText:
    """Random access to an experiment split ("train" or "test") of a text corpus: record i → its text (str)."""

    def __init__(self, name: str, split: str, data_dir: str = ""):
        spec = corpus(name)
        if split not in ("train", "test"):
            raise ConfigError(f"web text has the experiment splits ['test', 'train'], not {split!r}")
        self.name, self.split = name, split
        self._records = TfdsRecords(spec.builder, (spec.train if split == "train" else spec.test,),
                                    {"text": field((), np.str_)}, data_dir, spec.build)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:
        return text(self._records[index]["text"])

    def identity(self) -> dict:
        return self._records.identity()

    def __repr__(self) -> str:
        return f"WebText({self.name!r}, split={self.split!r}, records={len(self)})"
