"""Export an orbax checkpoint to PyTorch (issue #6): `model.safetensors`, `model.pt`, `config.json`.

  python -m latent_lm.convert.to_torch --workdir=runs/default --out=runs/default/export \
      [--params=ema|raw] [--dtype=float32|bfloat16] [--what=all|lm|vae] [--step=N]

The generator goes to `<out>/` (official `Transformer` keys, or official `DiT` keys for a `model.arch="dit"` run,
plus `other_state.pth` with the latent normalisation in the official format) and the σ-VAE to `<out>/vae/`. A
multimodal run (`model.arch="mllm"`, docs/pytorch.md §2.1) also gets its text tokenizer, `tokenizer.json`, copied
byte for byte beside the weights, and a "multimodal" entry in config.json. A TTS run (`model.arch="tts"`,
docs/pytorch.md §2.2) exports as a multimodal one, with its audio σ-VAE in `<out>/audio_vae/` instead of `vae/`. The
σ-VAEs and the tokenizer are read where training reads them: under `data.tokenizer_workdir` when the run shares its
tokenizer, else under the workdir, and the image σ-VAE under `data.vae_workdir` when the run reads another run's
(`experiment.tokenizer_dir`, `stage_inputs.vae_dir`, `experiment.data_paths`, `speech_stages.audio_vae_dir`). The
experiment config is read from the checkpoint's own metadata, so only the workdir is needed. Parameters are gathered
to host one tensor at a time, and the scanned blocks one layer at a time (`x[i]` of the stacked arrays): devices hold
their training shards plus one gathered tensor, never the whole model. Multi-host arrays are assembled with
`process_allgather`; process 0 writes the files.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tokenizers
import torch
from flax import traverse_util
from jax.experimental import multihost_utils

from latent_lm import cli, storage
from latent_lm.checkpoint import Checkpointer
from latent_lm.convert import param_mapping
from latent_lm.convert.torch_files import AUDIO_VAE_DIR, DTYPES, TOKENIZER, VAE_DIR, ConversionError, write_export
from latent_lm.errors import DataError, MissingInputError
from latent_lm.experiment import data_paths
from latent_lm.models.audio_vae import AudioVAE, frame_rate
from latent_lm.models.dit import DiTConfig
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.latents import LatentNormalization
from latent_lm.speech_stages import audio_vae_dir
from latent_lm.stage_inputs import is_speech, vae_dir as image_vae_dir
from latent_lm.training.optimizer import make_optimizer
from latent_lm.text.tokenizer import TOKENIZER_FILE, TextTokenizer
from latent_lm.training.tasks import DiTTask, VAETask, make_generator_task
from latent_lm.training.tasks.audio_vae import AudioVAETask
from latent_lm.training.tasks.registry import latent_grid_tokens
from latent_lm.training.train_loop import build_state_fns

DEFAULT_CLASS_DROPOUT = 0.1  # official default; only sets whether the PyTorch class table has the null row
EXPORTABLE_ARCHS = ("latent_lm", "mllm", "tts", "dit")  # model.arch values with a PyTorch twin
TEXT_ARCHS = ("mllm", "tts")  # those that ship the run's text tokenizer


def lm_torch_kwargs(cfg: LatentLMConfig, class_dropout: float, input_size: int | None = None) -> dict:
    """Constructor arguments of the PyTorch `Transformer` (official names; extensions only when needed).

    `input_size`: the latent grid side of one image when the sequence is not one image (a multimodal run); by default
    √max_len. `max_len` is written whenever it is not `input_size²`."""
    side = input_size or math.isqrt(cfg.max_len)
    kwargs = dict(input_size=side, patch_size=1, flatten_input=False, in_channels=cfg.latent_dim,
                  hidden_size=cfg.width, depth=cfg.depth, diffusion_depth=cfg.head_depth, num_heads=cfg.num_heads,
                  num_kv_heads=cfg.num_kv_heads, mlp_ratio=cfg.mlp_ratio,
                  # The JAX table always has the null row; the PyTorch class has it only when this is > 0.
                  class_dropout_prob=class_dropout if class_dropout > 0 else DEFAULT_CLASS_DROPOUT,
                  num_classes=cfg.num_classes, posi_scale=cfg.posi_scale)
    if cfg.head_mlp_ratio is not None and cfg.head_mlp_ratio != cfg.mlp_ratio:
        kwargs["diffusion_mlp_ratio"] = cfg.head_mlp_ratio
    if cfg.text_vocab_size:
        kwargs["text_vocab_size"] = cfg.text_vocab_size
    if side * side != cfg.max_len:
        kwargs["max_len"] = cfg.max_len
    return kwargs


def dit_torch_kwargs(cfg: DiTConfig, class_dropout: float) -> dict:
    """Constructor arguments of the PyTorch (and official) `DiT`."""
    return dict(input_size=cfg.grid_size, patch_size=1, flatten_input=False, in_channels=cfg.latent_dim,
                hidden_size=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                mlp_ratio=cfg.mlp_ratio,
                class_dropout_prob=class_dropout if class_dropout > 0 else DEFAULT_CLASS_DROPOUT,
                num_classes=cfg.num_classes)


def vae_torch_kwargs(vae: SigmaVAE, kl_weight: float) -> dict:
    """Constructor arguments of the PyTorch (and official) `SigmaVAE` with ViT encoder and decoder."""
    common = dict(arch="vit-base", embed_dim=vae.width, depth=vae.depth, num_heads=vae.num_heads,
                  mlp_ratio=vae.mlp_ratio, qkv_bias=True, use_cls=vae.use_cls)
    grid = vae.image_size // vae.patch_size
    return dict(encoder_config=dict(common, img_size=vae.image_size, patch_size=vae.patch_size,
                                    in_chans=vae.in_channels),
                decoder_config=dict(common, img_size=grid, patch_size=1, in_chans=vae.latent_dim),
                patch_size=vae.patch_size, latent_size=vae.latent_dim, kl_weight=kl_weight, std=vae.std)


def to_host(x, layer: int | None = None) -> np.ndarray:
    """One parameter (or layer `layer` of a stacked one) as a float32 numpy array on this host."""
    if layer is not None:
        x = x[layer]
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)


def flat_params(params) -> dict[str, object]:
    """{"params": tree} or tree → {"a/b/kernel": leaf}."""
    tree = params["params"] if "params" in params else params
    return traverse_util.flatten_dict(tree, sep="/")


def params_to_state_dict(params, table: list[param_mapping.Rule], dtype: str = "float32",
                         what: str = "export") -> dict[str, torch.Tensor]:
    """Applies the table; every JAX parameter must be mapped exactly once (else one error naming it)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}")
    flat = flat_params(params)
    wanted = param_mapping.jax_paths(table)
    missing, extra = sorted(wanted - set(flat)), sorted(set(flat) - wanted)
    if missing:
        raise ConversionError(f"{what}: the checkpoint has no parameter {missing[0]!r}: it is not the architecture "
                              f"being exported")
    if extra:
        raise ConversionError(f"{what}: the checkpoint parameter {extra[0]!r} has no PyTorch key: it is not the "
                              f"architecture being exported")
    state_dict = {}
    for rule in table:
        arrays = [to_host(flat[p], rule.layer) for p in rule.jax_paths]
        for key, value in zip(rule.torch_keys, rule.to_torch(*arrays)):
            state_dict[key] = torch.from_numpy(np.array(value, np.float32, order="C")).to(DTYPES[dtype])
    return state_dict


def multimodal_metadata(tokenizer: TextTokenizer, cfg: LatentLMConfig, latents_per_image: int | None = None,
                        where: str = "export", speech: dict | None = None) -> dict:
    """config.json's "multimodal" entry (docs/pytorch.md §2.1): the tokenizer file, the text vocabulary (text id i is
    `text_embedder` row i and `lm_head` output i; the tokenizer uses the first `tokenizer_vocab_size` of them), the
    special tokens' ids, and the latents per image (a square grid); for a TTS run (§2.2) `speech` (`tts_metadata`)
    instead of the image fields."""
    if tokenizer.vocab_size > cfg.text_vocab_size:
        raise ConversionError(f"{where}: the text tokenizer has {tokenizer.vocab_size} tokens but the model's text "
                              f"vocabulary has {cfg.text_vocab_size} (model.text_vocab_size)")
    meta = dict(arch="tts" if speech else "mllm", tokenizer=TOKENIZER, text_vocab_size=cfg.text_vocab_size,
                tokenizer_vocab_size=tokenizer.vocab_size, text_token_offset=cfg.text_offset,
                special_tokens=dict(tokenizer.special))
    if speech:
        return dict(meta, **speech)
    return dict(meta, latents_per_image=latents_per_image, latent_grid_size=math.isqrt(latents_per_image))


def tts_metadata(config, latent_stop_id: int) -> dict:
    """The speech fields of a TTS export's "multimodal" entry (docs/pytorch.md §2.2): what a span's latents are (the
    audio σ-VAE in `audio_vae/`, its rates, the latent frames stacked per position), the token the LM head ends a span
    with, the longest span (in positions), the input, whether speech positions restart at `<bod>` and their scale."""
    a = config.audio_vae
    return dict(input=config.tts.input, latent_stop_id=int(latent_stop_id), max_frames=int(config.tts.max_frames),
                frames_per_step=int(config.tts.frames_per_step), positions=str(config.tts.get("positions", "continue")),
                position_scale=float(config.tts.get("position_scale", 1.0)),
                audio_vae=AUDIO_VAE_DIR, sample_rate=int(a.sample_rate), hop_length=int(math.prod(a.strides)),
                frame_rate=frame_rate(int(a.sample_rate), a.strides))


def export_latent_lm(params, cfg: LatentLMConfig, out_dir: str, *, dtype: str = "float32",
                     class_dropout: float = DEFAULT_CLASS_DROPOUT, latent_norm: dict | None = None,
                     diffusion: dict | None = None, source: dict | None = None,
                     experiment_config: dict | None = None, tokenizer_json: bytes | None = None,
                     latents_per_image: int | None = None, speech: dict | None = None) -> dict:
    """Writes the LatentLM files; returns config.json's content (`experiment_config` is kept for re-import).

    A multimodal model (docs/pytorch.md §2.1) passes its `tokenizer.json` as `tokenizer_json` (written beside the
    weights byte for byte, with config.json's "multimodal" entry) and its `latents_per_image` (the PyTorch
    `input_size` becomes the image's latent grid side); a TTS model (§2.2) passes `speech` (`tts_metadata`) instead
    of `latents_per_image` (a span has no grid: `input_size` stays √max_len)."""
    if tokenizer_json is not None and not (latents_per_image or speech):
        raise ValueError("a multimodal export (tokenizer_json) needs latents_per_image or speech")
    state_dict = params_to_state_dict(params, param_mapping.latent_lm_table(cfg), dtype, f"LatentLM → {out_dir}")
    extra, files, side = {}, {}, None
    if tokenizer_json is not None:
        tokenizer = parse_tokenizer(tokenizer_json, out_dir)
        extra["multimodal"] = multimodal_metadata(tokenizer, cfg, latents_per_image, out_dir, speech)
        files[TOKENIZER] = tokenizer_json
        side = math.isqrt(latents_per_image) if latents_per_image else None
    return _write_generator(state_dict, "Transformer", lm_torch_kwargs(cfg, class_dropout, side), out_dir,
                            dtype=dtype, latent_norm=latent_norm, diffusion=diffusion, source=source,
                            experiment_config=experiment_config, extra=extra, files=files)


def parse_tokenizer(tokenizer_json: bytes, where: str) -> TextTokenizer:
    """A `tokenizer.json`'s bytes → TextTokenizer (one DataError line for a file that is not one of ours)."""
    try:
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"{where}: the text tokenizer is not a tokenizer.json: {e}") from None
    return TextTokenizer(tokenizer)


def export_dit(params, cfg: DiTConfig, out_dir: str, *, dtype: str = "float32",
               class_dropout: float = DEFAULT_CLASS_DROPOUT, latent_norm: dict | None = None,
               diffusion: dict | None = None, source: dict | None = None,
               experiment_config: dict | None = None) -> dict:
    """Writes the DiT twin's files (official `DiT` keys, `pos_embed` included); returns config.json's content."""
    state_dict = params_to_state_dict(params, param_mapping.dit_table(cfg), dtype, f"DiT → {out_dir}")
    return _write_generator(state_dict, "DiT", dit_torch_kwargs(cfg, class_dropout), out_dir, dtype=dtype,
                            latent_norm=latent_norm, diffusion=diffusion, source=source,
                            experiment_config=experiment_config)


def _write_generator(state_dict, architecture: str, kwargs: dict, out_dir: str, *, dtype: str,
                     latent_norm: dict | None, diffusion: dict | None, source: dict | None,
                     experiment_config: dict | None, extra: dict | None = None,
                     files: dict[str, bytes] | None = None) -> dict:
    norm = latent_norm or {"scale": 1.0, "bias": 0.0}
    config = dict(architecture=architecture, kwargs=kwargs, latent_norm=norm, diffusion=diffusion or {},
                  **(extra or {}), source=dict(source or {}, dtype=dtype))
    if experiment_config is not None:
        config["experiment_config"] = experiment_config
    other = {"scaling_factor": norm["scale"], "bias_factor": norm["bias"],
             "steps": int((source or {}).get("step", 0)), "ema": None}
    if jax.process_index() == 0:
        write_export(out_dir, state_dict, config, other, files)
    return config


def export_sigma_vae(params, vae: SigmaVAE, out_dir: str, *, dtype: str = "float32", kl_weight: float = 0.01,
                     source: dict | None = None, experiment_config: dict | None = None) -> dict:
    state_dict = params_to_state_dict(params, param_mapping.sigma_vae_table(vae), dtype, f"σ-VAE → {out_dir}")
    config = dict(architecture="SigmaVAE", kwargs=vae_torch_kwargs(vae, kl_weight),
                  image=dict(size=vae.image_size, channels=vae.in_channels, value_range=[-1.0, 1.0], layout="NCHW"))
    return _write_tokenizer_model(state_dict, config, out_dir, dtype, source, experiment_config)


def _write_tokenizer_model(state_dict, config: dict, out_dir: str, dtype: str, source: dict | None,
                           experiment_config: dict | None) -> dict:
    """A σ-VAE's files (no other_state.pth); returns config.json's content."""
    config = dict(config, source=dict(source or {}, dtype=dtype))
    if experiment_config is not None:
        config["experiment_config"] = experiment_config
    if jax.process_index() == 0:
        write_export(out_dir, state_dict, config)
    return config


def audio_vae_torch_kwargs(vae: AudioVAE) -> dict:
    """Constructor arguments of the PyTorch `torch_audio_vae.AudioVAE` (weight norm, if any, is folded in)."""
    return dict(sample_rate=vae.sample_rate, strides=list(vae.strides), channels=vae.channels,
                latent_dim=vae.latent_dim, std=vae.std, max_channels=vae.max_channels,
                res_dilations=list(vae.res_dilations), kernel_size=vae.kernel_size, activation=vae.activation,
                output=vae.output)


def export_audio_vae(params, vae: AudioVAE, out_dir: str, *, dtype: str = "float32", source: dict | None = None,
                     experiment_config: dict | None = None) -> dict:
    """Writes the audio σ-VAE's files (docs/pytorch.md §2.2); `params` may hold the discriminators (not exported)."""
    state_dict = params_to_state_dict({"params": params["params"]}, param_mapping.audio_vae_table(vae), dtype,
                                      f"audio σ-VAE → {out_dir}")
    config = dict(architecture="AudioVAE", kwargs=audio_vae_torch_kwargs(vae),
                  audio=dict(sample_rate=vae.sample_rate, hop_length=vae.hop,
                             frame_rate=frame_rate(vae.sample_rate, vae.strides), value_range=[-1.0, 1.0],
                             layout="(B, T)", latent_layout="(B, N, C)", weight_norm_folded=vae.weight_norm))
    return _write_tokenizer_model(state_dict, config, out_dir, dtype, source, experiment_config)


# ---- from a training workdir ----

def read_meta(train_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a checkpoint under `<train_dir>/checkpoints` (default: the latest)."""
    if not storage.exists(f"{train_dir}/checkpoints"):  # before the Checkpointer, which would create the folder
        raise MissingInputError(f"no checkpoint under {train_dir}/checkpoints: is the --workdir a trained run?")
    ckpt = Checkpointer(f"{train_dir}/checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise MissingInputError(f"no checkpoint under {train_dir}/checkpoints")
        meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        ckpt.close()
    return step, meta


def config_from_meta(meta: dict, where: str) -> ml_collections.ConfigDict:
    if "config" not in meta:
        raise ConversionError(f"{where}: checkpoint metadata has no experiment config")
    return ml_collections.ConfigDict(json.loads(meta["config"]))


def restore_mesh(config, mesh=None):
    """(mesh, rules): `mesh`, else the run's mesh if this machine can build it, else all local devices as data
    parallel (restores re-shard onto whatever mesh is given)."""
    if mesh is not None:
        return mesh, logical_rules(config.mesh)
    try:
        return make_mesh(config.mesh), logical_rules(config.mesh)
    except ValueError:
        return make_mesh(None), logical_rules(config.mesh)


def restore_state(task, optim_config, train_config, train_dir: str, step: int, mesh, rules):
    tx = make_optimizer(optim_config, int(train_config.steps))
    _, abstract, _ = build_state_fns(task, tx, mesh, rules, train_config.get("seed", 0))
    ckpt = Checkpointer(f"{train_dir}/checkpoints", async_save=False)
    try:
        restored = ckpt.restore(abstract, step=step)
    finally:
        ckpt.close()
    return restored[0]


def run_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The run's experiment config, to find its tokenizer dir: the latest generator checkpoint's, else the workdir's
    config.json (what `latent_lm.main` writes), else None (a workdir that holds only vae/)."""
    if storage.exists(f"{workdir}/lm/checkpoints"):
        try:
            return config_from_meta(read_meta(f"{workdir}/lm")[1], f"{workdir}/lm")
        except MissingInputError:  # an empty checkpoints folder
            pass
    if storage.exists(f"{workdir}/config.json"):
        return ml_collections.ConfigDict(json.loads(storage.read_text(f"{workdir}/config.json")))
    return None


def _shared_hint(config, key: str = "tokenizer_workdir") -> str:
    shared = config is not None and config.data.get(key)
    return f" (the run's data.{key}={shared!r}, relative to the workdir)" if shared else ""


def read_text_tokenizer(config, workdir: str) -> bytes:
    """The bytes of a multimodal run's `tokenizer.json`, from where training reads it: `<tokenizer dir>/text/`
    (`experiment.data_paths`); one MissingInputError line naming the path when it is not there."""
    path = storage.join(data_paths(config, workdir).text_tokenizer, TOKENIZER_FILE)
    if not storage.exists(path):
        raise MissingInputError(f"text tokenizer {path} not found{_shared_hint(config)}: a multimodal export ships "
                                f"the run's tokenizer.json beside the weights")
    data = storage.read_bytes(path)
    parse_tokenizer(data, path)  # one of ours: the special tokens are there
    return data


def export_workdir(workdir: str, out_dir: str, *, params: str = "ema", dtype: str = "float32", what: str = "all",
                   step: int | None = None, vae_params: str = "raw", mesh=None) -> dict:
    """Exports `<workdir>/lm` to `out_dir` and the σ-VAE to `out_dir/vae` — a TTS run's audio σ-VAE to
    `out_dir/audio_vae` — (see the module docstring).

    The σ-VAE and a multimodal or TTS run's text tokenizer are read from `<tokenizer dir>/vae` (a speech run's:
    `<tokenizer dir>/audio_vae`) and `<tokenizer dir>/text/tokenizer.json`, tokenizer dir = `data.tokenizer_workdir`
    (relative to the workdir) or the workdir, the image σ-VAE from `data.vae_workdir` when set, as training reads
    them (`experiment.tokenizer_dir`, `stage_inputs.vae_dir`, `experiment.data_paths`,
    `speech_stages.audio_vae_dir`); for `what="vae"` the run's config comes from
    `run_config`. Every input is found before anything is restored or written. Arrays are restored
    onto `mesh` (default: the run's mesh if this machine can build it, else all local devices).
    """
    for name, value in (("params", params), ("vae_params", vae_params)):
        if value not in ("ema", "raw"):
            raise ValueError(f"{name}={value!r} must be 'ema' or 'raw'")
    if what not in ("all", "lm", "vae"):
        raise ValueError(f"what={what!r} must be 'all', 'lm' or 'vae'")
    # 1. Find every input (one clear error before any work).
    lm_dir = f"{workdir}/lm"
    if what in ("all", "lm"):
        lm_step, lm_meta = read_meta(lm_dir, step)
        config = config_from_meta(lm_meta, lm_dir)
        if "latent_norm" not in lm_meta:
            raise ConversionError(f"{lm_dir}: checkpoint metadata has no latent_norm: not a generator checkpoint")
        arch = config.model.get("arch", "latent_lm")
        if arch not in EXPORTABLE_ARCHS:
            raise ConversionError(f"{lm_dir}: model.arch={arch!r} has no PyTorch twin; exportable: "
                                  f"{list(EXPORTABLE_ARCHS)}")
        tokenizer_json = read_text_tokenizer(config, workdir) if arch in TEXT_ARCHS else None
    else:
        config = run_config(workdir)
    speech = config is not None and is_speech(config)  # its latents come from the audio σ-VAE
    if what in ("all", "vae"):
        hint = _shared_hint(config)
        if speech:
            vae_dir, vae_name = audio_vae_dir(config, workdir), "audio σ-VAE"
        else:
            vae_dir, vae_name = image_vae_dir(config, workdir) if config is not None else f"{workdir}/vae", "σ-VAE"
            hint = _shared_hint(config, "vae_workdir") or hint
        if not storage.exists(f"{vae_dir}/checkpoints"):
            raise MissingInputError(f"no {vae_name} checkpoint under {vae_dir}/checkpoints{hint}")
        vae_step, vae_meta = read_meta(vae_dir)
        vae_config = config_from_meta(vae_meta, vae_dir)
        if not speech and vae_config.vae.get("kind", "sigma") != "sigma":
            raise ConversionError(f"{vae_dir}: only σ-VAEs have an official PyTorch format; vae.kind="
                                  f"{vae_config.vae.kind!r} is not exported")
    # 2. Restore and write.
    written = {}
    if what in ("all", "lm"):
        task = make_generator_task(config, LatentNormalization(**lm_meta["latent_norm"]))
        state = restore_state(task, config.optim, config.train, lm_dir, lm_step, *restore_mesh(config, mesh))
        d = config.diffusion
        diffusion = dict(prediction_type=d.prediction_type, schedule=d.schedule, num_train_steps=d.num_train_steps,
                         num_sampling_steps=d.num_sampling_steps, cfg_scale=d.cfg_scale, x0_clip=d.x0_clip)
        common = dict(dtype=dtype, class_dropout=config.model.class_dropout, latent_norm=lm_meta["latent_norm"],
                      diffusion=diffusion, source=dict(checkpoint=os.path.abspath(lm_dir), step=lm_step, params=params),
                      experiment_config=json.loads(config.to_json()))
        weights = state.ema_params if params == "ema" else state.params
        if isinstance(task, DiTTask):
            export_dit(weights, task.model.config, out_dir, **common)
        else:
            image_text = tokenizer_json is not None and not speech
            export_latent_lm(weights, task.model.config, out_dir, tokenizer_json=tokenizer_json,
                             latents_per_image=latent_grid_tokens(config) if image_text else None,
                             speech=tts_metadata(config, task.latent_stop_id) if speech else None, **common)
        written["lm"] = out_dir
        if tokenizer_json is not None:
            written["tokenizer"] = os.path.join(out_dir, TOKENIZER)
        del state
    if what in ("all", "vae"):
        common = dict(dtype=dtype, source=dict(checkpoint=os.path.abspath(vae_dir), step=vae_step, params=vae_params),
                      experiment_config=json.loads(vae_config.to_json()))
        if speech:
            task = AudioVAETask.from_config(vae_config)
            state = restore_state(task, vae_config.audio_vae_optim, vae_config.audio_vae_train, vae_dir, vae_step,
                                  *restore_mesh(vae_config, mesh))
            written["audio_vae"] = os.path.join(out_dir, AUDIO_VAE_DIR)
            export_audio_vae(state.ema_params if vae_params == "ema" else state.params, task.model,
                             written["audio_vae"], **common)
        else:
            task = VAETask.from_config(vae_config)
            state = restore_state(task, vae_config.vae_optim, vae_config.vae_train, vae_dir, vae_step,
                                  *restore_mesh(vae_config, mesh))
            written["vae"] = os.path.join(out_dir, VAE_DIR)
            export_sigma_vae(state.ema_params if vae_params == "ema" else state.params, task.model, written["vae"],
                             kl_weight=vae_config.vae.kl_weight, **common)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True,
                   help="experiment workdir holding lm/ (and vae/ or audio_vae/, text/ unless data.tokenizer_workdir "
                        "shares them)")
    p.add_argument("--out", default=None, help="output directory (default <workdir>/export)")
    p.add_argument("--params", choices=["ema", "raw"], default="ema", help="generator (LatentLM or DiT) weights")
    p.add_argument("--vae_params", choices=["ema", "raw"], default="raw",
                   help="σ-VAE weights (the pipeline decodes with the raw ones)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--what", choices=["all", "lm", "vae"], default="all")
    p.add_argument("--step", type=int, default=None, help="generator checkpoint step (default: latest)")
    args = p.parse_args(argv)
    written = export_workdir(args.workdir, args.out or f"{args.workdir}/export", params=args.params,
                             dtype=args.dtype, what=args.what, step=args.step, vae_params=args.vae_params)
    for k, v in written.items():
        print(f"exported {k} to {v}")


if __name__ == "__main__":
    cli.main(main)
