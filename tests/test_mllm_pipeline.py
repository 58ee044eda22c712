"""The multimodal experiment's stages (configs/mllm.py, docs/experiments.md §10): the text tokenizer stage, and the tiny
study: tokenizers → latents → each arm's packed-document training → held-out loss → generation → scores → table."""

import json
import os

import numpy as np
import pytest

from configs.mllm import get_config
from latent_lm import experiment, sweep
from latent_lm.studies import mllm as mllm_study
from latent_lm.errors import ConfigError
from latent_lm.text.tokenizer import TextTokenizer, train_tokenizer


def test_train_tokenizer_stage_writes_once_and_checks_the_model_vocabulary(tmp_path, monkeypatch):
    """The stage trains on the run's texts and writes text/tokenizer.json; a second run keeps the file (later stages
    read it); a kept tokenizer of another `text.split` and one larger than the model's table are one clear error
    each."""
    monkeypatch.setattr(experiment, "tokenizer_training_texts", lambda name: ["a digit seven, thick."] * 50)
    config = get_config("tiny=1")
    config.text.vocab_size = 300
    out = experiment.train_text_tokenizer(config, str(tmp_path), None, None)
    path = tmp_path / "text" / "tokenizer.json"
    assert path.exists() and out["text_vocab_size"] == TextTokenizer.load(str(tmp_path / "text")).vocab_size
    mtime = path.stat().st_mtime_ns
    experiment.train_text_tokenizer(config, str(tmp_path), None, None)
    assert path.stat().st_mtime_ns == mtime
    config.text.split = "characters"
    with pytest.raises(ConfigError, match="trained with text.split='words', not the config's 'characters'"):
        experiment.train_text_tokenizer(config, str(tmp_path), None, None)
    config.text.split = "words"
    big = train_tokenizer([f"word{i} " * 3 for i in range(2000)], 600, min_frequency=1)
    big.save(str(tmp_path / "other" / "text"))
    config.data.tokenizer_workdir = str(tmp_path / "other")
    config.model.text_vocab_size = 300
    with pytest.raises(ConfigError, match="text_vocab_size=300"):
        experiment.train_text_tokenizer(config, str(tmp_path), None, None)


@pytest.mark.slow
# Five runs that train and generate: executing, not compiling, is their cost (437 s with XLA's optimisations off, 341 s
# on, 2026-12-07).
@pytest.mark.usefixtures("full_optimization")
def test_tiny_study_trains_generates_and_scores_every_arm(tmp_path):
    """`make mllm` at `tiny=1`: both tokenizer runs, the three arms (LatentLM, Transfusion, VQ-MLLM) through every
    stage, then the study's table. The samples and scores are where docs/experiments.md §10 says, with the shapes
    and ranges a user reads."""
    root = tmp_path / "study"
    config_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mllm.py")
    assert sweep.run_sweep(f"{config_file}:tiny=1", str(root)) == 0
    for arm in ("latentlm", "transfusion", "vq"):
        workdir = root / arm
        with np.load(workdir / "samples" / "t2i.npz") as npz:
            assert npz["images"].shape == (20, 28, 28, 1) and npz["images"].dtype == np.uint8
            assert npz["labels"].tolist() == sorted(npz["labels"].tolist()) and len(npz["captions"]) == 20
        captions = json.loads((workdir / "samples" / "i2t.json").read_text())
        assert len(captions) == 8 and all(isinstance(c["caption"], str) for c in captions)
        scores = json.loads((workdir / "eval" / "mllm.json").read_text())
        for key in ("t2i_class_accuracy", "i2t_class_accuracy", "i2t_parse_rate", "t2i_thickness_accuracy"):
            assert 0.0 <= scores[key] <= 1.0, (arm, key)
        assert scores["text_perplexity"] > 1.0 and np.isfinite(scores["t2i_fd"])
        assert ("t2i_eoi_rate" in scores) == (arm != "transfusion")  # Transfusion closes its images by construction
        assert (workdir / "samples" / "t2i.png").stat().st_size > 1000
        # eval_curve: every kept checkpoint (tiny: steps 10 and 20), scored as eval_mllm scores the last one
        curve = json.loads((workdir / "eval" / "curve.json").read_text())["points"]
        assert [p["step"] for p in curve] == [10, 20] and curve[1]["tokens"] == 20 * 16 * 128
        # eval_mllm alone adds what the caption prompts show (the σ-noised latents decoded; not the VQ arm's codes)
        assert (0.0 <= scores.pop("i2t_prompt_class_accuracy", -1.0) <= 1.0) == (arm != "vq"), arm
        assert curve[1] == pytest.approx(dict(step=20, tokens=20 * 16 * 128, **scores), rel=1e-5), arm
    mllm_study.main(["--root", str(root)])
    table = (root / "mllm" / "mllm.md").read_text()
    assert all(name in table for name in ("LatentLM", "Transfusion", "VQ-MLLM"))
    assert "| LatentLM | 10 | 20,480 |" in table  # the metrics against training tokens
    assert (root / "mllm" / "mllm_curve.png").stat().st_size > 1000
