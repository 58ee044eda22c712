"""Where a run's inputs live and how the generator stages load them (docs/design.md §5).

A run reads its tokenizers (σ-VAE or audio σ-VAE, latent caches, text tokenizer, speech corpus, judges) from its
tokenizer directory: `data.tokenizer_workdir` relative to the workdir, or the workdir itself. The image stages
(`latent_lm.experiment`) and the speech stages (`latent_lm.speech_stages`) both read through here.
"""

from __future__ import annotations

import os
import posixpath

from data_pipelines.latent_cache import read_latent_cache_meta
from latent_lm.latents import LatentNormalization
from latent_lm.training.tasks import DataPaths, make_generator_task
from latent_lm.training.train_loop import load_state


def tokenizer_dir(config, workdir: str) -> str:
    """Where the tokenizers and their latent caches live: `data.tokenizer_workdir` or the workdir.

    A relative path is relative to the workdir, so a sweep's runs name their sibling tokenizer run `../tokenizer`.
    """
    return relative_to(workdir, config.data.get("tokenizer_workdir") or ".")


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


def latent_norm(config, workdir: str) -> LatentNormalization:
    """The LM-space normalisation the latent cache's train split was written with (docs/method.md §3.1)."""
    meta = read_latent_cache_meta(f"{data_paths(config, workdir).latents}/train")
    return LatentNormalization(**meta["metadata"]["latent_norm"])


def generator_task(config, workdir: str):
    return make_generator_task(config, latent_norm(config, workdir))


def generator_params(config, workdir, mesh, rules):
    """(the generator task, its trained parameters — EMA when `eval.use_ema` —, trained steps)."""
    task = generator_task(config, workdir)
    state = load_state(task, optim_config=config.optim, train_config=config.train, mesh=mesh, rules=rules,
                       workdir=f"{workdir}/lm")
    return task, (state.ema_params if config.eval.use_ema else state.params), int(state.step)
