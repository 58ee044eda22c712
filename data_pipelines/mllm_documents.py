"""Multimodal documents for text + image LatentLM training (docs/method.md §7.3), built on the host from arrays.

A document is a dict of numpy arrays in the sequence layout of docs/method.md §7.3:
  tokens     int32 [L]      token ids; 0 (<pad>) at latent positions
  is_latent  bool  [L]      True where the position carries an image latent vector
  latents    float32 [L,C]  the cached σ-VAE mean μ at latent positions (not noised, not normalised), 0 elsewhere
plus `prompt_len` (the prompt form is the first `prompt_len` positions: `prompt(doc)`), `kind`, `images` (indices
into the split of the images it shows, in order; for a caption document, the one it describes) and `paragraph`
(index into the split's paragraphs of the one it quotes, or -1).

Kinds (`KINDS`), one public builder each; N latents = the σ-VAE grid (49 at 7×7):
  text_to_image   <bos> caption <boi> z_1 … z_N <eoi> <eos>     caption → <null> at `null_prompt_rate` (CFG, §8.3);
                                                                prompt: up to and including <boi>
  image_to_text   <bos> <boi> z … <eoi> caption <eos>           prompt: up to and including <eoi>
  question        <bos> <boi> z … <eoi> question answer <eos>   "is the stroke thick? yes."; prompt: up to the "?"
  successor       <bos> the digit after <boi> z_a <eoi> is <boi> z_b <eoi>. <eos>, label_b = label_a + 1 mod 10,
                  z_b a random image of that class in the same split; prompt: up to and including the second <boi>
  paragraph       <bos> English text <eos>: one chunk of ≤ seq_len − 2 tokens of a Python-docs paragraph
  caption         <bos> caption <eos>
Captions and questions come from `latent_lm.text.captions` (attributes measured on the image's pixels).

A split's documents use only that split's images and paragraphs: "train" documents never show a test image or quote
a test paragraph. `document_dataset` is a grain MapDataset: record index → one document whose kind (drawn from a
`mix` of weights) and images come from one rng seeded by (seed, index), so a document is a function of the two.
The latent arrays come from the latent cache (`load_split`), whose rows are in `load_embedded(name, split)` order:
`--mode=encode` reads `image_pipeline.ordered_images`, i.e. `load_embedded` in order, into contiguous shards, and
`load_latent_cache` reads the shards back in order (data_pipelines/latent_cache.py); `load_split` also checks that
the cached labels equal the embedded ones.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import grain
import numpy as np

from data_pipelines.embedded import load_embedded
from data_pipelines.latent_cache import load_latent_cache
from data_pipelines.text_corpus import python_docs_paragraphs
from latent_lm.errors import ConfigError, DataError
from latent_lm.text import captions
from latent_lm.text.tokenizer import TextTokenizer

KINDS = ("text_to_image", "image_to_text", "question", "successor", "paragraph", "caption")
IMAGE_KINDS = ("text_to_image", "image_to_text", "question", "successor")
Document = dict[str, Any]


class MultimodalSplit:
    """One split's material: cached σ-VAE means `latents` float32 [N,L,C], `images` uint8 [N,28,28,1] and `labels`
    [N] of the same N images (same order), English `paragraphs`, the text tokenizer, and `seq_len` (the packed row
    length: paragraphs are cut into chunks of ≤ seq_len − 2 tokens so that `<bos> chunk <eos>` fits a row)."""

    def __init__(self, *, dataset: str, split: str, latents: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 paragraphs: Iterable[str], tokenizer: TextTokenizer, seq_len: int):
        if dataset not in captions.CLASS_NAMES:
            raise ConfigError(f"no caption grammar for dataset {dataset!r}: choose one of "
                              f"{sorted(captions.CLASS_NAMES)}")
        latents, images, labels = np.asarray(latents, np.float32), np.asarray(images), np.asarray(labels, np.int32)
        if latents.ndim != 3 or not len(latents) == len(images) == len(labels):
            raise DataError(f"{dataset}/{split}: expected latents [N,L,C], images [N,28,28,1] and labels [N] of one "
                            f"N, got {latents.shape}, {images.shape} and {labels.shape}")
        if seq_len < 3:
            raise ConfigError(f"seq_len={seq_len} must be ≥ 3 (<bos>, one token, <eos>)")
        self.dataset, self.split, self.seq_len, self.tokenizer = dataset, split, int(seq_len), tokenizer
        self.latents, self.images, self.labels = latents, images, labels
        self.num_classes = len(captions.CLASS_NAMES[dataset])
        self.attributes = captions.image_attributes(images, dataset) if len(images) else []
        self.by_class = [np.flatnonzero(labels == k) for k in range(self.num_classes)]
        self.paragraphs = list(paragraphs)
        # Chunks of ≤ seq_len − 2 tokens, so `<bos> chunk <eos>` always fits a row and no text is dropped.
        width = self.seq_len - 2
        self.chunks: list[tuple[int, np.ndarray]] = []
        for p, ids in enumerate(tokenizer.encode_batch(self.paragraphs) if self.paragraphs else []):
            ids = np.asarray(ids, np.int32)
            self.chunks.extend((p, ids[i:i + width]) for i in range(0, len(ids), width))
        self._ids: dict[str, np.ndarray] = {}

    @property
    def latent_length(self) -> int:
        """Latent vectors per image (N = 49 for the 7×7 grid)."""
        return self.latents.shape[1]

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (memoised: captions and questions come from a finite grammar)."""
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = np.asarray(self.tokenizer.encode(text), np.int32)
        return ids

    def __repr__(self) -> str:
        # grain keys iterator checkpoints on reprs: no object ids here.
        return (f"MultimodalSplit(dataset={self.dataset!r}, split={self.split!r}, images={len(self.labels)}, "
                f"paragraphs={len(self.paragraphs)}, seq_len={self.seq_len})")


def load_split(dataset: str, split: str, latent_cache: str, tokenizer: TextTokenizer, seq_len: int) -> MultimodalSplit:
    """A split of an embedded dataset with its latent cache (`<tokenizer dir>/latents/<split>`) and the Python-docs
    paragraphs of the same split."""
    if dataset not in captions.CLASS_NAMES:  # e.g. COCO at paper scale: it trains, but generate/eval_mllm do not run
        raise ConfigError(f"no caption grammar for dataset {dataset!r}: generation and its scores read the embedded "
                          f"datasets {sorted(captions.CLASS_NAMES)} (docs/experiments.md §10.4)")
    latents, cached_labels = load_latent_cache(latent_cache)
    images, labels = load_embedded(dataset, split)
    if len(cached_labels) != len(labels) or not np.array_equal(cached_labels, labels):
        raise DataError(f"latent cache at {latent_cache} does not hold {dataset}/{split} in order "
                        f"({len(cached_labels)} records for {len(labels)} images): re-run --mode=encode")
    return MultimodalSplit(dataset=dataset, split=split, latents=latents, images=images, labels=labels,
                           paragraphs=python_docs_paragraphs(split), tokenizer=tokenizer, seq_len=seq_len)


class _Layout:
    """Accumulates a document's segments (text ids, images) and marks the prompt boundary."""

    def __init__(self, data: MultimodalSplit):
        self.data = data
        self.parts: list[np.ndarray | tuple[str, int]] = []
        self.images: list[int] = []
        self.length = 0
        self.prompt_len = 1

    def text(self, ids: np.ndarray | list[int]) -> "_Layout":
        ids = np.asarray(ids, np.int32)
        self.parts.append(ids)
        self.length += len(ids)
        return self

    def image(self, index: int, prompt_after_boi: bool = False) -> "_Layout":
        """`<boi> z_1..z_N <eoi>` of image `index`; `prompt_after_boi`: the prompt form ends at this <boi>."""
        self.text([self.data.tokenizer.boi_id])
        if prompt_after_boi:
            self.prompt_here()
        self.parts.append(("image", int(index)))
        self.images.append(int(index))
        self.length += self.data.latent_length
        return self.text([self.data.tokenizer.eoi_id])

    def prompt_here(self) -> "_Layout":
        self.prompt_len = self.length
        return self

    def build(self, kind: str, paragraph: int = -1) -> Document:
        n, c = self.data.latents.shape[1:]
        tokens = np.zeros(self.length, np.int32)
        is_latent = np.zeros(self.length, bool)
        latents = np.zeros((self.length, c), np.float32)
        at = 0
        for part in self.parts:
            if isinstance(part, tuple):
                is_latent[at:at + n] = True
                latents[at:at + n] = self.data.latents[part[1]]
                at += n
            else:
                tokens[at:at + len(part)] = part
                at += len(part)
        return {"tokens": tokens, "is_latent": is_latent, "latents": latents, "prompt_len": self.prompt_len,
                "kind": kind, "images": np.asarray(self.images, np.int32), "paragraph": int(paragraph)}


def _need_images(data: MultimodalSplit, kind: str) -> None:
    if not len(data.labels):
        raise DataError(f"{kind} documents need images, but {data.dataset}/{data.split} has none")


def _pick_image(data: MultimodalSplit, rng: np.random.Generator, image: int | None, kind: str) -> int:
    _need_images(data, kind)
    return int(rng.integers(len(data.labels))) if image is None else int(image)


def _caption(data: MultimodalSplit, rng: np.random.Generator, image: int) -> str:
    return captions.render_caption(int(data.labels[image]), data.attributes[image], rng, data.dataset)


def text_to_image(data: MultimodalSplit, rng: np.random.Generator, image: int | None = None,
                  null_prompt_rate: float = 0.0) -> Document:
    """`<bos> caption <boi> z_1..z_N <eoi> <eos>`; the caption is the single token <null> at `null_prompt_rate`.
    Prompt form: up to and including <boi>."""
    image = _pick_image(data, rng, image, "text_to_image")
    text = _caption(data, rng, image)
    tok = data.tokenizer
    ids = [tok.null_id] if rng.random() < null_prompt_rate else data.encode(text)
    return (_Layout(data).text([tok.bos_id]).text(ids).image(image, prompt_after_boi=True).text([tok.eos_id])
            .build("text_to_image"))


def image_to_text(data: MultimodalSplit, rng: np.random.Generator, image: int | None = None) -> Document:
    """`<bos> <boi> z_1..z_N <eoi> caption <eos>`. Prompt form: up to and including <eoi>."""
    image = _pick_image(data, rng, image, "image_to_text")
    tok = data.tokenizer
    return (_Layout(data).text([tok.bos_id]).image(image).prompt_here().text(data.encode(_caption(data, rng, image)))
            .text([tok.eos_id]).build("image_to_text"))


def question(data: MultimodalSplit, rng: np.random.Generator, image: int | None = None) -> Document:
    """`<bos> <boi> z.. <eoi> question answer <eos>`, e.g. "which digit is this? seven.". Prompt form: up to the end of
    the question."""
    image = _pick_image(data, rng, image, "question")
    q, a = captions.render_question(int(data.labels[image]), data.attributes[image], rng, data.dataset)
    tok = data.tokenizer
    return (_Layout(data).text([tok.bos_id]).image(image).text(data.encode(q)).prompt_here()
            .text(data.encode(" " + a)).text([tok.eos_id]).build("question"))


def successor(data: MultimodalSplit, rng: np.random.Generator, image: int | None = None) -> Document:
    """`<bos> the digit after <boi> z_a <eoi> is <boi> z_b <eoi>. <eos>` with label_b = label_a + 1 mod classes and
    z_b a random image of that class in the same split. Prompt form: up to and including the second <boi>."""
    a = _pick_image(data, rng, image, "successor")
    nxt = (int(data.labels[a]) + 1) % data.num_classes
    pool = data.by_class[nxt]
    if not len(pool):
        raise DataError(f"successor documents need images of every class, but {data.dataset}/{data.split} has "
                        f"none of class {nxt}")
    b = int(pool[rng.integers(len(pool))])
    before, middle, after = captions.successor_phrases(data.dataset)
    tok = data.tokenizer
    return (_Layout(data).text([tok.bos_id]).text(data.encode(before)).image(a).text(data.encode(middle))
            .image(b, prompt_after_boi=True).text(data.encode(after)).text([tok.eos_id]).build("successor"))


def paragraph(data: MultimodalSplit, rng: np.random.Generator, chunk: int | None = None) -> Document:
    """`<bos> text <eos>`: a chunk (≤ seq_len − 2 tokens) of one of the split's paragraphs. Prompt form: <bos>."""
    if not data.chunks:
        raise DataError(f"paragraph documents need text, but {data.dataset}/{data.split} has no paragraphs")
    p, ids = data.chunks[int(rng.integers(len(data.chunks))) if chunk is None else int(chunk)]
    tok = data.tokenizer
    return _Layout(data).text([tok.bos_id]).text(ids).text([tok.eos_id]).build("paragraph", paragraph=p)


def caption(data: MultimodalSplit, rng: np.random.Generator, image: int | None = None) -> Document:
    """`<bos> caption <eos>`: a caption alone (text only). Prompt form: <bos>."""
    image = _pick_image(data, rng, image, "caption")
    tok = data.tokenizer
    doc = _Layout(data).text([tok.bos_id]).text(data.encode(_caption(data, rng, image))).text([tok.eos_id])
    doc = doc.build("caption")
    doc["images"] = np.asarray([image], np.int32)  # described, not shown: for tests and evaluation
    return doc


BUILDERS: dict[str, Callable[..., Document]] = {
    "text_to_image": text_to_image, "image_to_text": image_to_text, "question": question, "successor": successor,
    "paragraph": paragraph, "caption": caption}


def build_document(data: MultimodalSplit, kind: str, rng: np.random.Generator, null_prompt_rate: float = 0.0
                   ) -> Document:
    """A document of `kind` drawn from `rng` (only text_to_image uses `null_prompt_rate`)."""
    if kind == "text_to_image":
        return text_to_image(data, rng, null_prompt_rate=null_prompt_rate)
    if kind not in BUILDERS:
        raise ConfigError(f"unknown document kind {kind!r}: choose among {KINDS}")
    return BUILDERS[kind](data, rng)


def prompt(document: Document) -> Document:
    """The prompt form of a document for generation and evaluation: its first `prompt_len` positions."""
    n = document["prompt_len"]
    return dict(document, tokens=document["tokens"][:n], is_latent=document["is_latent"][:n],
                latents=document["latents"][:n])


def caption_prompt(tokenizer: TextTokenizer, text: str | None) -> np.ndarray:
    """Token ids int32 of the text-to-image prompt `<bos> text <boi>`; `text=None` gives the null prompt
    `<bos> <null> <boi>` (the unconditional branch of classifier-free guidance)."""
    ids = [tokenizer.null_id] if text is None else tokenizer.encode(text)
    return np.asarray([tokenizer.bos_id, *ids, tokenizer.boi_id], np.int32)


def mix_probabilities(mix: Mapping[str, float] | Iterable[tuple[str, float]]) -> np.ndarray:
    """Probabilities float64 [len(KINDS)] of a `mix` {kind: weight} (weights ≥ 0, not all 0; missing kinds: 0)."""
    items = list(mix.items()) if hasattr(mix, "items") else list(mix)  # a dict, a ConfigDict or (kind, w) pairs
    weights = np.zeros(len(KINDS))
    for kind, w in items:
        if kind not in KINDS:
            raise ConfigError(f"unknown document kind {kind!r} in the mix: choose among {KINDS}")
        if not np.isfinite(float(w)) or float(w) < 0:
            raise ConfigError(f"document mix weight of {kind!r} must be a finite number ≥ 0, got {w}")
        weights[KINDS.index(kind)] = float(w)
    if weights.sum() <= 0:
        raise ConfigError(f"the document mix {dict(items)} has no positive weight")
    return weights / weights.sum()


def max_document_shape(data: MultimodalSplit, kind: str) -> tuple[int, int]:
    """(longest length, latent positions) a document of `kind` can have with this split's tokenizer and seq_len."""
    if kind not in KINDS:
        raise ConfigError(f"unknown document kind {kind!r}: choose among {KINDS}")
    n = data.latent_length
    cap = max(len(ids) for ids in data.tokenizer.encode_batch(captions.all_captions(data.dataset)))
    if kind in ("text_to_image", "image_to_text"):
        return 4 + cap + n, n  # <bos> caption <boi> z.. <eoi> <eos> (the <null> prompt is one token)
    if kind == "question":
        qa = max(len(data.encode(q)) + len(data.encode(" " + a)) for q, a in captions.all_questions(data.dataset))
        return 4 + n + qa, n
    if kind == "successor":
        text = sum(len(data.encode(s)) for s in captions.successor_phrases(data.dataset))
        return 6 + 2 * n + text, 2 * n
    if kind == "paragraph":
        return 2 + max((len(ids) for _, ids in data.chunks), default=0), 0
    return 2 + cap, 0


class DocumentSource(grain.sources.RandomAccessDataSource):
    """Record index → document: the kind (by `mix`) and everything in it drawn from one rng seeded by
    (seed, index). Any index ≥ 0 is a document; `len` is the epoch size `num_documents` (default: one per image,
    or per paragraph chunk when the split has no images)."""

    def __init__(self, data: MultimodalSplit, seed: int, mix: Mapping[str, float],
                 null_prompt_rate: float = 0.1, num_documents: int | None = None):
        if not 0.0 <= float(null_prompt_rate) <= 1.0:
            raise ConfigError(f"null_prompt_rate must be in [0, 1], got {null_prompt_rate}")
        self.data, self.seed, self.null_prompt_rate = data, int(seed), float(null_prompt_rate)
        self.probs = mix_probabilities(mix)
        for kind, p in zip(KINDS, self.probs):
            if p > 0 and kind in IMAGE_KINDS + ("caption",):
                _need_images(data, kind)
            if p > 0 and kind == "paragraph" and not data.chunks:
                raise DataError(f"paragraph documents need text, but {data.dataset}/{data.split} has no paragraphs")
        if num_documents is None:
            num_documents = len(data.labels) or len(data.chunks)
        if num_documents <= 0:
            raise ConfigError(f"num_documents must be positive, got {num_documents}")
        self.num_documents = int(num_documents)

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> Document:
        return self.document(int(index))

    def document(self, index: int) -> Document:
        rng = np.random.default_rng([self.seed, int(index)])
        kind = KINDS[int(rng.choice(len(KINDS), p=self.probs))]
        return build_document(self.data, kind, rng, self.null_prompt_rate)

    def __repr__(self) -> str:
        mix = {k: round(float(p), 6) for k, p in zip(KINDS, self.probs) if p > 0}
        return (f"DocumentSource({self.data!r}, seed={self.seed}, mix={mix}, "
                f"null_prompt_rate={self.null_prompt_rate}, num_documents={self.num_documents})")


def document_dataset(data: MultimodalSplit, seed: int, mix: Mapping[str, float], null_prompt_rate: float = 0.1,
                     num_documents: int | None = None) -> grain.MapDataset:
    """grain MapDataset of `num_documents` documents (see `DocumentSource`), deterministic in (seed, index)."""
    return grain.MapDataset.source(DocumentSource(data, seed, mix, null_prompt_rate, num_documents))


def tokenizer_training_texts(dataset: str) -> list[str]:
    """Text to train the BPE tokenizer on: the train paragraphs, every template's caption of every train image, and
    the question/answer and successor phrases. Train split only: the tokenizer never sees held-out text."""
    images, labels = load_embedded(dataset, "train")
    attrs = captions.image_attributes(images, dataset)
    qa = [f"{q} {a}" for q, a in captions.all_questions(dataset)]
    return python_docs_paragraphs("train") + captions.captions_for(labels, attrs, dataset) + qa + list(
        captions.successor_phrases(dataset))
