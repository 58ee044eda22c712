"""LatentLM-vs-DiT scaling law: eval loss against training compute, L(C) = a·C^(−b) + c per family (issue 5).

The paper's Fig. 4 (docs/method.md §10.2) shows both families improving with size on the §4.6 scaling family, LatentLM
scaling better than its DiT twin (§9, same token count). Here each family's finished runs are fitted with a
saturating power law in the training FLOPs that `eval/loss.json` reports (counted from the model, see
`latent_lm/training/flops.py`). The two families' losses are both diffusion losses on the same latents but of
different conditionals (per token given the prefix vs the whole image jointly), so compare the exponents b and the
shape of the curves rather than the absolute loss levels.

CLI: `python -m latent_lm.studies.scaling_law --root=runs/scaling [--out=runs/scaling/scaling]` writes
`scaling.png`, `scaling.json` and `scaling.md` into --out and prints the markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from scipy.optimize import least_squares

from latent_lm import cli
from latent_lm.errors import DataError, MissingInputError
from latent_lm.studies import (FAMILIES, FAMILY_COLORS, FAMILY_LABELS, config_value, finished_run_dirs,
                               finite_number, new_figure, read_json, save_png, write_json, write_text)

# Bounds on b in the normalised parameterisation. A fit that ends on B_MIN means the loss does not fall with
# compute; one that ends on B_MAX means the points cannot pin the exponent down. Both are DataErrors.
B_MIN, B_MAX = 1e-6, 10.0
# c lives in [0, min(L)); least_squares needs a strictly larger upper bound than lower, so stop just short.
C_UPPER_FRACTION = 1.0 - 1e-9
# Starting values of c as fractions of min(L) (multi-start: b and c trade off along a shallow valley).
C_START_FRACTIONS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L(C) = a·C^(−b) + c, fitted as a_scaled·(C/compute_scale)^(−b) + c (compute_scale = geometric mean of C).

    `residuals` are loss − fit in the order of the input points; `c_fixed` marks the 3-point fallback (c = 0).
    `b_stderr` is the asymptotic standard error from the Jacobian (None when no degree of freedom is left).
    """

    a: float
    b: float
    c: float
    r2: float
    residuals: tuple[float, ...]
    num_points: int
    compute_scale: float
    a_scaled: float
    b_stderr: float | None
    c_fixed: bool

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        return self.a_scaled * (np.asarray(compute, np.float64) / self.compute_scale) ** (-self.b) + self.c


def fit_power_law(compute: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray) -> PowerLawFit:
    """Least-squares fit of L(C) = a·C^(−b) + c with b > 0 and 0 ≤ c < min(L).

    Parameterisation: x = C / G with G the geometric mean of C, parameters (log A, b, c) with A = a·G^(−b), so all
    three are O(1) whatever the FLOP scale (10^12 or 10^22). Residuals are in loss units. Several starting values of
    c are tried (for each, log(L − c) vs log x gives log A and b by linear regression) and the lowest cost wins.

    With exactly 3 points a 3-parameter curve would interpolate them (R² = 1 by construction, no test of the law),
    so the fit falls back to a pure power law, c = 0 (`c_fixed=True`), leaving one degree of freedom. Fewer than 3
    points, fewer than 3 distinct compute values, non-positive or non-finite inputs, equal losses, or a loss that
    does not fall with compute raise a DataError.
    """
    c_arr = np.asarray(compute, np.float64).ravel()
    l_arr = np.asarray(loss, np.float64).ravel()
    if c_arr.shape != l_arr.shape:
        raise DataError(f"compute and loss differ in length: {c_arr.size} vs {l_arr.size}")
    if not (np.all(np.isfinite(c_arr)) and np.all(np.isfinite(l_arr))):
        raise DataError("compute and loss must be finite")
    if np.any(c_arr <= 0) or np.any(l_arr <= 0):
        raise DataError("compute and loss must be positive for a power law")
    n_distinct = np.unique(c_arr).size
    if c_arr.size < 3 or n_distinct < 3:
        raise DataError(f"a power-law fit needs at least 3 runs at distinct compute; got {c_arr.size} run(s) at "
                        f"{n_distinct} distinct compute value(s)")
    if np.ptp(l_arr) == 0:
        raise DataError("all losses are equal: there is no trend to fit")

    scale = float(np.exp(np.mean(np.log(c_arr))))
    log_x = np.log(c_arr / scale)
    l_min = float(l_arr.min())
    c_fixed = c_arr.size == 3

    def curve(theta: np.ndarray) -> np.ndarray:
        log_a, b = theta[0], theta[1]
        c = 0.0 if c_fixed else theta[2]
        return np.exp(log_a - b * log_x) + c

    def residual(theta: np.ndarray) -> np.ndarray:
        return curve(theta) - l_arr

    best = None
    for frac in (0.0,) if c_fixed else C_START_FRACTIONS:
        c0 = frac * l_min
        slope, intercept = np.polyfit(log_x, np.log(l_arr - c0), 1)
        b0 = float(np.clip(-slope, 1e-3, 0.9 * B_MAX))
        x0 = [intercept, b0] if c_fixed else [intercept, b0, c0]
        lower = [-np.inf, B_MIN] if c_fixed else [-np.inf, B_MIN, 0.0]
        upper = [np.inf, B_MAX] if c_fixed else [np.inf, B_MAX, C_UPPER_FRACTION * l_min]
        result = least_squares(residual, x0, bounds=(lower, upper), method="trf", x_scale="jac",
                               ftol=1e-14, xtol=1e-14, gtol=1e-14, max_nfev=20000)
        if best is None or result.cost < best.cost:
            best = result
    theta = best.x
    b = float(theta[1])
    if b <= B_MIN * 1.01:
        raise DataError(f"the loss does not fall with compute (fitted exponent b ran to its lower bound {B_MIN}); "
                        f"points (compute, loss): {_points_text(c_arr, l_arr)}")
    if b >= B_MAX * 0.99:
        raise DataError(f"the exponent is not determined by these points (b ran to its upper bound {B_MAX}); "
                        f"points (compute, loss): {_points_text(c_arr, l_arr)}")

    res = l_arr - curve(theta)  # loss − fit, as reported
    ss_res = float(np.sum(res ** 2))
    ss_tot = float(np.sum((l_arr - l_arr.mean()) ** 2))
    dof = c_arr.size - theta.size
    b_stderr = None
    if dof > 0:
        jtj = best.jac.T @ best.jac
        cov = np.linalg.pinv(jtj) * (ss_res / dof)
        b_stderr = float(np.sqrt(max(cov[1, 1], 0.0)))
    a_scaled = float(np.exp(theta[0]))
    return PowerLawFit(a=float(a_scaled * scale ** b), b=b, c=0.0 if c_fixed else float(theta[2]),
                       r2=1.0 - ss_res / ss_tot, residuals=tuple(float(r) for r in res), num_points=int(c_arr.size),
                       compute_scale=scale, a_scaled=a_scaled, b_stderr=b_stderr, c_fixed=c_fixed)


def _points_text(compute: np.ndarray, loss: np.ndarray) -> str:
    return ", ".join(f"({c:.3g}, {v:.4g})" for c, v in sorted(zip(compute, loss)))


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished generator run of the scaling sweep (from `config.json` and `eval/loss.json`)."""

    name: str
    family: str
    params: int
    train_flops: float
    flops_per_step: float
    steps: int
    eval_loss: float
    width: int
    depth: int
    batch_size: int


def collect(root: str) -> list[Run]:
    """The finished runs under `root`, sorted by (family, training FLOPs). A finished run must hold `eval/loss.json`;
    its `family` must be one of FAMILIES and agree with `config.json`'s `model.arch`."""
    runs = []
    for path in finished_run_dirs(root):
        name = os.path.basename(path)
        cfg_path, loss_path = os.path.join(path, "config.json"), os.path.join(path, "eval", "loss.json")
        config, result = read_json(cfg_path), read_json(loss_path)
        for key in ("eval_loss", "family", "params", "train_flops", "flops_per_step", "steps"):
            if key not in result:
                raise DataError(f"{loss_path} has no key {key!r}")
        family = result["family"]
        if family not in FAMILIES:
            raise DataError(f"{loss_path}: family {family!r} is not one of {list(FAMILIES)}")
        arch = config_value(config, "model.arch", cfg_path)
        if arch != family:
            raise DataError(f"run {name}: eval/loss.json says family {family!r} but config.json has "
                            f"model.arch={arch!r}")
        train_flops = finite_number(result["train_flops"], "train_flops", loss_path)
        if train_flops <= 0:
            raise DataError(f"{loss_path}: train_flops must be positive, got {train_flops}")
        runs.append(Run(
            name=name, family=family, params=int(result["params"]), train_flops=train_flops,
            flops_per_step=finite_number(result["flops_per_step"], "flops_per_step", loss_path),
            steps=int(result["steps"]), eval_loss=finite_number(result["eval_loss"], "eval_loss", loss_path),
            width=int(config_value(config, "model.width", cfg_path)),
            depth=int(config_value(config, "model.depth", cfg_path)),
            batch_size=int(config_value(config, "train.batch_size", cfg_path))))
    return sorted(runs, key=lambda r: (FAMILIES.index(r.family), r.train_flops, r.name))


def group_by_family(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs per family (in FAMILIES order, families without runs left out), each sorted by training FLOPs."""
    groups = {f: sorted((r for r in runs if r.family == f), key=lambda r: (r.train_flops, r.name)) for f in FAMILIES}
    return {f: g for f, g in groups.items() if g}


def fit_families(runs: Sequence[Run]) -> dict[str, PowerLawFit]:
    """One power-law fit per family present; a family with fewer than 3 runs is a DataError naming it."""
    fits = {}
    for family, group in group_by_family(runs).items():
        if len(group) < 3:
            raise DataError(f"family {family!r} has {len(group)} finished run(s) "
                            f"({', '.join(r.name for r in group)}); a scaling fit needs at least 3")
        try:
            fits[family] = fit_power_law([r.train_flops for r in group], [r.eval_loss for r in group])
        except DataError as e:
            raise DataError(f"family {family!r}: {e}") from None
    return fits


def plot(runs: Sequence[Run], fits: dict[str, PowerLawFit], path: str) -> None:
    """Eval loss vs training FLOPs (log x): the runs as points labelled with their parameter count, each family's
    fitted curve over its compute range, the exponent b in the legend. Written atomically as PNG."""
    figure = new_figure(7.0, 4.8)
    ax = figure.add_subplot(1, 1, 1)
    for family, group in group_by_family(runs).items():
        color, label = FAMILY_COLORS[family], FAMILY_LABELS[family]
        flops = np.array([r.train_flops for r in group])
        ax.scatter(flops, [r.eval_loss for r in group], color=color, zorder=3,
                   label=None if family in fits else f"{label} (no fit)")
        # Both families' runs share compute values: label one above-right, the other below-left, off the curves.
        offset, align = ((4, 4), "left") if family == FAMILIES[0] else ((-4, -12), "right")
        for r in group:
            ax.annotate(_params_text(r.params), (r.train_flops, r.eval_loss), textcoords="offset points",
                        xytext=offset, ha=align, fontsize=7, color=color)
        if family in fits:
            fit = fits[family]
            grid = np.geomspace(flops.min() / 1.5, flops.max() * 1.5, 200)
            ax.plot(grid, fit.predict(grid), color=color,
                    label=f"{label}: L = {fit.a:.3g}·C^(−{fit.b:.3f}) + {fit.c:.3g}  (R² {fit.r2:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("eval loss")
    ax.set_title("Scaling: eval loss vs training compute (docs/method.md §10.2, Fig. 4)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(figure, path)


def _params_text(params: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if params >= div:
            return f"{params / div:.3g}{unit}"
    return str(params)


def summary_markdown(runs: Sequence[Run], fits: dict[str, PowerLawFit]) -> str:
    """A fit table (family, a, b ± s.e., c, R², points) and a points table (every run with its fitted loss)."""
    lines = ["| family | a | b | c | R² | points | model |", "|---|---|---|---|---|---|---|"]
    for family, fit in fits.items():
        b = f"{fit.b:.4f}" + (f" ± {fit.b_stderr:.4f}" if fit.b_stderr is not None else "")
        model = "a·C^(−b) (3 points: c fixed to 0)" if fit.c_fixed else "a·C^(−b) + c"
        lines.append(f"| {FAMILY_LABELS[family]} | {fit.a:.4g} | {b} | {fit.c:.4f} | {fit.r2:.4f} | "
                     f"{fit.num_points} | {model} |")
    lines += ["", "| family | run | params | width × depth | steps | train FLOPs | eval loss | fit | residual |",
              "|---|---|---|---|---|---|---|---|---|"]
    for family, group in group_by_family(runs).items():
        fit = fits.get(family)
        for r in group:
            fitted = float(fit.predict(r.train_flops)) if fit else None
            fit_cells = f"{fitted:.4f} | {r.eval_loss - fitted:+.4f}" if fitted is not None else "— | —"
            lines.append(f"| {FAMILY_LABELS[family]} | {r.name} | {_params_text(r.params)} | {r.width} × {r.depth} "
                         f"| {r.steps} | {r.train_flops:.3e} | {r.eval_loss:.4f} | {fit_cells} |")
    return "\n".join(lines) + "\n"


def write_summary(runs: Sequence[Run], fits: dict[str, PowerLawFit], json_path: str, markdown_path: str) -> str:
    """Writes the fits and the points as JSON and as markdown tables (both atomically); returns the markdown."""
    write_json(json_path, {
        "model": "L(C) = a * C^(-b) + c, C = training FLOPs, L = eval loss",
        "fits": {f: dataclasses.asdict(fit) for f, fit in fits.items()},
        "runs": [dataclasses.asdict(r) for r in runs],
    })
    markdown = summary_markdown(runs, fits)
    write_text(markdown_path, markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m latent_lm.studies.scaling_law", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder holding one subfolder per scaling run")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/scaling)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.root, "scaling")
    runs = collect(args.root)
    if not runs:
        raise MissingInputError(f"no finished runs (with done.json) under {args.root}")
    fits = fit_families(runs)
    plot(runs, fits, os.path.join(out, "scaling.png"))
    print(write_summary(runs, fits, os.path.join(out, "scaling.json"), os.path.join(out, "scaling.md")), end="")
    print(f"wrote {out}/scaling.{{png,json,md}}")


if __name__ == "__main__":
    cli.main(main)
