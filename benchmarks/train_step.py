"""Achieved FLOP/s of the LatentLM train step vs a dense-matmul peak measured in the same run.

  python benchmarks/train_step.py                      # the embedded default model (configs/default.py)
  python benchmarks/train_step.py --size=B --dtype=bfloat16 --batch=32 --peak=989e12   # GPU MFU
  python benchmarks/train_step.py --width=32 --depth=1 --batch=4 --steps=1 --matmul_n=256   # smoke test (tests)
  python benchmarks/train_step.py --mllm --latent_fraction=0.2   # multimodal: gathered head vs head everywhere
  python benchmarks/train_step.py --against=torch      # side by side with the PyTorch twin's eager train step
FLOPs come from latent_lm.training.flops (the head counted ×batch_mul). `--against=torch` loads the same model into
the PyTorch twin and times the official recipe's step (per-token timesteps and noise, v-target MSE through
`Transformer.forward(…, batch_mul)`, backward, clip_grad_norm_ 1.0, AdamW, EMA) at 1 and 2 torch threads.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.common import (TORCH_THREADS, add_model_flags, apply_model_flags, host_pages, matmul_peak_flops,
                               random_model, time_fn, torch_twin)
from configs import default, mllm
from latent_lm import host_memory
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.presets import apply_preset
from latent_lm.parallel.mesh import DEFAULT_RULES, make_mesh, shard_batch
from latent_lm.training.flops import train_flops_per_step
from latent_lm.training.tasks import LatentLMTask, MultimodalTask
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import build_state_fns, jit_train_step
from latent_lm.training.optimizer import learning_rate_schedule, make_optimizer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default=None, help="a preset (B, L, H, Base, …); default: the embedded model")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--latent_dim", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--peak", type=float, default=None, help="vendor peak FLOP/s (else a measured matmul peak)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--matmul_n", type=int, default=2048, help="side of the square matmul that measures the peak")
    p.add_argument("--mllm", action="store_true", help="the multimodal model on packed rows (configs/mllm.py): "
                   "time the step with the diffusion head gathered onto the latent targets and on every position")
    p.add_argument("--latent_fraction", type=float, default=0.2, help="--mllm: share of positions with latent targets")
    p.add_argument("--against", default="none", choices=["none", "torch"], help="torch: also time the PyTorch "
                   "twin's eager train step at the same config")
    add_model_flags(p)
    args = p.parse_args(argv)
    if args.mllm:
        return gathered_head(args)

    c = default.get_config()
    if args.size:
        apply_preset(c.model, c.head, args.size)
        c.model.update(dict(max_len=256, latent_dim=16, num_classes=1000))
    if args.tokens:
        c.model.max_len = args.tokens
    if args.latent_dim:
        c.model.latent_dim = args.latent_dim
    apply_model_flags(c, args)
    c.model.dtype = args.dtype
    c.vae.latent_dim = c.model.latent_dim
    batch = args.batch or c.train.batch_size
    task = LatentLMTask.from_config(c, LatentNormalization(1.0, 0.0))
    cfg: LatentLMConfig = task.model.config
    data = {"latents": jax.random.normal(jax.random.PRNGKey(1), (batch, cfg.max_len, cfg.latent_dim)),
            "label": jnp.zeros((batch,), jnp.int32)}
    seconds = _time_steps(task, c, data, args.steps)
    flops = train_flops_per_step(cfg, batch, cfg.max_len, c.diffusion.batch_mul)
    peak = args.peak or matmul_peak_flops(args.matmul_n, dtype=jnp.dtype(args.dtype))
    achieved = flops["total"] / seconds
    print(f"device: {jax.devices()[0].device_kind}  model: width {cfg.width} depth {cfg.depth} "
          f"head {cfg.head_depth}  batch {batch} × {cfg.max_len} tokens  head ×{c.diffusion.batch_mul}  {args.dtype}"
          f"  {host_pages()}")
    print(f"train step: {seconds * 1e3:.1f} ms   FLOPs/step {flops['total'] / 1e9:.2f} G "
          f"(backbone {flops['backbone'] / 1e9:.2f} G, head {flops['head'] / 1e9:.2f} G)")
    print(f"achieved {achieved / 1e9:.1f} GFLOP/s   peak {'(given)' if args.peak else '(measured matmul)'} "
          f"{peak / 1e9:.1f} GFLOP/s   ratio (MFU) {achieved / peak:.3f}")
    if args.against == "torch":
        rates = _torch_step_seconds(cfg, batch, c.diffusion.batch_mul, args.steps)
        best = min(rates.values())
        per = ", ".join(f"{n} thread{'s' * (n > 1)} {r * 1e3:.1f} ms" for n, r in rates.items())
        print(f"PyTorch twin train step (eager): {best * 1e3:.1f} ms ({per})")
        print(f"PyTorch / JAX step time: {best / seconds:.2f}x")


def _torch_step_seconds(cfg: LatentLMConfig, batch: int, batch_mul: int, steps: int) -> dict[int, float]:
    """Median seconds of the official recipe's train step (docs/method.md §6) on the PyTorch twin, per thread count."""
    import torch
    import torch.nn.functional as F

    from latent_lm.convert import torch_sampling

    model = torch_twin(random_model(cfg)[1], cfg)
    model.train()
    side, c = model.input_size, cfg.latent_dim
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01, eps=1e-8)
    ema = [p.detach().clone() for p in model.parameters()]
    ab = torch_sampling.alphas_cumprod("cosine", 1000)
    clean, labels = torch.randn(batch, c, side, side), torch.randint(0, cfg.num_classes, (batch,))

    def step():
        n = batch * batch_mul * side * side
        noise, t = torch.randn(n, c), torch.randint(0, 1000, (n,))
        x0 = clean.repeat_interleave(batch_mul, 0).permute(0, 2, 3, 1).reshape(-1, c)
        a, s = ab[t].sqrt()[:, None], (1 - ab[t]).sqrt()[:, None]
        grid = lambda v: v.reshape(batch * batch_mul, side, side, c).permute(0, 3, 1, 2)
        out = model(grid(a * x0 + s * noise), t.reshape(batch * batch_mul, -1).float(), x_start=clean, y=labels,
                    batch_mul=batch_mul)
        loss = F.mse_loss(out.float(), grid(a * noise - s * x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.999)

    seconds = {}
    for threads in TORCH_THREADS:
        torch.set_num_threads(threads)
        seconds[threads] = time_fn(step, repeats=steps, warmup=1)
    return seconds


def _time_steps(task, c, batch: dict, steps: int) -> float:
    tx = make_optimizer(c.optim, 1000)
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1))), jax.devices()[:1])
    init, _, shardings = build_state_fns(task, tx, mesh, DEFAULT_RULES, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        holder = [init(jax.random.PRNGKey(0))]
        step = jit_train_step(task, tx, learning_rate_schedule(c.optim, 1000), 0.999, shardings, mesh)
        data = shard_batch(batch, mesh)

        def one():
            holder[0], m = step(holder[0], data)
            return m["loss"]

        return time_fn(one, repeats=steps, warmup=2)


def gathered_head(args) -> None:
    """The multimodal train step on text-heavy packed rows (docs/method.md §7.3), side by side in one run: the head on
    the gathered latent targets (`model.head_capacity` = the targets a row holds) against the head on every
    position (capacity = the row length, what an ungathered head costs)."""
    c = mllm.get_config()
    apply_model_flags(c, args)
    c.model.dtype = args.dtype
    batch_size, t = args.batch or c.train.batch_size, c.model.max_len
    k = max(1, int(round(args.latent_fraction * t)))
    rng = np.random.default_rng(0)
    is_latent = np.zeros((batch_size, t), bool)
    is_latent[:, 1:k + 1] = True  # one image span per row; position 0 (<boi>) and z_1..z_{k-1} have latent targets
    batch = dict(tokens=np.where(is_latent, 0, rng.integers(8, c.model.text_vocab_size, (batch_size, t))).astype(
                     np.int32),
                 is_latent=is_latent,
                 latents=np.where(is_latent[..., None], rng.normal(size=(batch_size, t, c.model.latent_dim)),
                                  0).astype(np.float32),
                 segment_ids=np.ones((batch_size, t), np.int32),
                 positions=np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t)).copy())
    batch = {key: jnp.asarray(v) for key, v in batch.items()}
    base = MultimodalTask.from_config(c, LatentNormalization(1.0, 0.0))
    results = {}
    for name, capacity in (("gathered", k), ("every position", t)):
        task = dataclasses.replace(base, head_capacity=capacity)
        seconds = _time_steps(task, c, batch, args.steps)
        results[name] = (seconds, train_flops_per_step(task.model.config, batch_size, t, c.diffusion.batch_mul,
                                                       capacity))
    cfg = base.model.config
    print(f"device: {jax.devices()[0].device_kind}  model: width {cfg.width} depth {cfg.depth} head {cfg.head_depth}"
          f"  batch {batch_size} × {t} positions, {k} latent targets per row  head ×{c.diffusion.batch_mul}")
    for name, (seconds, flops) in results.items():
        print(f"head on {name:<15} step {seconds * 1e3:8.1f} ms   FLOPs/step {flops['total'] / 1e9:7.2f} G "
              f"(head {flops['head'] / 1e9:.2f} G)")
    ratio = results["every position"][0] / results["gathered"][0]
    print(f"gathered head: {ratio:.2f}× faster step (FLOPs ratio "
          f"{results['every position'][1]['total'] / results['gathered'][1]['total']:.2f}×)")


if __name__ == "__main__":
    host_memory.reexec_with_huge_pages()  # as the CLIs: XLA:CPU temporaries on huge pages (docs/benchmarks.md §2)
    main()
