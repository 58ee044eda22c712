"""Analysis of finished sweeps (issue 5, "Studies"): the LatentLM-vs-DiT scaling law (docs/method.md §4.6 scaling
family, §9 DiT twin, §10.2 Fig. 4) in `scaling_law.py` and the tokenizer-variance study (docs/method.md §2.4, §10.2
Fig. 6) in `tokenizer_variance.py`.

This package file holds what both studies share: the run-directory contract and atomic file writing (the root
may be a URL, gs://...: `latent_lm.storage`).
A generator run is a directory `<root>/<name>/` holding `config.json` (the resolved ml_collections config), its
`eval/*.json` results, and `done.json` once every stage finished. A subdirectory without `config.json` or
`done.json` is not a run (e.g. a study's own output folder inside the root) and is ignored; a run without
`done.json` is skipped with one warning line that lists all such runs.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from latent_lm import storage
from latent_lm.errors import DataError, MissingInputError

log = logging.getLogger(__name__)

FAMILIES = ("latent_lm", "dit")
FAMILY_LABELS = {"latent_lm": "LatentLM", "dit": "DiT"}
FAMILY_COLORS = {"latent_lm": "tab:blue", "dit": "tab:orange"}


def finished_run_dirs(root: str) -> list[str]:
    """The finished generator runs under `root`, sorted by name; warns once about started, unfinished runs.

    Tokenizer runs of a sweep (their stages train no generator) are not runs of the study and are left out.
    """
    if not storage.isdir(root):
        raise MissingInputError(f"run root {root!r} is not a directory")
    finished, unfinished = [], []
    for name in sorted(storage.listdir(root)):
        path = storage.join(root, name)
        if not storage.isdir(path):
            continue
        if storage.exists(storage.join(path, "done.json")):
            if "train" in read_json(storage.join(path, "config.json")).get("stages", ("train",)):
                finished.append(path)
        elif storage.exists(storage.join(path, "config.json")):
            unfinished.append(name)
    if unfinished:
        log.warning("skipping %d unfinished run(s) without done.json under %s: %s", len(unfinished), root,
                    ", ".join(unfinished))
    return finished


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path`; a missing file is a MissingInputError, anything unreadable a DataError."""
    if not storage.exists(path):
        raise MissingInputError(f"{path} is missing")
    try:
        value = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def config_value(config: dict[str, Any], dotted: str, source: str) -> Any:
    """`config["a"]["b"]` for dotted="a.b"; a missing key is a DataError naming `source` (the config file)."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{source} has no key {dotted!r}")
        value = value[part]
    return value


def finite_number(value: Any, what: str, source: str) -> float:
    """`value` as a finite float, else a DataError naming the field and the file."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{source}: {what} must be a finite number, got {value!r}")
    return float(value)


def write_text(path: str, text: str) -> None:
    """Writes `text` atomically (temp file + rename: never a half file)."""
    storage.write_text_atomic(path, text)


def write_json(path: str, value: Any) -> None:
    # allow_nan=False: NaN/inf are not JSON; the studies store None for undefined values instead.
    write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot global state, no display needed."""
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str) -> None:
    with storage.atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=120)
