"""The multimodal experiment's stages (configs/mllm.py, docs/experiments.md §9): the text tokenizer stage, and the whole
tiny pipeline tokenizer → σ-VAE → latents → packed-document training → held-out loss → generation → scores."""

import json

import numpy as np
import pytest

from configs.mllm import get_config
from latent_lm import experiment
from latent_lm.errors import ConfigError
from latent_lm.text.tokenizer import TextTokenizer, train_tokenizer


def test_train_tokenizer_stage_writes_once_and_checks_the_model_vocabulary(tmp_path, monkeypatch):
    """The stage trains on the run's texts and writes text/tokenizer.json; a second run keeps the file (later stages
    read it); a tokenizer larger than the model's table is one clear error."""
    monkeypatch.setattr(experiment, "tokenizer_training_texts", lambda name: ["a digit seven, thick."] * 50)
    config = get_config("tiny=1")
    config.text.vocab_size = 300
    out = experiment.train_text_tokenizer(config, str(tmp_path), None, None)
    path = tmp_path / "text" / "tokenizer.json"
    assert path.exists() and out["text_vocab_size"] == TextTokenizer.load(str(tmp_path / "text")).vocab_size
    mtime = path.stat().st_mtime_ns
    experiment.train_text_tokenizer(config, str(tmp_path), None, None)
    assert path.stat().st_mtime_ns == mtime
    big = train_tokenizer([f"word{i} " * 3 for i in range(2000)], 600, min_frequency=1)
    big.save(str(tmp_path / "other" / "text"))
    config.data.tokenizer_workdir = str(tmp_path / "other")
    config.model.text_vocab_size = 300
    with pytest.raises(ConfigError, match="text_vocab_size=300"):
        experiment.train_text_tokenizer(config, str(tmp_path), None, None)


@pytest.mark.slow
def test_tiny_multimodal_run_trains_generates_and_scores(tmp_path):
    """`--config=configs/mllm.py:tiny=1 --mode=all` end to end: every stage runs, the samples and scores are where
    docs/experiments.md §9 says, with the shapes and ranges a user reads."""
    config = get_config("tiny=1")
    config.train.steps = 30
    config.text.vocab_size = 300
    config.model.text_vocab_size = 300
    workdir = str(tmp_path / "run")
    summary = experiment.run(config, workdir, "all")
    assert np.isfinite(summary["eval_loss"]) and summary["text_vocab_size"] <= 300
    with np.load(f"{workdir}/samples/t2i.npz") as npz:
        assert npz["images"].shape == (20, 28, 28, 1) and npz["images"].dtype == np.uint8
        assert npz["labels"].tolist() == sorted(npz["labels"].tolist()) and len(npz["captions"]) == 20
    captions = json.loads(open(f"{workdir}/samples/i2t.json").read())
    assert len(captions) == 8 and all(isinstance(c["caption"], str) for c in captions)
    scores = json.loads(open(f"{workdir}/eval/mllm.json").read())
    for key in ("t2i_class_accuracy", "t2i_eoi_rate", "i2t_class_accuracy", "i2t_parse_rate",
                "interleaved_eoi_rate", "t2i_thickness_accuracy"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert scores["text_perplexity"] > 1.0 and np.isfinite(scores["t2i_fd"])
    for png in ("t2i.png", "i2t.png"):
        assert (tmp_path / "run" / "samples" / png).stat().st_size > 1000
