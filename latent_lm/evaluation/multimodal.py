"""Generating with the multimodal model and scoring what it generates (docs/method.md §10.5).

Text-to-image: a held-out image's caption → `<boi>` → N latents with text CFG (null prompt `<bos> <null> <boi>`) →
the model's next token (must be `<eoi>`) → decoded image, scored by the class of the caption (classifier), the caption's
attributes measured on the generated pixels, and the Fréchet distance to the held-out images. Image-to-text: a
held-out image (σ-noised like training latents) → greedy caption, parsed exactly for the class and attributes, and
its word F1 against every caption of the true image. Interleaved: "the digit after" → the model opens an image
itself, writes it, closes it, continues "is", opens and writes a second image; scored by `<eoi>` placement and
whether the second digit follows the first. Text: held-out perplexity of the Python-docs paragraphs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import mllm_documents as docs
from latent_lm.evaluation.text_metrics import caption_similarity, mean
from latent_lm.generation import Generation, GenerationSettings, Prompt, make_generator, make_prompt
from latent_lm.text import captions
from latent_lm.training.batches import document_targets
from latent_lm.training.tasks.mllm import NULL_ID, PAD_ID, MultimodalTask

Decode = Callable[[np.ndarray], np.ndarray]  # normalised latents [B, N, C] → uint8 images [B, H, W, 1]


@dataclasses.dataclass
class Generator:
    """A trained multimodal model ready to generate: its task, parameters and image decoder, and the sampler
    settings of the config (`diffusion.num_sampling_steps`, `cfg_scale`, `prediction_type`, `x0_clip`)."""

    task: MultimodalTask
    params: object
    decode: Decode
    num_steps: int
    cfg_scale: float
    x0_clip: float | None
    batch: int

    def settings(self, max_new: int, guided: bool) -> GenerationSettings:
        return GenerationSettings(max_new=max_new, num_latents=self.task.num_latents, num_steps=self.num_steps,
                                  cfg_scale=self.cfg_scale if guided else None,
                                  prediction_type=self.task.prediction_type, x0_clip=self.x0_clip)

    def prompt(self, documents: Sequence[dict], rng: jax.Array, width: int) -> Prompt:
        """Prompt forms of documents, left-aligned in `width` slots; their image latents become model latents as in
        training (σ-noised, normalised)."""
        items = []
        for i, d in enumerate(documents):
            z = np.asarray(self.task.model_latents(jax.random.fold_in(rng, i), jnp.asarray(d["latents"])[None],
                                                   jnp.asarray(d["is_latent"])[None]))[0]
            items.append([z[j] if d["is_latent"][j] else int(d["tokens"][j]) for j in range(len(d["tokens"]))])
        return make_prompt(items, self.task.model.config.latent_dim, width)

    def generate(self, documents: Sequence[dict], settings: GenerationSettings, rng: jax.Array,
                 null_ids: Sequence[int] | None = None) -> Generation:
        """Generates after each document's tokens in batches of `batch` (one compiled shape: prompts padded to the
        longest, the last batch filled with repeats that are dropped); `null_ids`: the null prompt of CFG."""
        run = make_generator(self.task.model, self.task.schedule, settings)
        width = max(len(d["tokens"]) for d in documents)
        c = self.task.model.config.latent_dim
        null = None if null_ids is None else make_prompt([list(null_ids)] * self.batch, c)
        outs = []
        for i in range(0, len(documents), self.batch):
            part = list(documents[i:i + self.batch])
            n = len(part)
            part += [part[-1]] * (self.batch - n)
            key = jax.random.fold_in(rng, i)
            g = jax.device_get(run(self.params, self.prompt(part, key, width), key, null))
            outs.append(jax.tree.map(lambda x: x[:n], g))
        return jax.tree.map(lambda *x: np.concatenate(x), *outs)


def _images_of(g: Generation, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first image's latents [B, N, C] of each element and whether it was complete (N latents in a row)."""
    first = np.argmax(g.is_latent, axis=1)
    idx = first[:, None] + np.arange(n)[None]
    idx = np.minimum(idx, g.is_latent.shape[1] - 1)
    complete = np.take_along_axis(g.is_latent, idx, 1).all(1) & g.is_latent.any(1)
    return np.take_along_axis(g.latents, idx[..., None], 1), complete


def _eoi_after_images(g: Generation, n: int, eoi_id: int) -> tuple[int, int]:
    """(images followed by `<eoi>`, complete images) over every element: the `<eoi>` placement of generation."""
    hits = total = 0
    for b in range(g.tokens.shape[0]):
        lat = g.is_latent[b, :g.num_generated[b]]
        j = 0
        while j < len(lat):
            if lat[j]:
                k = j
                while k < len(lat) and lat[k]:
                    k += 1
                if k - j == n and k < len(lat):
                    total += 1
                    hits += int(g.tokens[b, k] == eoi_id)
                j = k
            else:
                j += 1
    return hits, total


def text_to_image(gen: Generator, split: docs.MultimodalSplit, per_class: int, seed: int) -> dict:
    """Captions of `per_class` held-out images of each class → generated images (see the module docstring)."""
    chosen = [int(i) for k in range(split.num_classes) for i in split.by_class[k][:per_class]]
    documents = [docs.prompt(docs.text_to_image(split, np.random.default_rng([seed, i]), image=i)) for i in chosen]
    tok = split.tokenizer
    n = gen.task.num_latents
    g = gen.generate(documents, gen.settings(n + 2, guided=True), jax.random.PRNGKey(seed),
                     null_ids=docs.caption_prompt(tok, None))
    z, complete = _images_of(g, n)
    assert complete.all(), "a prompt ending in <boi> starts an image of N latents"
    prompts_text = [tok.decode(d["tokens"][1:-1]) for d in documents]
    return dict(images=gen.decode(z), labels=split.labels[chosen], captions=np.asarray(prompts_text),
                attributes=[split.attributes[i] for i in chosen], eoi_after_image=g.tokens[:, n] == tok.eoi_id,
                source_images=np.asarray(chosen, np.int32))


def image_to_text(gen: Generator, split: docs.MultimodalSplit, count: int, seed: int, max_new: int = 40) -> dict:
    """`count` held-out images → greedy captions, parsed (see the module docstring)."""
    chosen = list(range(min(count, len(split.labels))))
    documents = [docs.prompt(docs.image_to_text(split, np.random.default_rng([seed, i]), image=i)) for i in chosen]
    g = gen.generate(documents, gen.settings(max_new, guided=False), jax.random.PRNGKey(seed + 1))
    tok = split.tokenizer
    texts = [tok.decode([int(t) for t in g.tokens[b, :g.num_generated[b]] if t != tok.eos_id])
             for b in range(len(documents))]
    parsed = [captions.parse_caption(t, split.dataset) for t in texts]
    labels = split.labels[chosen]
    attrs = [split.attributes[i] for i in chosen]
    references = [[c for c in captions.all_captions(split.dataset)
                   if captions.parse_caption(c, split.dataset) == (int(y), a)] for y, a in zip(labels, attrs)]
    return dict(captions=texts, labels=labels, attributes=attrs, parsed=parsed,
                similarity=[caption_similarity(t, refs) for t, refs in zip(texts, references)],
                source_images=np.asarray(chosen, np.int32))


def interleaved(gen: Generator, split: docs.MultimodalSplit, count: int, seed: int) -> dict:
    """Free generation from "<bos> the digit after": both images come from the model's own `<boi>`s."""
    before = split.encode(captions.successor_phrases(split.dataset)[0])
    n = gen.task.num_latents
    documents = [dict(tokens=np.asarray([split.tokenizer.bos_id, *before], np.int32),
                      is_latent=np.zeros(len(before) + 1, bool),
                      latents=np.zeros((len(before) + 1, gen.task.model.config.latent_dim), np.float32))] * count
    settings = dataclasses.replace(gen.settings(2 * n + 24, guided=False), temperature=1.0)
    g = gen.generate(documents, settings, jax.random.PRNGKey(seed + 2))
    hits, total = _eoi_after_images(g, n, split.tokenizer.eoi_id)
    firsts, seconds, pairs = [], [], []
    for b in range(g.tokens.shape[0]):
        lat = g.is_latent[b, :g.num_generated[b]]
        starts = [j for j in range(len(lat)) if lat[j] and (j == 0 or not lat[j - 1])]
        complete = [j for j in starts if j + n <= len(lat) and lat[j:j + n].all()]
        pairs.append(len(complete) >= 2)
        if len(complete) >= 2:
            firsts.append(g.latents[b, complete[0]:complete[0] + n])
            seconds.append(g.latents[b, complete[1]:complete[1] + n])
    out = dict(eoi_hits=hits, eoi_total=total, two_images=np.asarray(pairs))
    if firsts:
        out.update(first=gen.decode(np.stack(firsts)), second=gen.decode(np.stack(seconds)))
    return out


def paragraph_rows(split: docs.MultimodalSplit, batch: int):
    """Every paragraph chunk of the split as `<bos> chunk <eos>`, one document per row of `split.seq_len`, in batches
    of packed-row arrays (the last batch padded with empty rows)."""
    c = split.latents.shape[-1]
    rows = [docs.paragraph(split, np.random.default_rng(0), chunk=i)["tokens"] for i in range(len(split.chunks))]
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        tokens = np.zeros((batch, split.seq_len), np.int32)
        segments = np.zeros((batch, split.seq_len), np.int32)
        for r, ids in enumerate(part):
            tokens[r, :len(ids)], segments[r, :len(ids)] = ids, 1
        positions = np.where(segments > 0, np.arange(split.seq_len)[None], 0).astype(np.int32)
        yield dict(tokens=tokens, is_latent=np.zeros_like(tokens, bool),
                   latents=np.zeros((batch, split.seq_len, c), np.float32), segment_ids=segments, positions=positions)


def text_nll(task: MultimodalTask, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(Σ negative log-likelihood in nats, number of predicted tokens) of the text targets of packed rows."""
    z = jnp.zeros_like(batch["latents"], jnp.float32)  # paragraphs hold no image
    targets = document_targets(batch["tokens"], batch["is_latent"], z, batch["segment_ids"], (PAD_ID, NULL_ID))
    _, hidden = task.model.apply(params, batch["tokens"], z, batch["is_latent"], batch["positions"],
                                 batch["segment_ids"])
    logp = jax.nn.log_softmax(task.model.apply(params, hidden, method=type(task.model).lm_logits), -1)
    nll = -jnp.take_along_axis(logp, targets["text_targets"][..., None], -1)[..., 0]
    mask = targets["text_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def attribute_accuracy(wanted: Sequence[captions.Attributes], measured: Sequence[captions.Attributes]
                       ) -> dict[str, float]:
    """Per attribute, the fraction of images whose measured bin is the wanted one."""
    return {name: mean([float(getattr(w, name) == getattr(m, name)) for w, m in zip(wanted, measured)])
            for name in captions.Attributes._fields}
