"""Sampler throughput side by side in one run: the compiled KV-cache sampler against the no-cache reference (which
recomputes the prefix at every position), the PyTorch twin's eager sampler, or the DiT twin's whole-image sampler
(docs/benchmarks.md §1).

  python benchmarks/sampling.py                    # embedded default size: 49 tokens, K=20, CFG, vs the reference
  python benchmarks/sampling.py --preset=official_small --against=torch --batch=1,16,100,256   # vs PyTorch
  python benchmarks/sampling.py --preset=official_small --against=dit --batch=256   # vs the DiT twin, same size
  python benchmarks/sampling.py --size=B --batch=256 --dtype=bfloat16 --against=none   # GPU throughput
  python benchmarks/sampling.py --width=32 --depth=1 --head_depth=1 --tokens=4 --batch=2 --steps=2   # smoke test

`--against=torch` exports the same random weights to a PyTorch directory and samples with the twin as the official
code does: `Transformer.sample_with_cfg` (eager `forward_recurrent` with a KV cache, then DPM-Solver++ per token on
the CFG-doubled batch), at 1 and 2 torch threads, reporting the better. `--against=dit` builds the DiT twin of the
same width, depth and heads (its own MLP ratio 4 and adaLN; both parameter counts are printed) and samples it with
`make_dit_sampler`: K solver steps of the whole transformer on all N latents. Both sides report the best of
`--repeats` timed calls, made in turn (ours, theirs, ours, …) against PyTorch or the DiT; a JAX first call (the
compile) is reported apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.common import (TORCH_THREADS, add_model_flags, apply_model_flags, best_of_alternating, host_pages,
                               matmul_peak_flops, parameter_count, random_model, time_fn, torch_twin)
from configs import default
from latent_lm import host_memory
from latent_lm.diffusion import make_schedule
from latent_lm.models.dit import DiTConfig
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.presets import DIT_MLP_RATIO
from latent_lm.models.presets import apply_preset
from latent_lm.sampling import SamplerSettings, make_dit_sampler, make_sampler
from tests.reference_samplers import make_reference_sampler

# The official code's small setting (issue #17): 7×7×4 latents, width 128, depth 4, 4 heads, head depth 3.
PRESETS = {"official_small": dict(width=128, depth=4, num_heads=4, latent_dim=4, max_len=49, num_classes=1000,
                                  head_depth=3)}


def build_config(args: argparse.Namespace) -> LatentLMConfig:
    c = default.get_config()
    if args.size:
        apply_preset(c.model, c.head, args.size)
        c.model.update(dict(max_len=256, latent_dim=16, num_classes=1000))
    if args.preset:
        preset = dict(PRESETS[args.preset])
        c.head.depth = preset.pop("head_depth")
        c.model.update(preset)
    if args.tokens:
        c.model.max_len = args.tokens
    apply_model_flags(c, args)
    c.model.dtype = args.dtype
    return LatentLMConfig.from_config(c)


def torch_samplers(model, batch: int, args: argparse.Namespace) -> dict[int, Callable[[], Any]]:
    """The official-protocol eager sampler of the twin on `batch` labels, one call per torch thread count."""
    import torch

    from latent_lm.convert import torch_sampling

    labels = torch.arange(batch) % model.num_classes

    def at(threads: int) -> Callable[[], Any]:
        def run():
            torch.set_num_threads(threads)
            return torch_sampling.generate(model, labels, cfg_scale=args.cfg, num_steps=args.steps,
                                           prediction_type="v_prediction")
        return run

    return {threads: at(threads) for threads in TORCH_THREADS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default=None, help="a paper preset (B, L, H, …)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a benchmark setting (see PRESETS)")
    p.add_argument("--batch", default="100", help="batch size, or several comma-separated")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--against", default="reference", choices=["reference", "torch", "dit", "none"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per sampler and batch, alternating between "
                   "the sides compared (best reported)")
    p.add_argument("--tokens", type=int, default=None, help="sequence length (default: the config's)")
    add_model_flags(p)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    cfg = build_config(args)
    model, params = random_model(cfg)
    schedule = make_schedule("cosine", 1000)
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.cfg, prediction_type="v_prediction")
    sampler = make_sampler(model, schedule, settings, cfg.max_len)
    twin = torch_twin(params, cfg) if args.against == "torch" else None
    if args.against == "dit":
        dit_cfg = DiTConfig(width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                            latent_dim=cfg.latent_dim, num_classes=cfg.num_classes, max_len=cfg.max_len,
                            mlp_ratio=DIT_MLP_RATIO, dtype=cfg.dtype)
        dit, dit_params = random_model(dit_cfg)
        dit_sampler = make_dit_sampler(dit, schedule, settings)
        sizes = (f"parameters: LatentLM {parameter_count(params) / 1e6:.3f} M, DiT twin "
                 f"{parameter_count(dit_params) / 1e6:.3f} M")
    peak = matmul_peak_flops(repeats=3)
    print(f"device: {jax.devices()[0].device_kind}  width {cfg.width} depth {cfg.depth} head {cfg.head_depth}  "
          f"{cfg.max_len} tokens × {cfg.latent_dim}  K={args.steps}  CFG {args.cfg}  {args.dtype}  "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s  {host_pages()}")
    if args.against == "dit":
        print(sizes)
    rows = []
    for batch in batches:
        labels = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes
        t0 = time.perf_counter()
        jax.block_until_ready(sampler(params, labels, jax.random.PRNGKey(0)))
        compile_s = time.perf_counter() - t0
        ours = lambda: sampler(params, labels, jax.random.PRNGKey(0))
        # Against PyTorch or the DiT, the two sides' calls alternate (best of each), so load changes hit both alike.
        others = (torch_samplers(twin, batch, args) if args.against == "torch" else
                  {"dit": lambda: dit_sampler(dit_params, labels, jax.random.PRNGKey(0))} if args.against == "dit"
                  else {})
        best = best_of_alternating({"ours": ours, **others}, args.repeats)
        fast = best["ours"]
        print(f"batch {batch}: compiled KV-cache sampler: {batch / fast:.1f} images/s ({fast:.3f} s/batch, "
              f"first call incl. compile {compile_s:.1f} s)", flush=True)
        if args.against == "reference":
            noise = jax.random.normal(jax.random.PRNGKey(0), (cfg.max_len, batch, cfg.latent_dim))
            ref = make_reference_sampler(model, schedule, settings)
            slow = time_fn(ref, params, labels[:, None], noise, repeats=1, warmup=1)  # warm-up compiles every length
            print(f"batch {batch}: no-cache reference sampler: {batch / slow:.1f} images/s ({slow:.3f} s/batch)")
            print(f"batch {batch}: speed-up of the compiled KV-cache sampler: {slow / fast:.2f}x")
        elif args.against == "torch":
            rates = {n: batch / best[n] for n in TORCH_THREADS}
            torch_rate = max(rates.values())
            per = ", ".join(f"{n} thread{'s' * (n > 1)} {r:.1f}" for n, r in rates.items())
            print(f"batch {batch}: PyTorch twin, eager: {torch_rate:.1f} images/s ({per})")
            print(f"batch {batch}: compiled sampler / PyTorch: {batch / fast / torch_rate:.2f}x", flush=True)
            rows.append((batch, batch / fast, torch_rate))
        elif args.against == "dit":
            whole = best["dit"]  # its untimed first call compiled it
            print(f"batch {batch}: DiT twin, whole-image sampler: {batch / whole:.1f} images/s ({whole:.3f} s/batch)")
            print(f"batch {batch}: LatentLM / DiT sampling throughput: {whole / fast:.2f}x", flush=True)
    if rows:
        print("\n| batch | compiled KV-cache sampler (images/s) | PyTorch twin, best of 1/2 threads | ratio |")
        print("|---|---|---|---|")
        for batch, ours, theirs in rows:
            print(f"| {batch} | {ours:.1f} | {theirs:.1f} | **{ours / theirs:.2f}×** |")


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # as the CLIs: XLA:CPU temporaries on huge pages (docs/benchmarks.md §2)
    main()
