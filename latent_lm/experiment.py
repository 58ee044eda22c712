"""The stages of an experiment, each a function of (config, workdir): train_vae → encode → train → sample → eval.

Layout of a workdir:
  vae/          σ-VAE checkpoints and metrics        latents/{train,test}/  cached σ-VAE means (ArrayRecord)
  lm/           LatentLM checkpoints and metrics      samples/final.{npz,png}  eval/final.json
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines.embedded import load_embedded
from data_pipelines.image_pipeline import make_training_images, ordered_images
from data_pipelines.latent_cache import encode_to_latent_cache, make_latent_dataset, read_latent_cache_meta
from latent_lm.config_validation import validate
from latent_lm.evaluation import classifier as clf
from latent_lm.evaluation.frechet import feature_stats, frechet_distance
from latent_lm.evaluation.grids import save_image_grid
from latent_lm.evaluation.image_metrics import psnr, to_uint8, variance_collapse_ratio
from latent_lm.models.sigma_vae import SIGMA_DIVISOR, SigmaVAE
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.sampling import SamplerSettings, make_sampler
from latent_lm.training.tasks import LatentLMTask, LatentNormalization, VAETask
from latent_lm.training.train_loop import load_state, train
from latent_lm.training.train_loop import log_process0 as _log

STAGES = ("train_vae", "encode", "train", "sample", "eval")


def _atomic_write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _batched(fn, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + batch])) for i in range(0, len(x), batch)])


def _to_float_images(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def _vae_params(config, workdir, mesh, rules):
    state = load_state(VAETask.from_config(config), optim_config=config.vae_optim, train_config=config.vae_train,
                       mesh=mesh, rules=rules, workdir=f"{workdir}/vae")
    return state.params


def _latent_norm(workdir: str) -> LatentNormalization:
    meta = read_latent_cache_meta(f"{workdir}/latents/train")
    return LatentNormalization(**meta["metadata"]["latent_norm"])


def train_vae(config, workdir, mesh, rules):
    task = VAETask.from_config(config)
    # Each process reads its own slice and yields its rows (batch_size / process_count) of every global batch.
    it = iter(make_training_images(config.data, config.vae_train.batch_size, seed=config.vae_train.seed))
    res = train(task, it, optim_config=config.vae_optim, train_config=config.vae_train, mesh=mesh, rules=rules,
                workdir=f"{workdir}/vae", meta={"config": config.to_json()},
                checkpoint_config=config.checkpoint, log=_log)
    return {"vae_final_loss": res.final_metrics.get("loss")}


def encode(config, workdir, mesh, rules):
    """Encodes both splits to σ-VAE means μ in sharded, resumable latent caches (data_pipelines.latent_cache).

    Every process encodes its own shards on its own devices with a full copy of the σ-VAE, out of step with the
    others. The latent normalisation (spec §1.7: moments of σ-sampled latents z = μ + σ_b·ε) is computed in closed
    form over the whole train split: E z = E μ and Var z = Var μ + E σ_b², σ_b ~ N(0, (C_σ/0.8)²); the official
    code estimates it from one sampled batch.
    """
    task = VAETask.from_config(config)
    state = load_state(task, optim_config=config.vae_optim, train_config=config.vae_train, mesh=mesh, rules=rules,
                       workdir=f"{workdir}/vae")
    params = (multihost_utils.process_allgather(state.params, tiled=True) if jax.process_count() > 1
              else jax.device_get(state.params))
    local = Mesh(np.array(jax.local_devices()), ("batch",))
    params = jax.device_put(params, NamedSharding(local, PartitionSpec()))
    rows = NamedSharding(local, PartitionSpec("batch"))
    enc = jax.jit(lambda p, x: task.model.apply(p, x, method=SigmaVAE.encode))
    batch = -(-config.data.encode_batch_size // local.size) * local.size

    def encode_fn(images: np.ndarray) -> np.ndarray:
        n = len(images)  # the last batch of a shard is padded: one compiled shape
        padded = np.zeros((batch, *images.shape[1:]), np.float32)
        padded[:n] = images
        return np.asarray(enc(params, jax.device_put(padded, rows)))[:n]

    def latent_norm(moments: dict) -> dict:
        var = moments["std"] ** 2 + (config.vae.std / SIGMA_DIVISOR) ** 2
        norm = LatentNormalization(scale=float(var ** -0.5), bias=-float(moments["mean"]))
        return {"latent_norm": norm.to_dict()}

    fingerprint = {"vae_step": int(state.step), "vae": config.vae.to_dict(), "dataset": config.data.dataset,
                   "image_size": config.data.image_size}
    out = {}
    for split in ("train", "test"):
        count, read_batches = ordered_images(config.data, split, batch)
        meta = encode_to_latent_cache(f"{workdir}/latents/{split}", num_examples=count, read_batches=read_batches,
                                      encode_fn=encode_fn, num_shards=config.data.cache_shards,
                                      metadata=latent_norm if split == "train" else {},
                                      fingerprint=dict(fingerprint, split=split))
        if split == "train":
            norm = meta["metadata"]["latent_norm"]
            out.update(latent_scale=norm["scale"], latent_bias=norm["bias"])
        out[f"{split}_latents"] = [meta["count"], *meta["shape"]]
    _log(f"encoded latents {out}")
    return out


def _lm_task(config, workdir) -> LatentLMTask:
    return LatentLMTask.from_config(config, _latent_norm(workdir))


def train_lm(config, workdir, mesh, rules):
    task = _lm_task(config, workdir)
    # `batch_size` is global: each process reads its slice of the cache and yields batch_size / process_count rows.
    it = iter(make_latent_dataset(f"{workdir}/latents/train", config.train.batch_size, seed=config.train.seed,
                                  expected_shape=(config.model.max_len, config.model.latent_dim),
                                  num_workers=config.data.get("num_workers", 0)))
    res = train(task, it, optim_config=config.optim, train_config=config.train, mesh=mesh, rules=rules,
                workdir=f"{workdir}/lm", meta={"config": config.to_json(), "latent_norm": task.norm.to_dict()},
                checkpoint_config=config.checkpoint, log=_log)
    return {"lm_final_loss": res.final_metrics.get("loss"), "lm_steps_per_sec": res.steps_per_sec}


def _decode_fn(config, params):
    vae = VAETask.from_config(config).model
    return jax.jit(lambda z: jnp.clip(vae.apply(params, z, method=SigmaVAE.decode), -1.0, 1.0))


def sample(config, workdir, mesh, rules):
    """Samples `eval.samples_per_class` images per class with CFG and writes samples/final.{npz,png}."""
    task = _lm_task(config, workdir)
    state = load_state(task, optim_config=config.optim, train_config=config.train, mesh=mesh, rules=rules,
                       workdir=f"{workdir}/lm")
    params = state.ema_params if config.eval.use_ema else state.params
    d = config.diffusion
    settings = SamplerSettings(num_steps=d.num_sampling_steps, cfg_scale=d.cfg_scale,
                               prediction_type=d.prediction_type, x0_clip=d.x0_clip)
    sampler = make_sampler(task.model, task.schedule, settings, config.model.max_len)
    decode = _decode_fn(config, _vae_params(config, workdir, mesh, rules))
    labels = np.repeat(np.arange(config.data.num_classes), config.eval.samples_per_class).astype(np.int32)
    rng = jax.random.PRNGKey(config.eval.seed)
    t0 = time.time()
    images = []
    for i in range(0, len(labels), config.eval.sample_batch):
        z = sampler(params, jnp.asarray(labels[i:i + config.eval.sample_batch]), jax.random.fold_in(rng, i))
        images.append(to_uint8(np.asarray(decode(task.norm.denormalize(z)))))
    images = np.concatenate(images)
    elapsed = time.time() - t0
    os.makedirs(f"{workdir}/samples", exist_ok=True)
    tmp = f"{workdir}/samples/final.tmp.npz"
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, f"{workdir}/samples/final.npz")
    per = config.eval.samples_per_class
    grid = np.stack([images[labels == k][:10] for k in range(config.data.num_classes)], 0)
    save_image_grid(grid.reshape(-1, *images.shape[1:]), f"{workdir}/samples/final.png", ncols=min(10, per))
    _log(f"sampled {len(images)} images in {elapsed:.1f}s ({len(images) / elapsed:.1f} images/s)")
    return {"num_samples": int(len(images)), "sampling_images_per_sec": len(images) / elapsed}


def evaluate(config, workdir, mesh, rules):
    """Classifier accuracy and Fréchet distance of the samples; σ-VAE PSNR and variance-collapse ratio."""
    name, k = config.data.dataset, config.data.num_classes
    train_x, train_y = load_embedded(name, "train")
    test_x, test_y = load_embedded(name, "test")
    cpath = f"{workdir}/eval/classifier.msgpack"
    if os.path.exists(cpath):
        cparams = clf.load_classifier(cpath)
    else:
        cparams = clf.train_classifier(train_x, train_y, k, steps=config.eval.classifier_steps, seed=0)
        os.makedirs(os.path.dirname(cpath), exist_ok=True)
        clf.save_classifier(cparams, cpath)
    test_logits, test_feats = clf.classify(cparams, test_x, k)
    ref_mu, ref_sigma = feature_stats(test_feats)

    def score(images):
        logits, feats = clf.classify(cparams, images, k)
        return logits.argmax(-1), frechet_distance(*feature_stats(feats), ref_mu, ref_sigma)

    data = np.load(f"{workdir}/samples/final.npz")
    pred, fd_samples = score(data["images"])

    # Baseline: decode latents drawn from N(0, I) in LM space (the normalised latent prior).
    norm = _latent_norm(workdir)
    vae = VAETask.from_config(config).model
    vparams = _vae_params(config, workdir, mesh, rules)
    decode = _decode_fn(config, vparams)
    z = jax.random.normal(jax.random.PRNGKey(123), (len(data["images"]), config.model.max_len,
                                                    config.model.latent_dim))
    rand_images = to_uint8(_batched(lambda zz: decode(norm.denormalize(zz)), np.asarray(z), 500))
    _, fd_random = score(rand_images)

    x = _to_float_images(test_x)
    mu = _batched(jax.jit(lambda xx: vae.apply(vparams, xx, method=SigmaVAE.encode)), x, 500)
    rec = _batched(jax.jit(lambda z: vae.apply(vparams, z, method=SigmaVAE.decode)), mu, 500)
    mean_abs_sigma = config.vae.std / 0.8 * np.sqrt(2 / np.pi)  # E|σ| for σ ~ N(0, (std/0.8)²)
    result = {
        "dataset": name,
        "classifier_test_accuracy": float((test_logits.argmax(-1) == test_y).mean()),
        "sample_conditional_accuracy": float((pred == data["labels"]).mean()),
        "sample_fd": float(fd_samples),
        "random_latent_fd": float(fd_random),
        "vae_psnr_db": float(psnr(rec, x)),
        "vae_psnr_clipped_db": float(psnr(np.clip(rec, -1, 1), x)),
        "variance_collapse_ratio": float(variance_collapse_ratio(mean_abs_sigma, mu)),
        "num_samples": int(len(data["images"])),
        "cfg_scale": float(config.diffusion.cfg_scale),
        "sampling_steps": int(config.diffusion.num_sampling_steps),
    }
    _atomic_write_json(f"{workdir}/eval/final.json", result)
    return result


RUNNERS = {"train_vae": train_vae, "encode": encode, "train": train_lm, "sample": sample, "eval": evaluate}


def run(config, workdir: str, mode: str) -> dict:
    """Runs one stage, or all of them in order for mode='all'; prints a summary table at the end."""
    if mode != "all" and mode not in RUNNERS:
        raise ValueError(f"unknown --mode={mode}; choose one of {['all', *RUNNERS]}")
    validate(config)
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(f"{workdir}/config.json", "w") as f:
            f.write(config.to_json(indent=2))
    summary, timings = {}, {}
    for stage in (STAGES if mode == "all" else (mode,)):
        t0 = time.time()
        _log(f"=== {stage} ===")
        summary.update(RUNNERS[stage](config, workdir, mesh, rules) or {})
        timings[stage] = time.time() - t0
    summary["stage_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    _log(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    rows = [(k, v) for k, v in summary.items() if k != "stage_seconds"]
    rows += [(f"time/{k} (s)", v) for k, v in summary.get("stage_seconds", {}).items()]
    if "stage_seconds" in summary:
        rows.append(("time/total (s)", round(sum(summary["stage_seconds"].values()), 1)))
    width = max(len(k) for k, _ in rows) if rows else 10
    lines = ["", "=" * (width + 24), f"{'metric':<{width}}  value", "-" * (width + 24)]
    for k, v in rows:
        v = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {v}")
    lines.append("=" * (width + 24))
    return "\n".join(lines)
