"""tfds datasets prepared as ArrayRecord, read without TensorFlow (docs/experiments.md §10.4).

`tfds.data_source` constructs the dataset's builder class, and some builders import TensorFlow to do so (COCO's
features name `tf.int64`; the `Audio` feature), although the prepared files need none. This reader goes from the
files: it finds a split's ArrayRecord shards from the builder directory's dataset_info.json (tfds's own proto
reader) and parses each record with tfds's NumPy example parser against the fields a caller asks for; the other
features of the record are skipped. Preparing a dataset (`tfds build <name> --file_format=array_record`) may need
TensorFlow, on any machine; reading here never does.

A builder directory is `<data_dir>/<name>[/<config>]/<version>`; the newest version under `data_dir` is read.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from latent_lm import storage
from latent_lm.errors import ConfigError, MissingInputError


def default_data_dir() -> str:
    """tfds's default data dir (`TFDS_DATA_DIR`, else ~/tensorflow_datasets)."""
    from tensorflow_datasets.core import constants

    return constants.get_default_data_dir()


def _version_key(path: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in storage.basename(path).split("."))
    except ValueError:
        return (-1,)


def prepared_dir(builder: str, data_dir: str = "", build: str = "", config_key: str = "data.data_dir") -> str:
    """The newest version directory of `builder` ("coco_captions/2014", "c4/en") under `data_dir` (tfds's default
    when empty). MissingInputError naming the `build` command and the `config_key` to set when there is none."""
    data_dir = data_dir or default_data_dir()
    found = [storage.dirname(p) for p in storage.glob(storage.join(data_dir, builder, "*", "dataset_info.json"))]
    if not found:
        name = builder.split("/")[0]
        command = build or f"tfds build {name} --file_format=array_record"
        raise MissingInputError(f"tfds dataset {builder!r} is not prepared under {data_dir}: build it once with "
                                f"`{command} --data_dir={data_dir}` (needs TensorFlow) and set "
                                f"--config.{config_key}={data_dir}")
    return max(found, key=_version_key)


def split_dict(builder_dir: str):
    """(DatasetInfo proto, tfds SplitDict) of a prepared builder directory; ArrayRecord only."""
    from tensorflow_datasets.core import dataset_info

    proto = dataset_info.read_from_json(storage.join(builder_dir, "dataset_info.json"))
    if proto.file_format != "array_record":
        raise MissingInputError(f"the tfds dataset at {builder_dir} is stored as {proto.file_format or 'tfrecord'}: "
                                f"rebuild it with `tfds build ... --file_format=array_record`, or convert it with "
                                f"`tfds convert_format --dataset_version_dir={builder_dir} "
                                f"--out_file_format=array_record`")
    return proto, dataset_info.get_split_dict_from_proto(proto, builder_dir)


def field(shape: tuple, dtype: Any, sequence: bool = False):
    """A tfds TensorInfo of a stored feature: `np.bytes_` for encoded images, `np.str_` for text; `sequence` for the
    values of a `tfds.features.Sequence` (shape (None,) …)."""
    from tensorflow_datasets.core.features import feature as feature_lib

    return feature_lib.TensorInfo(shape=shape, dtype=dtype, sequence_rank=1 if sequence else 0)


class TfdsRecords:
    """Random access to the records of one or more splits of a prepared tfds dataset, concatenated in the order
    given: record i → the parsed `fields` (a nested {name: TensorInfo}, as the dataset's features nest them, e.g.
    {"captions": {"text": …}} for the feature "captions/text"). Picklable: a grain worker reopens the files."""

    def __init__(self, builder: str, splits: Sequence[str], fields: Mapping[str, Any], data_dir: str = "",
                 build: str = "", config_key: str = "data.data_dir"):
        if not splits:
            raise ConfigError(f"no tfds split of {builder!r} to read")
        self.builder, self.splits, self.fields = builder, tuple(splits), fields
        self.builder_dir = prepared_dir(builder, data_dir, build, config_key)
        proto, splits_found = split_dict(self.builder_dir)
        missing = [s for s in self.splits if s not in splits_found]
        if missing:
            raise ConfigError(f"tfds dataset {builder!r} at {self.builder_dir} has no split(s) {missing}; it has "
                              f"{sorted(splits_found.keys())}")
        self.version = str(proto.version)
        self.counts = {s: int(splits_found[s].num_examples) for s in self.splits}
        self.files = [os.fspath(f) for s in self.splits for f in splits_found[s].filepaths]
        self._source = self._parser = None

    def _open(self) -> None:
        import grain
        from tensorflow_datasets.core import example_parser

        self._source = grain.sources.ArrayRecordDataSource(self.files)
        self._parser = example_parser.ExampleParserNp(self.fields)
        if len(self._source) != sum(self.counts.values()):
            raise MissingInputError(f"the tfds dataset at {self.builder_dir} holds {len(self._source)} records in "
                                    f"{list(self.splits)} but its dataset_info.json says {self.counts}: "
                                    f"re-prepare it")

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._source is None:
            self._open()
        return self._parser.parse_example(self._source[int(index)])

    def identity(self) -> dict[str, Any]:
        """{builder, version, split: count}: what a fingerprint knows of the prepared dataset."""
        return {"builder": self.builder, "version": self.version, "splits": dict(self.counts)}

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _source=None, _parser=None)

    def __repr__(self) -> str:
        return f"TfdsRecords({self.builder!r}, splits={list(self.splits)}, records={len(self)})"


def text(value: Any) -> str:
    """A parsed tfds string (bytes) as str."""
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)
