"""Workdirs on gs:// (issue 5): storage helpers, the latent cache, metrics and the train loop's checkpoints in a bucket.

The bucket is a fake held in this process's memory and reached by all three clients a real run uses:
  - etils.epath (latent_lm.storage, orbax's metadata files, grain's iterator state) through fsspec, for which
    `FakeGCS` is registered as "gs"/"gcs" (epath asks fsspec for "gcs" when TensorFlow is absent);
  - TensorStore (orbax's arrays) through the GCS JSON API, served by `_GCSHandler` on 127.0.0.1
    (TENSORSTORE_GCS_HTTP_URL; GCE_METADATA_ROOT points at the same server, whose 404 means "no credentials");
  - ArrayRecord's reader (google-cloud-cpp) through the same server (CLOUD_STORAGE_EMULATOR_ENDPOINT).
Nothing leaves the machine: Python sockets may only connect to the loopback address, and the test checks that no
local `gs:` directory appears (what os.path-based code makes of gs://bucket/x).
"""

from __future__ import annotations

import glob as _glob
import http.server
import importlib
import io
import itertools
import json
import os
import socket
import sys
import tempfile
import threading
import types
import urllib.parse

import fsspec
import jax
import ml_collections
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from test_train_loop import REF_STEPS, Interrupted, ToyTask, assert_same_state, configs, toy_data, train_toy

from data_pipelines.latent_cache import (
    encode_to_latent_cache,
    load_latent_cache,
    make_latent_dataset,
    read_latent_cache_meta,
    write_latent_cache,
)
from latent_lm import storage
from latent_lm.checkpoint import Checkpointer
from latent_lm.evaluation.classifier import load_classifier, save_classifier
from latent_lm.evaluation.grids import save_image_grid
from latent_lm.parallel.mesh import DEFAULT_RULES, make_mesh
from latent_lm.training.metrics_writer import MetricsWriter, read_metrics
from latent_lm.training.train_loop import Preempted, load_state


# ----------------------------------------------------------------------------------------------------------------
# The fake bucket.

class _Object(MemoryFile):
    """An upload: visible once closed, as on GCS (fsspec's MemoryFile publishes an empty object at open), and then
    immutable (what it publishes is a copy; a second close, e.g. by the garbage collector, publishes nothing)."""

    def commit(self):
        pass

    def seekable(self):
        return False

    def seek(self, *args):  # an upload streams forward, as gcsfs's does (zipfile, i.e. np.savez, copes)
        raise io.UnsupportedOperation("seek in an object being uploaded")

    def close(self):
        if getattr(self, "_published", False):
            return
        self._published = True
        FakeGCS.put(self.path, self.getvalue())


class FakeGCS(MemoryFileSystem):
    """GCS semantics on fsspec's memory filesystem: keys "bucket/name", no directories (a prefix exists while an
    object lies under it), no appends, whole-object writes."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs = [""]
    lock = threading.RLock()
    _generations: dict = {}
    _counter = itertools.count(1)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.strip("/")

    @classmethod
    def put(cls, key: str, data: bytes) -> None:
        """Publishes an object (a new generation), as a finished upload does."""
        with cls.lock:
            cls.store[key] = MemoryFile(None, key, data)
            cls.generation(key)

    @classmethod
    def generation(cls, key: str) -> int:
        """GCS object generation (0: absent); a new object under the same name gets a new one."""
        obj = cls.store.get(key)
        if obj is None:
            return 0
        known = cls._generations.get(key)
        if known is None or known[0] is not obj:
            cls._generations[key] = (obj, next(cls._counter))
        return cls._generations[key][1]

    def mkdir(self, path, create_parents=True, **kwargs):
        pass

    def makedirs(self, path, exist_ok=False):
        pass

    def rmdir(self, path):
        pass

    def _open(self, path, mode="rb", **kwargs):
        if mode in ("wb", "xb"):
            path = self._strip_protocol(path)
            if mode == "xb" and self.exists(path):
                raise FileExistsError(path)
            return _Object(self, path)
        if mode != "rb":
            raise ValueError(f"GCS objects cannot be opened in mode {mode!r}")
        return super()._open(path, mode, **kwargs)

    def cp_file(self, path1, path2, **kwargs):
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.isfile(path1):
            self.put(path2, self.store[path1].getvalue())
        elif not self.isdir(path1):
            raise FileNotFoundError(path1)


class _GCSHandler(http.server.BaseHTTPRequestHandler):
    """The GCS JSON API calls TensorStore and google-cloud-cpp make: media upload, object get (metadata or media,
    with Range and generation preconditions), list by prefix, delete."""

    protocol_version = "HTTP/1.1"
    requests: list = []

    def log_message(self, *args):
        pass

    def _reply(self, code, body=b"", headers=()):
        if isinstance(body, dict):
            body, headers = json.dumps(body).encode(), (*headers, ("Content-Type", "application/json"))
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _parse(self):
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        parts = url.path.split("/")
        if parts[1:2] == ["download"]:
            parts = parts[1:]
        self.requests.append((self.command, url.path, query, self.headers.get("User-Agent", "")))
        return parts, query

    @staticmethod
    def _meta(bucket, name, key):
        return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(FakeGCS.store[key].size),
                "generation": str(FakeGCS.generation(key)), "metageneration": "1"}

    @staticmethod
    def _precondition(key, query):
        gen = FakeGCS.generation(key)
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != gen:
            return 412
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == gen:
            return 304
        return None

    def do_GET(self):
        parts, query = self._parse()
        if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 6 or parts[5] != "o":
            return self._reply(404)  # the GCE metadata server: no credentials here, so anonymous requests
        bucket = parts[4]
        with FakeGCS.lock:
            if len(parts) == 6:  # list
                prefix, start, end = query.get("prefix", ""), query.get("startOffset", ""), query.get("endOffset")
                items = [self._meta(bucket, k[len(bucket) + 1:], k) for k in sorted(FakeGCS.store)
                         if k.startswith(f"{bucket}/{prefix}") and k[len(bucket) + 1:] >= start
                         and (end is None or k[len(bucket) + 1:] < end)]
                return self._reply(200, {"kind": "storage#objects", **({"items": items} if items else {})})
            name = urllib.parse.unquote("/".join(parts[6:]))
            key = f"{bucket}/{name}"
            if key not in FakeGCS.store:
                return self._reply(404, {"error": {"code": 404, "message": f"no object {key}"}})
            meta = self._meta(bucket, name, key)
            headers = [("x-goog-generation", meta["generation"]), ("x-goog-metageneration", "1")]
            if code := self._precondition(key, query):
                return self._reply(code, b"", headers)
            if query.get("alt") != "media":
                return self._reply(200, meta, headers)
            data = FakeGCS.store[key].getvalue()
        if rng := self.headers.get("Range"):
            lo, hi = rng.removeprefix("bytes=").split("-")
            lo = int(lo) if lo else max(0, len(data) - int(hi))  # "bytes=-N": the last N bytes
            hi = min(int(hi), len(data) - 1) if hi and rng.split("=")[1][0] != "-" else len(data) - 1
            chunk = data[lo:hi + 1]
            return self._reply(206, chunk, [*headers, ("Content-Range", f"bytes {lo}-{hi}/{len(data)}")])
        return self._reply(200, data, headers)

    def do_POST(self):
        parts, query = self._parse()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if parts[1:5] != ["upload", "storage", "v1", "b"] or query.get("uploadType") != "media":
            return self._reply(400, {"error": {"code": 400, "message": f"not emulated: {self.path}"}})
        bucket, name = parts[5], query["name"]
        key = f"{bucket}/{name}"
        with FakeGCS.lock:
            if self._precondition(key, query):
                return self._reply(412)
            FakeGCS.put(key, body)
            return self._reply(200, self._meta(bucket, name, key))

    def do_DELETE(self):
        parts, query = self._parse()
        key = f"{parts[4]}/{urllib.parse.unquote('/'.join(parts[6:]))}"
        with FakeGCS.lock:
            if key not in FakeGCS.store:
                return self._reply(404)
            if self._precondition(key, query):
                return self._reply(412)
            del FakeGCS.store[key]
        return self._reply(204)


class _StorageClient:
    """google-cloud-storage's Client as orbax uses it: is the bucket's namespace hierarchical? (no)"""

    def get_bucket(self, name):
        return types.SimpleNamespace(name=name, hierarchical_namespace_enabled=False)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """Routes gs:// to the fake for this module; yields the fake's object store ({"bucket/name": file})."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GCSHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with pytest.MonkeyPatch.context() as mp:
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, FakeGCS, clobber=True)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem per protocol
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        mp.setenv("GCE_METADATA_ROOT", url.removeprefix("http://"))
        mp.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)
        mp.setenv("CLOUDSDK_CONFIG", str(tmp_path_factory.mktemp("no_gcloud_credentials")))
        mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        # orbax asks google-cloud-storage (in the [gcs] extra, not installed for tests) whether the bucket has a
        # hierarchical namespace before listing steps: a stand-in module answers for the fake bucket (flat).
        client_module = types.ModuleType("google.cloud.storage")
        client_module.Client = _StorageClient
        mp.setitem(sys.modules, "google.cloud.storage", client_module)
        # google.cloud is a namespace package here (googleapis-common-protos, a dependency of tensorflow-datasets).
        mp.setattr(importlib.import_module("google.cloud"), "storage", client_module, raising=False)
        connect = socket.socket.connect

        def loopback_only(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
                raise OSError(f"test tried to reach the network: {address}")
            return connect(sock, address)

        mp.setattr(socket.socket, "connect", loopback_only)
        try:
            yield FakeGCS.store
        finally:
            server.shutdown()
            server.server_close()
            for protocol in ("gs", "gcs"):  # back to fsspec's default (gcsfs, when installed)
                importlib.import_module("fsspec.registry")._registry.pop(protocol, None)
            epath_backend.fsspec_backend._get_filesystem.cache_clear()
            storage._check_scheme.cache_clear()


@pytest.fixture
def no_local_gs_dirs(tmp_path, monkeypatch):
    """Runs the test in tmp_path and checks that nothing wrote a local `gs:` directory (os.path on a URL)."""
    monkeypatch.chdir(tmp_path)
    yield
    leaked = [p for p in (tmp_path / "gs:", os.path.join(tempfile.gettempdir(), "gs:")) if os.path.exists(p)]
    assert not leaked, f"gs:// paths were written to the local disk: {leaked}"


def _keys(store, prefix):
    return sorted(k for k in store if k.startswith(prefix))


# ----------------------------------------------------------------------------------------------------------------
# Tests.

def test_is_url_join_absolute():
    assert storage.is_url("gs://b/x") and storage.is_url("s3://b") and not storage.is_url("/tmp/x")
    assert not storage.is_url("C:\\runs") and not storage.is_url("runs/x")
    assert storage.join("gs://b/runs", "x", "y.json") == "gs://b/runs/x/y.json"
    assert storage.absolute("gs://b/runs/x") == "gs://b/runs/x"
    assert storage.absolute("runs/x") == os.path.abspath("runs/x")
    assert storage.dirname("gs://b/runs/x/") == "gs://b/runs" and storage.basename("gs://b/runs/x") == "x"


def test_unreachable_scheme_is_one_clear_error():
    with pytest.raises(storage.MissingBackendError, match="nosuchfs:// paths need an fsspec filesystem"):
        storage.makedirs("nosuchfs://bucket/run")
    with pytest.raises(storage.MissingBackendError):
        storage.write_text_atomic("nosuchfs://bucket/run/x.txt", "x")


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_storage_helpers(where, bucket, tmp_path, no_local_gs_dirs):
    root = str(tmp_path / "root") if where == "local" else f"gs://bucket/helpers-{where}"
    storage.makedirs(root)
    storage.write_text_atomic(storage.join(root, "a", "b.txt"), "hello\n")
    storage.write_json_atomic(storage.join(root, "a", "c.json"), {"x": [1, 2]}, indent=2)
    storage.write_npz_atomic(storage.join(root, "arrays.npz"), images=np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert storage.read_text(storage.join(root, "a", "b.txt")) == "hello\n"
    assert json.loads(storage.read_text(storage.join(root, "a", "c.json"))) == {"x": [1, 2]}
    with storage.open_file(storage.join(root, "arrays.npz")) as f, np.load(f) as npz:
        np.testing.assert_array_equal(npz["images"], np.arange(12).reshape(3, 4))
    assert storage.isdir(storage.join(root, "a")) and not storage.isdir(storage.join(root, "a", "b.txt"))
    assert sorted(storage.listdir(root)) == ["a", "arrays.npz"]
    assert sorted(storage.basename(p) for p in storage.glob(storage.join(root, "a", "*.json"))) == ["c.json"]
    assert sorted(storage.basename(p) for p in storage.walk_files(root)) == ["arrays.npz", "b.txt", "c.json"]
    assert all(storage.is_url(p) for p in storage.walk_files(root)) == (where == "bucket")

    # A writer that fails half-way leaves neither the target nor its temporary file.
    target = storage.join(root, "a", "b.txt")
    with pytest.raises(RuntimeError, match="half-way"), storage.atomic_open(target, "w") as f:
        f.write("partial")
        raise RuntimeError("half-way")
    assert storage.read_text(target) == "hello\n"
    assert storage.glob(storage.join(root, "a", "*.tmp-*")) == []

    storage.replace(target, storage.join(root, "a", "moved.txt"))
    assert not storage.exists(target) and storage.read_text(storage.join(root, "a", "moved.txt")) == "hello\n"
    storage.replace(storage.join(root, "a"), storage.join(root, "renamed"))  # a directory
    assert sorted(storage.listdir(storage.join(root, "renamed"))) == ["c.json", "moved.txt"]
    storage.remove(storage.join(root, "renamed", "c.json"))
    storage.remove(storage.join(root, "renamed", "c.json"), missing_ok=True)
    with pytest.raises(FileNotFoundError):
        storage.remove(storage.join(root, "renamed", "c.json"))
    storage.rmtree(storage.join(root, "renamed"))
    assert not storage.exists(storage.join(root, "renamed"))
    if where == "bucket":
        assert _keys(bucket, "bucket/helpers-bucket/") == ["bucket/helpers-bucket/arrays.npz"]


def test_png_msgpack_and_metrics_in_bucket(bucket, no_local_gs_dirs):
    save_image_grid(np.full((4, 8, 8, 1), 200, np.uint8), "gs://bucket/eval/grid.png", ncols=2)
    assert bucket["bucket/eval/grid.png"].getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    save_classifier(params, "gs://bucket/eval/classifier.msgpack")
    np.testing.assert_array_equal(load_classifier("gs://bucket/eval/classifier.msgpack")["dense"]["kernel"],
                                  params["dense"]["kernel"])

    # Two sessions (a run and its resume); the first flushes a part mid-way (flush_secs=0: every row).
    first = MetricsWriter("gs://bucket/metrics", flush_secs=0)
    for step in (1, 2):
        first.write(step, {"loss": 1.0 / step})
    first.close()
    second = MetricsWriter("gs://bucket/metrics", flush_secs=3600)  # buffers until close
    second.write(2, {"loss": 0.4})
    second.write(3, {"loss": 0.3})
    assert [r["step"] for r in read_metrics("gs://bucket/metrics")] == [1, 2]
    second.close()
    rows = read_metrics("gs://bucket/metrics")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (2, 0.4), (3, 0.3)]
    names = [k.rsplit("/", 1)[1] for k in _keys(bucket, "bucket/metrics/")]
    assert sum(n.startswith("metrics-") and n.endswith(".jsonl") for n in names) == 3, names
    events = [n for n in names if "tfevents" in n]
    assert events and all(n.rsplit(".", 1)[1].isdigit() for n in events)
    assert any(b"loss" in bucket[f"bucket/metrics/{n}"].getvalue() for n in events)


def test_latent_cache_in_bucket(bucket, no_local_gs_dirs):
    rng = np.random.default_rng(0)
    latents, labels = rng.standard_normal((10, 8, 2)).astype(np.float32), np.arange(10, dtype=np.int32) % 4
    leftovers = set(_glob.glob(os.path.join(tempfile.gettempdir(), ".latents-*")))
    before = len(_GCSHandler.requests)
    meta = encode_to_latent_cache("gs://bucket/cache", num_examples=10, num_shards=3, encode_fn=lambda x: x,
                                  read_batches=lambda s, e: [(latents[s:e], labels[s:e])], metadata={"v": 1})
    assert meta["count"] == 10 and read_latent_cache_meta("gs://bucket/cache")["files"] == meta["files"]
    assert _keys(bucket, "bucket/cache/") == sorted(
        [f"bucket/cache/{f}" for f in meta["files"]] + [f"bucket/cache/{f[:-13]}.json" for f in meta["files"]]
        + ["bucket/cache/meta.json"])
    x, y = load_latent_cache("gs://bucket/cache")
    np.testing.assert_array_equal(x, latents)
    np.testing.assert_array_equal(y, labels)
    batches = list(make_latent_dataset("gs://bucket/cache", 5, seed=0, shuffle=False, repeat=False))
    np.testing.assert_array_equal(np.concatenate([b["latents"] for b in batches]), latents)
    # ArrayRecord read the shards itself, over the JSON API (not through fsspec).
    media = [r for r in _GCSHandler.requests[before:] if r[2].get("alt") == "media" and "array_record" in r[1]]
    assert media, "ArrayRecord did not read the shards from the fake bucket"
    # Resumable: a re-run with the same fingerprint does nothing; the shards' local temporaries are gone.
    assert encode_to_latent_cache("gs://bucket/cache", num_examples=10, num_shards=3, encode_fn=None,
                                  read_batches=None, metadata={"v": 1}) == meta
    assert set(_glob.glob(os.path.join(tempfile.gettempdir(), ".latents-*"))) == leftovers
    # Replacing a whole cache in a bucket (directory renames are copies there).
    write_latent_cache("gs://bucket/cache", latents[:4] + 1, labels[:4], {"v": 2}, num_shards=2)
    np.testing.assert_array_equal(load_latent_cache("gs://bucket/cache")[0], latents[:4] + 1)
    assert [k for k in bucket if k.startswith("bucket/.cache")] == []


def test_train_checkpoints_to_bucket_and_resumes(bucket, toy_reference, no_local_gs_dirs):
    """The toy run with its workdir in the bucket, preempted at step 6 and resumed from the bucket: checkpoints
    (arrays through TensorStore's GCS driver), the data position and metrics all live there, and the run ends
    bit-identical to the local uninterrupted reference."""
    before = len(_GCSHandler.requests)
    with pytest.raises(Preempted):
        train_toy("gs://bucket/run", Interrupted(toy_data(), at=6))
    uploads = [r for r in _GCSHandler.requests[before:] if r[0] == "POST" and "tensorstore" in r[3]]
    assert uploads, "orbax's arrays did not go through TensorStore's GCS driver to the fake bucket"
    optim, train_cfg, _ = configs()
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])
    restored = load_state(ToyTask(), optim_config=optim, train_config=train_cfg, mesh=mesh, rules=DEFAULT_RULES,
                          workdir="gs://bucket/run")
    assert int(restored.step) == 6

    logs = []
    res = train_toy("gs://bucket/run", toy_data(), log=logs.append)
    assert "resumed from step 6" in logs
    assert_same_state(res.state, toy_reference.state)
    assert {k.split("/")[3] for k in _keys(bucket, "bucket/run/checkpoints/")} == {"8", "16", str(REF_STEPS)}
    last = f"bucket/run/checkpoints/{REF_STEPS}"
    for item in ("commit_success.txt", "state/manifest.ocdbt", "data/process_0-of-1.json", "meta/metadata"):
        assert f"{last}/{item}" in bucket, item
    # The data position went to the bucket and came back: the resumed run read batches 6.. (its result is exact),
    # and its last checkpoint records all REF_STEPS batches consumed.
    assert json.loads(bucket[f"{last}/data/process_0-of-1.json"].getvalue()) == {"next_index": REF_STEPS}
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [5, 10, 15, 20, REF_STEPS]


def test_damaged_checkpoint_in_bucket_is_moved_aside(bucket, no_local_gs_dirs, capsys):
    state = {"w": np.arange(6, dtype=np.float32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    ckpt = Checkpointer("gs://bucket/quarantine", async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step}, meta={"step": step})
    ckpt.wait()
    for key in _keys(bucket, "bucket/quarantine/2/state/"):
        if "/d/" in key:  # the OCDBT data files holding the arrays
            FakeGCS.put(key, b"garbage")
    restored, meta = ckpt.restore(abstract)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
    moved = {k.split("/")[2] for k in _keys(bucket, "bucket/quarantine/")}
    assert "2" not in moved and any(m.startswith("corrupt.2.") for m in moved), moved
    assert "WARNING: checkpoint step 2" in capsys.readouterr().out
    assert ckpt.latest_step() == 1
    ckpt.close()
