"""Multi-process recovery (docs/scaling_out.md §4.1): a run resumes on another number of processes with the same global
data order, a per-process order refuses to with one error line, and SIGTERM on one process of two preempts both at
one step, from which both resume bit-exactly.

Fast: the global order in-process (simulated processes): the processes' rows make the one-process batches, epoch
after epoch, and their iterator states are one position; a checkpoint of "2 processes" (its data files named as
two processes write them) continues the same batches on one, bit-exactly; a per-process order refuses before
anything is written. Slow: the real thing through `python -m latent_lm.main`, two processes × 2 fake CPU devices
(gloo) against one process × 4: 2 → 1 and 1 → 2 processes, and SIGTERM to one process of two.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import cli_runs
import grain
import jax
import numpy as np
import pytest
from conftest import requires_espeak
from test_multihost import _free_port
from test_train_loop import REF_STEPS, ToyData, assert_same_state, train_toy

from data_pipelines import sharding, speech_corpus
from data_pipelines.audio_batches import make_audio_training_batches
from data_pipelines.embedded import load_embedded
from data_pipelines.image_pipeline import make_image_dataset
from data_pipelines.latent_cache import _Decode, make_latent_dataset, read_latent_cache_meta, write_latent_cache
from data_pipelines.packing import make_packed_dataset
from latent_lm.checkpoint import ProcessCountChangedError
from latent_lm.training.metrics_writer import read_metrics


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _global_batches(make, counts: tuple[int, ...], n: int) -> dict[int, list[dict]]:
    """{process count P: the first n global batches, each the P simulated processes' rows concatenated in order}."""
    out = {}
    for count in counts:
        its = [iter(make(p, count)) for p in range(count)]
        parts = [_take(it, n) for it in its]
        out[count] = [{k: np.concatenate([part[i][k] for part in parts]) for k in parts[0][i]} for i in range(n)]
        states = {json.dumps(it.get_state()) for it in its}
        assert len(states) == 1, states  # one position for every process: what lets another count continue it
        _close(its)
    return out


def _close(its) -> None:
    """Stops the iterators' read-ahead threads (grain reads hundreds of batches ahead), which would otherwise compete
    with the rest of the test for the cores."""
    for it in its:
        it.close()


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("recovery") / "train")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((50, 3, 2)).astype(np.float32)
    latents[:, 0, 0] = np.arange(50)  # the example's index, to follow it
    write_latent_cache(path, latents, np.arange(50) % 10, {}, num_shards=3)
    return path


def test_latent_cache_global_order_does_not_depend_on_the_process_count(small_cache):
    make = lambda p, count: make_latent_dataset(small_cache, 8, seed=1, process_index=p,  # noqa: E731
                                                process_count=count)
    got = _global_batches(make, (1, 2), 15)  # 120 rows: past two epochs of 50
    for count in (2,):
        for a, b in zip(got[1], got[count]):
            np.testing.assert_array_equal(a["latents"], b["latents"])
            np.testing.assert_array_equal(a["label"], b["label"])
    # One process reads what it read before the global order existed: the whole cache shuffled with `seed` itself.
    meta = read_latent_cache_meta(small_cache)
    source = grain.sources.ArrayRecordDataSource([f"{small_cache}/{f}" for f in meta["files"]])
    before = iter(grain.MapDataset.source(source).seed(1).shuffle().repeat().map(_Decode((3, 2))).batch(8)
                  .to_iter_dataset())
    for a, b in zip(got[1], _take(before, 15)):
        np.testing.assert_array_equal(a["latents"], b["latents"])
    _close([before])
    # Every epoch is a permutation of the cache, reshuffled: grain's shuffle().repeat() reseeds per epoch.
    order = np.concatenate([b["latents"][:, 0, 0] for b in got[1]]).astype(int)
    assert sorted(order[:50]) == sorted(order[50:100]) == list(range(50)) and list(order[:50]) != list(order[50:100])
    # A position saved by two processes continues the same global batches on one and on four.
    its = [iter(make(p, 2)) for p in range(2)]
    for it in its:
        _take(it, 9)
    state = json.loads(json.dumps(its[0].get_state()))
    _close(its)
    for count in (1, 4):
        resumed = [iter(make(p, count)) for p in range(count)]
        for it in resumed:
            it.set_state(state)
        rows = np.concatenate([next(it)["latents"] for it in resumed])
        np.testing.assert_array_equal(rows, got[1][9]["latents"])
        _close(resumed)


def test_image_dataset_global_order_and_a_single_pass_split_evenly():
    make = lambda p, count: make_image_dataset("mnist", "train", 32, seed=3, process_index=p,  # noqa: E731
                                               process_count=count)
    got = _global_batches(make, (1, 2), 3)
    for a, b in zip(got[1], got[2]):
        np.testing.assert_array_equal(a["image"], b["image"])
    # A single pass without drop_remainder: the last partial global batch (1,000 = 3·300 + 100) split evenly.
    single = lambda p, count: make_image_dataset("mnist", "test", 300, seed=0, shuffle=False,  # noqa: E731
                                                 repeat=False, drop_remainder=False, process_index=p,
                                                 process_count=count)
    labels = load_embedded("mnist", "test")[1]
    for count in (1, 2, 3):
        per = [list(single(p, count)) for p in range(count)]
        sizes = {tuple(len(b["label"]) for b in batches) for batches in per}
        assert sizes == {(300 // count,) * 3 + (100 // count,)}  # 3 processes: 33 rows each of the last 100
        rows = np.concatenate([np.concatenate([b["label"] for b in batch]) for batch in zip(*per)])
        np.testing.assert_array_equal(rows, labels[:1000 - 100 % count])  # in order, the remainder of 100 dropped


@requires_espeak
def test_audio_crops_global_order(tmp_path):
    """The audio σ-VAE's random crops are drawn from each utterance's global position: the same for any process
    count (a 12-utterance corpus, crops shorter than every utterance)."""
    from test_speech_corpus import tiny_config  # noqa: PLC0415  (a test module: importable once pytest runs)

    corpus = str(tmp_path / "corpus")
    speech_corpus.build_corpus(corpus, tiny_config(), log=lambda _: None)
    crop = min(len(a) for a in speech_corpus.load_corpus(corpus, "train").audio) // 2
    make = lambda p, count: make_audio_training_batches(corpus, 4, crop, seed=0, process_index=p,  # noqa: E731
                                                        process_count=count)
    got = _global_batches(make, (1, 2), 7)  # 28 crops: past two epochs of 12
    for a, b in zip(got[1], got[2]):
        np.testing.assert_array_equal(a["audio"], b["audio"])


class _Documents:
    """Four one-token text documents, for the packed pipeline."""

    def __len__(self) -> int:
        return 4

    def document(self, index: int) -> dict:
        return {"tokens": np.array([index], np.int32), "is_latent": np.zeros(1, bool),
                "latents": np.zeros((1, 2), np.float32)}


def test_which_pipelines_have_the_global_order(small_cache):
    """The fixed-shape pipelines declare the global order (what the train loop reads); the packed rows
    (data_pipelines/packing.py), packed per process, do not, and neither does an iterator that says nothing."""
    global_it = iter(make_latent_dataset(small_cache, 8, seed=0))
    assert isinstance(global_it, sharding.GlobalOrderIterator) and global_it.global_order
    _close([global_it])
    packed = iter(make_packed_dataset(_Documents(), 4, 2, seed=0, latent_capacity=0))
    assert next(packed)["tokens"].shape == (2, 4) and not getattr(packed, "global_order", False)
    assert not getattr(ToyData(), "global_order", False)


# ------------------------------------------------------------------ resuming a checkpoint of another process count

class GlobalToyData(ToyData):
    """The toy batches, declared global-order: every process would read the same position (as GlobalOrder does)."""

    global_order = True


def _as_written_by_two_processes(workdir, data_order: str | None) -> None:
    """Rewrites every checkpoint of a one-process run as two processes of the same run write it: one data file per
    process (a global order's positions are equal) and `data_order` in the meta (None: the key removed, as before
    runs recorded it)."""
    ckpts = os.path.join(workdir, "checkpoints")
    for step in os.listdir(ckpts):
        data = os.path.join(ckpts, step, "data")
        own = os.path.join(data, "process_0-of-1.json")
        for p in range(2):
            shutil.copy(own, os.path.join(data, f"process_{p}-of-2.json"))
        os.remove(own)
        meta_file = os.path.join(ckpts, step, "meta", "metadata")
        meta = json.load(open(meta_file))
        meta.pop("data_order", None)
        if data_order is not None:
            meta["data_order"] = data_order
        json.dump(meta, open(meta_file, "w"))


def _snapshot(workdir) -> dict[str, int]:
    return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
            for root, _, files in os.walk(workdir) for f in files}


def test_global_order_resumes_from_another_process_count_bit_exact(tmp_path, toy_reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(toy_reference.workdir, run)
    shutil.rmtree(run / "checkpoints" / str(REF_STEPS))  # as if stopped after step 16
    _as_written_by_two_processes(run, "global")
    logs = []
    res = train_toy(run, GlobalToyData(), log=logs.append)
    assert "resumed from step 16" in logs
    assert "checkpoint step 16 was written by 2 process(es): continuing its global data order on 1" in \
        capsys.readouterr().out
    assert_same_state(res.state, toy_reference.state)


@pytest.mark.parametrize("data, saved_order, why", [
    (ToyData(), "global", "gives each process its own stream"),  # a per-process pipeline (packed rows)
    (GlobalToyData(), "per_process", "its data position is per process"),
    (GlobalToyData(), None, "its data position is per process"),  # written before runs recorded their order
])
def test_per_process_order_refuses_another_process_count_before_writing(tmp_path, toy_reference, data, saved_order,
                                                                        why):
    run = tmp_path / "run"
    shutil.copytree(toy_reference.workdir, run)
    _as_written_by_two_processes(run, saved_order)
    before = _snapshot(run)
    with pytest.raises(ProcessCountChangedError) as error:
        train_toy(run, data)
    message = str(error.value)
    assert "\n" not in message and why in message, message  # the CLI prints it as one `error:` line
    assert f"checkpoint step {REF_STEPS}" in message and "written by 2 process(es) and this run has 1" in message
    assert "rerun with 2 process(es) (--num_processes=2), or start over in a new --workdir" in message
    assert _snapshot(run) == before  # nothing written, moved or quarantined


# ------------------------------------------------------------------------ the real thing: processes of the CLI

STEPS, EVERY = 24, 8
# Pure data parallelism, the data axis 4 wide on two processes × 2 fake devices and on one process × 4.
OVER = cli_runs.overrides(STEPS, **{"mesh.shape": (-1, 1, 1), "checkpoint.every": EVERY})


def _start(workdir: str, log: str, processes: int) -> list[subprocess.Popen]:
    if processes == 1:
        return [cli_runs.start(workdir, OVER, f"{log}0.log", num_devices=4)]
    port = _free_port()
    return [cli_runs.start(workdir, OVER, f"{log}{i}.log", f"--coordinator_address=127.0.0.1:{port}",
                           "--num_processes=2", f"--process_id={i}", num_devices=2)
            for i in range(processes)]


def _finish(procs: list[subprocess.Popen], log: str) -> str:
    """Waits for every process (killing them all if one fails or hangs); returns process 0's log."""
    try:
        for i, p in enumerate(procs):
            assert p.wait(timeout=600) == 0, open(f"{log}{i}.log").read()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return open(f"{log}0.log").read()


def _run(workdir: str, log: str, processes: int) -> str:
    return _finish(_start(workdir, log, processes), log)


def _losses(workdir: str) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in read_metrics(f"{workdir}/lm")}  # a resumed step: its redo
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return [by_step[s] for s in range(1, STEPS + 1)]


def _stopped_at(src: str, dst: str, step: int, *, drop_order: bool = False) -> str:
    """A copy of run `src` as if it had stopped after `step`: the later checkpoints removed. `drop_order`: its
    checkpoint's meta without `data_order`, as runs wrote it before they recorded their data order."""
    shutil.copytree(src, dst)
    ckpts = f"{dst}/lm/checkpoints"
    for name in os.listdir(ckpts):
        if int(name) > step:
            shutil.rmtree(f"{ckpts}/{name}")
    assert os.listdir(ckpts) == [str(step)]
    if drop_order:
        meta_file = f"{ckpts}/{step}/meta/metadata"
        meta = json.load(open(meta_file))
        assert meta.pop("data_order") == "global"
        json.dump(meta, open(meta_file, "w"))
    return dst


def _assert_close_params(a, b) -> None:
    """Another process count reduces in another order: equal to fp32 tolerance (as test_multihost)."""
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=2e-4)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The uninterrupted two-process run that the slow tests compare against (checkpoints 8, 16 and 24)."""
    workdir = str(tmp_path_factory.mktemp("two_process_run"))
    cli_runs.write_synthetic_cache(workdir)
    _run(workdir, f"{workdir}/process", 2)
    return workdir, _losses(workdir), cli_runs.trained_params(workdir, OVER)


@pytest.mark.slow
def test_resume_on_another_process_count_continues_the_global_data_order(tmp_path, two_process_run):
    ref, ref_losses, ref_state = two_process_run
    one = str(tmp_path / "one")
    cli_runs.write_synthetic_cache(one)
    _run(one, f"{tmp_path}/one", 1)
    # The same global batches on one process as on two: the same loss at every step (another batch would differ
    # by percents, the reduction order by ≤ 1e-6).
    np.testing.assert_allclose(_losses(one), ref_losses, rtol=1e-5)
    _assert_close_params(cli_runs.trained_params(one, OVER), ref_state)

    # 2 → 1: the two-process run stopped after step 8, continued by one process.
    two_to_one = _stopped_at(ref, str(tmp_path / "two_to_one"), EVERY)
    out = _run(two_to_one, f"{tmp_path}/two_to_one", 1)
    assert f"resumed from step {EVERY}" in out
    assert f"checkpoint step {EVERY} was written by 2 process(es): continuing its global data order on 1" in out
    np.testing.assert_allclose(_losses(two_to_one), ref_losses, rtol=1e-5)
    _assert_close_params(cli_runs.trained_params(two_to_one, OVER), ref_state)

    # 1 → 2, from a one-process checkpoint written as before runs recorded their data order (one process's
    # stream was the global order already).
    one_to_two = _stopped_at(one, str(tmp_path / "one_to_two"), EVERY, drop_order=True)
    out = _run(one_to_two, f"{tmp_path}/one_to_two", 2)
    assert f"resumed from step {EVERY}" in out
    assert f"checkpoint step {EVERY} was written by 1 process(es): continuing its global data order on 2" in out
    np.testing.assert_allclose(_losses(one_to_two), ref_losses, rtol=1e-5)
    _assert_close_params(cli_runs.trained_params(one_to_two, OVER), ref_state)


def _last_step(log: str) -> int:
    steps = re.findall(r"\[lm\] step (\d+)/", open(log).read()) if os.path.exists(log) else []
    return int(steps[-1]) if steps else 0


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_preempts_both_at_one_step(tmp_path, two_process_run):
    """SIGTERM to process 1 alone: JAX's preemption notifier (armed by jax.distributed.initialize) tells the
    coordination service, both processes reach the sync point at the same step, save it and exit 0; the same
    command on both resumes there and ends bit-identical to the uninterrupted two-process run."""
    _, _, ref_state = two_process_run
    run, log = str(tmp_path / "run"), f"{tmp_path}/run"
    cli_runs.write_synthetic_cache(run)
    procs = _start(run, log, 2)
    t0 = time.time()
    while _last_step(f"{log}0.log") < 3 and all(p.poll() is None for p in procs) and time.time() - t0 < 600:
        time.sleep(0.005)
    procs[1].send_signal(signal.SIGTERM)
    _finish(procs, log)
    saved = [re.findall(r"preempted: checkpoint of step (\d+) saved", open(f"{log}{i}.log").read()) for i in (0, 1)]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved  # one preemption, the same step on both
    step = int(saved[0][0])
    # Exit status 0 on both (`_finish`): SIGTERM's default action would have killed process 1.
    assert 3 <= step < STEPS and max(int(n) for n in os.listdir(f"{run}/lm/checkpoints")) == step

    out = _run(run, f"{tmp_path}/again", 2)
    assert f"resumed from step {step}" in out
    state = cli_runs.trained_params(run, OVER)
    assert int(state.step) == STEPS
    for x, y in zip(jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
                    jax.tree.leaves((ref_state.params, ref_state.ema_params, ref_state.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
