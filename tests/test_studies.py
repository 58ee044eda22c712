"""Scaling-law fit and tokenizer-variance analysis (issue 5, "Studies"; docs/method.md §2.4, §4.6, §9, §10.2
Fig. 4/6), and the TTS study's table (docs/experiments.md §11)."""

import json
import logging
import os

import numpy as np
import pytest

from latent_lm.errors import DataError, MissingInputError
from latent_lm.cli import run as run_cli
from latent_lm.studies import scaling_law as sl
from latent_lm.studies import tokenizer_variance as tv
from latent_lm.studies import tts as tts_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMPUTE = np.geomspace(1e15, 1e19, 8)


def _curve(compute, a, b, c):
    return a * np.asarray(compute) ** (-b) + c


# ---------------------------------------------------------------------------------------------- power-law fit


@pytest.mark.parametrize("b", [0.1, 0.25, 0.5])
def test_fit_recovers_exponent_from_noisy_data(b):
    # Reducible loss 1.0 at the smallest run, floor 0.5, 0.2% multiplicative noise over 4 decades of compute.
    a, c = COMPUTE[0] ** b, 0.5
    for seed in range(5):
        loss = _curve(COMPUTE, a, b, c) * (1 + 0.002 * np.random.default_rng(seed).standard_normal(COMPUTE.size))
        fit = sl.fit_power_law(COMPUTE, loss)
        assert fit.b == pytest.approx(b, rel=0.15)
        assert fit.c == pytest.approx(c, abs=0.05)
        assert abs(fit.b - b) < 5 * fit.b_stderr
        assert fit.r2 > 0.99 and not fit.c_fixed
        np.testing.assert_allclose(fit.residuals, loss - fit.predict(COMPUTE), atol=1e-12)


@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e4])
@pytest.mark.parametrize("b,c", [(0.3, 0.25), (0.07, 2.0), (0.5, 0.0)])
def test_fit_is_exact_on_exact_data_at_any_flop_scale(scale, b, c):
    compute = COMPUTE * scale  # 1e10 … 1e23 FLOPs: the normalised parameterisation keeps the fit conditioned
    a = 3.0 * compute[0] ** b
    fit = sl.fit_power_law(compute, _curve(compute, a, b, c))
    assert fit.b == pytest.approx(b, rel=1e-6)
    assert fit.c == pytest.approx(c, abs=1e-6)
    assert fit.a == pytest.approx(a, rel=1e-5)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    assert max(abs(r) for r in fit.residuals) < 1e-8


def test_fit_with_three_points_falls_back_to_a_pure_power_law():
    compute = COMPUTE[::3]
    fit = sl.fit_power_law(compute, _curve(compute, 2.0 * compute[0] ** 0.2, 0.2, 0.0))
    assert fit.c_fixed and fit.c == 0.0 and fit.num_points == 3
    assert fit.b == pytest.approx(0.2, rel=1e-6)
    assert fit.b_stderr is not None  # one degree of freedom is left


@pytest.mark.parametrize("compute,loss,message", [
    ([1e15, 1e16], [2.0, 1.5], "at least 3 runs"),
    ([1e15, 1e15, 1e16, 1e16], [2.0, 1.9, 1.5, 1.4], "2 distinct compute"),
    ([1e15, 1e16, 1e17], [2.0, 1.5], "differ in length"),
    ([1e15, 0.0, 1e17], [2.0, 1.5, 1.2], "positive"),
    ([1e15, 1e16, 1e17], [2.0, float("nan"), 1.2], "finite"),
    ([1e15, 1e16, 1e17, 1e18], [1.0, 1.0, 1.0, 1.0], "all losses are equal"),
    ([1e15, 1e16, 1e17, 1e18], [1.0, 1.2, 1.3, 1.5], "does not fall with compute"),
    ([1e15, 1e16, 1e17], [1.0, 1.2, 1.3], "does not fall with compute"),
])
def test_fit_rejects_degenerate_input(compute, loss, message):
    with pytest.raises(DataError, match=message):
        sl.fit_power_law(compute, loss)


# ---------------------------------------------------------------------------------------------- fake run roots


def _write(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f)


def _config(arch="latent_lm", width=64, depth=2, kind="sigma", std=0.5, cfg=3.0):
    return {"model": {"arch": arch, "width": width, "depth": depth}, "vae": {"kind": kind, "std": std},
            "train": {"steps": 1000, "batch_size": 64}, "diffusion": {"cfg_scale": cfg}}


def _scaling_run(root, name, family, flops, loss, done=True, arch=None, width=64):
    _write(f"{root}/{name}/config.json", _config(arch or family, width=width))
    _write(f"{root}/{name}/eval/loss.json", {"eval_loss": loss, "family": family, "params": int(flops / 6e9),
                                             "train_flops": flops, "flops_per_step": flops / 1000, "steps": 1000})
    if done:
        _write(f"{root}/{name}/done.json", {})


def _scaling_root(root, families=("latent_lm", "dit")):
    exponents = {"latent_lm": 0.3, "dit": 0.2}
    for family in families:
        b = exponents[family]
        for i, flops in enumerate(COMPUTE[::2]):
            _scaling_run(root, f"{family}_{i}", family, float(flops), float(_curve(flops, COMPUTE[0] ** b, b, 0.4)),
                         width=32 * (i + 1))


def test_scaling_collect_skips_unfinished_runs_with_one_warning(tmp_path, caplog):
    root = str(tmp_path)
    _scaling_root(root)
    _scaling_run(root, "latent_lm_big", "latent_lm", 1e20, 0.41, done=False)
    _scaling_run(root, "dit_big", "dit", 1e20, 0.45, done=False)
    os.makedirs(f"{root}/scaling")  # an output folder inside the root is not a run
    _write(f"{root}/tokenizer/config.json", dict(_config(), stages=["train_vae", "encode"]))  # a sweep's tokenizer
    _write(f"{root}/tokenizer/done.json", {})
    with caplog.at_level(logging.WARNING):
        runs = sl.collect(root)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dit_big, latent_lm_big" in warnings[0] and "2 unfinished" in warnings[0]
    assert [r.name for r in runs] == [f"latent_lm_{i}" for i in range(4)] + [f"dit_{i}" for i in range(4)]
    first = runs[0]
    assert (first.family, first.train_flops, first.width, first.depth, first.steps, first.batch_size) == (
        "latent_lm", 1e15, 32, 2, 1000, 64)
    groups = sl.group_by_family(runs)
    assert list(groups) == ["latent_lm", "dit"] and all(len(g) == 4 for g in groups.values())


def test_scaling_collect_rejects_inconsistent_runs(tmp_path):
    _scaling_run(str(tmp_path / "a"), "r", "dit", 1e15, 1.0, arch="latent_lm")
    with pytest.raises(DataError, match="family 'dit' but config.json has model.arch='latent_lm'"):
        sl.collect(str(tmp_path / "a"))
    _scaling_run(str(tmp_path / "b"), "r", "latent_lm", 1e15, 1.0)
    os.remove(tmp_path / "b" / "r" / "eval" / "loss.json")
    with pytest.raises(MissingInputError, match="loss.json is missing"):
        sl.collect(str(tmp_path / "b"))
    with pytest.raises(MissingInputError, match="not a directory"):
        sl.collect(str(tmp_path / "nowhere"))


def test_scaling_fit_families_needs_three_runs_per_family(tmp_path):
    root = str(tmp_path)
    _scaling_root(root, families=("latent_lm",))
    _scaling_run(root, "dit_0", "dit", 1e15, 2.0)
    _scaling_run(root, "dit_1", "dit", 1e16, 1.5)
    with pytest.raises(DataError, match=r"family 'dit' has 2 finished run\(s\) \(dit_0, dit_1\)"):
        sl.fit_families(sl.collect(root))


def test_scaling_cli_writes_plot_json_and_markdown(tmp_path, capsys):
    root = str(tmp_path)
    _scaling_root(root)
    assert run_cli(sl.main, [f"--root={root}"]) == 0
    out = tmp_path / "scaling"
    assert (out / "scaling.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out / "scaling.json").read_text())
    assert summary["fits"]["latent_lm"]["b"] == pytest.approx(0.3, rel=1e-5)
    assert summary["fits"]["dit"]["b"] == pytest.approx(0.2, rel=1e-5)
    assert len(summary["runs"]) == 8
    markdown = (out / "scaling.md").read_text()
    assert "| LatentLM |" in markdown and "| DiT |" in markdown and "0.3000" in markdown
    assert markdown in capsys.readouterr().out
    assert not [p for p in os.listdir(out) if ".tmp-" in p]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(sl.main, [f"--root={empty}"]) == 2
    assert "error: no finished runs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- tokenizer variance


def _tokenizer_run(root, name, arch, kind, std, fd, acc, cfg=3.0, ratio=None, done=True):
    _write(f"{root}/{name}/config.json", _config(arch, kind=kind, std=std, cfg=cfg))
    _write(f"{root}/{name}/eval/final.json", {
        "sample_conditional_accuracy": acc, "sample_fd": fd, "random_latent_fd": 1300.0,
        "vae_psnr_db": 20.0 + 4 * (std if kind == "sigma" else 1.5),
        "variance_collapse_ratio": ratio if ratio is not None else (std if kind == "sigma" else 0.01),
        "num_samples": 1000, "cfg_scale": cfg})
    if done:
        _write(f"{root}/{name}/done.json", {})


def _tokenizer_root(root):
    # Fig. 6's shape: LatentLM's FD falls steeply with C_σ, DiT's barely moves; the KL control hurts LatentLM most.
    for std, lm_fd, dit_fd in ((1.0, 80.0, 90.0), (0.25, 300.0, 100.0), (0.5, 150.0, 95.0)):
        _tokenizer_run(root, f"lm_s{std}", "latent_lm", "sigma", std, lm_fd, 0.9 - 0.1 / std)
        _tokenizer_run(root, f"dit_s{std}", "dit", "sigma", std, dit_fd, 0.8)
    _tokenizer_run(root, "lm_kl", "latent_lm", "kl", 0.0, 600.0, 0.3)
    _tokenizer_run(root, "dit_kl", "dit", "kl", 0.0, 110.0, 0.75)


def test_tokenizer_table_orders_sigma_by_c_then_the_kl_control(tmp_path, caplog):
    root = str(tmp_path)
    _tokenizer_root(root)
    _tokenizer_run(root, "lm_s2_running", "latent_lm", "sigma", 2.0, 1.0, 1.0, done=False)
    with caplog.at_level(logging.WARNING):
        rows = tv.collect(root)
    assert "lm_s2_running" in caplog.text and all(r.name != "lm_s2_running" for r in rows)
    assert len(rows) == 8
    lines = tv.table(rows).strip().splitlines()
    assert lines[0] == ("| tokenizer | C_σ | collapse ratio r | PSNR (dB) | LatentLM acc | LatentLM FD | DiT acc "
                        "| DiT FD |")
    body = [line.split(" | ") for line in lines[2:]]
    assert [cells[1] for cells in body] == ["0.25", "0.5", "1", "—"]
    assert body[-1][0] == "| KL-VAE" and body[-1][2] == "0.0100"
    assert body[0][4:6] == ["50.0%", "300.00"] and body[0][6:8] == ["80.0%", "100.00 |"]
    assert body[2][3] == "24.00"


def test_tokenizer_summary_averages_seeds_and_picks_the_best_cfg(tmp_path):
    root = str(tmp_path)
    _tokenizer_run(root, "a_seed0", "latent_lm", "sigma", 0.5, fd=100.0, acc=0.90, cfg=3.0, ratio=0.40)
    _tokenizer_run(root, "a_seed1", "latent_lm", "sigma", 0.5, fd=120.0, acc=0.94, cfg=3.0, ratio=0.44)
    _tokenizer_run(root, "b", "latent_lm", "sigma", 0.5, fd=115.0, acc=0.99, cfg=1.5, ratio=0.42)
    (summary,) = tv.summarize(tv.collect(root))
    assert summary.collapse_ratio == pytest.approx(0.42) and "dit" not in summary.families
    best = summary.families["latent_lm"]
    assert (best.cfg_scale, best.num_runs, best.runs) == (3.0, 2, ("a_seed0", "a_seed1"))
    assert best.fd == pytest.approx(110.0) and best.accuracy == pytest.approx(0.92)
    table = tv.table(tv.collect(root))
    assert "110.00 (cfg 3)" in table and "| — | — |" in table


def test_tokenizer_collect_rejects_bad_runs(tmp_path):
    _tokenizer_run(str(tmp_path / "a"), "r", "latent_lm", "vq", 0.5, 100.0, 0.9)
    with pytest.raises(DataError, match="vae.kind 'vq' is not one of"):
        tv.collect(str(tmp_path / "a"))
    _tokenizer_run(str(tmp_path / "b"), "r", "latent_lm", "sigma", 0.5, float("nan"), 0.9)
    with pytest.raises(DataError, match="sample_fd must be a finite number"):
        tv.collect(str(tmp_path / "b"))
    _tokenizer_run(str(tmp_path / "c"), "r", "latent_lm", "sigma", 0.5, 100.0, 0.9)
    final = tmp_path / "c" / "r" / "eval" / "final.json"
    final.write_text(json.dumps({k: v for k, v in json.loads(final.read_text()).items() if k != "vae_psnr_db"}))
    with pytest.raises(DataError, match="final.json has no key 'vae_psnr_db'"):
        tv.collect(str(tmp_path / "c"))


def test_tokenizer_cli_writes_plot_json_and_markdown(tmp_path, capsys):
    root = str(tmp_path)
    _tokenizer_root(root)
    assert run_cli(tv.main, [f"--root={root}"]) == 0
    out = tmp_path / "tokenizer_variance"
    assert (out / "tokenizer_variance.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((out / "tokenizer_variance.json").read_text())
    assert [t["label"] for t in summary["tokenizers"]] == [
        "σ-VAE C_σ=0.25", "σ-VAE C_σ=0.5", "σ-VAE C_σ=1", "KL-VAE"]
    assert summary["tokenizers"][-1]["families"]["latent_lm"]["fd"] == 600.0 and len(summary["runs"]) == 8
    markdown = (out / "tokenizer_variance.md").read_text()
    assert markdown in capsys.readouterr().out

    # A KL-only root still plots (the control alone, no σ-VAE line).
    kl_root = tmp_path / "kl_only"
    _tokenizer_run(str(kl_root), "lm_kl", "latent_lm", "kl", 0.0, 600.0, 0.3)
    tv.plot(tv.collect(str(kl_root)), str(kl_root / "p.png"))
    assert (kl_root / "p.png").read_bytes()[:8] == PNG_MAGIC

    assert run_cli(tv.main, [f"--root={tmp_path / 'missing'}"]) == 2
    assert "error: run root" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- TTS study


def _tts_run(root) -> str:
    run = root / "tts"
    (run / "eval").mkdir(parents=True)
    (run / "samples/tts").mkdir(parents=True)
    row = dict(wer=0.5, per=0.2, sim=0.8, utterances=2)
    gen = dict(row, duration_within_20pct=0.5, ended_by_eod=1.0, rtf=0.3,
               floors_met=dict(wer=True, sim=True, duration=False))
    scores = dict(split="test_speakers", frame_rate=25.0, ar_steps_per_second=12.5, codec_ar_steps_per_second=75.0,
                  fewer_ar_steps_than_codec=6.0, real=row, resynthesis=dict(row, wer=0.6), continuation=gen,
                  reference=dict(gen, wer=0.9),
                  floors=dict(recogniser=dict(test_speakers=dict(wer=0.45, per=0.2)),
                              speaker=dict(test_speakers=dict(same=0.85, different=0.1))))
    (run / "eval/tts.json").write_text(json.dumps(scores))
    (run / "eval/audio_vae.json").write_text(json.dumps(dict(
        frame_rate=25.0, latent_dim=16, mel_distance=0.96, stoi=0.7, variance_collapse_ratio=1.1, num_utterances=9)))
    (run / "eval/loss.json").write_text(json.dumps(dict(eval_loss=3.0, metrics=dict(diffusion_loss=0.45),
                                                        null_text=dict(eval_loss=2.9, metrics=dict(diffusion_loss=0.5)))))
    manifest = []
    for mode in ("continuation", "reference"):
        for i, (real, dur) in enumerate(((2.0, 2.1), (3.0, 4.0))):
            manifest.append(dict(mode=mode, file=f"{mode}_{i:03d}.wav", prompt_file=f"{mode}_{i:03d}_prompt.wav",
                                 duration=dur, real_duration=real))
            for name in (manifest[-1]["file"], manifest[-1]["prompt_file"]):
                (run / "samples/tts" / name).write_bytes(b"RIFF" + name.encode())
    (run / "samples/tts/manifest.json").write_text(json.dumps(manifest))
    return str(run)


def test_tts_study_writes_table_plot_and_docs_wavs(tmp_path, capsys):
    run = _tts_run(tmp_path)
    docs = tmp_path / "docs"
    tts_study.main(["--workdir", run, f"--docs={docs}", "--wavs=1"])
    text = (tmp_path / "tts/study/tts.md").read_text()
    assert text == (docs / "tts.md").read_text() and text in capsys.readouterr().out
    lines = text.splitlines()
    assert lines[2].startswith("| real audio") and "| 0.500 | 0.200 | 0.800 | – | – | – |" in lines[2]
    assert lines[5].startswith("| zero-shot: reference") and "0.900" in lines[5] and "50%" in lines[5]
    assert "12.5 (the audio σ-VAE's 25 Hz frames, 2 per step)" in text and "6.0× fewer" in text
    assert "mel distance 0.960" in text and "duration not met" in text
    assert "diffusion loss with the text 0.4500, with every text dropped to <null> 0.5000 (10.0% lower" in text
    assert (docs / "tts.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(docs)) == ["continuation_000.wav", "continuation_000_prompt.wav", "reference_000.wav",
                                        "reference_000_prompt.wav", "tts.json", "tts.md", "tts.png"]
    assert (docs / "reference_000.wav").read_bytes() == b"RIFFreference_000.wav"


def test_tts_study_adds_the_frame_rate_table(tmp_path, capsys):
    run = _tts_run(tmp_path)
    for rate, hop, mel in ((50.0, 320, 0.7), (12.5, 1280, 1.3)):
        d = tmp_path / "rates" / f"audio_vae_{rate:g}hz"
        (d / "eval").mkdir(parents=True)
        judged = {"judges": {"wer": 0.75, "sim": 0.5}} if rate == 50 else {}  # the 12.5 Hz run had no judges
        (d / "eval/audio_vae.json").write_text(json.dumps(dict(
            frame_rate=rate, hop=hop, latent_dim=16, audio_vae_params=10, audio_vae_steps=3200, mel_distance=mel,
            stoi=0.7, variance_collapse_ratio=0.2, **judged)))
        (d / "done.json").write_text("{}")
    (tmp_path / "rates/unfinished/eval").mkdir(parents=True)
    main = json.loads(open(f"{run}/eval/audio_vae.json").read())
    main.update(hop=640, audio_vae_params=10, audio_vae_steps=3200)
    open(f"{run}/eval/audio_vae.json", "w").write(json.dumps(main))
    tts_study.main(["--workdir", run, f"--rates_root={tmp_path / 'rates'}"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 12.5") or
            line.startswith("| 25") or line.startswith("| 50")]
    assert [r.split(" | ")[5] for r in rows] == ["1.300", "0.960", "0.700"]  # sorted by rate
    assert rows[0].endswith("| – | – |") and rows[2].endswith("| 0.750 | 0.500 |")
    assert len(json.loads((tmp_path / "tts/study/tts.json").read_text())["rates"]) == 3


def test_tts_study_needs_the_resynthesis_scores(tmp_path):
    run = _tts_run(tmp_path)
    scores = json.loads(open(f"{run}/eval/tts.json").read())
    del scores["resynthesis"]
    open(f"{run}/eval/tts.json", "w").write(json.dumps(scores))
    assert run_cli(tts_study.main, ["--workdir", run]) == 2
    with pytest.raises(DataError, match="resynthesis"):
        tts_study.collect(run)
