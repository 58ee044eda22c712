"""Multimodal study: LatentLM against Transfusion and a VQ-token MLLM on the same data and compute (the paper's
Table 3 and Fig. 8 at embedded scale; docs/method.md §10.5, docs/experiments.md §10).

Each finished generator run of the sweep (`configs/mllm.py`'s `get_sweep`) holds `eval/mllm.json` (the scores of its
generations and its text perplexity) and `eval/loss.json` (held-out loss, parameters, exact training FLOPs). Runs of
one arm (e.g. seeds) are averaged and their spread reported as ± one standard deviation.

Runs that also hold `eval/curve.json` (the eval_curve stage: the same scores at every kept checkpoint) give the metrics
against training tokens: a second table and `mllm_curve.png`.

CLI: `python -m latent_lm.studies.mllm --root=runs/mllm [--out=...]` writes `mllm.png`, `mllm_curve.png`, `.json` and
`.md` into --out (default `<root>/mllm`) and prints the tables.
"""

from __future__ import annotations

import argparse
import collections
import os
from collections.abc import Sequence

import numpy as np

from latent_lm import cli
from latent_lm.errors import DataError, MissingInputError
from latent_lm.studies import config_value, finished_run_dirs, new_figure, read_json, save_png, write_json, write_text

ARCH_LABELS = {"mllm": "LatentLM", "transfusion": "Transfusion", "vq": "VQ-MLLM"}
# (key in eval/mllm.json or eval/loss.json, column title, format); a missing key is shown as "–" (e.g. an arm without
# an interleaved loop, or without its own <eoi> placement).
COLUMNS = (
    ("text_perplexity", "text PPL ↓", "{:.2f}"),
    ("t2i_class_accuracy", "T2I class acc ↑", "{:.1%}"),
    ("t2i_attribute_accuracy", "T2I attr acc ↑", "{:.1%}"),
    ("t2i_fd", "T2I FD ↓", "{:.1f}"),
    ("i2t_class_accuracy", "I2T class acc ↑", "{:.1%}"),
    ("i2t_attribute_accuracy", "I2T attr acc ↑", "{:.1%}"),
    ("i2t_similarity", "I2T F1 ↑", "{:.3f}"),
    ("t2i_eoi_rate", "<eoi> placed ↑", "{:.1%}"),
    ("interleaved_successor_accuracy", "interleaved succ. ↑", "{:.1%}"),
    ("train_flops", "train FLOPs", "{:.2e}"),
    ("params", "params", "{:,.0f}"),
)
ATTRIBUTES = ("thickness", "slant", "size")
# The metrics against training tokens (eval/curve.json, written by the eval_curve stage): one panel each.
CURVE_COLUMNS = (
    ("text_perplexity", "text PPL ↓", "{:.2f}"),
    ("t2i_class_accuracy", "T2I class acc ↑", "{:.1%}"),
    ("t2i_fd", "T2I FD ↓", "{:.1f}"),
    ("i2t_class_accuracy", "I2T class acc ↑", "{:.1%}"),
)


def collect(root: str) -> dict[str, list[dict[str, float]]]:
    """arch → one dict of figures per finished run (eval/mllm.json + eval/loss.json, attribute accuracies averaged).
    Every run must have been scored with the same `eval` settings (prompts, their latents, counts, seed): a
    DataError names the first setting that differs."""
    by_arch: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    scored_with: tuple[str, dict] | None = None  # (first run, its eval settings)
    for run in finished_run_dirs(root):
        config = read_json(os.path.join(run, "config.json"))
        arch = config_value(config, "model.arch", f"{run}/config.json")
        if arch not in ARCH_LABELS:
            continue
        settings = config.get("eval", {})
        if scored_with is None:
            scored_with = (run, settings)
        elif settings != scored_with[1]:
            key = sorted(k for k in set(settings) | set(scored_with[1]) if settings.get(k) != scored_with[1].get(k))[0]
            raise DataError(f"{run} was scored with eval.{key}={settings.get(key)!r} but {scored_with[0]} with "
                            f"{scored_with[1].get(key)!r}: rerun the stale run's eval stages (the sweep does when its "
                            "config changed) before comparing them")
        scores = dict(read_json(os.path.join(run, "eval", "mllm.json")))
        loss = read_json(os.path.join(run, "eval", "loss.json"))
        scores.update(eval_loss=loss["eval_loss"], train_flops=loss["train_flops"], params=loss["params"])
        for side in ("t2i", "i2t"):
            scores[f"{side}_attribute_accuracy"] = float(np.mean([scores[f"{side}_{a}_accuracy"] for a in ATTRIBUTES]))
        scores["name"] = os.path.basename(run)
        curve = os.path.join(run, "eval", "curve.json")
        if os.path.exists(curve):
            scores["curve"] = read_json(curve)["points"]
        by_arch[arch].append(scores)
    return dict(by_arch)


def curves(by_arch: dict[str, list[dict]]) -> dict[str, list[dict[str, float]]]:
    """arch → one point per checkpoint step: the mean over the arm's runs that scored that step."""
    out = {}
    for arch, runs in by_arch.items():
        steps: dict[int, list[dict]] = collections.defaultdict(list)
        for run in runs:
            for point in run.get("curve", []):
                steps[point["step"]].append(point)
        if steps:
            out[arch] = [{"step": step, "tokens": points[0]["tokens"], "runs": len(points),
                          **{k: float(np.mean([p[k] for p in points])) for k, _, _ in CURVE_COLUMNS}}
                         for step, points in sorted(steps.items())]
    return out


def curve_table(by_step: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: the curve's points, one row per arm and checkpoint."""
    lines = ["| arm | step | tokens | " + " | ".join(t for _, t, _ in CURVE_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(CURVE_COLUMNS)]
    for arch in sorted(by_step, key=list(ARCH_LABELS).index):
        for p in by_step[arch]:
            lines.append(f"| {ARCH_LABELS[arch]} | {p['step']} | {p['tokens']:,} | "
                         + " | ".join(fmt.format(p[k]) for k, _, fmt in CURVE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(by_step: dict[str, list[dict[str, float]]], path: str) -> None:
    """One panel per CURVE_COLUMNS metric against training tokens, a line per arm (paper Fig. 8's axes)."""
    fig = new_figure(4 * len(CURVE_COLUMNS), 3.4)
    for i, (key, title, _) in enumerate(CURVE_COLUMNS):
        ax = fig.add_subplot(1, len(CURVE_COLUMNS), i + 1)
        for arch in sorted(by_step, key=list(ARCH_LABELS).index):
            ax.plot([p["tokens"] for p in by_step[arch]], [p[key] for p in by_step[arch]], "o-",
                    label=ARCH_LABELS[arch])
        ax.set_xlabel("training tokens")
        ax.set_title(title, fontsize=9)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    fig.axes[0].legend(fontsize=8)
    save_png(fig, path)


def summarize(by_arch: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """arch → column → (mean, std over runs, number of runs)."""
    out = {}
    for arch, runs in by_arch.items():
        out[arch] = {}
        for key, _, _ in COLUMNS:
            values = [r[key] for r in runs if key in r]
            if values:
                out[arch][key] = (float(np.mean(values)), float(np.std(values)), len(values))
    return out


def table(summary: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    """Markdown: one row per arm, LatentLM first; ± the seed spread where an arm has several runs."""
    lines = ["| arm | runs | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for arch in sorted(summary, key=list(ARCH_LABELS).index):
        cells, runs = [], 0
        for key, _, fmt in COLUMNS:
            if key not in summary[arch]:
                cells.append("–")
                continue
            mean, std, n = summary[arch][key]
            runs = max(runs, n)
            cells.append(fmt.format(mean) + (f" ± {fmt.format(std)}" if n > 1 and std > 0 else ""))  # not for FLOPs
        lines.append(f"| {ARCH_LABELS[arch]} | {runs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, dict[str, tuple[float, float, int]]], path: str) -> None:
    """Grouped bars of the accuracy-type scores per arm (with the seed spread as error bars)."""
    keys = [k for k, _, fmt in COLUMNS if fmt.endswith("%}")]
    titles = {k: t for k, t, _ in COLUMNS}
    arches = sorted(summary, key=list(ARCH_LABELS).index)
    fig = new_figure(10, 4)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(arches))
    for i, arch in enumerate(arches):
        means = [summary[arch].get(k, (np.nan, 0, 0))[0] for k in keys]
        stds = [summary[arch].get(k, (0, 0, 0))[1] for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, means, width, yerr=stds, label=ARCH_LABELS[arch])
    ax.set_xticks(np.arange(len(keys)) + width * (len(arches) - 1) / 2)
    ax.set_xticklabels([titles[k].replace(" ↑", "") for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.legend()
    ax.set_title("Multimodal study (MNIST captions, embedded scale)")
    save_png(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latent_lm.studies.mllm", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder holding one subfolder per run (the sweep's root)")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/mllm)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.root, "mllm")
    by_arch = collect(args.root)
    if not by_arch:
        raise MissingInputError(f"no finished multimodal runs (with done.json) under {args.root}")
    summary = summarize(by_arch)
    plot(summary, os.path.join(out, "mllm.png"))
    text = table(summary)
    by_step = curves(by_arch)
    if by_step:
        plot_curves(by_step, os.path.join(out, "mllm_curve.png"))
        text += "\nAgainst training tokens (every kept checkpoint, scored as the last):\n\n" + curve_table(by_step)
    write_json(os.path.join(out, "mllm.json"), {"runs": by_arch, "curves": by_step, "summary": {
        arch: {k: dict(mean=m, std=sd, runs=n) for k, (m, sd, n) in cols.items()} for arch, cols in summary.items()}})
    write_text(os.path.join(out, "mllm.md"), text)
    print(text, end="")
    print(f"wrote {out}/mllm.{{png,json,md}}" + (" and mllm_curve.png" if by_step else ""))


if __name__ == "__main__":
    cli.main(main)
