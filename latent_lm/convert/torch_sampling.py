"""Class-conditional generation from an export directory with PyTorch alone (docs/method.md §6.1, §8).

The solver is DPM-Solver++(2M), midpoint, as the official scripts configure diffusers'
`DPMSolverMultistepScheduler` (order 2, lower_order_final, final σ = 0, linspace timesteps, no thresholding),
written out per step in torch float32 as diffusers computes it. `make_sample_func` returns the official
`sample_func(model_fn, z)` that `Transformer.sample_with_cfg` calls once per token.

  python -m latent_lm.convert.torch_sampling --export_dir=runs/default/export --per_class=10 --out=samples.npz \
      [--cfg_scale=S] [--num_steps=K] [--threads=1]
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable

import numpy as np
import torch

from latent_lm import cli, storage
from latent_lm.convert.torch_files import VAE_DIR, ConversionError, load_model
from latent_lm.pixels import to_uint8

PREDICTION_TYPES = ("epsilon", "v_prediction")


def alphas_cumprod(schedule: str = "cosine", num_train_steps: int = 1000) -> torch.Tensor:
    """ᾱ as the official `DDPMScheduler` builds it: float32 betas, `torch.cumprod(1 − β)`."""
    if schedule in ("cosine", "squaredcos_cap_v2"):
        def ab(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - ab((i + 1) / num_train_steps) / ab(i / num_train_steps), 0.999)
                 for i in range(num_train_steps)]
        betas = torch.tensor(betas, dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, num_train_steps, dtype=torch.float32)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; expected 'cosine' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def solver_timesteps(num_steps: int, num_train_steps: int = 1000) -> np.ndarray:
    """linspace(0, T−1, K+1).round()[::-1][:-1] (diffusers "linspace" spacing)."""
    return np.linspace(0, num_train_steps - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)


def dpm_solver_pp(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                  ab: torch.Tensor, num_steps: int, prediction_type: str = "epsilon",
                  x0_clip: float | None = None) -> torch.Tensor:
    """K steps of DPM-Solver++(2M) from x = x_T; model_fn(x, t) gets t as a float tensor (B,). Returns x̂₀.

    σ_k = √((1−ᾱ)/ᾱ) at the timesteps, then 0; α_t = 1/√(σ²+1), σ_t = σ·α_t, λ = log α_t − log σ_t.
    Steps 0 and K−1 are first order, the others second-order midpoint. `x0_clip` (default off, not in the official
    sampler) clamps x̂₀ like the JAX sampler's option.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    ts = solver_timesteps(num_steps, ab.shape[0])
    table = ((1 - ab) / ab) ** 0.5
    sigmas = torch.cat([table[torch.from_numpy(ts)], torch.zeros(1)]).float()
    alpha_t = 1 / (sigmas**2 + 1) ** 0.5
    sigma_t = sigmas * alpha_t
    lam = torch.log(alpha_t) - torch.log(sigma_t)
    dtype = x.dtype
    sample = x.float()
    prev_x0, prev_h = None, None
    for k, t in enumerate(ts):
        out = model_fn(sample.to(dtype), torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)).float()
        if prediction_type == "epsilon":
            x0 = (sample - sigma_t[k] * out) / alpha_t[k]
        else:
            x0 = alpha_t[k] * sample - sigma_t[k] * out
        if x0_clip is not None:
            x0 = x0.clamp(-x0_clip, x0_clip)
        h = lam[k + 1] - lam[k]
        coef = alpha_t[k + 1] * (torch.exp(-h) - 1.0)
        sample = (sigma_t[k + 1] / sigma_t[k]) * sample - coef * x0
        if 0 < k < num_steps - 1:  # second order: D1 = (m₀ − m₋₁)/r₀, r₀ = h_prev/h
            sample = sample - 0.5 * coef * ((x0 - prev_x0) / (prev_h / h))
        prev_x0, prev_h = x0, h
    return sample.to(dtype)


def make_sample_func(num_steps: int, prediction_type: str, schedule: str = "cosine", num_train_steps: int = 1000,
                     x0_clip: float | None = None) -> Callable:
    """The official `sample_func(model_fn, z) -> x̂₀` (one solver run per token)."""
    ab = alphas_cumprod(schedule, num_train_steps)
    return lambda model_fn, z: dpm_solver_pp(model_fn, z, ab, num_steps, prediction_type, x0_clip)


@torch.no_grad()
def generate(model, labels: torch.Tensor, *, cfg_scale: float, num_steps: int, prediction_type: str,
             schedule: str = "cosine", num_train_steps: int = 1000, x0_clip: float | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """CFG latents (B, C, h, w) in LM space for labels (B,); `noise` (N, B, C) fixes every x_T."""
    null = torch.full_like(labels, model.num_classes)
    sample_func = make_sample_func(num_steps, prediction_type, schedule, num_train_steps, x0_clip)
    return model.sample_with_cfg(torch.cat([labels, null]), cfg_scale, sample_func, noise=noise)


@torch.no_grad()
def generate_images(export_dir: str, labels: np.ndarray, *, batch: int = 500, seed: int = 0,
                    cfg_scale: float | None = None, num_steps: int | None = None, noise: np.ndarray | None = None
                    ) -> np.ndarray:
    """uint8 images [N, H, W, C] from an export directory (LatentLM + vae/); CFG and steps default to config.json.
    `noise` [N_tokens, len(labels), C] fixes every initial x_T (for comparisons with the JAX sampler)."""
    model, cfg = load_model(export_dir)
    _check_class_conditional(cfg, export_dir)
    vae, _ = load_model(os.path.join(export_dir, VAE_DIR))
    d, norm = cfg["diffusion"], cfg["latent_norm"]
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(labels), batch):
        y = torch.as_tensor(labels[i:i + batch], dtype=torch.long)
        if noise is None:
            z = torch.randn(model.flatten_input_size, len(y), model.in_channels, generator=gen)
        else:
            z = torch.as_tensor(noise[:, i:i + batch], dtype=torch.float32)
        lat = generate(model, y, cfg_scale=d["cfg_scale"] if cfg_scale is None else cfg_scale,
                       num_steps=d["num_sampling_steps"] if num_steps is None else num_steps,
                       prediction_type=d["prediction_type"], schedule=d["schedule"],
                       num_train_steps=d["num_train_steps"], x0_clip=d.get("x0_clip"), noise=z)
        img = vae.decode(lat / norm["scale"] - norm["bias"]).clamp(-1, 1)  # official: z / scaling − bias
        images.append(to_uint8(img.permute(0, 2, 3, 1).numpy()))
    return np.concatenate(images)


def _check_class_conditional(cfg: dict, export_dir: str) -> None:
    if not cfg["kwargs"].get("num_classes", 1000):
        raise ConversionError(f"{export_dir} holds a model without classes (a multimodal run): this sampler draws "
                              f"class-conditional images; use Transformer.forward_tokens, lm_logits and "
                              f"diffuse_tokens with the exported tokenizer.json (docs/pytorch.md §2.1)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export_dir", required=True)
    p.add_argument("--per_class", type=int, default=10)
    p.add_argument("--cfg_scale", type=float, default=None)
    p.add_argument("--num_steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is much faster when other processes hold the cores)")
    p.add_argument("--out", default="samples.npz", help=".npz with uint8 `images` [N,H,W,C] and `labels`")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, cfg = load_model(args.export_dir)
    _check_class_conditional(cfg, args.export_dir)
    labels = np.repeat(np.arange(cfg["kwargs"]["num_classes"]), args.per_class)
    images = generate_images(args.export_dir, labels, seed=args.seed, cfg_scale=args.cfg_scale,
                             num_steps=args.num_steps)
    storage.write_npz_atomic(args.out, images=images, labels=labels)
    print(f"wrote {len(images)} images {images.shape[1:]} to {args.out}")


if __name__ == "__main__":
    cli.main(main)
