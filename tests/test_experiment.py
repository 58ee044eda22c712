"""The whole pipeline (train_vae → encode → train → sample → eval) through the CLI entry point, tiny and fast."""

import json
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from latent_lm import experiment
from latent_lm.config_validation import ConfigError, validate


def tiny_config():
    c = default.get_config()
    c.vae.update(dict(width=32, depth=1))
    c.vae_train.update(dict(steps=4, batch_size=16, log_every=2))
    c.model.update(dict(width=32, depth=1))
    c.head.depth = 1
    c.train.update(dict(steps=4, batch_size=16, log_every=2))
    c.diffusion.num_sampling_steps = 2
    c.eval.update(dict(samples_per_class=2, sample_batch=20, classifier_steps=20, loss_batch=200, loss_repeats=1))
    c.checkpoint.every = 2
    return c


@pytest.mark.slow
def test_all_stages_write_their_outputs(tmp_path):
    summary = experiment.run(tiny_config(), str(tmp_path), "all")
    samples = np.load(tmp_path / "samples" / "final.npz")
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (20, 28, 28, 1)
    assert samples["labels"].tolist() == np.repeat(np.arange(10), 2).tolist()
    assert (tmp_path / "samples" / "final.png").stat().st_size > 0
    result = json.loads((tmp_path / "eval" / "final.json").read_text())
    for key in ("sample_conditional_accuracy", "sample_fd", "random_latent_fd", "vae_psnr_db",
                "variance_collapse_ratio"):
        assert np.isfinite(result[key]), key
    assert summary["train_latents"] == [4000, 49, 4]
    loss = json.loads((tmp_path / "eval" / "loss.json").read_text())
    assert loss["family"] == "latent_lm" and loss["steps"] == 4
    assert loss["eval_batches"] == summary["test_latents"][0] // 200
    assert np.isfinite(loss["eval_loss"]) and loss["train_flops"] == 4 * loss["flops_per_step"] > 0
    assert json.loads((tmp_path / "done.json").read_text())["eval_loss"] == loss["eval_loss"]
    assert (tmp_path / "lm" / "metrics.jsonl").exists() and (tmp_path / "vae" / "metrics.jsonl").exists()
    # A second `train` call resumes from the final checkpoint and has nothing left to do.
    again = experiment.run(tiny_config(), str(tmp_path), "train")
    assert again["lm_steps_per_sec"] == 0.0


def test_cli_rejects_unknown_config_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "latent_lm.main", "--config=configs/default.py",
                          f"--workdir={tmp_path}", "--config.model.no_such_key=3"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "no_such_key" in out.stderr


@pytest.mark.parametrize("path,value,msg", [
    (("vae", "patch_size"), 5, "not divisible by vae.patch_size"),
    (("model", "latent_dim"), 8, "must equal vae.latent_dim"),
    (("diffusion", "prediction_type"), "x0", "prediction_type"),
    (("model", "num_heads"), 5, "heads of even size"),
])
def test_invalid_configs_fail_with_one_clear_error(path, value, msg):
    c = default.get_config()
    setattr(c[path[0]], path[1], value)
    with pytest.raises(ConfigError, match=msg):
        validate(c, experiment.STAGES)


@pytest.mark.parametrize("tok,workdir,expected", [
    ("", "runs/a", "runs/a"), ("../tok", "runs/sweep/a", "runs/sweep/tok"),
    ("../tok", "gs://b/runs/a", "gs://b/runs/tok"), ("/abs/tok", "runs/a", "/abs/tok"), ("gs://c/t", "runs/a", "gs://c/t"),
])
def test_tokenizer_workdir_is_relative_to_the_run(tok, workdir, expected):
    c = default.get_config()
    c.data.tokenizer_workdir = tok
    assert experiment.tokenizer_dir(c, workdir) == expected
