"""Tokenizer-variance study: generation quality of LatentLM and DiT against the σ-VAE's C_σ (issue 5).

The paper's Fig. 6 (docs/method.md §2.2, §10.2) sweeps tokenizer variance: LatentLM needs high-variance (σ-VAE)
tokenizers, DiT (§9) is less sensitive, and a KL-VAE tuned for image diffusion (learned variance, collapsed, §2.4) is
the control. The paper measures collapse only indirectly, through FID; here each tokenizer row also carries the direct
diagnostic of §2.4, the collapse ratio r = mean posterior |σ| / std(μ), and the σ-VAE's PSNR, both from the
generator runs' `eval/final.json` (the runs of one tokenizer share it, so these are averaged over them).

Several runs of one (tokenizer, family) are combined as follows: runs at the same CFG scale (seeds) are averaged,
and across CFG scales the one with the lowest mean FD is reported (Fig. 6 also sweeps CFG); its CFG scale is shown.

CLI: `python -m latent_lm.studies.tokenizer_variance --root=runs/tokenizer_variance [--out=...]` writes
`tokenizer_variance.png`, `.json` and `.md` into --out (default `<root>/tokenizer_variance`) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.ticker import FormatStrFormatter

from latent_lm import cli
from latent_lm.errors import DataError, MissingInputError
from latent_lm.studies import (FAMILIES, FAMILY_COLORS, FAMILY_LABELS, config_value, finished_run_dirs,
                               finite_number, new_figure, read_json, save_png, write_json, write_text)

VAE_KINDS = ("sigma", "kl")
METRIC_KEYS = ("variance_collapse_ratio", "vae_psnr_db", "sample_conditional_accuracy", "sample_fd",
               "random_latent_fd", "num_samples", "cfg_scale")


@dataclasses.dataclass(frozen=True)
class TokenizerRun:
    """One finished generator run: its tokenizer (`vae_std` = C_σ, None for the KL-VAE) and its `eval/final.json`."""

    name: str
    family: str
    vae_kind: str
    vae_std: float | None
    collapse_ratio: float
    psnr_db: float
    accuracy: float
    fd: float
    random_latent_fd: float
    num_samples: int
    cfg_scale: float

    @property
    def tokenizer(self) -> tuple[str, float | None]:
        return self.vae_kind, self.vae_std


@dataclasses.dataclass(frozen=True)
class FamilyResult:
    """The reported result of one family on one tokenizer: the best CFG scale's mean over its runs."""

    accuracy: float
    fd: float
    cfg_scale: float
    num_runs: int
    runs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TokenizerSummary:
    """One row of the table: a tokenizer, its collapse ratio and PSNR, and each family's result on it."""

    vae_kind: str
    vae_std: float | None
    collapse_ratio: float
    psnr_db: float
    families: dict[str, FamilyResult]

    @property
    def label(self) -> str:
        return f"σ-VAE C_σ={self.vae_std:g}" if self.vae_kind == "sigma" else "KL-VAE"


def collect(root: str) -> list[TokenizerRun]:
    """The finished runs under `root` (sorted by tokenizer, then family, then name); each needs `eval/final.json`."""
    rows = []
    for path in finished_run_dirs(root):
        name = os.path.basename(path)
        cfg_path, final_path = os.path.join(path, "config.json"), os.path.join(path, "eval", "final.json")
        config, final = read_json(cfg_path), read_json(final_path)
        family = config_value(config, "model.arch", cfg_path)
        if family not in FAMILIES:
            raise DataError(f"{cfg_path}: model.arch {family!r} is not one of {list(FAMILIES)}")
        kind = config_value(config, "vae.kind", cfg_path)
        if kind not in VAE_KINDS:
            raise DataError(f"{cfg_path}: vae.kind {kind!r} is not one of {list(VAE_KINDS)}")
        std = None
        if kind == "sigma":
            std = finite_number(config_value(config, "vae.std", cfg_path), "vae.std", cfg_path)
            if std < 0:
                raise DataError(f"{cfg_path}: vae.std must be ≥ 0, got {std}")
        metric = {key: _metric(final, key, final_path) for key in METRIC_KEYS}
        rows.append(TokenizerRun(
            name=name, family=family, vae_kind=kind, vae_std=std, collapse_ratio=metric["variance_collapse_ratio"],
            psnr_db=metric["vae_psnr_db"], accuracy=metric["sample_conditional_accuracy"], fd=metric["sample_fd"],
            random_latent_fd=metric["random_latent_fd"], num_samples=int(metric["num_samples"]),
            cfg_scale=metric["cfg_scale"]))
    return sorted(rows, key=lambda r: (_tokenizer_order(r.tokenizer), FAMILIES.index(r.family), r.name))


def _metric(final: dict, key: str, source: str) -> float:
    if key not in final:
        raise DataError(f"{source} has no key {key!r}")
    return finite_number(final[key], key, source)


def _tokenizer_order(tokenizer: tuple[str, float | None]) -> tuple[int, float]:
    """σ-VAEs by increasing C_σ, then the KL-VAE control."""
    kind, std = tokenizer
    return (0, std) if kind == "sigma" else (1, 0.0)


def summarize(rows: Sequence[TokenizerRun]) -> list[TokenizerSummary]:
    """One summary per tokenizer in table order (see the module docstring for how runs are combined)."""
    summaries = []
    for tokenizer in sorted({r.tokenizer for r in rows}, key=_tokenizer_order):
        runs = [r for r in rows if r.tokenizer == tokenizer]
        families = {}
        for family in FAMILIES:
            by_cfg: dict[float, list[TokenizerRun]] = {}
            for r in runs:
                if r.family == family:
                    by_cfg.setdefault(r.cfg_scale, []).append(r)
            if not by_cfg:
                continue
            results = [FamilyResult(accuracy=float(np.mean([r.accuracy for r in group])),
                                    fd=float(np.mean([r.fd for r in group])), cfg_scale=cfg, num_runs=len(group),
                                    runs=tuple(r.name for r in group))
                       for cfg, group in sorted(by_cfg.items())]
            families[family] = min(results, key=lambda res: res.fd)
        summaries.append(TokenizerSummary(
            vae_kind=tokenizer[0], vae_std=tokenizer[1],
            collapse_ratio=float(np.mean([r.collapse_ratio for r in runs])),
            psnr_db=float(np.mean([r.psnr_db for r in runs])), families=families))
    return summaries


def table(rows: Sequence[TokenizerRun]) -> str:
    """Markdown: one row per tokenizer (σ-VAEs by C_σ, then the KL-VAE), collapse ratio r, PSNR, and accuracy / FD
    of each family. The CFG scale is shown next to the FD when the runs used more than one."""
    show_cfg = len({r.cfg_scale for r in rows}) > 1
    header = ["tokenizer", "C_σ", "collapse ratio r", "PSNR (dB)"]
    for family in FAMILIES:
        header += [f"{FAMILY_LABELS[family]} acc", f"{FAMILY_LABELS[family]} FD"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summarize(rows):
        cells = ["σ-VAE" if s.vae_kind == "sigma" else "KL-VAE",
                 f"{s.vae_std:g}" if s.vae_std is not None else "—", f"{s.collapse_ratio:.4f}", f"{s.psnr_db:.2f}"]
        for family in FAMILIES:
            res = s.families.get(family)
            if res is None:
                cells += ["—", "—"]
                continue
            cells += [f"{100 * res.accuracy:.1f}%",
                      f"{res.fd:.2f}" + (f" (cfg {res.cfg_scale:g})" if show_cfg else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[TokenizerRun], path: str) -> None:
    """FD (left, log y) and conditional accuracy (right) against C_σ, one line per family over the σ-VAEs.

    The KL-VAE has no C_σ, so it sits at a separate x one C_σ step right of the largest C_σ, past a dotted divider,
    as a star per family. Each tick also shows that tokenizer's collapse ratio r. Written atomically as PNG.
    """
    summaries = summarize(rows)
    sigma = [s for s in summaries if s.vae_kind == "sigma"]
    kl = [s for s in summaries if s.vae_kind == "kl"]
    stds = [s.vae_std for s in sigma]
    step = float(np.median(np.diff(stds))) if len(stds) > 1 else 0.25
    kl_x = (max(stds) if stds else 0.0) + step
    ticks = [(s.vae_std, f"{s.vae_std:g}\nr={s.collapse_ratio:.3g}") for s in sigma]
    ticks += [(kl_x, f"KL-VAE\nr={s.collapse_ratio:.3g}") for s in kl]

    figure = new_figure(10.0, 4.2)
    axes = figure.subplots(1, 2)
    panels = ((axes[0], "sample FD (classifier features) ↓", lambda res: res.fd),
              (axes[1], "conditional accuracy (%) ↑", lambda res: 100 * res.accuracy))
    for ax, ylabel, value in panels:
        for family in FAMILIES:
            color, label = FAMILY_COLORS[family], FAMILY_LABELS[family]
            points = [(s.vae_std, value(s.families[family])) for s in sigma if family in s.families]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", color=color, label=f"{label}, σ-VAE")
            for s in kl:
                if family in s.families:
                    ax.plot([kl_x], [value(s.families[family])], marker="*", markersize=14, linestyle="none",
                            color=color, label=f"{label}, KL-VAE")
        if sigma and kl:
            ax.axvline(kl_x - step / 2, color="gray", linestyle=":", linewidth=1)
        ax.set_xticks([x for x, _ in ticks], [t for _, t in ticks], fontsize=8)
        ax.set_xlabel("tokenizer: σ-VAE C_σ (and collapse ratio r)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    for axis in (axes[0].yaxis.set_major_formatter, axes[0].yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # plain FD values on the log axis, not 6×10²
    axes[0].legend(fontsize=8)
    figure.suptitle("Tokenizer variance: generation quality vs C_σ (docs/method.md §2.4, §10.2 Fig. 6)")
    save_png(figure, path)


def write_summary(rows: Sequence[TokenizerRun], json_path: str, markdown_path: str) -> str:
    """Writes every run and the per-tokenizer summaries as JSON, and the table as markdown; returns the markdown."""
    write_json(json_path, {
        "tokenizers": [dataclasses.asdict(s) | {"label": s.label} for s in summarize(rows)],
        "runs": [dataclasses.asdict(r) for r in rows],
    })
    markdown = table(rows)
    write_text(markdown_path, markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latent_lm.studies.tokenizer_variance",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder holding one subfolder per generator run")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/tokenizer_variance)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.root, "tokenizer_variance")
    rows = collect(args.root)
    if not rows:
        raise MissingInputError(f"no finished runs (with done.json) under {args.root}")
    plot(rows, os.path.join(out, "tokenizer_variance.png"))
    print(write_summary(rows, os.path.join(out, "tokenizer_variance.json"),
                        os.path.join(out, "tokenizer_variance.md")), end="")
    print(f"wrote {out}/tokenizer_variance.{{png,json,md}}")


if __name__ == "__main__":
    cli.main(main)
