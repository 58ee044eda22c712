"""Is the input pipeline the bottleneck? The LatentLM train step fed by the real cached-latent grain pipeline vs the
same compiled step fed by one synthetic batch already on device, measured side by side in one run.

  python benchmarks/input_pipeline.py                                   # the embedded default model and data
  python benchmarks/input_pipeline.py --cache=runs/default/latents/train --workers=2
  python benchmarks/input_pipeline.py --num_examples=64 --width=32 --depth=1 --batch=8 --steps=2 --rounds=1  # smoke

The fed loop is what the train loop does: `next(iterator)` (ArrayRecord read, decode, shuffle, batch), then
`shard_batch` (`make_array_from_process_local_data`), then the step; JAX dispatch is asynchronous, so the host
reads batch k+1 while the device runs step k. Rounds of the two loops alternate, so load on the machine hits
both alike; the figure is the median per-step time over rounds. Without --cache, the MNIST train split is encoded
with a randomly initialised σ-VAE into a temporary sharded cache (real images, real files, real pipeline; the
latent values do not change the cost).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from configs import default
from data_pipelines.image_pipeline import ordered_images
from data_pipelines.latent_cache import encode_to_latent_cache, make_latent_dataset
from benchmarks.common import add_model_flags, apply_model_flags
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.parallel.mesh import DEFAULT_RULES, make_mesh, shard_batch
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer
from latent_lm.training.tasks import LatentLMTask, VAETask
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import build_state_fns, jit_train_step


def build_cache(config, path: str, num_examples: int | None = None) -> None:
    """MNIST train split (its first `num_examples`, default all) → random-init σ-VAE means → a sharded latent cache
    at `path`."""
    task = VAETask.from_config(config)
    params = nn.unbox(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    enc = jax.jit(lambda x: task.model.apply(params, x, method=SigmaVAE.encode))
    count, read_batches = ordered_images(config.data, "train", 500)
    count = min(count, num_examples or count)
    encode_to_latent_cache(path, num_examples=count, read_batches=read_batches, encode_fn=enc,
                           num_shards=config.data.cache_shards, metadata={}, fingerprint={"benchmark": True},
                           process_index=0, process_count=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default=None, help="a latent cache (default: build one from MNIST in a temp dir)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes (data.num_workers)")
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each loop, alternating")
    p.add_argument("--num_examples", type=int, default=None,
                   help="without --cache: encode only the first N MNIST train images (default: all)")
    add_model_flags(p)
    args = p.parse_args(argv)

    c = default.get_config()
    apply_model_flags(c, args)
    batch = args.batch or c.train.batch_size
    tmp = None
    cache = args.cache
    if cache is None:
        tmp = tempfile.TemporaryDirectory()
        cache = os.path.join(tmp.name, "train")
        t0 = time.perf_counter()
        build_cache(c, cache, args.num_examples)
        print(f"built a temporary cache of the MNIST train split in {time.perf_counter() - t0:.1f} s")

    task = LatentLMTask.from_config(c, LatentNormalization(1.0, 0.0))
    tx = make_optimizer(c.optim, 1000)
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1))), jax.devices()[:1])
    shape = (c.model.max_len, c.model.latent_dim)
    data = iter(make_latent_dataset(cache, batch, seed=0, expected_shape=shape, num_workers=args.workers))
    init, _, shardings = build_state_fns(task, tx, mesh, DEFAULT_RULES, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = init(jax.random.PRNGKey(0))
        step = jit_train_step(task, tx, learning_rate_schedule(c.optim, 1000), 0.999, shardings, mesh)
        synthetic = shard_batch({"latents": np.random.default_rng(0).normal(size=(batch, *shape)).astype(np.float32),
                                 "label": np.zeros((batch,), np.int32)}, mesh)
        holder = [state]

        def run(feed) -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                holder[0], metrics = step(holder[0], feed())
            jax.block_until_ready(metrics["loss"])
            return (time.perf_counter() - t0) / args.steps

        fed = lambda: shard_batch(next(data), mesh)
        run(fed), run(lambda: synthetic)  # compile, fill caches
        times = {"pipeline": [], "synthetic": []}
        for _ in range(args.rounds):
            times["pipeline"].append(run(fed))
            times["synthetic"].append(run(lambda: synthetic))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(data)
        alone = (time.perf_counter() - t0) / args.steps
    real, synth = np.median(times["pipeline"]), np.median(times["synthetic"])
    print(f"device: {jax.devices()[0].device_kind}  batch {batch} × {shape[0]} tokens × {shape[1]} channels  "
          f"grain workers {args.workers}  cache {'(temporary)' if tmp else cache}")
    print(f"train step fed by the cached-latent pipeline: {real * 1e3:.1f} ms/step "
          f"(rounds: {', '.join(f'{t * 1e3:.1f}' for t in times['pipeline'])})")
    print(f"train step fed by a synthetic on-device batch: {synth * 1e3:.1f} ms/step "
          f"(rounds: {', '.join(f'{t * 1e3:.1f}' for t in times['synthetic'])})")
    print(f"ratio pipeline/synthetic: {real / synth:.3f}   "
          f"(the pipeline alone: {alone * 1e3:.2f} ms/batch, {synth / alone:.0f}× faster than the step)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
