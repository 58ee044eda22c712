"""The variable-length audio latent cache (data_pipelines/audio_latents.py): records round-trip with their ids, the
moments are those of the σ-sampled latents, a re-run is a no-op, and a killed, partial, stale or damaged cache is never
read as complete. Synthetic latents, no JAX compile."""

import json
import os

import numpy as np
import pytest

from data_pipelines import audio_latents as al
from latent_lm.errors import DataError, MissingInputError

C = 3
STD = 0.5


def _utterances(n=7, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [1, 5, 2, 9, 3, 4, 6, 1, 2, 8][:n]
    return [(rng.normal(0.3, 1.5, (k, C)).astype(np.float32), 100 + i, 200 + 3 * i) for i, k in enumerate(lengths)]


def _write(path, utts, fingerprint="fp", num_shards=3, calls=None, fail_at=None, **kw):
    def encode_range(start, end):
        if calls is not None:
            calls.append((start, end))
        for i in range(start, end):
            if i == fail_at:
                raise RuntimeError("killed")
            yield utts[i]

    return al.write_audio_latent_cache(str(path), num_examples=len(utts), encode_range=encode_range, latent_dim=C,
                                       frame_rate=25.0, std=STD, num_shards=num_shards, fingerprint=fingerprint,
                                       **kw)


def _mtimes(d):
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)}


def test_round_trip_ids_order_and_moments(tmp_path):
    utts = _utterances()
    meta = _write(tmp_path / "train", utts, metadata=lambda m: {"latent_norm": {"scale": 1 / m["std"]}})
    data = al.load_audio_latents(str(tmp_path), "train")
    assert len(data) == len(utts) == meta["count"] and data.meta == meta
    for got, (mu, _, _) in zip(data.mu, utts):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, mu)
    assert data.speaker.tolist() == [u[1] for u in utts] and data.speaker.dtype == np.int32
    assert data.sentence.tolist() == [u[2] for u in utts]
    assert data.frames.tolist() == [len(u[0]) for u in utts] and meta["frames"] == sum(data.frames)
    # Moments of z = μ + σ_b·ε with σ_b ~ N(0, (std/0.8)²), in closed form over every value.
    allmu = np.concatenate([u[0] for u in utts]).astype(np.float64)
    m = meta["moments"]
    assert m["mean"] == pytest.approx(allmu.mean()) and m["mu_std"] == pytest.approx(allmu.std())
    assert m["std"] == pytest.approx(np.sqrt(allmu.var() + (STD / 0.8) ** 2)) and m["values"] == allmu.size
    assert meta["metadata"]["latent_norm"]["scale"] == pytest.approx(1 / m["std"])
    assert meta["latent_dim"] == C and meta["frame_rate"] == 25.0 and len(meta["files"]) == 3
    # The grain source gives the same records by index.
    src = al.AudioLatentSource(str(tmp_path), "train")
    assert len(src) == len(utts) and "AudioLatentSource(" in repr(src) and "0x" not in repr(src)
    rec = src[3]
    np.testing.assert_array_equal(rec["latents"], utts[3][0])
    assert (int(rec["speaker"]), int(rec["sentence"]), int(rec["index"])) == (utts[3][1], utts[3][2], 3)


def test_rerun_with_same_fingerprint_is_a_noop(tmp_path):
    utts = _utterances()
    _write(tmp_path / "s", utts)
    before = _mtimes(tmp_path / "s")
    calls = []
    _write(tmp_path / "s", utts, calls=calls)
    assert calls == [] and _mtimes(tmp_path / "s") == before


def test_killed_writer_leaves_no_readable_cache_and_resumes(tmp_path):
    utts = _utterances()  # shards [0,3) [3,5) [5,7)
    with pytest.raises(RuntimeError, match="killed"):
        _write(tmp_path / "s", utts, fail_at=4)
    files = sorted(os.listdir(tmp_path / "s"))
    assert "meta.json" not in files and not [f for f in files if ".tmp-" in f]
    assert files == ["audio_latents-00000-of-00003.array_record", "audio_latents-00000-of-00003.json"]
    with pytest.raises(MissingInputError, match="encode_audio"):
        al.load_audio_latents(str(tmp_path), "s")
    first = _mtimes(tmp_path / "s")
    calls = []
    _write(tmp_path / "s", utts, calls=calls)
    assert calls == [(3, 5), (5, 7)]  # the complete shard is kept
    assert _mtimes(tmp_path / "s")["audio_latents-00000-of-00003.array_record"] == \
        first["audio_latents-00000-of-00003.array_record"]
    assert len(al.load_audio_latents(str(tmp_path), "s")) == len(utts)


def test_new_fingerprint_drops_meta_before_rewriting(tmp_path):
    utts, other = _utterances(seed=0), _utterances(seed=1)
    _write(tmp_path / "s", utts, fingerprint="old")
    with pytest.raises(RuntimeError):  # a retrained σ-VAE whose encode dies half-way
        _write(tmp_path / "s", other, fingerprint="new", fail_at=4)
    with pytest.raises(MissingInputError):  # the old cache is not served as the new one
        al.load_audio_latents(str(tmp_path), "s")
    calls = []
    meta = _write(tmp_path / "s", other, fingerprint="new", calls=calls)
    assert calls == [(3, 5), (5, 7)] and meta["fingerprint"] == "new"
    np.testing.assert_array_equal(al.load_audio_latents(str(tmp_path), "s").mu[6], other[6][0])
    # Fewer shards: the files of the old layout go.
    _write(tmp_path / "s", other, fingerprint="new", num_shards=2)
    assert sorted(f for f in os.listdir(tmp_path / "s") if f.endswith(".array_record")) == [
        "audio_latents-00000-of-00002.array_record", "audio_latents-00001-of-00002.array_record"]


def test_missing_shard_or_damaged_record_is_an_error(tmp_path):
    utts = _utterances()
    _write(tmp_path / "s", utts)
    os.remove(tmp_path / "s" / "audio_latents-00001-of-00003.array_record")
    with pytest.raises(MissingInputError, match="missing 1 of its 3 shard files"):
        al.load_audio_latents(str(tmp_path), "s")
    with pytest.raises(DataError, match="damaged"):
        al.decode_record(al.encode_record(utts[1][0], 1, 2)[:-4], C)
    with pytest.raises(DataError, match="damaged"):
        al.decode_record(b"\x00", C)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["record_format"] == al.RECORD_FORMAT


def test_process_shards_then_process_zero_finalises(tmp_path):
    utts = _utterances()
    calls1, calls0 = [], []
    assert _write(tmp_path / "s", utts, calls=calls1, process_index=1, process_count=2) is None
    meta = _write(tmp_path / "s", utts, calls=calls0, process_index=0, process_count=2)
    assert calls1 == [(3, 5)] and calls0 == [(0, 3), (5, 7)]
    assert meta["count"] == len(utts) and len(al.load_audio_latents(str(tmp_path), "s")) == len(utts)


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="empty"):
        _write(tmp_path / "e", [])
    utts = _utterances()
    with pytest.raises(ValueError, match="latents"):
        _write(tmp_path / "w", [(np.zeros((2, C + 1), np.float32), 0, 0)] + utts[1:])
