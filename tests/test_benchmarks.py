"""Every script in benchmarks/ runs at a tiny size and prints the figures docs/benchmarks.md and docs/pytorch.md §4.1
quote, in the format they quote them, all finite. Nothing here looks at speed: only that each documented figure
still has a working script behind it.

Each script runs as the docs run it (`python benchmarks/<script>.py …`: its own sys.path set-up and `__main__`
line), with conftest's JAX_DISABLE_MOST_OPTIMIZATIONS=1 (speed is never asserted here). The subprocesses share
conftest's run-wide compilation cache, so input_pipeline.py loads the train step that train_step.py compiled (same
model, batch, optimizer and flags)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = r"(-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)"  # a printed figure; nan/inf are matched so that the finiteness check fails
TINY_MODEL = ["--width=32", "--depth=1", "--head_depth=1"]


def _run(script: str, *args: str) -> str:
    """stdout of `python benchmarks/<script> args` (which must succeed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _figures(pattern: str, text: str) -> list[float]:
    """The numbers of the one line of `text` that matches `pattern` (NUM groups), each checked finite."""
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no line matches {pattern!r} in:\n{text}"
    values = [float(v) for v in found.groups()]
    assert all(math.isfinite(v) for v in values), (pattern, found.group(0))
    return values


def test_train_step_prints_time_flops_and_fraction_of_peak():
    """docs/benchmarks.md §2: FLOP/step (backbone + head), time/step, achieved FLOP/s, measured matmul peak, MFU."""
    text = _run("train_step.py", *TINY_MODEL, "--batch=8", "--steps=1", "--matmul_n=256")
    assert re.search(r"^device: \S+.*model: width 32 depth 1 head 1  batch 8 × 49 tokens  head ×4  float32  host huge pages: (on|off)$", text,
                     re.MULTILINE), text
    ms, total, backbone, head = _figures(rf"^train step: {NUM} ms   FLOPs/step {NUM} G \(backbone {NUM} G, "
                                         rf"head {NUM} G\)$", text)
    assert ms > 0 and abs(backbone + head - total) <= 0.011  # the parts sum to the total (2-decimal rounding)
    achieved, peak, mfu = _figures(rf"^achieved {NUM} GFLOP/s   peak \(measured matmul\) {NUM} GFLOP/s   "
                                   rf"ratio \(MFU\) {NUM}$", text)
    assert peak > 0 and achieved >= 0 and mfu >= 0


@pytest.mark.slow  # 23 s: a torch export and eager steps; the fast sibling runs the same script's default mode
def test_train_step_against_the_pytorch_twin_prints_both_step_times_and_their_ratio():
    """docs/benchmarks.md §2: the PyTorch twin's eager train step at the same config, at 1 and 2 threads, and the
    ratio of the better one to the JAX step."""
    text = _run("train_step.py", *TINY_MODEL, "--batch=4", "--steps=1", "--matmul_n=256", "--against=torch")
    (jax_ms,) = _figures(rf"^train step: {NUM} ms", text)
    best, one, two = _figures(rf"^PyTorch twin train step \(eager\): {NUM} ms \(1 thread {NUM} ms, 2 threads {NUM} "
                              rf"ms\)$", text)
    (ratio,) = _figures(rf"^PyTorch / JAX step time: {NUM}x$", text)
    assert best == min(one, two) > 0 and abs(ratio - best / jax_ms) <= 0.02 * ratio + 0.01


@pytest.mark.slow  # 30 s: two multimodal train steps compiled; the fast sibling runs the same script's default mode
def test_train_step_times_the_gathered_head_against_the_head_everywhere():
    """docs/benchmarks.md §2: the multimodal step with the head on the latent targets only and on every position, side
    by side; the FLOPs ratio follows from the shapes (row 128, 13 latent targets at fraction 0.1)."""
    text = _run("train_step.py", "--mllm", "--latent_fraction=0.1", *TINY_MODEL, "--batch=2", "--steps=1")
    assert "batch 2 × 128 positions, 13 latent targets per row" in text, text
    (gathered_ms,) = _figures(rf"^head on gathered +step +{NUM} ms", text)
    (everywhere_ms,) = _figures(rf"^head on every position +step +{NUM} ms", text)
    speed, flops = _figures(rf"^gathered head: {NUM}× faster step \(FLOPs ratio {NUM}×\)$", text)
    assert gathered_ms > 0 and everywhere_ms > 0 and speed > 0 and flops > 1.5


def test_sampling_prints_both_samplers_and_the_speed_up():
    """docs/benchmarks.md §1: images/s of the compiled KV-cache sampler and of the no-cache reference, their ratio."""
    text = _run("sampling.py", *TINY_MODEL, "--tokens=2", "--batch=2", "--steps=2", "--repeats=1")
    assert re.search(r"^device: \S+.*width 32 depth 1 head 1  2 tokens × 4  K=2  CFG 3.0  float32  matmul peak "
                     r"[0-9.]+ GFLOP/s  host huge pages: (on|off)$", text, re.MULTILINE), text
    fast_rate, fast_s, compile_s = _figures(rf"^batch 2: compiled KV-cache sampler: {NUM} images/s \({NUM} s/batch, "
                                            rf"first call incl. compile {NUM} s\)$", text)
    ref_rate, ref_s = _figures(rf"^batch 2: no-cache reference sampler: {NUM} images/s \({NUM} s/batch\)$", text)
    (speed_up,) = _figures(rf"^batch 2: speed-up of the compiled KV-cache sampler: {NUM}x$", text)
    assert min(fast_rate, ref_rate, speed_up) > 0 and min(fast_s, ref_s, compile_s) >= 0


def test_sampling_against_the_pytorch_twin_prints_a_row_per_batch():
    """docs/benchmarks.md §1: the compiled sampler against the PyTorch twin's eager sampler at 1 and 2 threads, one
    table row per batch size with the ratio of the images/s printed above it."""
    text = _run("sampling.py", *TINY_MODEL, "--tokens=4", "--batch=1,3", "--steps=2", "--repeats=1",
                "--against=torch")
    for batch in (1, 3):
        (ours,) = _figures(rf"^batch {batch}: compiled KV-cache sampler: {NUM} images/s", text)
        best, one, two = _figures(rf"^batch {batch}: PyTorch twin, eager: {NUM} images/s \(1 thread {NUM}, "
                                  rf"2 threads {NUM}\)$", text)
        assert best == max(one, two) > 0
        row = _figures(rf"^\| {batch} \| {NUM} \| {NUM} \| \*\*{NUM}×\*\* \|$", text)
        assert row[:2] == [ours, best] and abs(row[2] - ours / best) <= 0.01 * row[2] + 0.01


def test_sampling_against_the_dit_twin_prints_both_sizes_and_the_ratio():
    """docs/benchmarks.md §1: LatentLM's sampler against the DiT twin of the same width and depth: both parameter
    counts, the DiT's images/s and the throughput ratio of the two rates printed."""
    text = _run("sampling.py", *TINY_MODEL, "--tokens=4", "--batch=2", "--steps=2", "--repeats=1", "--against=dit")
    lm, dit = _figures(rf"^parameters: LatentLM {NUM} M, DiT twin {NUM} M$", text)
    (ours,) = _figures(rf"^batch 2: compiled KV-cache sampler: {NUM} images/s", text)
    theirs, _ = _figures(rf"^batch 2: DiT twin, whole-image sampler: {NUM} images/s \({NUM} s/batch\)$", text)
    (ratio,) = _figures(rf"^batch 2: LatentLM / DiT sampling throughput: {NUM}x$", text)
    assert lm > 0 and dit > 0 and abs(ratio - ours / theirs) <= 0.01 * ratio + 0.01


def test_input_pipeline_prints_fed_and_synthetic_step_times_and_their_ratio():
    """docs/benchmarks.md §3: per-step time fed by the real pipeline (a temporary cache of MNIST images encoded by a
    random σ-VAE) and by a synthetic batch, their ratio, and the pipeline alone."""
    text = _run("input_pipeline.py", "--num_examples=64", *TINY_MODEL, "--batch=8", "--steps=2", "--rounds=2")
    _figures(rf"^built a temporary cache of the MNIST train split in {NUM} s$", text)
    assert re.search(r"^device: \S+.*batch 8 × 49 tokens × 4 channels  grain workers 0  cache \(temporary\)$", text,
                     re.MULTILINE), text
    fed = _figures(rf"^train step fed by the cached-latent pipeline: {NUM} ms/step \(rounds: {NUM}, {NUM}\)$", text)
    synth = _figures(rf"^train step fed by a synthetic on-device batch: {NUM} ms/step \(rounds: {NUM}, {NUM}\)$",
                     text)
    ratio, alone, faster = _figures(rf"^ratio pipeline/synthetic: {NUM}   \(the pipeline alone: {NUM} ms/batch, "
                                    rf"{NUM}× faster than the step\)$", text)
    assert min(fed + synth) > 0 and ratio > 0 and alone > 0 and faster >= 0
    # The headline figure is the median over the rounds (of 2: their mean), as printed to 0.1 ms.
    assert fed[0] == pytest.approx(sum(fed[1:]) / 2, abs=0.1) and synth[0] == pytest.approx(sum(synth[1:]) / 2, abs=0.1)


# The figures docs/pytorch.md §4.1 quotes, as torch_export_parity.py names them in parity.json and its table.
PARITY_KEYS = ["num_samples", "cfg_scale", "sampling_steps", "params", "latent_max_abs_diff", "latent_mean_abs_diff",
               "latent_frac_diff_over_1e-4", "control_jax_vs_jax_latent_max_abs_diff",
               "control_jax_vs_jax_latent_mean_abs_diff", "pixels_differing_uint8", "pixel_max_abs_diff_uint8",
               "export_seconds", "jax_sampling_seconds", "torch_sampling_seconds", "torch_threads",
               "jax_conditional_accuracy", "jax_fd", "torch_conditional_accuracy", "torch_fd", "prediction_agreement"]


@pytest.mark.slow
def test_torch_export_parity_prints_and_writes_the_comparison(tiny_run_workdir, tmp_path):
    """docs/pytorch.md §4.1: a run's checkpoint exported, sampled in JAX and in PyTorch from the same noise, both
    scored by the run's classifier; parity.json and the printed table hold the same figures, and they agree.

    Slow (about 12 s of CPU: two sampler programs, the decoder and the classifier compile, checkpoints restore).
    Its pieces are fast in test_convert.py: the default export is the EMA weights
    (test_to_torch_exports_the_ema_weights_by_default), PyTorch samples what JAX samples from the same noise
    (test_cfg_sampling_from_the_same_noise_gives_the_same_latents), and sampling from an export with PyTorch alone
    (test_torch_sampling_cli_samples_an_export_with_pytorch_alone)."""
    text = _run("torch_export_parity.py", "--workdir", tiny_run_workdir["workdir"], "--out", str(tmp_path / "export"))
    with open(tmp_path / "export" / "parity.json") as f:
        result = json.load(f)
    assert list(result) == PARITY_KEYS
    # The run's eval settings: 1 sample per class, its 2 solver steps and CFG 3, its EMA weights (eval.use_ema).
    assert (result["num_samples"], result["sampling_steps"], result["cfg_scale"], result["params"]) == (10, 2, 3.0,
                                                                                                        "ema")
    lines = text.strip().splitlines()
    assert [line.split()[0] for line in lines] == PARITY_KEYS
    for line, (key, value) in zip(lines, result.items()):
        printed = line.split()[1]
        if isinstance(value, float):
            assert math.isfinite(value) and float(printed) == pytest.approx(value, rel=1e-5), key
        else:
            assert printed == str(value), key
    # The same weights and noise in both frameworks: the export samples what JAX samples.
    assert result["latent_max_abs_diff"] < 1e-3 and result["prediction_agreement"] >= 0.9
    assert 0 <= result["jax_conditional_accuracy"] <= 1 and result["jax_fd"] >= 0
