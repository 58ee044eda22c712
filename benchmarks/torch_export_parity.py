"""A trained checkpoint exported to PyTorch samples as well as in JAX (issue #6).

Exports `<workdir>` (LatentLM + σ-VAE), then samples the same labels from the same initial noise in both frameworks
(JAX: the compiled KV-cache sampler; PyTorch: `Transformer.sample_with_cfg` with the PyTorch DPM-Solver++), decodes
each with its own σ-VAE, and scores both sets with the in-repo classifier of the run (`eval/classifier.msgpack`).
The noise is drawn as `--mode=sample` draws it (per batch of `eval.sample_batch`, key fold_in(eval.seed, i)), so the
JAX half reproduces the run's own `samples/final.npz`.

  python benchmarks/torch_export_parity.py --workdir=runs/default --per_class=100

Writes `<out>/parity.json` (default out: `<workdir>/export`) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch

from data_pipelines.embedded import load_embedded
from latent_lm.convert import to_torch, torch_sampling
from latent_lm.convert.torch_files import VAE_DIR, load_model
from latent_lm.evaluation import classifier as clf
from latent_lm import stage_inputs
from latent_lm.evaluation.frechet import feature_stats, frechet_distance
from latent_lm.pixels import to_uint8
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.sampling import SamplerSettings, make_sampler, row_noise, sample_latents
from latent_lm.training.tasks import LatentLMTask, VAETask
from latent_lm.latents import LatentNormalization


def jax_models(workdir: str, params: str):
    """(LM task, LM params, σ-VAE, σ-VAE params, config) restored from the run's checkpoints."""
    step, meta = to_torch.read_meta(f"{workdir}/lm")
    config = to_torch.config_from_meta(meta, f"{workdir}/lm")
    task = LatentLMTask.from_config(config, LatentNormalization(**meta["latent_norm"]))
    mesh, rules = to_torch.restore_mesh(config)
    state = to_torch.restore_state(task, config.optim, config.train, f"{workdir}/lm", step, mesh, rules)
    vae_dir = stage_inputs.vae_dir(config, workdir)  # data.vae_workdir / data.tokenizer_workdir when shared
    vstep, vmeta = to_torch.read_meta(vae_dir)
    vconfig = to_torch.config_from_meta(vmeta, vae_dir)
    vtask = VAETask.from_config(vconfig)
    vstate = to_torch.restore_state(vtask, vconfig.vae_optim, vconfig.vae_train, vae_dir, vstep, mesh, rules)
    lm_params = state.ema_params if params == "ema" else state.params
    return task, jax.device_get(lm_params), vtask.model, jax.device_get(vstate.params), config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="runs/default")
    p.add_argument("--out", default=None)
    p.add_argument("--per_class", type=int, default=None, help="default: the run's eval.samples_per_class")
    p.add_argument("--params", choices=["ema", "raw"], default=None, help="default: as eval.use_ema")
    p.add_argument("--torch_threads", type=int, default=1,
                   help="PyTorch intra-op threads (1 is robust on a shared machine; 2 threads ran 2.6× slower than 1 "
                        "here while one other process kept a core busy)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    out = args.out or f"{args.workdir}/export"

    _, meta = to_torch.read_meta(f"{args.workdir}/lm")
    run_eval = to_torch.config_from_meta(meta, args.workdir).eval
    which = args.params or ("ema" if run_eval.use_ema else "raw")
    t0 = time.time()
    to_torch.export_workdir(args.workdir, out, params=which)
    export_s = time.time() - t0
    task, params, vae, vparams, config = jax_models(args.workdir, which)
    d, k = config.diffusion, config.data.num_classes
    labels = np.repeat(np.arange(k), args.per_class or run_eval.samples_per_class).astype(np.int32)
    n, c, batch = config.model.max_len, config.model.latent_dim, run_eval.sample_batch
    rng = jax.random.PRNGKey(run_eval.seed)
    noise = np.concatenate([np.asarray(row_noise(jax.random.fold_in(rng, i), len(labels[i:i + batch]), n, c))
                            for i in range(0, len(labels), batch)]).swapaxes(0, 1)  # [N, images, C], as make_sampler

    settings = SamplerSettings(num_steps=d.num_sampling_steps, cfg_scale=d.cfg_scale,
                               prediction_type=d.prediction_type, x0_clip=d.x0_clip)
    jax_sample = jax.jit(lambda y, e: sample_latents(task.model, params, y[:, None], e, task.schedule, settings))
    jax_decode = jax.jit(lambda z: jnp.clip(vae.apply(vparams, task.norm.denormalize(z), method=SigmaVAE.decode),
                                            -1.0, 1.0))
    t0 = time.time()
    z_jax, img_jax = [], []
    for i in range(0, len(labels), batch):
        z = jax_sample(jnp.asarray(labels[i:i + batch]), jnp.asarray(noise[:, i:i + batch]))
        z_jax.append(np.asarray(z))
        img_jax.append(to_uint8(np.asarray(jax_decode(z))))
    z_jax, img_jax = np.concatenate(z_jax), np.concatenate(img_jax)
    jax_s = time.time() - t0
    # Control: the experiment's own sampler (noise drawn inside its jit) is a different XLA program from the same
    # math; its distance to the one above is the float32 sensitivity of this trained model's sampling.
    run_sampler = make_sampler(task.model, task.schedule, settings, n)
    z_run = np.concatenate([np.asarray(run_sampler(params, jnp.asarray(labels[i:i + batch]),
                                                   jax.random.fold_in(rng, i))) for i in range(0, len(labels), batch)])

    model, tcfg = load_model(out)
    tvae, _ = load_model(os.path.join(out, VAE_DIR))
    norm = tcfg["latent_norm"]
    t0 = time.time()
    z_torch, img_torch = [], []
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            z = torch_sampling.generate(model, torch.from_numpy(labels[i:i + batch]).long(),
                                        cfg_scale=d.cfg_scale, num_steps=d.num_sampling_steps,
                                        prediction_type=d.prediction_type, schedule=d.schedule,
                                        num_train_steps=d.num_train_steps, x0_clip=d.x0_clip,
                                        noise=torch.from_numpy(noise[:, i:i + batch]))
            img = tvae.decode(z / norm["scale"] - norm["bias"]).clamp(-1, 1)
            z_torch.append(z.reshape(z.shape[0], c, -1).permute(0, 2, 1).numpy())
            img_torch.append(torch_sampling.to_uint8(img.permute(0, 2, 3, 1).numpy()))
    z_torch, img_torch = np.concatenate(z_torch), np.concatenate(img_torch)
    torch_s = time.time() - t0

    cparams = clf.load_classifier(f"{args.workdir}/eval/classifier.msgpack")
    test_x, _ = load_embedded(config.data.dataset, "test")
    ref = feature_stats(clf.classify(cparams, test_x, k)[1])
    result = {"num_samples": int(len(labels)), "cfg_scale": float(d.cfg_scale),
              "sampling_steps": int(d.num_sampling_steps), "params": which,
              "latent_max_abs_diff": float(np.abs(z_jax - z_torch).max()),
              "latent_mean_abs_diff": float(np.abs(z_jax - z_torch).mean()),
              "latent_frac_diff_over_1e-4": float((np.abs(z_jax - z_torch) > 1e-4).mean()),
              "control_jax_vs_jax_latent_max_abs_diff": float(np.abs(z_jax - z_run).max()),
              "control_jax_vs_jax_latent_mean_abs_diff": float(np.abs(z_jax - z_run).mean()),
              "pixels_differing_uint8": float((img_jax != img_torch).mean()),
              "pixel_max_abs_diff_uint8": int(np.abs(img_jax.astype(int) - img_torch.astype(int)).max()),
              "export_seconds": export_s, "jax_sampling_seconds": jax_s, "torch_sampling_seconds": torch_s,
              "torch_threads": torch.get_num_threads()}
    preds = {}
    for name, images in (("jax", img_jax), ("torch", img_torch)):
        logits, feats = clf.classify(cparams, images, k)
        preds[name] = logits.argmax(-1)
        result[f"{name}_conditional_accuracy"] = float((preds[name] == labels).mean())
        result[f"{name}_fd"] = float(frechet_distance(*feature_stats(feats), *ref))
    result["prediction_agreement"] = float((preds["jax"] == preds["torch"]).mean())
    run_samples = f"{args.workdir}/samples/final.npz"
    if os.path.exists(run_samples):
        ref_images = np.load(run_samples)["images"]
        if ref_images.shape == img_jax.shape:
            result["run_samples_pixels_differing_uint8"] = float((ref_images != img_jax).mean())
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "parity.json"), "w") as f:
        json.dump(result, f, indent=2)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
