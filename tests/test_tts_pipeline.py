"""The speech pipeline end to end at `configs/tts.py:tiny=1` (docs/method.md §12): corpus, audio σ-VAE, latent
caches, judges, phoneme tokenizer, TTS model, zero-shot generation of both modes and its scores, from the CLI entry
point, then a user's own text and recording through `latent_lm.tts_cli`. Quality is not asserted (a few steps); the
files, their fields and their consistency are."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import scipy.io.wavfile

from configs.tts import get_config
from data_pipelines.speech_corpus import load_corpus
from latent_lm import experiment, tts_cli
from latent_lm.studies import tts_text_use
from latent_lm.parallel import mesh as mesh_lib

pytestmark = pytest.mark.slow


def test_tiny_tts_run_writes_wavs_manifest_and_scores(tmp_path, monkeypatch):
    one_device = mesh_lib.make_mesh(None, jax.devices()[:1])  # the tiny batches are smaller than the 8 test devices
    monkeypatch.setattr(experiment, "make_mesh", lambda cfg: one_device)
    config = get_config("tiny=1")
    config.mesh.shape = (1, 1, 1)
    config.eval.loss_batch = 1  # without their text the 4 test documents pack into one row
    summary = experiment.run(config, str(tmp_path), "all")
    assert np.isfinite(summary["eval_loss"])
    # The held-out loss again with every text dropped: no text CE targets then, the same latent targets.
    loss = json.loads((tmp_path / "eval/loss.json").read_text())
    assert summary["eval_loss_null_text"] == loss["null_text"]["eval_loss"] != loss["eval_loss"]
    assert loss["null_text"]["metrics"].keys() == loss["metrics"].keys() >= {"diffusion_loss", "ce_loss"}
    assert np.isfinite(loss["null_text"]["metrics"]["diffusion_loss"])
    # The same two held-out runs by position in the speech span (latent_lm.studies.tts_text_use).
    tts_text_use.main([f"--workdir={tmp_path}", "--buckets=0,2,500", f"--out={tmp_path}/text_use.json"])
    rows = json.loads((tmp_path / "text_use.json").read_text())
    assert [r["positions"] for r in rows] == [[0, 2], [2, 500]] and rows[0]["documents"] == 4
    for r in rows:
        assert np.isfinite(r["with_text"]) and np.isclose(r["gap"], 1 - r["with_text"] / r["null_text"], rtol=1e-5)
    manifest = json.loads((tmp_path / "samples/tts/manifest.json").read_text())
    modes = [m["mode"] for m in manifest]
    assert set(modes) == {"continuation", "reference"} and modes.count("reference") == modes.count("continuation")
    hop = int(np.prod(config.audio_vae.strides))
    for m in manifest:
        rate, pcm = scipy.io.wavfile.read(tmp_path / "samples/tts" / m["file"])
        assert rate == config.speech.sample_rate and pcm.dtype == np.int16
        frames = m["generated_frames"] + (m["prompt_frames"] if m["mode"] == "continuation" else 0)
        assert len(pcm) == frames * hop and m["duration"] == pytest.approx(len(pcm) / rate)
        assert (tmp_path / "samples/tts" / m["prompt_file"]).exists() and m["text"] and m["phonemes"]
    scores = json.loads((tmp_path / "eval/tts.json").read_text())
    k = config.tts.frames_per_step  # 2: 25 Hz frames, 12.5 autoregressive steps per second
    assert scores["ar_steps_per_second"] == 25 / k and scores["fewer_ar_steps_than_codec"] == pytest.approx(75 * k / 25)
    assert all(m["generated_frames"] % k == 0 and m["prompt_frames"] % k == 0 for m in manifest)
    for mode in ("continuation", "reference"):
        assert set(scores[mode]) >= {"wer", "per", "sim", "duration_within_20pct", "ended_by_eod", "floors_met"}
    # train_judges ran before eval_audio_vae, which judged the σ-VAE's reconstructions beside the real audio's floors
    judged = json.loads((tmp_path / "eval/audio_vae.json").read_text())["judges"]
    assert summary["audio_vae_resynthesis_wer"] == judged["wer"] and judged["real"]["wer"] == summary["judge_wer"]

    # A user's recording (a held-out utterance, written at another rate in stereo) and text, in every mode.
    split = load_corpus(str(tmp_path / "speech_corpus"), "test_speakers")
    ref = np.repeat(np.round(split.audio[0] * 32767).astype(np.int16)[::2, None], 2, axis=1)  # 8 kHz stereo
    scipy.io.wavfile.write(tmp_path / "ref.wav", 8000, ref)
    for mode, extra in (("reference", []), ("continuation", [f"--prompt_text={split.text[0]}"]), (None, [])):
        out = tmp_path / f"speech_{mode}"
        argv = ["--workdir", str(tmp_path), "--text=The cat sat down.", "--num=2", f"--out={out}", *extra]
        argv += [f"--prompt={tmp_path / 'ref.wav'}", f"--mode={mode}"] if mode else []
        tts_cli.main(argv)
        record = json.loads((out / "speech.json").read_text())
        assert record["input"] and len(record["utterances"]) == 2
        assert (record["prompt_heard"] is not None) == (mode == "reference")  # heard by the recogniser
        for u in record["utterances"]:
            rate, pcm = scipy.io.wavfile.read(out / u["file"])
            assert rate == config.speech.sample_rate and len(pcm) == u["frames"] * hop
