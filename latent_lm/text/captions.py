"""The caption grammar of the embedded multimodal data (docs/method.md §7.3): pixel attributes of a 28×28 image,
class names, caption templates, questions about an image, and an exact parser for every caption rendered here.

Attributes, each measured on the uint8 image with integer moments (so the value does not depend on how many images
are measured together) and binned into three words by fixed thresholds (`THRESHOLDS`):
- thickness (thin / medium / thick): 2·area / perimeter of the ink (pixels ≥ 128), where area counts ink pixels
  and perimeter counts the unit edges between an ink pixel and a non-ink pixel or the image border. A stroke of
  width w and length l ≫ w has area w·l and perimeter ≈ 2l, so the value is the mean stroke width in pixels.
- slant (left / upright / right): −cov(row, col) / var(row) of the pixel coordinates weighted by intensity: the
  columns the ink moves right per row going up (the shear a deslanting transform would remove); > 0 leans right.
- size (small / medium / large): √(var(row) + var(col)) under the same weights, the ink's radius of gyration in
  pixels. (The bounding-box height would not do: MNIST scales every digit into a 20-pixel box.)
An empty image measures 0 on all three.

Class names: MNIST digits "zero" … "nine" ("digit seven"); animal_mnist's silhouettes in label order bear, bird, cat,
cow, dog, elephant, giraffe, horse, sheep, zebra (the wheel's METADATA lists these ten; the label order was checked
against the per-class sample rows of docs/animal_mnist_samples.png).

A caption renders (label, attributes) with one of `NUM_TEMPLATES` templates, e.g. "a thick digit seven leaning
right, small."; `parse_caption` inverts every rendering exactly (the grammar is finite: 10 × 27 × 5 strings).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np

from latent_lm.errors import ConfigError

THICKNESS = ("thin", "medium", "thick")
SLANT = ("left", "upright", "right")
SIZE = ("small", "medium", "large")
INK_LEVEL = 128  # a pixel is ink at ≥ 128 of 255 (the thickness measure only)

# Bin edges (value < lo: first word; lo ≤ value < hi: second; ≥ hi: third) per dataset: the 1/3 and 2/3 quantiles of
# the train split, `np.round(tertile_thresholds(load_embedded(name, "train")[0]), 3)`, computed once (2026-12-07) and
# fixed here so that captions never move. animal_mnist has its own: its filled silhouettes are all "thick" by the
# MNIST edges.
THRESHOLDS: dict[str, dict[str, tuple[float, float]]] = {
    "mnist": {"thickness": (1.75, 2.167), "slant": (0.008, 0.261), "size": (6.395, 7.084)},
    "animal_mnist": {"thickness": (2.811, 3.73), "slant": (-0.14, 0.176), "size": (7.484, 8.124)},
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "animal_mnist": ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"),
}
CATEGORY = {"mnist": "digit", "animal_mnist": "animal"}


class Attributes(NamedTuple):
    thickness: str  # one of THICKNESS
    slant: str  # one of SLANT
    size: str  # one of SIZE


ALL_ATTRIBUTES = tuple(Attributes(t, s, z) for t in THICKNESS for s in SLANT for z in SIZE)


def _check_dataset(dataset: str) -> None:
    if dataset not in CLASS_NAMES:
        raise ConfigError(f"no caption grammar for dataset {dataset!r}: choose one of {sorted(CLASS_NAMES)}")


def class_name(label: int, dataset: str = "mnist") -> str:
    """The class word: "seven" (mnist), "bear" (animal_mnist)."""
    _check_dataset(dataset)
    return CLASS_NAMES[dataset][int(label)]


def noun(label: int, dataset: str = "mnist") -> str:
    """The noun phrase captions use: "digit seven" (mnist), "bear" (animal_mnist)."""
    name = class_name(label, dataset)
    return f"digit {name}" if dataset == "mnist" else name


# ---------------------------------------------------------------------------------------------------------------
# Attributes

def _as_batch(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N,H,W] or [N,H,W,1], got {x.dtype} {x.shape}")
    return x


def measure(images: np.ndarray) -> np.ndarray:
    """Raw attribute values float64 [N, 3] (thickness, slant, size) of uint8 images [N,28,28(,1)] (module doc)."""
    x = _as_batch(images)
    n, h, w = x.shape
    ink = np.pad(x >= INK_LEVEL, ((0, 0), (1, 1), (1, 1)))
    area = ink.sum((1, 2))
    perimeter = (ink[:, 1:] != ink[:, :-1]).sum((1, 2)) + (ink[:, :, 1:] != ink[:, :, :-1]).sum((1, 2))
    thickness = 2.0 * area / np.maximum(perimeter, 1)
    # Integer moments are exact, so a value is the same whatever batch the image is measured in.
    wt = x.astype(np.int64)
    r = np.arange(h, dtype=np.int64)[:, None]
    c = np.arange(w, dtype=np.int64)[None, :]
    s0 = wt.sum((1, 2))
    sr, sc = (wt * r).sum((1, 2)), (wt * c).sum((1, 2))
    srr, scc, src = (wt * r * r).sum((1, 2)), (wt * c * c).sum((1, 2)), (wt * r * c).sum((1, 2))
    m = np.maximum(s0, 1).astype(np.float64)
    var_r = np.maximum(srr / m - (sr / m) ** 2, 0.0)
    var_c = np.maximum(scc / m - (sc / m) ** 2, 0.0)
    cov = src / m - (sr / m) * (sc / m)
    slant = np.where(var_r > 0, -cov / np.where(var_r > 0, var_r, 1.0), 0.0)
    size = np.sqrt(var_r + var_c)
    return np.stack([thickness, slant, size], axis=1)


def tertile_thresholds(images: np.ndarray) -> dict[str, tuple[float, float]]:
    """The 1/3 and 2/3 quantiles of each attribute over `images`: how `THRESHOLDS` were obtained."""
    values = measure(images)
    return {name: tuple(float(q) for q in np.quantile(values[:, i], [1 / 3, 2 / 3]))
            for i, name in enumerate(Attributes._fields)}


def attribute_bins(images: np.ndarray, dataset: str = "mnist") -> np.ndarray:
    """Bin indices int [N, 3] (thickness, slant, size; 0, 1, 2 index THICKNESS / SLANT / SIZE)."""
    _check_dataset(dataset)
    values = measure(images)
    edges = THRESHOLDS[dataset]
    return np.stack([np.searchsorted(np.asarray(edges[name]), values[:, i], side="right")
                     for i, name in enumerate(Attributes._fields)], axis=1)


def image_attributes(images: np.ndarray, dataset: str = "mnist") -> list[Attributes]:
    """The attribute words of each image of a batch [N,28,28(,1)] (use `images[None]` for one image)."""
    return [Attributes(THICKNESS[t], SLANT[s], SIZE[z]) for t, s, z in attribute_bins(images, dataset)]


# ---------------------------------------------------------------------------------------------------------------
# Captions

_LEAN = {"left": "leaning left", "upright": "standing upright", "right": "leaning right"}
_SLANT_NOUN = {"left": "left", "upright": "no", "right": "right"}
_THAT_LEANS = {"left": "that leans left", "upright": "that stands upright", "right": "that leans right"}
_TILTED = {"left": "tilted to the left", "upright": "upright", "right": "tilted to the right"}

# Every slot sits at a fixed place with its own word list, so each template renders (label, attributes) injectively.
_TEMPLATES = (
    lambda n, a: f"a {a.thickness} {n} {_LEAN[a.slant]}, {a.size}.",
    lambda n, a: f"a {a.size} {n} drawn with a {a.thickness} stroke, {_LEAN[a.slant]}.",
    lambda n, a: f"{n}: {a.thickness} stroke, {_SLANT_NOUN[a.slant]} slant, {a.size} size.",
    lambda n, a: f"a picture of a {a.size}, {a.thickness} {n} {_THAT_LEANS[a.slant]}.",
    lambda n, a: f"{a.size} and {a.thickness}, this {n} is {_TILTED[a.slant]}.",
)
NUM_TEMPLATES = len(_TEMPLATES)


def render_caption(label: int, attributes: Attributes, rng: np.random.Generator | None = None,
                   dataset: str = "mnist", template: int | None = None) -> str:
    """One caption of (label, attributes): template `template`, or one drawn from `rng`."""
    if template is None:
        if rng is None:
            raise ValueError("render_caption needs an rng or an explicit template")
        template = int(rng.integers(NUM_TEMPLATES))
    return _TEMPLATES[template](noun(label, dataset), Attributes(*attributes))


@functools.lru_cache(maxsize=None)
def _caption_table(dataset: str) -> dict[str, tuple[int, Attributes]]:
    table = {}
    for label in range(len(CLASS_NAMES[dataset])):
        for attrs in ALL_ATTRIBUTES:
            for t in range(NUM_TEMPLATES):
                text = render_caption(label, attrs, dataset=dataset, template=t)
                assert text not in table, f"ambiguous caption {text!r}"  # a grammar edit broke injectivity
                table[text] = (label, attrs)
    return table


def all_captions(dataset: str = "mnist") -> list[str]:
    """Every caption the grammar renders (10 labels × 27 attribute triples × `NUM_TEMPLATES`)."""
    _check_dataset(dataset)
    return list(_caption_table(dataset))


def parse_caption(text: str, dataset: str = "mnist") -> tuple[int, Attributes] | None:
    """(label, attributes) of a caption rendered by `render_caption`, or None for any other text. Exact match, up to
    leading and trailing whitespace (a decoded sample may end in a space)."""
    _check_dataset(dataset)
    return _caption_table(dataset).get(text.strip())


# ---------------------------------------------------------------------------------------------------------------
# Questions about an image (the interleaved "question" documents)

def _questions(label: int, a: Attributes, dataset: str) -> list[tuple[str, str]]:
    """Every (question, answer) about an image of (label, a): the class, each attribute's word, yes/no checks."""
    cat = CATEGORY[dataset]
    return [(f"which {cat} is this?", f"{class_name(label, dataset)}."),
            ("how thick is the stroke?", f"{a.thickness}."),
            ("which way does it lean?", {"left": "left.", "upright": "it stands upright.", "right": "right."}[a.slant]),
            ("how big is it?", f"{a.size}.")]


def _yes_no(a: Attributes, attribute: str, word: str) -> tuple[str, str]:
    question = {"thickness": lambda: f"is the stroke {word}?", "slant": lambda: f"is it {_LEAN[word]}?",
                "size": lambda: f"is it {word}?"}[attribute]()
    return question, "yes." if getattr(a, attribute) == word else "no."


def render_question(label: int, attributes: Attributes, rng: np.random.Generator,
                    dataset: str = "mnist") -> tuple[str, str]:
    """A (question, answer) about an image, drawn from `rng`: half open questions ("which digit is this?" →
    "seven."), half yes/no checks of one attribute, asked about the true word half of the time."""
    _check_dataset(dataset)
    a = Attributes(*attributes)
    if rng.random() < 0.5:
        open_questions = _questions(label, a, dataset)
        return open_questions[int(rng.integers(len(open_questions)))]
    attribute = Attributes._fields[int(rng.integers(3))]
    words = {"thickness": THICKNESS, "slant": SLANT, "size": SIZE}[attribute]
    true = getattr(a, attribute)
    word = true if rng.random() < 0.5 else [w for w in words if w != true][int(rng.integers(2))]
    return _yes_no(a, attribute, word)


def all_questions(dataset: str = "mnist") -> list[tuple[str, str]]:
    """Every (question, answer) `render_question` can return, without repeats."""
    _check_dataset(dataset)
    out = {}
    for label in range(len(CLASS_NAMES[dataset])):
        for a in ALL_ATTRIBUTES:
            for qa in _questions(label, a, dataset):
                out[qa] = None
            for attribute, words in zip(Attributes._fields, (THICKNESS, SLANT, SIZE)):
                for word in words:
                    out[_yes_no(a, attribute, word)] = None
    return list(out)


def successor_phrases(dataset: str = "mnist") -> tuple[str, str, str]:
    """The text around the two images of a successor document: "the digit after ", " is ", "."."""
    _check_dataset(dataset)
    return f"the {CATEGORY[dataset]} after ", " is ", "."


def captions_for(labels: Sequence[int], attributes: Sequence[Attributes], dataset: str = "mnist") -> list[str]:
    """Every template's caption of every (label, attributes) pair (tokenizer training text)."""
    return [render_caption(int(y), a, dataset=dataset, template=t)
            for y, a in zip(labels, attributes) for t in range(NUM_TEMPLATES)]
