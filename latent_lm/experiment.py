"""The stages of an experiment, each a function of (config, workdir): train_vae → encode → train → sample → eval
(+ eval_loss); multimodal runs start with train_tokenizer. `--mode=all` runs `config.stages` in order and then
writes `done.json`.

Layout of a workdir:
  vae/          σ-VAE checkpoints and metrics        latents/{train,test}/  cached σ-VAE means (ArrayRecord)
  text/tokenizer.json   the text tokenizer (multimodal runs)
  lm/           generator (LatentLM or DiT) checkpoints and metrics
  samples/final.{npz,png}   eval/final.json   eval/loss.json   config.json   done.json (all stages finished)
`data.tokenizer_workdir`, when set, is where vae/, latents/ and text/ live instead (one tokenizer shared by many runs: the
scaling and tokenizer-variance sweeps); `data.vae_workdir`, when set, is where vae/ is read from (another run's σ-VAE,
e.g. the ImageNet one at paper-scale multimodal, whose own latents are never overwritten).
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines.embedded import dataset_names, load_embedded
from data_pipelines.image_pipeline import make_training_images, ordered_images
from data_pipelines.latent_cache import encode_to_latent_cache
from data_pipelines import speech_corpus
from data_pipelines.mllm_documents import tokenizer_training_texts
from latent_lm import mllm_stages, speech_stages, storage
from latent_lm.config_validation import validate
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.evaluation import classifier as clf
from latent_lm.evaluation import imagenet_fid, inception
from latent_lm.evaluation.frechet import feature_stats, frechet_distance
from latent_lm.evaluation.grids import save_image_grid
from latent_lm.evaluation.image_metrics import psnr, variance_collapse_ratio
from latent_lm.latents import SIGMA_DIVISOR, LatentNormalization, LatentPosterior
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.parallel.device_prefetch import DevicePrefetcher
from latent_lm.parallel.distributed import barrier
from latent_lm.parallel.mesh import (data_parallel_size, global_rows, host_arrays, logical_rules, make_mesh,
                                   pad_rows)
from latent_lm.pixels import to_signed, to_uint8
from latent_lm.sampling import SamplerSettings
from latent_lm.text.tokenizer import TOKENIZER_FILE, TextTokenizer, train_tokenizer
from latent_lm.training.tasks import VAETask
from latent_lm.training.train_loop import load_state, train
from latent_lm.training.train_loop import log_process0 as _log
from latent_lm.stage_inputs import (data_paths, embedded_classifier, generator_params as _generator_params,
                                    generator_task, image_decoder, is_speech, latent_norm as _latent_norm,
                                    tokenizer_dir, vae_dir, vae_params, check_latents_writable)

def _atomic_write_json(path: str, obj) -> None:
    storage.write_json_atomic(path, obj, indent=2, sort_keys=True)


def _batched(fn, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + batch])) for i in range(0, len(x), batch)])


def _tokenizer_texts(config, workdir: str) -> list[str]:
    """The run's training text: for speech, the train split's phonemes or text (`tts.input`); else the image
    dataset's captions, questions and English paragraphs; at paper scale COCO's captions and web text."""
    if (config.get("documents") or {}).get("source") == "coco":  # docs/experiments.md §10.4
        from data_pipelines.coco_documents import tokenizer_training_texts as paper_texts

        return paper_texts(config.documents)
    if not is_speech(config):
        return tokenizer_training_texts(config.data.dataset)
    train = speech_corpus.load_corpus(data_paths(config, workdir).speech_corpus, "train")
    return list(train.phonemes if config.tts.input == "phonemes" else train.text)


def train_text_tokenizer(config, workdir, mesh, rules):
    """Trains the byte-level BPE text tokenizer on the run's training text (docs/method.md §7.3) into
    `<tokenizer dir>/text/tokenizer.json`; a tokenizer already there is kept, since every later stage reads it.

    Training is deterministic, so every process trains the same one and process 0 writes it. A kept tokenizer must
    have been trained with the config's `text.split` (one error line otherwise: it is not silently reused)."""
    path = data_paths(config, workdir).text_tokenizer
    split = config.text.get("split", "words")
    if storage.exists(storage.join(path, TOKENIZER_FILE)):
        tok = TextTokenizer.load(path)
        if tok.split != split:
            raise ConfigError(f"the text tokenizer at {path} was trained with text.split={tok.split!r}, not the "
                              f"config's {split!r}: remove it to train another, or use another tokenizer workdir")
    else:
        tok = train_tokenizer(_tokenizer_texts(config, workdir), config.text.vocab_size, config.text.min_frequency,
                              split)
        if jax.process_index() == 0:
            tok.save(path)
        barrier("train_tokenizer")
    if tok.vocab_size > config.model.text_vocab_size:
        raise ConfigError(f"the text tokenizer at {path} has {tok.vocab_size} tokens but model.text_vocab_size="
                          f"{config.model.text_vocab_size}")
    _log(f"text tokenizer: {tok.vocab_size} tokens in {path}")
    return {"text_vocab_size": tok.vocab_size}


def train_vae(config, workdir, mesh, rules):
    """Trains (or resumes) the σ-VAE in `<tokenizer dir>/vae`. A σ-VAE read from another run (`data.vae_workdir`,
    docs/experiments.md §10.4) is never trained here: resuming it would write into that run (one ConfigError line)."""
    out = vae_dir(config, workdir)
    if out != f"{tokenizer_dir(config, workdir)}/vae":
        raise ConfigError(f"data.vae_workdir={config.data.vae_workdir!r} names a σ-VAE this run reads and never "
                          f"trains ({out}): drop train_vae from config.stages, or unset data.vae_workdir to train "
                          f"the run's own")
    task = VAETask.from_config(config)
    # Each process reads its own slice and yields its rows (batch_size / process_count) of every global batch.
    it = iter(make_training_images(config.data, config.vae_train.batch_size, seed=config.vae_train.seed))
    res = train(task, it, optim_config=config.vae_optim, train_config=config.vae_train, mesh=mesh, rules=rules,
                workdir=out, meta={"config": config.to_json()},
                checkpoint_config=config.checkpoint, log=_log)
    return {"vae_final_loss": res.final_metrics.get("loss")}


def encode(config, workdir, mesh, rules):
    """Encodes both splits to σ-VAE means μ in sharded, resumable latent caches (data_pipelines.latent_cache).

    Every process encodes its own shards on its own devices with a full copy of the σ-VAE, out of step with the
    others. The latent normalisation (docs/method.md §3.1: moments of σ-sampled latents z = μ + σ_b·ε) is computed in
    closed form over the whole train split: E z = E μ and Var z = Var μ + E σ_b², σ_b ~ N(0, (C_σ/0.8)²); the official
    code estimates it from one sampled batch. A KL-VAE (`vae.kind="kl"`, docs/method.md §2.4) caches its posterior as
    the sigma points (μ + σ, μ − σ) [T, 2C], whose moments are those of z = μ + σ·ε: Var z = Var μ + E σ²
    (`sigma_vae.LatentPosterior.latent_variance`). An FSQ tokenizer (`vae.kind="fsq"`, §2.5) caches its quantized
    grid vectors [T, C]: exact codes, and Var z = Var(cache).

    The σ-VAE is read from `vae_dir` (`data.vae_workdir`, else the tokenizer dir) and the caches are written to
    `<tokenizer dir>/latents`; a cache there of another dataset is refused before anything is written
    (`check_latents_writable`, docs/experiments.md §10.4).
    """
    check_latents_writable(config, workdir)
    task = VAETask.from_config(config)
    posterior = LatentPosterior.from_vae_config(config.vae)
    tok, vae = tokenizer_dir(config, workdir), vae_dir(config, workdir)
    state = load_state(task, optim_config=config.vae_optim, train_config=config.vae_train, mesh=mesh, rules=rules,
                       workdir=vae)
    vae_params = task.vae_variables(state.params)  # without the GAN's discriminator, if any
    params = host_arrays(vae_params)
    local = Mesh(np.array(jax.local_devices()), ("batch",))
    params = jax.device_put(params, NamedSharding(local, PartitionSpec()))
    rows = NamedSharding(local, PartitionSpec("batch"))
    enc = jax.jit(lambda p, x: task.model.apply(p, x, method=SigmaVAE.cache_latents))
    batch = -(-config.data.encode_batch_size // local.size) * local.size

    def encode_fn(images: np.ndarray) -> np.ndarray:
        n = len(images)  # the last batch of a shard is padded: one compiled shape
        padded = np.zeros((batch, *images.shape[1:]), np.float32)
        padded[:n] = images
        return np.asarray(enc(params, jax.device_put(padded, rows)))[:n]

    def latent_norm(moments: dict) -> dict:
        var = posterior.latent_variance(moments["std"])
        if var <= 0:  # e.g. an FSQ tokenizer that gives every token of every image one code (§2.5)
            raise DataError(f"the encoded train split has zero latent variance (every value is {moments['mean']:g}): "
                            f"the tokenizer in {vae} maps every image to one latent; train it (longer)")
        norm = LatentNormalization(scale=float(var ** -0.5), bias=-float(moments["mean"]))
        return {"latent_norm": norm.to_dict()}

    fingerprint = {"vae_step": int(state.step), "vae": config.vae.to_dict(), "dataset": config.data.dataset,
                   "image_size": config.data.image_size}
    out = {}
    for split in ("train", "test"):
        count, read_batches = ordered_images(config.data, split, batch)
        meta = encode_to_latent_cache(f"{tok}/latents/{split}", num_examples=count, read_batches=read_batches,
                                      encode_fn=encode_fn, num_shards=config.data.cache_shards,
                                      metadata=latent_norm if split == "train" else {},
                                      fingerprint=dict(fingerprint, split=split))
        if split == "train":
            norm = meta["metadata"]["latent_norm"]
            out.update(latent_scale=norm["scale"], latent_bias=norm["bias"])
        out[f"{split}_latents"] = [meta["count"], *meta["shape"]]
    _log(f"encoded latents {out}")
    return out


def train_lm(config, workdir, mesh, rules):
    task = generator_task(config, workdir)
    # `batch_size` is global: each process reads its slice of the data and yields batch_size / process_count rows.
    it = iter(task.make_dataset(data_paths(config, workdir), "train", config.train.batch_size, config.train.seed,
                                num_workers=config.data.get("num_workers", 0)))
    res = train(task, it, optim_config=config.optim, train_config=config.train, mesh=mesh, rules=rules,
                workdir=f"{workdir}/lm", meta={"config": config.to_json(), "latent_norm": task.norm.to_dict()},
                checkpoint_config=config.checkpoint, log=_log)
    return {"lm_final_loss": res.final_metrics.get("loss"), "lm_steps_per_sec": res.steps_per_sec}


def eval_loss(config, workdir, mesh, rules):
    """Held-out loss of the generator on the test latents, with its exact training FLOPs (the scaling-law point).

    The same loss as training (docs/method.md §6.1–6.3) without class dropout, averaged over `eval.loss_repeats` draws
    of (t, ε, σ) per test batch from a fixed seed, so runs of one sweep see identical noise; beside it the mean of
    each of the loss's metrics (`metrics`), and the same for each of the task's `eval_loss_variants` (named datasets
    of the same split, e.g. TTS with every text dropped).
    """
    task, params, step = _generator_params(config, workdir, mesh, rules)
    e = config.eval
    if e.loss_batch % data_parallel_size(mesh):
        raise ConfigError(f"eval.loss_batch={e.loss_batch} is not divisible by the data-parallel size "
                          f"{data_parallel_size(mesh)} (mesh data×fsdp)")
    loss_fn = jax.jit(lambda p, b, r: task.loss(p, b, r, train=False))

    def held_out(**dataset_kwargs) -> tuple[float, dict[str, float], int]:
        it = task.make_dataset(data_paths(config, workdir), "test", e.loss_batch, seed=0, **dataset_kwargs)
        losses, metrics = [], []
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for i, batch in enumerate(DevicePrefetcher(iter(it), mesh)):
                for r in range(e.loss_repeats):
                    loss, m = loss_fn(params, batch, jax.random.PRNGKey(e.seed * 1_000_003 + i * 1009 + r))
                    losses.append(float(loss))
                    metrics.append({k: float(v) for k, v in m.items()})
        if not losses:
            raise DataError(f"the test split under {tokenizer_dir(config, workdir)} holds fewer than "
                            f"eval.loss_batch={e.loss_batch} examples"
                            + (f" as {dataset_kwargs}" if dataset_kwargs else ""))
        return float(np.mean(losses)), {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}, len(losses)

    loss, metrics, count = held_out()
    variants = {name: dict(zip(("eval_loss", "metrics"), held_out(**kwargs)[:2]))
                for name, kwargs in getattr(task, "eval_loss_variants", {}).items()}
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    per_step = task.train_flops_per_example() * config.train.batch_size
    result = {"eval_loss": loss, "family": config.model.get("arch", "latent_lm"), "params": num_params,
              "flops_per_step": per_step, "train_flops": per_step * step, "steps": step,
              "eval_batches": count // e.loss_repeats, "metrics": metrics, **variants}
    if jax.process_index() == 0:
        _atomic_write_json(f"{workdir}/eval/loss.json", result)
    return {"eval_loss": result["eval_loss"], "train_flops": result["train_flops"],
            **{f"eval_loss_{name}": v["eval_loss"] for name, v in variants.items()}}


def sample(config, workdir, mesh, rules):
    """Samples `eval.samples_per_class` images per class with CFG and writes samples/final.{npz,png}."""
    task, params, _ = _generator_params(config, workdir, mesh, rules)
    d = config.diffusion
    settings = SamplerSettings(num_steps=d.num_sampling_steps, cfg_scale=d.cfg_scale,
                               prediction_type=d.prediction_type, x0_clip=d.x0_clip)
    sampler = task.make_sampler(settings)
    decode = image_decoder(config, vae_params(config, workdir, mesh, rules))
    labels = np.repeat(np.arange(config.data.num_classes), config.eval.samples_per_class).astype(np.int32)
    rng = jax.random.PRNGKey(config.eval.seed)
    t0 = time.time()
    images = []
    # Every process holds all labels; each batch is split over (data, fsdp), padded to the data-parallel size (a
    # row's noise does not depend on the padding: `row_noise`), and every process gathers the decoded images.
    dp = data_parallel_size(mesh)
    for i in range(0, len(labels), config.eval.sample_batch):
        chunk = labels[i:i + config.eval.sample_batch]
        z = sampler(params, global_rows(pad_rows(chunk, dp), mesh), jax.random.fold_in(rng, i))
        images.append(to_uint8(host_arrays(decode(task.norm.denormalize(z)))[:len(chunk)]))
    images = np.concatenate(images)
    elapsed = time.time() - t0
    if jax.process_index() == 0:
        storage.write_npz_atomic(f"{workdir}/samples/final.npz", images=images, labels=labels)
        per = config.eval.samples_per_class
        grid = np.stack([images[labels == k][:10] for k in range(config.data.num_classes)], 0)
        save_image_grid(grid.reshape(-1, *images.shape[1:]), f"{workdir}/samples/final.png", ncols=min(10, per))
    barrier("sample")  # the eval stage reads samples/final.npz on every process
    _log(f"sampled {len(images)} images in {elapsed:.1f}s ({len(images) / elapsed:.1f} images/s)")
    return {"num_samples": int(len(images)), "sampling_images_per_sec": len(images) / elapsed}


def _check_fid_inputs(config) -> None:
    """Before any stage runs: the FID inputs of a non-embedded eval exist (not discovered after days of training)."""
    e = config.eval
    if not e.reference_stats:
        raise ConfigError(f"eval of {config.data.dataset} needs --config.eval.reference_stats (e.g. the ADM "
                          f"VIRTUAL_imagenet256_labeled.npz); see docs/experiments.md §8")
    for path in (e.reference_stats, e.inception_weights or inception.DEFAULT_WEIGHTS):
        if not storage.exists(path):
            raise MissingInputError(f"{path} does not exist (eval.reference_stats / eval.inception_weights); see "
                                    f"docs/experiments.md §8")


def evaluate_fid(config, workdir):
    """ImageNet (any non-embedded dataset): FID and IS of samples/final.npz with the standard Inception network and
    reference statistics the user supplies (`eval.inception_weights`, `eval.reference_stats`; docs/method.md §10.2)."""
    e = config.eval
    result = imagenet_fid.evaluate_samples(f"{workdir}/samples/final.npz", e.reference_stats,
                                           e.inception_weights or inception.DEFAULT_WEIGHTS,
                                           out=f"{workdir}/eval/final.json")
    return {k: result[k] for k in ("fid", "inception_score", "num_samples")}


def evaluate(config, workdir, mesh, rules):
    """Classifier accuracy and Fréchet distance of the samples; σ-VAE PSNR and variance-collapse ratio (no ratio for
    an FSQ tokenizer, which has no posterior noise: docs/method.md §2.5).

    Embedded datasets only (a classifier trained here scores the samples); other datasets go to `evaluate_fid`.
    """
    if config.data.dataset not in dataset_names():
        return evaluate_fid(config, workdir)
    name, k = config.data.dataset, config.data.num_classes
    train_x, train_y = load_embedded(name, "train")
    test_x, test_y = load_embedded(name, "test")
    cparams = embedded_classifier(config, workdir, train_x, train_y)
    test_logits, test_feats = clf.classify(cparams, test_x, k)
    ref_mu, ref_sigma = feature_stats(test_feats)

    def score(images):
        logits, feats = clf.classify(cparams, images, k)
        return logits.argmax(-1), frechet_distance(*feature_stats(feats), ref_mu, ref_sigma)

    with storage.open_file(f"{workdir}/samples/final.npz") as f, np.load(f) as npz:
        data = {key: npz[key] for key in npz.files}
    pred, fd_samples = score(data["images"])

    # Baseline: decode latents drawn from N(0, I) in LM space (the normalised latent prior).
    norm = _latent_norm(config, workdir)
    vae = VAETask.from_config(config).model
    vparams = vae_params(config, workdir, mesh, rules)
    decode = image_decoder(config, vparams)
    z = jax.random.normal(jax.random.PRNGKey(123), (len(data["images"]), config.model.max_len,
                                                    config.model.latent_dim))
    rand_images = to_uint8(_batched(lambda zz: decode(norm.denormalize(zz)), np.asarray(z), 500))
    _, fd_random = score(rand_images)

    x = to_signed(test_x)
    if vae.kind == "kl":  # the learned posterior σ (docs/method.md §2.4)
        moments = _batched(jax.jit(lambda xx: jnp.concatenate(vae.apply(vparams, xx, method=SigmaVAE.posterior),
                                                               -1)), x, 500)
        mu, logvar = np.split(moments, 2, axis=-1)
        mean_abs_sigma = float(np.mean(np.exp(0.5 * logvar.astype(np.float64))))
    else:  # FSQ: `encode` gives the grid vector, and with no posterior noise there is no ratio (§2.5)
        mu = _batched(jax.jit(lambda xx: vae.apply(vparams, xx, method=SigmaVAE.encode)), x, 500)
        mean_abs_sigma = (None if vae.kind == "fsq"
                          else config.vae.std / SIGMA_DIVISOR * np.sqrt(2 / np.pi))  # E|σ| for σ ~ N(0, (std/0.8)²)
    rec = _batched(jax.jit(lambda z: vae.apply(vparams, z, method=SigmaVAE.decode)), mu, 500)
    result = {
        "dataset": name,
        "classifier_test_accuracy": float((test_logits.argmax(-1) == test_y).mean()),
        "sample_conditional_accuracy": float((pred == data["labels"]).mean()),
        "sample_fd": float(fd_samples),
        "random_latent_fd": float(fd_random),
        "vae_psnr_db": float(psnr(rec, x)),
        "vae_psnr_clipped_db": float(psnr(np.clip(rec, -1, 1), x)),
        **({} if mean_abs_sigma is None else
           {"variance_collapse_ratio": float(variance_collapse_ratio(mean_abs_sigma, mu))}),
        "num_samples": int(len(data["images"])),
        "cfg_scale": float(config.diffusion.cfg_scale),
        "sampling_steps": int(config.diffusion.num_sampling_steps),
    }
    _atomic_write_json(f"{workdir}/eval/final.json", result)
    return result


RUNNERS = {"train_tokenizer": train_text_tokenizer, "train_vae": train_vae, "encode": encode,
           # speech (docs/method.md §12): corpus, audio σ-VAE, its latent caches and scores, the judges
           "build_corpus": speech_stages.build_corpus, "train_audio_vae": speech_stages.train_audio_vae,
           "encode_audio": speech_stages.encode_audio, "eval_audio_vae": speech_stages.eval_audio_vae,
           "train_judges": speech_stages.train_judges,
           "train": train_lm, "sample": sample, "eval": evaluate, "eval_loss": eval_loss, "generate": mllm_stages.generate,
           "eval_mllm": mllm_stages.evaluate_multimodal, "eval_curve": mllm_stages.eval_curve,
           "generate_tts": speech_stages.generate_tts, "eval_tts": speech_stages.eval_tts}
STAGES = tuple(RUNNERS)  # the stage names a config's `stages` may list, in pipeline order
IMAGE_STAGES = ("train_vae", "encode", "train", "sample", "eval", "eval_loss")  # a class-conditional image run


def run(config, workdir: str, mode: str) -> dict:
    """Runs one stage, or `config.stages` in order for mode='all' and then writes done.json (what the sweep runner
    reads as "finished"); prints a summary table at the end."""
    if mode != "all" and mode not in RUNNERS:
        raise ValueError(f"unknown --mode={mode}; choose one of {['all', *RUNNERS]}")
    validate(config, STAGES)
    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh)
    storage.makedirs(workdir)
    if jax.process_index() == 0:
        if mode == "all":  # a rerun (e.g. with more steps) is unfinished until it finishes
            storage.remove(f"{workdir}/done.json", missing_ok=True)
        storage.write_text_atomic(f"{workdir}/config.json", config.to_json(indent=2))
    stages = tuple(config.stages) if mode == "all" else (mode,)
    if "eval" in stages and config.data.dataset not in dataset_names():
        _check_fid_inputs(config)
    summary, timings = {}, {}
    for stage in stages:
        t0 = time.time()
        _log(f"=== {stage} ===")
        summary.update(RUNNERS[stage](config, workdir, mesh, rules) or {})
        timings[stage] = time.time() - t0
    summary["stage_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    _log(format_summary(summary))
    if mode == "all" and jax.process_index() == 0:
        _atomic_write_json(f"{workdir}/done.json", summary)
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
