"""Compiled KV-cache sampler vs the no-cache reference (recomputes the prefix every position), side by side.

  python benchmarks/sampling.py                    # embedded default size: 49 tokens, K=20, CFG
  python benchmarks/sampling.py --size=B --batch=256 --dtype=bfloat16 --skip_reference   # GPU throughput
  python benchmarks/sampling.py --width=32 --depth=1 --head_depth=1 --tokens=4 --batch=2 --steps=2   # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks.common import add_model_flags, apply_model_flags, random_model, time_fn
from configs import default
from latent_lm.diffusion import make_schedule
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.presets import apply_preset
from latent_lm.sampling import SamplerSettings, make_sampler
from tests.reference_samplers import make_reference_sampler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default=None)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip_reference", action="store_true")
    p.add_argument("--tokens", type=int, default=None, help="sequence length (default: the config's)")
    add_model_flags(p)
    args = p.parse_args(argv)
    c = default.get_config()
    if args.size:
        apply_preset(c.model, c.head, args.size)
        c.model.update(dict(max_len=256, latent_dim=16, num_classes=1000))
    if args.tokens:
        c.model.max_len = args.tokens
    apply_model_flags(c, args)
    c.model.dtype = args.dtype
    cfg = LatentLMConfig.from_config(c)
    model, params = random_model(cfg)
    schedule = make_schedule("cosine", 1000)
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.cfg, prediction_type="v_prediction")
    labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_classes
    sampler = make_sampler(model, schedule, settings, cfg.max_len)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, labels, jax.random.PRNGKey(0)))
    compile_s = time.perf_counter() - t0
    fast = time_fn(sampler, params, labels, jax.random.PRNGKey(0), repeats=3)
    print(f"device: {jax.devices()[0].device_kind}  width {cfg.width} depth {cfg.depth} head {cfg.head_depth}  "
          f"{cfg.max_len} tokens × {cfg.latent_dim}  batch {args.batch}  K={args.steps}  CFG {args.cfg}  {args.dtype}")
    print(f"compiled KV-cache sampler: {args.batch / fast:.1f} images/s ({fast:.3f} s/batch, first call "
          f"incl. compile {compile_s:.1f} s)")
    if not args.skip_reference:
        noise = jax.random.normal(jax.random.PRNGKey(0), (cfg.max_len, args.batch, cfg.latent_dim))
        ref = make_reference_sampler(model, schedule, settings)
        slow = time_fn(ref, params, labels[:, None], noise, repeats=1, warmup=1)  # warm-up compiles every length
        print(f"no-cache reference sampler: {args.batch / slow:.1f} images/s ({slow:.3f} s/batch)")
        print(f"speed-up of the compiled KV-cache sampler: {slow / fast:.2f}x")


if __name__ == "__main__":
    main()
