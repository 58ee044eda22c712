"""Where in an utterance a TTS run's predictions use the text (docs/experiments.md §11, *What limits the TTS model*).

  python -m latent_lm.studies.tts_text_use --workdir=runs/tts [--buckets=0,2,5,10,20,30,45,60] [--out=FILE.json]

The held-out documents of `eval_loss` (test_speakers, single utterances, one packed row at a time) go through the trained model (EMA when
`eval.use_ema`) twice, with their text and with it dropped to `<null>`; at every speech position the diffusion loss is
averaged over fixed t ∈ T_STEPS, and both runs are lined up document by document. Per bucket of positions in the
span it prints the mean loss with and without the text and the gap, (without − with) / without. A model that reads
the text through the utterance shows a gap at every position; one that has only learnt the first sound and the
length shows it at the start and the end alone. σ, t's noise ε and the rows' packing differ between the two runs:
the gap of a bucket is a Monte Carlo estimate over its documents.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latent_lm import cli, storage
from latent_lm.errors import DataError
from latent_lm.diffusion.schedule import add_noise
from latent_lm.models.latent_lm import LatentLM
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.speech_stages import tts_run_config
from latent_lm.stage_inputs import data_paths, generator_params
from latent_lm.training.generator_losses import training_target

T_STEPS = (100, 300, 500, 700, 900)  # of the 1,000 training steps: from little noise to much


def span_losses(config, workdir: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The diffusion loss at each speech position of every held-out document, in document order: with the text, and
    with it dropped to `<null>` (the model loaded once)."""
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1))), jax.devices()[:1])  # one device suffices
    rules = logical_rules(config.mesh)
    task, params, _ = generator_params(config, workdir, mesh, rules)
    return tuple(_held_out(config, workdir, task, params, mesh, rules, null_text) for null_text in (False, True))


def _held_out(config, workdir, task, params, mesh, rules, null_text: bool) -> list[np.ndarray]:
    @jax.jit
    def per_position(b, key):
        cond, _ = task.model.apply(params, b["tokens"], b["latents"], b["is_latent"], b["positions"],
                                   b["segment_ids"])
        x0, errs = b["latent_targets"], []
        for i, t in enumerate(T_STEPS):
            noise = jax.random.normal(jax.random.fold_in(key, i), x0.shape)
            t = jnp.full(x0.shape[:2], t)
            out = task.model.apply(params, add_noise(task.schedule, x0, noise, t), t, cond, method=LatentLM.diffuse)
            target = training_target(task.prediction_type, x0, noise, t, task.schedule)
            errs.append(jnp.mean(jnp.square(out - target), axis=-1))
        return jnp.mean(jnp.stack(errs), axis=0)

    docs = []
    # One row per batch: a batch of several rows would leave out the documents of an unfilled last one, and unequally
    # with and without the text (they pack into different numbers of rows).
    data = task.make_dataset(data_paths(config, workdir), "test", 1, seed=0, null_text=null_text)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for i, raw in enumerate(data):
            b = task.make_batch({k: jnp.asarray(v) for k, v in raw.items()}, jax.random.PRNGKey(i))
            err, mask = np.asarray(per_position(b, jax.random.PRNGKey(10_000 + i))), np.asarray(b["latent_mask"])
            for row, seg in enumerate(raw["segment_ids"]):
                docs += [err[row][(seg == s) & mask[row]] for s in sorted(set(seg[seg > 0].tolist()))]
    if not docs:
        raise DataError(f"the held-out split of {workdir} holds no speech document")
    return docs


def text_use(with_text: list[np.ndarray], null: list[np.ndarray], buckets: Sequence[int]) -> list[dict]:
    """Per bucket [lo, hi) of speech positions: documents, mean loss with and without the text, relative gap."""
    if len(with_text) != len(null):
        raise ValueError(f"{len(with_text)} documents with their text but {len(null)} without")
    rows = []
    for lo, hi in zip(buckets, buckets[1:]):
        a = np.concatenate([x[lo:min(hi, len(x), len(y))] for x, y in zip(with_text, null)])
        n = np.concatenate([y[lo:min(hi, len(x), len(y))] for x, y in zip(with_text, null)])
        if len(a):
            rows.append(dict(positions=[lo, hi], documents=int(sum(min(len(x), len(y)) > lo
                                                                   for x, y in zip(with_text, null))),
                             with_text=float(a.mean()), null_text=float(n.mean()),
                             gap=float((n.mean() - a.mean()) / n.mean())))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a trained TTS run")
    p.add_argument("--buckets", default="0,2,5,10,20,30,45,60", help="bucket edges, in speech positions")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    buckets = [int(b) for b in args.buckets.split(",")]
    config = tts_run_config(args.workdir)
    rows = text_use(*span_losses(config, args.workdir), buckets)
    print("| speech positions | documents | diffusion loss with the text | with `<null>` | gap |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['positions'][0]}–{r['positions'][1]} | {r['documents']} | {r['with_text']:.4f} | "
              f"{r['null_text']:.4f} | {r['gap']:+.1%} |")
    if args.out:
        storage.write_json_atomic(args.out, rows, indent=2)


if __name__ == "__main__":
    cli.main(main)
