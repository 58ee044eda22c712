"""Generating with the multimodal model and scoring what it generates (docs/method.md §10.5).

Text-to-image: a held-out image's caption → `<boi>` → N latents with text CFG (null prompt `<bos> <null> <boi>`) →
the model's next token (must be `<eoi>`) → decoded image, scored by the class of the caption (classifier), the caption's
attributes measured on the generated pixels, and the Fréchet distance to the held-out images. Image-to-text: a
held-out image (its σ-VAE latents as `eval.prompt_latents` says) → greedy caption, parsed exactly for the class and
attributes, and its word F1 against every caption of the true image. Interleaved: "the digit after" → the model opens
an image itself, writes it, closes it, continues "is", opens and writes a second image; scored by `<eoi>` placement
and whether the second digit follows the first. Text: held-out perplexity of the Python-docs paragraphs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import mllm_documents as docs
from latent_lm.evaluation.text_metrics import caption_similarity, mean
from latent_lm import transfusion_sampling
from latent_lm.generation import Generation, GenerationSettings, Prompt, make_generator, make_prompt
from latent_lm.sampling import SamplerSettings
from latent_lm.text import captions
from latent_lm.text.tokenizer import SPECIAL_TOKENS
from latent_lm.training.batches import document_targets
from latent_lm.training.tasks.mllm import NULL_ID, PAD_ID, PROMPT_LATENTS

Decode = Callable[[np.ndarray], np.ndarray]  # normalised latents [B, N, C] → uint8 images [B, H, W, 1]


@dataclasses.dataclass
class Generator:
    """A trained multimodal model ready to generate: its task, parameters and image decoder, and the sampler
    settings of the config (`diffusion.num_sampling_steps`, `cfg_scale`, `prediction_type`, `x0_clip`). Each arm
    implements `images` (text-to-image), `captions` (image-to-text) and `free` (interleaved generation, or None where
    the arm has no such loop); prompts go in batches of `batch`, one compiled shape (padded to the longest prompt,
    the last batch filled with repeats that are dropped). `prompt_std`: the σ of the prompts' image latents (None:
    drawn per image as in training; 0: the σ-VAE's mean μ; `prompt_latent_std`)."""

    task: Any
    params: Any
    decode: Decode
    num_steps: int
    cfg_scale: float
    x0_clip: float | None
    batch: int
    prompt_std: float | None = None

    def model_prompts(self, documents: Sequence[dict], rng: jax.Array) -> list[Prompt]:
        """Prompt forms of documents in batches, left-aligned in the longest's width; image latents become model
        latents (σ-noised at `prompt_std`, normalised: `task.model_latents`)."""
        width = max(len(d["tokens"]) for d in documents)
        out = []
        for i in range(0, len(documents), self.batch):
            part = list(documents[i:i + self.batch])
            part += [part[-1]] * (self.batch - len(part))
            items = []
            for j, d in enumerate(part):
                key = jax.random.fold_in(rng, i + j)
                z = d["latents"] if not d["is_latent"].any() else np.asarray(self.task.model_latents(
                    key, jnp.asarray(d["latents"])[None], jnp.asarray(d["is_latent"])[None], self.prompt_std))[0]
                items.append([z[k] if d["is_latent"][k] else int(d["tokens"][k]) for k in range(len(d["tokens"]))])
            out.append(make_prompt(items, self.task.model.config.latent_dim, width))
        return out

    def _batched(self, fn: Callable, documents: Sequence[dict], rng: jax.Array):
        outs = []
        for i, prompt in enumerate(self.model_prompts(documents, rng)):
            n = min(self.batch, len(documents) - i * self.batch)
            outs.append(jax.tree.map(lambda x: np.asarray(x)[:n], jax.device_get(fn(prompt, jax.random.fold_in(rng, i)))))
        return jax.tree.map(lambda *x: np.concatenate(x), *outs)


class LatentLMGenerator(Generator):
    """The LatentLM arm: everything through the one compiled loop of `latent_lm.generation`."""

    def settings(self, max_new: int, guided: bool, temperature: float = 0.0) -> GenerationSettings:
        return GenerationSettings(max_new=max_new, num_latents=self.task.num_latents, num_steps=self.num_steps,
                                  cfg_scale=self.cfg_scale if guided else None, temperature=temperature,
                                  prediction_type=self.task.prediction_type, x0_clip=self.x0_clip)

    def generate(self, documents: Sequence[dict], settings: GenerationSettings, rng: jax.Array,
                 null_ids: Sequence[int] | None = None) -> Generation:
        run = make_generator(self.task.model, getattr(self.task, "schedule", None), settings)  # VQ: no diffusion
        c = self.task.model.config.latent_dim
        null = None if null_ids is None else make_prompt([list(null_ids)] * self.batch, c)
        return self._batched(lambda prompt, key: run(self.params, prompt, key, null), documents, rng)

    def images(self, documents: Sequence[dict], rng: jax.Array, null_ids: Sequence[int]):
        """Prompts ending in `<boi>` → (normalised latents [B, N, C], whether the next token was `<eoi>` [B])."""
        n = self.task.num_latents
        g = self.generate(documents, self.settings(n + 2, guided=True), rng, null_ids)
        if not g.is_latent[:, :n].all():
            raise AssertionError("a prompt ending in <boi> starts an image of N latents")
        return g.latents[:, :n], g.tokens[:, n] == SPECIAL_TOKENS.index("<eoi>")

    def captions(self, documents: Sequence[dict], rng: jax.Array, max_new: int) -> list[list[int]]:
        g = self.generate(documents, self.settings(max_new, guided=False), rng)
        return [[int(t) for t in g.tokens[b, :g.num_generated[b]]] for b in range(len(documents))]

    def free(self, documents: Sequence[dict], rng: jax.Array, max_new: int) -> Generation:
        return self.generate(documents, self.settings(max_new, guided=False, temperature=1.0), rng)

    def item_latents(self, g: Generation) -> np.ndarray:
        """Normalised latents [B, T, C] of the generated image items (zeros elsewhere)."""
        return g.latents

    def text_logits(self, params, batch: dict) -> jax.Array:
        model = self.task.model
        _, hidden = model.apply(params, batch["tokens"], jnp.zeros_like(batch["latents"], jnp.float32),
                                batch["is_latent"], batch["positions"], batch["segment_ids"])
        return model.apply(params, hidden, method=type(model).lm_logits)


class TransfusionGenerator(Generator):
    """The Transfusion arm: whole-image denoising over the cached prompt, and greedy captions
    (`latent_lm.transfusion_sampling`); no interleaved loop, and `<eoi>` follows every image by construction."""

    def _right_aligned(self, prompt: Prompt) -> tuple[np.ndarray, ...]:
        tokens, latents, is_latent, lengths = (np.asarray(x) for x in (prompt.tokens, prompt.latents,
                                                                       prompt.is_latent, prompt.lengths))
        shift = tokens.shape[1] - lengths
        roll = lambda x: np.stack([np.roll(r, k, axis=0) for r, k in zip(x, shift)])
        return roll(tokens), roll(latents), roll(is_latent), lengths

    def images(self, documents: Sequence[dict], rng: jax.Array, null_ids: Sequence[int]):
        settings = SamplerSettings(num_steps=self.num_steps, cfg_scale=self.cfg_scale,
                                   prediction_type=self.task.prediction_type, x0_clip=self.x0_clip)
        sample = transfusion_sampling.make_image_sampler(self.task.model, self.task.schedule, settings,
                                                         self.task.num_latents, np.asarray(null_ids, np.int32))

        def fn(prompt, key):
            tokens, _, _, lengths = self._right_aligned(prompt)
            return sample(self.params, tokens, lengths, key)

        return self._batched(fn, documents, rng), None

    def captions(self, documents: Sequence[dict], rng: jax.Array, max_new: int) -> list[list[int]]:
        caption = transfusion_sampling.make_captioner(self.task.model, max_new)
        tokens, num = self._batched(lambda prompt, key: caption(self.params, *self._right_aligned(prompt)),
                                    documents, rng)
        return [[int(t) for t in tokens[b, :num[b]]] for b in range(len(documents))]

    def free(self, documents: Sequence[dict], rng: jax.Array, max_new: int) -> None:
        return None

    def text_logits(self, params, batch: dict) -> jax.Array:
        model, tokens = self.task.model, batch["tokens"]
        none = jnp.zeros(tokens.shape[:1] + (1,), jnp.int32)  # no image: one unused timestep slot
        hidden = model.apply(params, tokens, jnp.zeros_like(batch["latents"], jnp.float32), batch["is_latent"], none,
                             jnp.zeros_like(tokens), batch["positions"], batch["segment_ids"])
        return model.apply(params, hidden, method=type(model).lm_logits)


class VQGenerator(LatentLMGenerator):
    """The VQ-MLLM arm: the same compiled loop in code mode (an image is N code tokens sampled from the LM head with
    CFG on logits, at temperature 1; text stays greedy where asked), prompts' images as their code tokens."""

    def settings(self, max_new: int, guided: bool, temperature: float = 0.0) -> GenerationSettings:
        return GenerationSettings(max_new=max_new, num_latents=self.task.num_latents, temperature=temperature,
                                  cfg_scale=self.cfg_scale if guided else None, image_codes=self.task.image_codes)

    def model_prompts(self, documents: Sequence[dict], rng: jax.Array) -> list[Prompt]:
        coded = [dict(d, tokens=np.asarray(self.task.code_tokens(jnp.asarray(d["tokens"]), jnp.asarray(d["latents"]),
                                                                   jnp.asarray(d["is_latent"]))),
                      is_latent=np.zeros_like(d["is_latent"]), latents=np.zeros_like(d["latents"]))
                 for d in documents]
        return super().model_prompts(coded, rng)

    def images(self, documents: Sequence[dict], rng: jax.Array, null_ids: Sequence[int]):
        n = self.task.num_latents
        g = self.generate(documents, self.settings(n + 2, guided=True, temperature=1.0), rng, null_ids)
        grid = np.asarray(self.task.image_latents(jnp.asarray(g.tokens[:, :n])))
        return np.asarray(self.task.norm.normalize(grid)), g.tokens[:, n] == SPECIAL_TOKENS.index("<eoi>")

    def text_logits(self, params, batch: dict) -> jax.Array:
        return self.task.logits(params, batch["tokens"], batch["positions"], batch["segment_ids"])

    def item_latents(self, g: Generation) -> np.ndarray:
        grid = np.asarray(self.task.image_latents(jnp.asarray(g.tokens)))
        return np.where(g.is_latent[..., None], np.asarray(self.task.norm.normalize(grid)), 0.0)


GENERATORS = {"mllm": LatentLMGenerator, "transfusion": TransfusionGenerator, "vq": VQGenerator}


def prompt_latent_std(eval_config) -> float | None:
    """`eval.prompt_latents` → `Generator.prompt_std` (`training.tasks.mllm.PROMPT_LATENTS`)."""
    return PROMPT_LATENTS[eval_config.get("prompt_latents", "sampled")]


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
    z, eoi = gen.images(documents, jax.random.PRNGKey(seed), docs.caption_prompt(tok, None))
    out = dict(images=gen.decode(z), labels=split.labels[chosen],
               captions=np.asarray([tok.decode(d["tokens"][1:-1]) for d in documents]),
               attributes=[split.attributes[i] for i in chosen], source_images=np.asarray(chosen, np.int32))
    if eoi is not None:
        out["eoi_after_image"] = eoi
    return out


def image_to_text(gen: Generator, split: docs.MultimodalSplit, count: int, seed: int, max_new: int = 40) -> dict:
    """`count` held-out images → greedy captions, parsed (see the module docstring)."""
    chosen = list(range(min(count, len(split.labels))))
    documents = [docs.prompt(docs.image_to_text(split, np.random.default_rng([seed, i]), image=i)) for i in chosen]
    tok = split.tokenizer
    texts = [tok.decode([t for t in ids if t != tok.eos_id])
             for ids in gen.captions(documents, jax.random.PRNGKey(seed + 1), max_new)]
    parsed = [captions.parse_caption(t, split.dataset) for t in texts]
    labels = split.labels[chosen]
    attrs = [split.attributes[i] for i in chosen]
    by_meaning: dict[tuple, list[str]] = {}  # (class, attributes) → every caption that says it, parsed once
    for c in captions.all_captions(split.dataset):
        by_meaning.setdefault(captions.parse_caption(c, split.dataset), []).append(c)
    references = [by_meaning[(int(y), a)] for y, a in zip(labels, attrs)]
    return dict(captions=texts, labels=labels, attributes=attrs, parsed=parsed,
                similarity=[caption_similarity(t, refs) for t, refs in zip(texts, references)],
                source_images=np.asarray(chosen, np.int32))


def caption_prompt_images(gen: Generator, split: docs.MultimodalSplit, count: int, seed: int) -> np.ndarray | None:
    """The images `image_to_text`'s prompts show the model, decoded (uint8 [count, H, W, 1]): each prompt's latents
    σ-noised with the keys and `prompt_std` the LatentLM arm's prompts use, through the σ-VAE decoder. The
    classifier's accuracy on them bounds what a captioner can read from its prompts. None for the VQ arm (its prompts
    hold the codes)."""
    if not hasattr(gen.task, "model_latents"):
        return None
    rng = jax.random.PRNGKey(seed + 1)
    shown = []
    for i in range(min(count, len(split.labels))):
        d = docs.prompt(docs.image_to_text(split, np.random.default_rng([seed, i]), image=i))
        z = gen.task.model_latents(jax.random.fold_in(rng, i), jnp.asarray(d["latents"])[None],
                                   jnp.asarray(d["is_latent"])[None], gen.prompt_std)[0]
        shown.append(np.asarray(z)[d["is_latent"]])
    return np.concatenate([gen.decode(np.stack(shown[i:i + gen.batch])) for i in range(0, len(shown), gen.batch)])


def interleaved(gen: Generator, split: docs.MultimodalSplit, count: int, seed: int) -> dict | None:
    """Free generation from "<bos> the digit after": both images come from the model's own `<boi>`s (None for an arm
    without an interleaved loop)."""
    before = split.encode(captions.successor_phrases(split.dataset)[0])
    n = gen.task.num_latents
    documents = [dict(tokens=np.asarray([split.tokenizer.bos_id, *before], np.int32),
                      is_latent=np.zeros(len(before) + 1, bool),
                      latents=np.zeros((len(before) + 1, gen.task.model.config.latent_dim), np.float32))] * count
    g = gen.free(documents, jax.random.PRNGKey(seed + 2), 2 * n + 24)
    if g is None:
        return None
    hits, total = _eoi_after_images(g, n, split.tokenizer.eoi_id)
    latents = gen.item_latents(g)
    firsts, seconds, pairs = [], [], []
    for b in range(g.tokens.shape[0]):
        lat = g.is_latent[b, :g.num_generated[b]]
        starts = [j for j in range(len(lat)) if lat[j] and (j == 0 or not lat[j - 1])]
        complete = [j for j in starts if j + n <= len(lat) and lat[j:j + n].all()]
        pairs.append(len(complete) >= 2)
        if len(complete) >= 2:
            firsts.append(latents[b, complete[0]:complete[0] + n])
            seconds.append(latents[b, complete[1]:complete[1] + n])
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


def text_nll(gen: Generator, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(Σ negative log-likelihood in nats, number of predicted tokens) of the text targets of packed rows without
    images (jit it)."""
    z = jnp.zeros_like(batch["latents"], jnp.float32)
    targets = document_targets(batch["tokens"], batch["is_latent"], z, batch["segment_ids"], (PAD_ID, NULL_ID))
    logits = gen.text_logits(params, batch)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets["text_targets"][..., None], -1)[..., 0]
    mask = targets["text_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def attribute_accuracy(wanted: Sequence[captions.Attributes], measured: Sequence[captions.Attributes]
                       ) -> dict[str, float]:
    """Per attribute, the fraction of images whose measured bin is the wanted one."""
    return {name: mean([float(getattr(w, name) == getattr(m, name)) for w, m in zip(wanted, measured)])
            for name in captions.Attributes._fields}
