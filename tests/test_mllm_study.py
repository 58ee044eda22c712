"""The multimodal study's analysis (latent_lm/studies/mllm.py): runs of the three arms → one table (seed spread where an
arm has several runs, "–" for what an arm does not have) and one plot."""

import json

import pytest

from latent_lm.errors import DataError
from latent_lm.studies import mllm


def _run(root, name, arch, accuracy, with_loop=True, prompt_latents="mean"):
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model": {"arch": arch}, "stages": ["train", "eval_mllm"],
                                               "eval": {"prompt_latents": prompt_latents, "seed": 0}}))
    (d / "done.json").write_text("{}")
    scores = {"text_perplexity": 5.0, "t2i_class_accuracy": accuracy, "t2i_fd": 50.0, "i2t_class_accuracy": 0.9,
              "i2t_similarity": 0.8, **{f"{s}_{a}_accuracy": 0.5 for s in ("t2i", "i2t") for a in mllm.ATTRIBUTES}}
    if with_loop:
        scores.update(t2i_eoi_rate=1.0, interleaved_successor_accuracy=0.7)
    (d / "eval" / "mllm.json").write_text(json.dumps(scores))
    (d / "eval" / "loss.json").write_text(json.dumps({"eval_loss": 1.0, "train_flops": 1e12, "params": 1000}))
    curve = [{"step": step, "tokens": step * 4096, "text_perplexity": 9.0 - step / 100, "t2i_fd": 80.0,
              "t2i_class_accuracy": accuracy * step / 200, "i2t_class_accuracy": 0.5} for step in (100, 200)]
    (d / "eval" / "curve.json").write_text(json.dumps({"points": curve}))


def test_table_and_plot_of_three_arms(tmp_path, capsys):
    _run(tmp_path, "latentlm_seed0", "mllm", 0.90)
    _run(tmp_path, "latentlm_seed1", "mllm", 0.94)
    _run(tmp_path, "transfusion", "transfusion", 0.80, with_loop=False)
    _run(tmp_path, "vq", "vq", 0.70)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    mllm.main(["--root", str(tmp_path)])
    text = (tmp_path / "mllm" / "mllm.md").read_text()
    main_table = text.split("\n\n")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert [r.split("|")[1].strip() for r in rows] == ["LatentLM", "Transfusion", "VQ-MLLM"]
    assert "92.0% ± 2.0%" in rows[0] and "| 2 |" in rows[0]  # the seed spread of LatentLM's T2I accuracy
    assert rows[1].count("–") == 2  # Transfusion: no <eoi> placement of its own, no interleaved loop
    assert (tmp_path / "mllm" / "mllm.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "mllm" / "mllm.json").read_text())["summary"]
    assert summary["mllm"]["t2i_class_accuracy"]["runs"] == 2
    assert "VQ-MLLM" in capsys.readouterr().out
    # the metrics against training tokens: LatentLM's two seeds averaged at each step
    assert "| LatentLM | 100 | 409,600 | 8.00 | 46.0% | 80.0 | 50.0% |" in text
    assert "| VQ-MLLM | 200 | 819,200 | 7.00 | 70.0% |" in text
    assert summary["mllm"]["t2i_class_accuracy"]["runs"] == 2
    assert (tmp_path / "mllm" / "mllm_curve.png").stat().st_size > 1000


def test_runs_scored_with_other_eval_settings_are_refused(tmp_path):
    _run(tmp_path, "latentlm", "mllm", 0.90)
    _run(tmp_path, "transfusion", "transfusion", 0.80, with_loop=False, prompt_latents="sampled")
    with pytest.raises(DataError, match="eval.prompt_latents='sampled'"):
        mllm.main(["--root", str(tmp_path)])
