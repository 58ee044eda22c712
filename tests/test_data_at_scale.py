"""Data at scale: ImageNet through tfds (offline), per-process sharding, mixtures, the sharded resumable latent cache.

No test touches the network: `_no_network` turns any TCP connect or DNS lookup in this process into an error (a
real tfds download attempt would otherwise hang for minutes), and tfds datasets are either mocked
(`tfds.testing.mock_data`) or prepared here in a temporary directory in tfds's own ArrayRecord format.
"""

import io
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from configs import default
from data_pipelines import latent_cache, sharding
from data_pipelines.imagenet import (
    CenterCroppedSource,
    center_crop_arr,
    make_imagenet_dataset,
    read_range_batches,
    tfds_image_source,
)
from data_pipelines.latent_cache import (
    encode_to_latent_cache,
    load_latent_cache,
    make_latent_dataset,
    read_latent_cache_meta,
)
from latent_lm.parallel.device_prefetch import DevicePrefetcher
from latent_lm.parallel.mesh import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"test tried to reach the network: {address}")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in ("localhost", "127.0.0.1", "::1", None):
            raise RuntimeError(f"test tried to resolve {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def _take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- ADM center crop

@pytest.mark.parametrize("size,hw", [(256, (375, 500)), (256, (1100, 530)), (256, (200, 300)), (512, (1200, 1700)),
                                     (512, (513, 700))])
def test_center_crop_matches_adm(size, hw):
    rng = np.random.default_rng(sum(hw))
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    got = center_crop_arr(image, size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    # Exactness (ADM's recipe, docs/method.md §10.2): upsampling by pixel repetition ×4 and cropping gives back exactly
    # the crop of the original, which holds for BOX halving (the mean of equal pixels) and not for a single BICUBIC
    # resize.
    small = rng.integers(0, 256, (size, size + 30, 3), dtype=np.uint8)
    big = small.repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_array_equal(center_crop_arr(big, size), small[:, 15:15 + size])
    # The crop is centred on the long side: a left-black/right-white landscape image keeps its edge in the middle.
    split = np.zeros((hw[0], 2 * hw[0], 3), np.uint8)
    split[:, hw[0]:] = 255
    out = center_crop_arr(split, size).astype(int)
    assert out[:, : size // 2 - 4].max() < 10 and out[:, size // 2 + 4:].min() > 245


# --------------------------------------------------------------------------------------- tfds: mock and prepared

def _prepare_tfds(data_dir, name, splits):
    """Writes a prepared tfds dataset (ArrayRecord + dataset_info.json), as `tfds build` would, without TF."""
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    os.makedirs(builder.data_dir, exist_ok=True)
    infos = []
    for split, examples in splits.items():
        template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name, split=split,
                                                 template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                                 filetype_suffix="array_record")
        writer = ArrayRecordWriter(os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
        for i, (image, label) in enumerate(examples):
            jpeg = io.BytesIO()
            Image.fromarray(image).save(jpeg, format="JPEG", quality=95)
            example = {"image": io.BytesIO(jpeg.getvalue()), "label": int(label)}
            if "file_name" in builder.info.features:
                example["file_name"] = f"{split}_{i}.JPEG"
            writer.write(builder.info.features.serialize_example(example))
        writer.close()
        infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0,
                                         filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)


def _images(n, value, seed, label_offset=0):
    """n images of varied sizes; pixel values around `value` tell datasets apart after JPEG and crops."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        out.append((np.clip(value + rng.integers(-8, 8, (h, w, 3)), 0, 255).astype(np.uint8), label_offset + i))
    return out


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    _prepare_tfds(data_dir, "imagenet2012", {"train": _images(24, 60, 0), "validation": _images(6, 60, 1, 100)})
    _prepare_tfds(data_dir, "imagenette", {"train": [(x, y % 10) for x, y in _images(20, 200, 2)]})
    return data_dir


def test_imagenet_mock_data_pipeline():
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        it = iter(make_imagenet_dataset("train", 8, seed=0, image_size=256))
        batch = next(it)
        assert batch["image"].shape == (8, 256, 256, 3) and batch["image"].dtype == np.float32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
        assert batch["label"].dtype == np.int32 and ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
        state = it.get_state()
        expected = next(it)
        resumed = iter(make_imagenet_dataset("train", 8, seed=0, image_size=256))
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["image"], expected["image"])
        # 512: the other ADM resolution; "test" reads ImageNet's validation split; two processes → 2 rows each.
        half = next(iter(make_imagenet_dataset("test", 4, seed=0, image_size=512, random_flip=False,
                                               process_index=1, process_count=2)))
        assert half["image"].shape == (2, 512, 512, 3)


def test_prepared_tfds_source_decodes_without_tensorflow(tfds_dir):
    import importlib.util
    assert importlib.util.find_spec("tensorflow") is None  # the point: the data path works without TF
    raw = tfds_image_source("imagenet2012", "train", tfds_dir)
    assert len(raw) == 24 and raw[3]["image"].dtype == np.uint8 and raw[3]["image"].ndim == 3
    source = CenterCroppedSource("imagenet2012", "test", 32, tfds_dir)  # "test" → validation
    assert len(source) == 6 and repr(source) == "CenterCroppedSource(name='imagenet2012', split='validation', size=32)"
    batches = list(read_range_batches(source, 1, 6, batch_size=2))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert np.concatenate([y for _, y in batches]).tolist() == [101, 102, 103, 104, 105]
    expected = center_crop_arr(tfds_image_source("imagenet2012", "validation", tfds_dir)[1]["image"], 32)
    np.testing.assert_allclose(batches[0][0][0], expected / 127.5 - 1.0, atol=1e-6)


def test_missing_tfds_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds dataset 'imagenet2012' is not prepared under .*tfds build"):
        make_imagenet_dataset("train", 8, seed=0, data_dir=str(tmp_path))


def _labels(it, n):
    return np.concatenate([b["label"] for b in _take(it, n)])


def test_imagenet_pipeline_process_sharding_flip_and_resume(tfds_dir):
    kwargs = dict(image_size=16, data_dir=tfds_dir, random_flip=False, shuffle=True)
    # Three simulated processes, one epoch each (8 examples, batches of 12 / 3 = 4): disjoint slices covering all.
    parts = [set(_labels(iter(make_imagenet_dataset("train", 12, 0, process_index=p, process_count=3, **kwargs)), 2))
             for p in range(3)]
    assert all(len(p) == 8 for p in parts) and set.union(*parts) == set(range(24))
    assert not (parts[0] & parts[1]) and not (parts[1] & parts[2])
    with pytest.raises(ValueError, match="global batch size 10 must be a positive multiple of the 3 processes"):
        make_imagenet_dataset("train", 10, 0, process_index=0, process_count=3, **kwargs)

    # Flips: about half the examples, reproducible, and mirror images of the unflipped crops.
    plain = next(iter(make_imagenet_dataset("train", 24, 5, **kwargs)))["image"]
    flip = dict(kwargs, random_flip=True)
    flipped = next(iter(make_imagenet_dataset("train", 24, 5, **flip)))["image"]
    same = np.array([np.array_equal(a, b) for a, b in zip(plain, flipped)])
    mirrored = np.array([np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)])
    assert (same | mirrored).all() and 4 <= mirrored.sum() <= 20
    np.testing.assert_array_equal(next(iter(make_imagenet_dataset("train", 24, 5, **flip)))["image"], flipped)

    # The global order (data_pipelines/sharding.py): the mixture and the flips follow each example's global position,
    # so two processes' rows make the one-process batches.
    mixed = dict(flip, names=("imagenet2012", "imagenette"), weights=(0.5, 0.5))
    one = _take(iter(make_imagenet_dataset("train", 8, 2, **mixed)), 4)
    two = [_take(iter(make_imagenet_dataset("train", 8, 2, process_index=p, process_count=2, **mixed)), 4)
           for p in range(2)]
    for whole, first, second in zip(one, *two):
        np.testing.assert_array_equal(whole["image"], np.concatenate([first["image"], second["image"]]))

    it = iter(make_imagenet_dataset("train", 4, 1, **flip))
    _take(it, 7)  # past the first epoch (6 batches)
    state = it.get_state()
    expected = _take(it, 3)
    resumed = iter(make_imagenet_dataset("train", 4, 1, **flip))
    resumed.set_state(state)
    for e, r in zip(expected, _take(resumed, 3)):
        np.testing.assert_array_equal(e["image"], r["image"])


def test_mixture_proportions(tfds_dir):
    it = iter(make_imagenet_dataset("train", 40, 0, image_size=16, names=("imagenet2012", "imagenette"),
                                    weights=(0.75, 0.25), data_dir=tfds_dir))
    images = np.concatenate([b["image"] for b in _take(it, 10)])
    bright = images.mean(axis=(1, 2, 3)) > 0.0  # imagenette images sit near 200/255, imagenet2012 ones near 60/255
    assert bright.mean() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="mixture weights"):
        make_imagenet_dataset("train", 8, 0, names=("imagenet2012", "imagenette"), weights=(1.0, 0.0),
                              data_dir=tfds_dir)


def test_multiprocess_workers_give_the_same_batches(tfds_dir):
    kwargs = dict(image_size=16, data_dir=tfds_dir)
    serial = _take(iter(make_imagenet_dataset("train", 4, 3, **kwargs)), 3)
    workers = _take(iter(make_imagenet_dataset("train", 4, 3, num_workers=2, **kwargs)), 3)
    for a, b in zip(serial, workers):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


# -------------------------------------------------------------------------------------------- per-process slices

@pytest.mark.parametrize("n,count", [(103, 1), (103, 2), (103, 8), (8, 8)])
def test_process_slices_are_disjoint_equal_and_cover(n, count):
    ranges = [sharding.shard_range(n, sharding.process_shard(p, count)) for p in range(count)]
    sizes = {end - start for start, end in ranges}
    assert sizes == {n // count}
    covered = np.concatenate([np.arange(s, e) for s, e in ranges])
    assert len(np.unique(covered)) == len(covered) == n - n % count
    with pytest.raises(ValueError, match="give both"):
        sharding.process_shard(0, None)


# ------------------------------------------------------------------------------------ sharded, resumable encoding

N, SHAPE = 103, (6, 3)


def _inputs(start, end, batch=8):
    for i in range(start, end, batch):
        idx = np.arange(i, min(i + batch, end))
        yield idx, idx % 10


class _Encoder:
    """Deterministic stand-in for the σ-VAE encoder; records which examples it saw; can fail on a given call."""

    def __init__(self, fail_at_call=None):
        self.seen, self.calls, self.fail_at_call = [], 0, fail_at_call

    def __call__(self, idx):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("killed")
        self.seen.extend(idx.tolist())
        t = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)
        return np.sin(idx[:, None, None] * 0.37 + t).astype(np.float32)


def _encode(path, encoder, **kwargs):
    kwargs = dict(dict(num_shards=5, metadata=lambda m: {"norm": m}, fingerprint={"vae_step": 7}), **kwargs)
    return encode_to_latent_cache(path, num_examples=N, read_batches=_inputs, encode_fn=encoder, **kwargs)


def _temporaries(path):
    return [f for f in os.listdir(path) if ".tmp-" in f]


def test_sharded_encode_resumes_after_an_interruption(tmp_path):
    reference = str(tmp_path / "reference")
    meta = _encode(reference, _Encoder())
    assert meta["files"] == [f"latents-0000{i}-of-00005.array_record" for i in range(5)]
    x, y = load_latent_cache(reference)
    assert x.shape == (N, *SHAPE) and y.tolist() == [i % 10 for i in range(N)]
    np.testing.assert_array_equal(x, _Encoder()(np.arange(N)))  # source order across shards
    assert meta["moments"]["mean"] == pytest.approx(x.mean()) and meta["moments"]["std"] == pytest.approx(x.std())
    assert meta["metadata"] == {"norm": meta["moments"]}

    # Shards hold 21, 21, 21, 20, 20 examples (3 batches each): dying in the 8th call leaves shards 0 and 1.
    path = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        _encode(path, _Encoder(fail_at_call=8))
    assert sorted(f for f in os.listdir(path) if f.endswith(".array_record")) == [
        "latents-00000-of-00005.array_record", "latents-00001-of-00005.array_record"]
    assert not _temporaries(path) and not os.path.exists(os.path.join(path, "meta.json"))
    with pytest.raises(FileNotFoundError, match="run --mode=encode first"):
        make_latent_dataset(path, 4, seed=0)
    # A kill -9 mid-shard leaves a temporary file behind; the rerun removes it and encodes only shards 2..4.
    open(os.path.join(path, ".latents-00003-of-00005.array_record.tmp-dead"), "wb").close()
    encoder = _Encoder()
    meta2 = _encode(path, encoder)
    assert sorted(encoder.seen) == list(range(42, N))
    assert not _temporaries(path)
    np.testing.assert_array_equal(load_latent_cache(path)[0], x)
    assert meta2 == meta

    # Complete and current: nothing is encoded again.
    idle = _Encoder()
    _encode(path, idle)
    assert idle.calls == 0
    # Another fingerprint (a retrained σ-VAE): everything is re-encoded.
    again = _Encoder()
    assert _encode(path, again, fingerprint={"vae_step": 8})["fingerprint"] == {"vae_step": 8}
    assert sorted(again.seen) == list(range(N))
    # Another shard count: the old shard files go away.
    _encode(path, _Encoder(), num_shards=2)
    assert sorted(os.listdir(path)) == ["latents-00000-of-00002.array_record", "latents-00000-of-00002.json",
                                        "latents-00001-of-00002.array_record", "latents-00001-of-00002.json",
                                        "meta.json"]
    np.testing.assert_array_equal(load_latent_cache(path)[0], x)


def test_processes_encode_their_own_shards_and_process_0_finishes(tmp_path):
    path = str(tmp_path / "cache")
    bounds = latent_cache.shard_bounds(N, 5)
    encoders = {p: _Encoder() for p in range(3)}
    # Process 0 first: the other shards are missing, so no meta.json (readers never see a partial cache).
    with pytest.raises(FileNotFoundError, match=r"incomplete: shards \[1, 2, 4\] of 5 are missing"):
        _encode(path, encoders[0], process_index=0, process_count=3)
    assert not os.path.exists(os.path.join(path, "meta.json"))
    assert _encode(path, encoders[1], process_index=1, process_count=3) is None
    assert _encode(path, encoders[2], process_index=2, process_count=3) is None
    idle = _Encoder()
    meta = _encode(path, idle, process_index=0, process_count=3)
    assert idle.calls == 0 and meta["count"] == N  # its shards 0 and 3 were already written
    for p in range(3):
        mine = set().union(*(range(*bounds[i]) for i in range(p, 5, 3)))
        assert set(encoders[p].seen) == mine
    np.testing.assert_array_equal(load_latent_cache(path)[0], _Encoder()(np.arange(N)))


# ------------------------------------------------------------------------------------------------ reading a cache

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("latents") / "train")
    _encode(path, _Encoder(), num_shards=4)
    return path


def test_cache_reader_per_process_rows(cache):
    """Each of two processes yields its half of every global batch of the shuffled cache (the global order,
    data_pipelines/sharding.py): 10 full global batches of the 103 examples, disjoint halves, shuffled."""
    x, _ = load_latent_cache(cache)
    key = {row.tobytes(): i for i, row in enumerate(x)}
    per_process = []
    for p in range(2):
        batches = list(make_latent_dataset(cache, batch_size=10, seed=0, repeat=False, process_index=p,
                                           process_count=2, expected_shape=SHAPE))
        assert [len(b["label"]) for b in batches] == [5] * 10  # the 10 full global batches, local batches of 10 / 2
        per_process.append([[key[r.tobytes()] for r in b["latents"]] for b in batches])
    one = [[key[r.tobytes()] for r in b["latents"]]
           for b in make_latent_dataset(cache, batch_size=10, seed=0, repeat=False, expected_shape=SHAPE)]
    assert [a + b for a, b in zip(*per_process)] == one[:10]
    a, b = (sum(rows, []) for rows in per_process)
    assert len(set(a) | set(b)) == 100 and not set(a) & set(b)
    assert a != sorted(a)  # shuffled


def test_cache_reader_iterator_state_round_trip(cache):
    kwargs = dict(batch_size=8, seed=1, process_index=1, process_count=2)
    it = iter(make_latent_dataset(cache, **kwargs))
    _take(it, 15)  # past one epoch of this process's 51 examples
    state = it.get_state()
    expected = _take(it, 4)
    resumed = iter(make_latent_dataset(cache, **kwargs))
    resumed.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
    for e, r in zip(expected, _take(resumed, 4)):
        np.testing.assert_array_equal(e["latents"], r["latents"])
        np.testing.assert_array_equal(e["label"], r["label"])


def test_cache_errors(cache, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"latent cache not found at {missing}: run --mode=encode first"):
        make_latent_dataset(missing, 4, seed=0)
    with pytest.raises(ValueError, match=r"holds latents of shape \(6, 3\) but the config expects \(49, 4\)"):
        make_latent_dataset(cache, 4, seed=0, expected_shape=(49, 4))
    with pytest.raises(ValueError, match="global batch size 9 must be a positive multiple of the 2 processes"):
        make_latent_dataset(cache, 9, seed=0, process_index=0, process_count=2)
    # A shard file that went missing, and records whose size does not match meta.json's shape.
    broken = str(tmp_path / "broken")
    _encode(broken, _Encoder(), num_shards=3)
    os.remove(os.path.join(broken, "latents-00001-of-00003.array_record"))
    with pytest.raises(FileNotFoundError, match="missing 1 of its 3 shard files"):
        read_latent_cache_meta(broken)
    wrong = str(tmp_path / "wrong")
    _encode(wrong, _Encoder(), num_shards=1)
    meta = json.load(open(os.path.join(wrong, "meta.json")))
    json.dump(dict(meta, shape=[4, 2]), open(os.path.join(wrong, "meta.json"), "w"))
    with pytest.raises(ValueError, match=r"does not hold latents of shape \(4, 2\)"):
        next(iter(make_latent_dataset(wrong, 4, seed=0)))
    with pytest.raises(ValueError, match=r"encode_fn must return latents \[B,T,C\]"):
        encode_to_latent_cache(str(tmp_path / "bad"), num_examples=8, read_batches=_inputs,
                               encode_fn=lambda idx: np.zeros((len(idx), 4)), num_shards=1)
    assert os.listdir(tmp_path / "bad") == []  # the shard's temporary file is gone too


# ------------------------------------------------------------------------------ two real processes (multi-host)

_TWO_PROCESS_SCRIPT = r"""
import sys
import numpy as np
import jax
pid, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from data_pipelines.latent_cache import encode_to_latent_cache, load_latent_cache, make_latent_dataset, shard_bounds
from latent_lm.parallel.mesh import make_mesh, shard_batch

def read_batches(start, end):
    for i in range(start, end, 4):
        idx = np.arange(i, min(i + 4, end))
        yield idx, idx % 10

seen = []
def encode_fn(idx):
    seen.extend(idx.tolist())
    return (idx[:, None, None] + np.arange(6).reshape(1, 3, 2) / 8).astype(np.float32)

meta = encode_to_latent_cache(path, num_examples=37, read_batches=read_batches, encode_fn=encode_fn, num_shards=5)
mine = set().union(*(range(*b) for i, b in enumerate(shard_bounds(37, 5)) if i % 2 == pid))
assert set(seen) == mine, (pid, sorted(seen))
assert meta["count"] == 37
it = iter(make_latent_dataset(path, batch_size=8, seed=0, shuffle=False, repeat=False))  # rows of the global batch
local = next(it)
assert local["latents"].shape == (4, 3, 2)
batch = shard_batch(local, make_mesh())
assert batch["latents"].shape == (8, 3, 2) and len(jax.devices()) == 4
full = multihost_utils.process_allgather(batch["latents"], tiled=True)
x, _ = load_latent_cache(path)
np.testing.assert_array_equal(full, x[0:8])  # the first global batch, whatever the process count
print("OK", pid)
"""


def test_two_processes_encode_and_assemble_global_batches(tmp_path):
    with socket.socket() as s:  # a free local port (bind, not connect)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, str(script), str(p), str(port), str(tmp_path / "cache")], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "OK" in out, out[-3000:]


def test_device_prefetcher_yields_every_batch_of_a_finite_iterator():
    """Evaluation reads finite iterators through the prefetcher: the buffered tail must not be dropped."""
    mesh = make_mesh(default.get_config().mesh)
    batches = [{"x": np.full((8, 2), i, np.float32)} for i in range(5)]
    got = [int(jax.device_get(b["x"])[0, 0]) for b in DevicePrefetcher(iter(batches), mesh, size=3)]
    assert got == [0, 1, 2, 3, 4]
