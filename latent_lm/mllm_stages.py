"""The multimodal stages (docs/method.md §10.5, docs/experiments.md §10): `generate` (held-out prompts → samples/),
`eval_mllm` (their scores and the text perplexity → eval/mllm.json) and `eval_curve` (the same scores at every kept
checkpoint → eval/curve.json: the study's metrics against training tokens).

Generation and scoring are one pair of functions used by all three, so a point of the curve is scored exactly as the
final checkpoint is: the same prompts (`eval.seed`), counts, sampler settings and classifier.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import jax
import numpy as np

from data_pipelines import mllm_documents
from data_pipelines.embedded import load_embedded
from latent_lm import storage
from latent_lm.evaluation import classifier as clf
from latent_lm.evaluation import multimodal as mm
from latent_lm.evaluation import text_metrics
from latent_lm.evaluation.frechet import feature_stats, frechet_distance
from latent_lm.evaluation.grids import save_captioned_grid, save_image_grid
from latent_lm.pixels import to_uint8
from latent_lm.stage_inputs import (data_paths, embedded_classifier, generator_params, generator_task, image_decoder,
                                    vae_params)
from latent_lm.text import captions
from latent_lm.text.tokenizer import TextTokenizer
from latent_lm.training.train_loop import checkpoint_steps
from latent_lm.training.train_loop import log_process0 as _log

CURVE_FILE = "eval/curve.json"


def multimodal_generators(config, workdir, mesh, rules
                          ) -> tuple[Callable[[int | None], mm.Generator], mllm_documents.MultimodalSplit]:
    """(step → the arm's generator (`model.arch`) at that checkpoint, None for the latest; the held-out split). The
    σ-VAE decoder and the split load once: each call reads only the LM checkpoint (eval_curve scores many)."""
    decode = image_decoder(config, vae_params(config, workdir, mesh, rules))
    d, e = config.diffusion, config.eval
    arm = mm.GENERATORS[config.model.arch]

    def at(step: int | None = None) -> mm.Generator:
        task, params, _ = generator_params(config, workdir, mesh, rules, step=step)
        return arm(task=task, params=params, decode=lambda z: to_uint8(np.asarray(decode(task.norm.denormalize(z)))),
                   num_steps=d.num_sampling_steps, cfg_scale=d.cfg_scale, x0_clip=d.x0_clip, batch=e.sample_batch,
                   prompt_std=mm.prompt_latent_std(e))

    paths = data_paths(config, workdir)
    split = mllm_documents.load_split(config.data.dataset, "test", f"{paths.latents}/test",
                                      TextTokenizer.load(paths.text_tokenizer), generator_task(config, workdir).seq_len)
    return at, split


def multimodal_generator(config, workdir, mesh, rules) -> tuple[mm.Generator, mllm_documents.MultimodalSplit]:
    """The arm's generator at the latest checkpoint, and the held-out split."""
    at, split = multimodal_generators(config, workdir, mesh, rules)
    return at(), split


def _samples(gen: mm.Generator, split: mllm_documents.MultimodalSplit, e) -> dict[str, Any]:
    """Text-to-image, image-to-text (as the records of samples/i2t.json) and free documents (None where the arm has
    no interleaved loop) on the held-out prompts of `eval`."""
    t0 = time.time()
    t2i = mm.text_to_image(gen, split, e.samples_per_class, e.seed)
    t2i_seconds = time.time() - t0
    i2t = mm.image_to_text(gen, split, e.caption_images, e.seed)
    records = [dict(image=int(i), label=int(y), caption=c, similarity=s)
               for i, y, c, s in zip(i2t["source_images"], i2t["labels"], i2t["captions"], i2t["similarity"])]
    free = mm.interleaved(gen, split, e.interleaved_samples, e.seed)
    return dict(t2i=t2i, t2i_seconds=t2i_seconds, i2t=records, free=free)


class _Scorer:
    """Scores one set of samples (docs/method.md §10.5) with the embedded classifier, trained once per tokenizer
    directory, and the held-out images' features as the FD reference."""

    def __init__(self, config, workdir: str, split: mllm_documents.MultimodalSplit):
        self.name, self.k, self.split = config.data.dataset, config.data.num_classes, split
        train_x, train_y = load_embedded(self.name, "train")
        self.cparams = embedded_classifier(config, workdir, train_x, train_y)
        self.ref_stats = feature_stats(clf.classify(self.cparams, split.images, self.k)[1])

    def __call__(self, t2i: dict, i2t: list[dict], free: dict | None) -> dict[str, float]:
        logits, feats = clf.classify(self.cparams, t2i["images"], self.k)
        wanted = [captions.Attributes(*a) for a in t2i["attributes"]]
        measured = captions.image_attributes(t2i["images"], self.name)
        result = {"t2i_class_accuracy": float((logits.argmax(-1) == t2i["labels"]).mean()),
                  "t2i_fd": float(frechet_distance(*feature_stats(feats), *self.ref_stats)),
                  **{f"t2i_{a}_accuracy": v for a, v in mm.attribute_accuracy(wanted, measured).items()}}
        if "eoi_after_image" in t2i:  # arms that place <eoi> themselves
            result["t2i_eoi_rate"] = float(np.mean(t2i["eoi_after_image"]))
        parsed = [captions.parse_caption(c["caption"], self.name) for c in i2t]
        truth = [(int(self.split.labels[c["image"]]), self.split.attributes[c["image"]]) for c in i2t]
        result.update(
            i2t_parse_rate=text_metrics.mean([float(p is not None) for p in parsed]),
            i2t_class_accuracy=text_metrics.mean([float(p is not None and p[0] == t[0]) for p, t in zip(parsed, truth)]),
            i2t_similarity=text_metrics.mean([c["similarity"] for c in i2t]),
            **{f"i2t_{a}_accuracy": text_metrics.mean([float(p is not None and getattr(p[1], a) == getattr(t[1], a))
                                                       for p, t in zip(parsed, truth)])
               for a in captions.Attributes._fields})
        if free is not None:
            result["interleaved_eoi_rate"] = float(free["eoi_hits"] / max(1, free["eoi_total"]))
            result["interleaved_two_images"] = float(np.mean(free["two_images"]))
        if free is not None and "first" in free:
            a = clf.classify(self.cparams, free["first"], self.k)[0].argmax(-1)
            b = clf.classify(self.cparams, free["second"], self.k)[0].argmax(-1)
            result["interleaved_successor_accuracy"] = float(((a + 1) % self.k == b).mean())
        return result


def _text_perplexity(gen: mm.Generator, split: mllm_documents.MultimodalSplit, batch: int) -> float:
    """exp(mean NLL per token) over every chunk of the held-out Python-docs paragraphs, one per row."""
    fn = jax.jit(lambda p, b: mm.text_nll(gen, p, b))
    total, count = 0.0, 0.0
    for rows in mm.paragraph_rows(split, batch):
        nll, n = fn(gen.params, rows)
        total, count = total + float(nll), count + float(n)
    return text_metrics.perplexity(total, int(count))


def generate(config, workdir, mesh, rules):
    """Multimodal generation on held-out prompts (docs/method.md §10.5): samples/t2i.{npz,png} (images from the
    captions of `eval.samples_per_class` test images per class), samples/i2t.{json,png} (captions of
    `eval.caption_images` test images), samples/interleaved.{npz,png} (`eval.interleaved_samples` free documents)."""
    gen, split = multimodal_generator(config, workdir, mesh, rules)
    e = config.eval
    s = _samples(gen, split, e)
    t2i, free = s["t2i"], s["free"]
    storage.write_npz_atomic(f"{workdir}/samples/t2i.npz", images=t2i["images"], labels=t2i["labels"],
                             captions=t2i["captions"], attributes=np.asarray([list(a) for a in t2i["attributes"]]),
                             source_images=t2i["source_images"],
                             **{k: t2i[k] for k in ("eoi_after_image",) if k in t2i})
    every = max(1, e.samples_per_class // min(e.samples_per_class, 10))
    save_captioned_grid(t2i["images"][::every][:100], list(t2i["captions"][::every][:100]),
                        f"{workdir}/samples/t2i.png")
    storage.write_json_atomic(f"{workdir}/samples/i2t.json", s["i2t"], indent=1)
    save_captioned_grid(split.images[[c["image"] for c in s["i2t"][:40]]], [c["caption"] for c in s["i2t"][:40]],
                        f"{workdir}/samples/i2t.png")
    if free is not None:  # None: the arm has no interleaved loop
        storage.write_npz_atomic(f"{workdir}/samples/interleaved.npz", **{k: np.asarray(v) for k, v in free.items()})
    if free is not None and "first" in free:
        pairs = np.stack([free["first"][:20], free["second"][:20]], 1).reshape(-1, *free["first"].shape[1:])
        save_image_grid(pairs, f"{workdir}/samples/interleaved.png", ncols=10)
    _log(f"generated {len(t2i['images'])} images in {s['t2i_seconds']:.1f}s, {len(s['i2t'])} captions, "
         f"{0 if free is None else len(free['two_images'])} interleaved documents")
    return {"t2i_images_per_sec": len(t2i["images"]) / s["t2i_seconds"]}


def evaluate_multimodal(config, workdir, mesh, rules):
    """Scores of samples/ and the held-out text perplexity → eval/mllm.json (docs/method.md §10.5)."""
    gen, split = multimodal_generator(config, workdir, mesh, rules)
    with storage.open_file(f"{workdir}/samples/t2i.npz") as f, np.load(f) as npz:
        t2i = {key: npz[key] for key in npz.files}
    i2t = json.loads(storage.read_text(f"{workdir}/samples/i2t.json"))
    free = None
    if storage.exists(f"{workdir}/samples/interleaved.npz"):
        with storage.open_file(f"{workdir}/samples/interleaved.npz") as f, np.load(f) as npz:
            free = {key: npz[key] for key in npz.files}
    scorer = _Scorer(config, workdir, split)
    result = scorer(t2i, i2t, free)
    result["text_perplexity"] = _text_perplexity(gen, split, config.eval.loss_batch)
    shown = mm.caption_prompt_images(gen, split, config.eval.caption_images, config.eval.seed)
    if shown is not None:  # what the captions' class could be read from (docs/method.md §10.5)
        labels = split.labels[:len(shown)]
        result["i2t_prompt_class_accuracy"] = float((clf.classify(scorer.cparams, shown, scorer.k)[0].argmax(-1)
                                                     == labels).mean())
    storage.write_json_atomic(f"{workdir}/eval/mllm.json", result, indent=2, sort_keys=True)
    return result


def eval_curve(config, workdir, mesh, rules):
    """The scores of `eval_mllm` at every kept checkpoint (`checkpoint.every` apart; configs/mllm.py keeps them
    all) → eval/curve.json: one point per step with its training tokens (step × batch rows × row length, padding
    included). Points already in the file are kept (a resumed stage scores only the missing steps)."""
    path = f"{workdir}/{CURVE_FILE}"
    old = json.loads(storage.read_text(path))["points"] if storage.exists(path) else []
    points = {p["step"]: p for p in old}
    missing = [step for step in checkpoint_steps(f"{workdir}/lm") if step not in points]
    if missing:
        generator_at, split = multimodal_generators(config, workdir, mesh, rules)
        scorer = _Scorer(config, workdir, split)
    for step in missing:
        t0 = time.time()
        gen = generator_at(step)
        s = _samples(gen, split, config.eval)
        scores = scorer(s["t2i"], s["i2t"], s["free"])
        scores["text_perplexity"] = _text_perplexity(gen, split, config.eval.loss_batch)
        points[step] = dict(step=step, tokens=step * config.train.batch_size * gen.task.seq_len, **scores)
        storage.write_json_atomic(path, {"points": [points[k] for k in sorted(points)]}, indent=1)
        _log(f"curve: step {step}: T2I {scores['t2i_class_accuracy']:.1%}, I2T {scores['i2t_class_accuracy']:.1%}, "
             f"PPL {scores['text_perplexity']:.2f} ({time.time() - t0:.0f}s)")
    return {"curve_points": len(points)}
