"""Multimodal documents at paper scale (docs/method.md §7.3, docs/experiments.md §10.4): COCO image–caption pairs
(data_pipelines/coco_captions.py) and web text (data_pipelines/web_text.py) in the layout of the embedded documents
(data_pipelines/mllm_documents.py), packed and trained the same way. `config.documents.source = "coco"` selects them.

Kinds (`KINDS`, named as in mllm_documents, so `documents.mix` reads the same); N latents = the σ-VAE's grid (256 for
the ImageNet σ-VAE at 256²):
  text_to_image   <bos> caption <boi> z_1 … z_N <eoi> <eos>   caption → <null> at `null_prompt_rate` (CFG, §8.3);
                                                              prompt: up to and including <boi>
  image_to_text   <bos> <boi> z … <eoi> caption <eos>         prompt: up to and including <eoi>
  paragraph       <bos> web text [<eos>]                      one chunk of ≤ seq_len − 2 tokens of a document, drawn
                                                              among its chunks; <eos> only on the chunk that ends it
The caption is one of the image's ≈ 5, drawn, and cut to `max_caption_tokens`. The embedded kinds question,
successor and caption are built from MNIST's measured attributes and classes; COCO has no such grammar and one image
per record, so there is no interleaved kind with two images here.

Document i is a function of (seed, i): its kind drawn by `mix`, then an image (uniform over the split) or a web-text
record (uniform), a caption, the null prompt, the chunk. An epoch is `num_documents` documents (0: as many as make
each image appear about once, images / P(image kind)). Nothing is held in memory but the tokenizer: the image's
cached σ-VAE means come from latent-cache record i, its captions from tfds record i (the COCO image id the cache
stores as the label must equal the record's: a cache of another split or order is a DataError), the text from the
corpus record, all by random access.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from data_pipelines import coco_captions
from data_pipelines.latent_cache import LatentCacheSource
from data_pipelines.mllm_documents import KINDS as ALL_KINDS
from data_pipelines.mllm_documents import mix_probabilities
from data_pipelines.web_text import WebText, corpus
from latent_lm.errors import ConfigError, DataError
from latent_lm.text.tokenizer import TextTokenizer

SOURCE = "coco"  # config.documents.source
KINDS = ("text_to_image", "image_to_text", "paragraph")
Document = dict[str, Any]


def default_config() -> dict[str, Any]:
    """The `documents` section at paper scale (configs/mllm.py:scale=paper); the mix and sizes are our defaults."""
    return dict(
        source=SOURCE,
        data_dir="",                # the tfds data dir holding coco_captions and the text corpus ("": tfds's default)
        text_dataset="c4",          # web_text.DATASETS
        # By documents: half web text, half pairs. A text chunk is up to a row long, a pair ≈ N + 15 positions.
        mix=(("text_to_image", 0.25), ("image_to_text", 0.25), ("paragraph", 0.5)),
        null_prompt_rate=0.1,
        max_caption_tokens=64,      # COCO captions are ≈ 12 tokens; a longer one is cut
        num_documents=0,            # per epoch of "train"; 0: images / P(image kind)
        test_documents=0,           # of the held-out loss; 0: the test images / P(image kind)
        tokenizer_images=20_000,    # the BPE trains on the captions of this many train images …
        tokenizer_texts=50_000)     # … and this many web-text documents


def _mix(mix) -> np.ndarray:
    """Probabilities over mllm_documents.KINDS of a paper-scale `mix`; ConfigError for a kind it cannot build."""
    probs = mix_probabilities(mix)
    other = [k for k, p in zip(ALL_KINDS, probs) if p > 0 and k not in KINDS]
    if other:
        raise ConfigError(f"documents.mix holds {other}, which need the embedded captions' grammar; with "
                          f"documents.source={SOURCE!r} choose among {list(KINDS)}")
    return probs


def config_problem(documents: Mapping[str, Any]) -> str | None:
    """Why a paper-scale `documents` section cannot work, or None (the config checks of training.tasks.mllm)."""
    try:
        corpus(documents.get("text_dataset", ""))
        _mix(documents.get("mix", ()))
    except ConfigError as e:
        return str(e)
    if not 0.0 <= float(documents.get("null_prompt_rate", 0.0)) <= 1.0:
        return f"documents.null_prompt_rate={documents.get('null_prompt_rate')} must be in [0, 1]"
    if int(documents.get("max_caption_tokens", 0)) < 1:
        return f"documents.max_caption_tokens={documents.get('max_caption_tokens')} must be ≥ 1"
    return None


def _parts(parts: list[np.ndarray], latent_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids int [k] and image means float [N, C], in order → (tokens, is_latent, latents) of one document."""
    tokens, is_latent, latents = [], [], []
    for p in parts:
        image = p.ndim == 2
        tokens.append(np.zeros(len(p), np.int32) if image else p.astype(np.int32))
        is_latent.append(np.full(len(p), image))
        latents.append(p.astype(np.float32) if image else np.zeros((len(p), latent_dim), np.float32))
    return np.concatenate(tokens), np.concatenate(is_latent), np.concatenate(latents)


class CocoDocumentSource:
    """Document i of one split (module docstring): `document(i)` and `len()` (the epoch), as
    `packing.make_packed_dataset` reads a `DocumentStream`."""

    def __init__(self, *, pairs, latents: LatentCacheSource, text: WebText | None, tokenizer: TextTokenizer,
                 seq_len: int, seed: int, mix, null_prompt_rate: float = 0.1, max_caption_tokens: int = 64,
                 num_documents: int = 0):
        self.probs = _mix(mix)
        if not 0.0 <= float(null_prompt_rate) <= 1.0 or int(max_caption_tokens) < 1:
            raise ConfigError(f"null_prompt_rate={null_prompt_rate} must be in [0, 1] and max_caption_tokens="
                              f"{max_caption_tokens} ≥ 1")
        if len(latents) != len(pairs):
            raise DataError(f"the latent cache at {latents.path} holds {len(latents)} images but coco_captions "
                            f"{list(pairs.splits)} holds {len(pairs)}: re-run --mode=encode")
        self.p_image = float(sum(p for k, p in zip(ALL_KINDS, self.probs) if k != "paragraph"))
        if self.probs[ALL_KINDS.index("paragraph")] > 0 and text is None:
            raise ConfigError("paragraph documents need the web-text corpus")
        self.pairs, self.latents, self.text, self.tokenizer = pairs, latents, text, tokenizer
        self.seq_len, self.seed = int(seq_len), int(seed)
        self.null_prompt_rate, self.max_caption_tokens = float(null_prompt_rate), int(max_caption_tokens)
        n, c = latents.shape
        self.latent_dim = c
        longest = 4 + self.max_caption_tokens + n  # <bos> caption <boi> z… <eoi> <eos>
        if longest > self.seq_len:
            raise ConfigError(f"seq_len={self.seq_len} is too short for an image of {n} latents with a caption of "
                              f"up to {self.max_caption_tokens} tokens ({longest} positions)")
        if num_documents <= 0:
            num_documents = (int(round(len(latents) / self.p_image)) if self.p_image > 0 else len(text))
        self.num_documents = int(num_documents)

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> Document:
        return self.document(int(index))

    def pair(self, image: int) -> tuple[np.ndarray, list[str]]:
        """(cached σ-VAE means μ float32 [N, C], captions) of image `image` of the split."""
        cached, record = self.latents[image], self.pairs[image]
        if int(cached["label"]) != int(record["image/id"]):
            raise DataError(f"latent cache record {image} is COCO image {int(cached['label'])} but coco_captions "
                            f"record {image} is image {int(record['image/id'])}: the cache at {self.latents.path} "
                            f"does not hold {list(self.pairs.splits)} in order; re-run --mode=encode")
        captions = coco_captions.captions_of(record)
        if not captions:
            raise DataError(f"coco_captions record {image} (image {int(record['image/id'])}) has no caption")
        return cached["latents"], captions

    def caption_ids(self, caption: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(caption)[:self.max_caption_tokens], np.int32)

    def text_to_image(self, image: int, rng: np.random.Generator, null: bool | None = None) -> Document:
        """`<bos> caption <boi> z_1..z_N <eoi> <eos>` (caption → <null> at `null_prompt_rate`, or as `null` says)."""
        mu, captions = self.pair(image)
        caption = captions[int(rng.integers(len(captions)))]
        null = rng.random() < self.null_prompt_rate if null is None else null
        tok = self.tokenizer
        ids = np.asarray([tok.null_id], np.int32) if null else self.caption_ids(caption)
        parts = [np.asarray([tok.bos_id, *ids, tok.boi_id]), mu, np.asarray([tok.eoi_id, tok.eos_id])]
        return self._build("text_to_image", parts, prompt_len=len(ids) + 2, image=image, caption=caption)

    def image_to_text(self, image: int, rng: np.random.Generator) -> Document:
        """`<bos> <boi> z_1..z_N <eoi> caption <eos>`."""
        mu, captions = self.pair(image)
        caption = captions[int(rng.integers(len(captions)))]
        tok = self.tokenizer
        parts = [np.asarray([tok.bos_id, tok.boi_id]), mu,
                 np.asarray([tok.eoi_id, *self.caption_ids(caption), tok.eos_id])]
        return self._build("image_to_text", parts, prompt_len=len(mu) + 3, image=image, caption=caption)

    def paragraph(self, record: int, rng: np.random.Generator) -> Document:
        """`<bos> chunk [<eos>]`: one of the ≤ seq_len − 2 token chunks of web-text document `record`."""
        tok = self.tokenizer
        ids = np.asarray(tok.encode(self.text[record]), np.int32)
        width = self.seq_len - 2
        chunks = max(1, -(-len(ids) // width))
        k = int(rng.integers(chunks))
        end = [tok.eos_id] if k == chunks - 1 else []
        parts = [np.asarray([tok.bos_id, *ids[k * width:(k + 1) * width], *end])]
        return self._build("paragraph", parts, prompt_len=1, paragraph=record)

    def _build(self, kind: str, parts: list[np.ndarray], *, prompt_len: int, image: int = -1, paragraph: int = -1,
               caption: str = "") -> Document:
        tokens, is_latent, latents = _parts(parts, self.latent_dim)
        return {"tokens": tokens, "is_latent": is_latent, "latents": latents, "prompt_len": int(prompt_len),
                "kind": kind, "images": np.asarray([image] if image >= 0 else [], np.int32),
                "paragraph": int(paragraph), "caption": caption}

    def document(self, index: int) -> Document:
        rng = np.random.default_rng([self.seed, int(index)])
        kind = ALL_KINDS[int(rng.choice(len(ALL_KINDS), p=self.probs))]
        if kind == "paragraph":
            return self.paragraph(int(rng.integers(len(self.text))), rng)
        image = int(rng.integers(len(self.latents)))
        return self.text_to_image(image, rng) if kind == "text_to_image" else self.image_to_text(image, rng)

    def __repr__(self) -> str:
        # grain keys iterator checkpoints on reprs: no object ids here.
        mix = {k: round(float(p), 6) for k, p in zip(ALL_KINDS, self.probs) if p > 0}
        return (f"CocoDocumentSource({self.pairs!r}, {self.latents!r}, {self.text!r}, seq_len={self.seq_len}, "
                f"seed={self.seed}, mix={mix}, null_prompt_rate={self.null_prompt_rate}, "
                f"max_caption_tokens={self.max_caption_tokens}, num_documents={self.num_documents})")


def document_source(documents: Mapping[str, Any], split: str, latents_dir: str, tokenizer: TextTokenizer,
                    seq_len: int, seed: int, train: bool) -> CocoDocumentSource:
    """The documents of an experiment split ("train", "test") over `<latents_dir>` (that split's latent cache);
    held out (`train=False`): every caption kept, `test_documents` of them."""
    data_dir = documents.get("data_dir", "")
    text = (WebText(documents["text_dataset"], split, data_dir)
            if _mix(documents["mix"])[ALL_KINDS.index("paragraph")] > 0 else None)
    return CocoDocumentSource(
        pairs=coco_captions.records(split, data_dir), latents=LatentCacheSource(latents_dir), text=text,
        tokenizer=tokenizer, seq_len=seq_len, seed=seed, mix=documents["mix"],
        null_prompt_rate=documents["null_prompt_rate"] if train else 0.0,
        max_caption_tokens=documents.get("max_caption_tokens", 64),
        num_documents=int(documents.get("num_documents" if train else "test_documents", 0)))


def tokenizer_training_texts(documents: Mapping[str, Any]) -> list[str]:
    """The BPE's training text (docs/method.md §7.3): every caption of the first `tokenizer_images` train images and
    the first `tokenizer_texts` train documents of the web text. Train splits only."""
    data_dir = documents.get("data_dir", "")
    pairs = coco_captions.records("train", data_dir)
    texts = [c for i in range(min(len(pairs), int(documents["tokenizer_images"])))
             for c in coco_captions.captions_of(pairs[i])]
    if int(documents["tokenizer_texts"]) > 0:
        web = WebText(documents["text_dataset"], "train", data_dir)
        texts += [web[j] for j in range(min(len(web), int(documents["tokenizer_texts"])))]
    return texts
