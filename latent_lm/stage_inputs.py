"""Where a run's inputs live and how the generator stages load them (docs/design.md §5).

A run reads its tokenizers (σ-VAE or audio σ-VAE, latent caches, text tokenizer, speech corpus, judges) from its
tokenizer directory: `data.tokenizer_workdir` relative to the workdir, or the workdir itself. The image σ-VAE alone
may come from another run, `data.vae_workdir` (`vae_dir`): its checkpoint is read there while latents/ and text/ stay
in the tokenizer directory, so `encode` never writes into that run. The image stages (`latent_lm.experiment`) and
the speech stages (`latent_lm.speech_stages`) both read through here.
"""

from __future__ import annotations

import os
import posixpath

import jax
import jax.numpy as jnp

from data_pipelines import sharded_records
from data_pipelines.latent_cache import META_FILE, read_latent_cache_meta
from latent_lm import storage
from latent_lm.errors import ConfigError
from latent_lm.evaluation import classifier as clf
from latent_lm.latents import LatentNormalization
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.training.tasks import DataPaths, VAETask, make_generator_task
from latent_lm.training.train_loop import load_state


def tokenizer_dir(config, workdir: str) -> str:
    """Where the tokenizers and their latent caches live: `data.tokenizer_workdir` or the workdir.

    A relative path is relative to the workdir, so a sweep's runs name their sibling tokenizer run `../tokenizer`.
    """
    return relative_to(workdir, config.data.get("tokenizer_workdir") or ".")


def vae_dir(config, workdir: str) -> str:
    """The image σ-VAE's checkpoint directory: `<data.vae_workdir>/vae` when set (relative to the workdir, as
    `tokenizer_workdir`), else `<tokenizer dir>/vae` (docs/experiments.md §10.4: the ImageNet σ-VAE run's, read in
    place, while this run's latents/ and text/ go to its own tokenizer dir)."""
    base = config.data.get("vae_workdir")
    return f"{relative_to(workdir, base) if base else tokenizer_dir(config, workdir)}/vae"


def relative_to(workdir: str, path: str) -> str:
    """`path` if absolute or a URL, else joined to the workdir (gs://bucket/runs/x + ../tok → gs://bucket/runs/tok)."""
    if "://" in path or os.path.isabs(path):
        return path
    scheme, sep, base = workdir.rpartition("://")
    return f"{scheme}{sep}{posixpath.normpath(posixpath.join(base, path))}"


def is_speech(config) -> bool:
    """A speech run (configs/tts.py): its latents come from the audio σ-VAE."""
    return "audio_vae" in config


def data_paths(config, workdir: str) -> DataPaths:
    tok = tokenizer_dir(config, workdir)
    latents = f"{tok}/audio_latents" if is_speech(config) else f"{tok}/latents"
    return DataPaths(latents=latents, text_tokenizer=f"{tok}/text", speech_corpus=f"{tok}/speech_corpus")


def check_latents_writable(config, workdir: str, splits: tuple[str, ...] = ("train", "test")) -> None:
    """One ConfigError line, before anything is written, when a latent cache `encode` would write (`data_paths`)
    already holds latents of another dataset (its meta.json's fingerprint): that cache is another run's, e.g. the
    ImageNet σ-VAE run's when `data.tokenizer_workdir` names it (docs/experiments.md §10.4). A cache of the same
    dataset (a retrained σ-VAE, another size) is re-encoded as before; one without a dataset in its meta is kept
    to the old rule."""
    latents, dataset = data_paths(config, workdir).latents, config.data.dataset
    for split in splits:
        path = f"{latents}/{split}"
        meta = sharded_records.read_json(storage.join(path, META_FILE)) or {}
        written_from = (meta.get("fingerprint") or {}).get("dataset")
        if written_from is not None and written_from != dataset:
            raise ConfigError(f"the latent cache at {path} holds {written_from!r} latents, not data.dataset="
                              f"{dataset!r}: encode will not overwrite another run's cache; point "
                              f"data.tokenizer_workdir at a directory of this run's own and read that run's σ-VAE "
                              f"with data.vae_workdir")


def latent_norm(config, workdir: str) -> LatentNormalization:
    """The LM-space normalisation the latent cache's train split was written with (docs/method.md §3.1)."""
    meta = read_latent_cache_meta(f"{data_paths(config, workdir).latents}/train")
    return LatentNormalization(**meta["metadata"]["latent_norm"])


def generator_task(config, workdir: str):
    return make_generator_task(config, latent_norm(config, workdir))


def generator_params(config, workdir, mesh, rules, step: int | None = None):
    """(the generator task, its trained parameters — EMA when `eval.use_ema` —, trained steps): the latest
    checkpoint's, or `step`'s."""
    task = generator_task(config, workdir)
    state = load_state(task, optim_config=config.optim, train_config=config.train, mesh=mesh, rules=rules,
                       workdir=f"{workdir}/lm", step=step)
    return task, (state.ema_params if config.eval.use_ema else state.params), int(state.step)


def vae_params(config, workdir, mesh, rules):
    """The image σ-VAE's trained parameters (from `vae_dir`)."""
    state = load_state(VAETask.from_config(config), optim_config=config.vae_optim, train_config=config.vae_train,
                       mesh=mesh, rules=rules, workdir=vae_dir(config, workdir))
    return state.params


def image_decoder(config, params):
    """Jitted σ-VAE decode of raw (denormalised) latents to images in [-1, 1]."""
    vae = VAETask.from_config(config).model
    return jax.jit(lambda z: jnp.clip(vae.apply(params, z, method=SigmaVAE.decode), -1.0, 1.0))


def embedded_classifier(config, workdir, train_x, train_y):
    """The embedded-data classifier, trained once and cached in `eval.classifier_dir` (docs/method.md §10.1)."""
    cpath = f"{relative_to(workdir, config.eval.get('classifier_dir') or 'eval')}/classifier.msgpack"
    if storage.exists(cpath):
        return clf.load_classifier(cpath)
    cparams = clf.train_classifier(train_x, train_y, config.data.num_classes, steps=config.eval.classifier_steps,
                                   seed=0)
    clf.save_classifier(cparams, cpath)
    return cparams
