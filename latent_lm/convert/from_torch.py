"""Import PyTorch weights into an orbax checkpoint that the train loop resumes from (issue #6).

  python -m latent_lm.convert.from_torch --torch_dir=runs/default/export --workdir=runs/finetune \
      [--config=configs/default.py[:arg]] [--what=all|lm|vae] [--step=0]

Reads an export directory (ours, or an official state dict with a config.json holding `architecture` and the
constructor `kwargs`), checks it against the experiment config, and writes `<workdir>/lm/checkpoints/<step>` (and
`<tokenizer dir>/vae/checkpoints/<step>`) through the train loop's own `build_state_fns` + `Checkpointer.save`, so
`--mode=train` resumes from it. A multimodal export's `tokenizer.json` goes to `<tokenizer dir>/text/`. The tokenizer
dir is where training reads vae/ and text/: `data.tokenizer_workdir` (relative to the workdir) or the workdir
(`experiment.tokenizer_dir`, docs/pytorch.md §2.1); the σ-VAE goes to `<data.vae_workdir>/vae` instead when the
config reads it from there (`stage_inputs.vae_dir`). The weights become both `params` and `ema_params`; the optimizer
state is fresh (zero Adam moments, bias correction from the start) with the learning-rate schedule positioned at
`step`. The experiment config defaults to the one embedded in the export's config.json. A TTS export
(`model.arch="tts"`, docs/pytorch.md §2.2) imports the same way: its phoneme tokenizer to `<tokenizer dir>/text/` and
its `audio_vae/` to `<tokenizer dir>/audio_vae` (`speech_stages.audio_vae_dir`) instead of a σ-VAE.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import torch
from flax import traverse_util

from latent_lm import cli, storage
from latent_lm.checkpoint import Checkpointer
from latent_lm.convert import param_mapping
from latent_lm.convert.to_torch import EXPORTABLE_ARCHS, TEXT_ARCHS, audio_vae_torch_kwargs
from latent_lm.convert.torch_files import (
    AUDIO_VAE_DIR,
    TOKENIZER,
    VAE_DIR,
    ConversionError,
    check_state_dict,
    expected_shapes,
    read_config,
    read_state_dict,
)
from latent_lm.errors import MissingInputError
from latent_lm.experiment import data_paths
from latent_lm.models.audio_vae import AudioVAE
from latent_lm.models.dit import DiTConfig
from latent_lm.models.latent_lm import LatentLMConfig
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.speech_stages import audio_vae_dir
from latent_lm.stage_inputs import is_speech, vae_dir
from latent_lm.latents import LatentNormalization
from latent_lm.text.tokenizer import TOKENIZER_FILE, TextTokenizer
from latent_lm.training.optimizer import make_optimizer
from latent_lm.training.tasks import VAETask, make_generator_task
from latent_lm.training.tasks.audio_vae import AudioVAETask
from latent_lm.training.train_loop import build_state_fns


def state_dict_to_params(state_dict: dict[str, torch.Tensor], table: list[param_mapping.Rule]) -> dict:
    """{"params": tree} of float32 numpy arrays; per-layer rules are stacked back along the leading axis."""
    flat, layered = {}, collections.defaultdict(dict)
    for rule in table:
        arrays = [state_dict[k].detach().to(torch.float32).cpu().numpy() for k in rule.torch_keys]
        for path, value in zip(rule.jax_paths, rule.from_torch(*arrays)):
            if rule.layer is None:
                flat[path] = value
            else:
                layered[path][rule.layer] = value
    for path, layers in layered.items():
        flat[path] = np.stack([layers[i] for i in range(len(layers))])
    return {"params": traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})}


def check_params(params: dict, abstract_params, what: str) -> None:
    """Same parameter paths and shapes as the model the experiment config builds (one error naming the path)."""
    got = traverse_util.flatten_dict(params["params"], sep="/")
    want = traverse_util.flatten_dict(abstract_params["params"], sep="/")
    for path in sorted(set(want) | set(got)):
        if path not in got:
            raise ConversionError(f"{what}: no PyTorch weight maps to the JAX parameter {path!r}")
        if path not in want:
            raise ConversionError(f"{what}: JAX parameter {path!r} is not in the configured model")
        if tuple(got[path].shape) != tuple(want[path].shape):
            raise ConversionError(f"{what}: JAX parameter {path!r} would get shape {list(got[path].shape)} but the "
                                  f"configured model has {list(want[path].shape)}")


def _compare(what: str, pairs) -> None:
    for torch_name, torch_value, jax_name, jax_value in pairs:
        if torch_value != jax_value:
            raise ConversionError(f"{what}: config.json {torch_name}={torch_value!r} but the experiment config has "
                                  f"{jax_name}={jax_value!r}")


def check_lm_config(torch_config: dict, cfg: LatentLMConfig, what: str) -> None:
    if torch_config["architecture"] != "Transformer":
        raise ConversionError(f"{what}: architecture {torch_config['architecture']!r} is not a LatentLM "
                              f"'Transformer' checkpoint")
    k = torch_config["kwargs"]
    side = k.get("input_size", 32)
    head_ratio = k.get("diffusion_mlp_ratio") or k.get("mlp_ratio", 4.0)
    _compare(what, [
        ("hidden_size", k.get("hidden_size"), "model.width", cfg.width),
        ("depth", k.get("depth"), "model.depth", cfg.depth),
        ("num_heads", k.get("num_heads"), "model.num_heads", cfg.num_heads),
        ("num_kv_heads", k.get("num_kv_heads") or k.get("num_heads"), "model.num_kv_heads", cfg.kv_heads),
        ("mlp_ratio", float(k.get("mlp_ratio", 4.0)), "model.mlp_ratio", float(cfg.mlp_ratio)),
        ("diffusion_depth", k.get("diffusion_depth", 3), "head.depth", cfg.head_depth),
        ("diffusion mlp ratio", float(head_ratio), "head.mlp_ratio", float(cfg.head_mlp_ratio or cfg.mlp_ratio)),
        ("in_channels", k.get("in_channels", 4), "model.latent_dim", cfg.latent_dim),
        ("num_classes", k.get("num_classes", 1000), "model.num_classes", cfg.num_classes),
        ("text_vocab_size", k.get("text_vocab_size", 0), "model.text_vocab_size", cfg.text_vocab_size),
        ("sequence length", k.get("max_len") or side * side, "model.max_len", cfg.max_len),
        ("posi_scale", float(k.get("posi_scale", 1)), "model.posi_scale", float(cfg.posi_scale)),
    ])
    if cfg.num_classes and not k.get("class_dropout_prob", 0.1) > 0:
        raise ConversionError(f"{what}: class_dropout_prob=0, so y_embedder.embedding_table has no null-class row; "
                              f"the JAX model needs it for classifier-free guidance")


def check_dit_config(torch_config: dict, cfg: DiTConfig, what: str) -> None:
    if torch_config["architecture"] != "DiT":
        raise ConversionError(f"{what}: architecture {torch_config['architecture']!r} is not a 'DiT' checkpoint "
                              f"(the experiment config has model.arch='dit')")
    k = torch_config["kwargs"]
    side = k.get("input_size", 32)
    _compare(what, [
        ("hidden_size", k.get("hidden_size"), "model.width", cfg.width),
        ("depth", k.get("depth"), "model.depth", cfg.depth),
        ("num_heads", k.get("num_heads"), "model.num_heads", cfg.num_heads),
        ("num_kv_heads", k.get("num_kv_heads") or k.get("num_heads"), "model.num_kv_heads", cfg.kv_heads),
        ("mlp_ratio", float(k.get("mlp_ratio", 4.0)), "model.mlp_ratio", float(cfg.mlp_ratio)),
        ("in_channels", k.get("in_channels", 4), "model.latent_dim", cfg.latent_dim),
        ("num_classes", k.get("num_classes", 1000), "model.num_classes", cfg.num_classes),
        ("sequence length", side * side, "model.max_len", cfg.max_len),
    ])
    if not k.get("class_dropout_prob", 0.1) > 0:
        raise ConversionError(f"{what}: class_dropout_prob=0, so y_embedder.embedding_table has no null-class row; "
                              f"the JAX model needs it for classifier-free guidance")


def check_vae_config(torch_config: dict, vae: SigmaVAE, what: str) -> None:
    if torch_config["architecture"] != "SigmaVAE":
        raise ConversionError(f"{what}: architecture {torch_config['architecture']!r} is not a 'SigmaVAE' checkpoint")
    k = torch_config["kwargs"]
    enc, dec = k["encoder_config"], k["decoder_config"]
    _compare(what, [
        ("encoder_config.img_size", enc.get("img_size"), "data.image_size", vae.image_size),
        ("encoder_config.in_chans", enc.get("in_chans"), "data.channels", vae.in_channels),
        ("patch_size", k.get("patch_size"), "vae.patch_size", vae.patch_size),
        ("latent_size", k.get("latent_size"), "vae.latent_dim", vae.latent_dim),
        ("encoder_config.embed_dim", enc.get("embed_dim"), "vae.width", vae.width),
        ("decoder_config.embed_dim", dec.get("embed_dim"), "vae.width", vae.width),
        ("encoder_config.depth", enc.get("depth"), "vae.depth", vae.depth),
        ("decoder_config.depth", dec.get("depth"), "vae.depth", vae.depth),
        ("encoder_config.num_heads", enc.get("num_heads"), "vae.num_heads", vae.num_heads),
        ("encoder_config.mlp_ratio", float(enc.get("mlp_ratio", 4.0)), "vae.mlp_ratio", float(vae.mlp_ratio)),
        ("std", float(k.get("std", 0.75)), "vae.std", float(vae.std)),
    ])


def check_audio_vae_config(torch_config: dict, vae: AudioVAE, what: str) -> None:
    """The export's constructor arguments are the configured audio σ-VAE's (an export folds weight norm in, so a
    `audio_vae.weight_norm` run imports too: each kernel's gain becomes its norm)."""
    if torch_config["architecture"] != "AudioVAE":
        raise ConversionError(f"{what}: architecture {torch_config['architecture']!r} is not an 'AudioVAE' "
                              f"checkpoint")
    k = torch_config["kwargs"]
    _compare(what, [(name, k.get(name), f"audio_vae.{name}", value)
                    for name, value in audio_vae_torch_kwargs(vae).items()])


def read_torch_params(torch_dir: str, model) -> tuple[dict, dict]:
    """(JAX params {"params": …} as numpy, config.json) for a LatentLM (`model` a LatentLMConfig), its DiT twin
    (a DiTConfig), a SigmaVAE or an AudioVAE."""
    config = read_config(torch_dir)
    if isinstance(model, LatentLMConfig):
        check_lm_config(config, model, torch_dir)
        table = param_mapping.latent_lm_table(model)
    elif isinstance(model, DiTConfig):
        check_dit_config(config, model, torch_dir)
        table = param_mapping.dit_table(model)
    elif isinstance(model, AudioVAE):
        check_audio_vae_config(config, model, torch_dir)
        table = param_mapping.audio_vae_table(model)
    else:
        check_vae_config(config, model, torch_dir)
        table = param_mapping.sigma_vae_table(model)
    state_dict = read_state_dict(torch_dir)
    check_state_dict(state_dict, expected_shapes(config), torch_dir)
    # The PyTorch model may hold keys the JAX model cannot represent (e.g. a flatten_input variant).
    check_state_dict(state_dict, {k: tuple(state_dict[k].shape) for k in param_mapping.torch_keys(table)}, torch_dir)
    try:
        return state_dict_to_params(state_dict, table), config
    except ValueError as e:  # a value the JAX model cannot hold (the DiT's fixed pos_embed)
        raise ConversionError(f"{torch_dir}: {e}") from None


def _schedule_at(opt_state, step: int):
    """Fresh optimizer state whose learning-rate schedule continues at `step` (the Adam moments stay fresh)."""
    def at(s):
        if isinstance(s, optax.ScaleByScheduleState):
            return s._replace(count=jax.device_put(np.asarray(step, s.count.dtype), s.count.sharding))
        return s

    return jax.tree.map(at, opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))


def write_checkpoint(params: dict, task, *, optim_config, train_config, mesh, rules, train_dir: str, step: int = 0,
                     meta: dict | None = None) -> str:
    """Writes `<train_dir>/checkpoints/<step>` for `task` with `params` as params and EMA, fresh optimizer.

    No data-iterator state is written: `train` restores such a checkpoint and starts its data from the beginning.
    Refuses a directory that already has checkpoints.
    """
    if step < 0:
        raise ValueError(f"step={step} must be ≥ 0")
    tx = make_optimizer(optim_config, int(train_config.steps))
    seed = train_config.get("seed", 0)
    init, abstract, shardings = build_state_fns(task, tx, mesh, rules, seed)
    check_params(params, abstract.params, train_dir)

    def put(tree, target_shardings):
        return jax.tree.map(lambda x, s, a: jax.device_put(np.asarray(x, a.dtype), s), tree, target_shardings,
                            abstract.params)

    ckpt = Checkpointer(f"{train_dir}/checkpoints", async_save=False)
    try:
        if ckpt.latest_step() is not None:
            raise ConversionError(f"{train_dir}/checkpoints already holds step {ckpt.latest_step()}: import into a "
                                  f"fresh workdir")
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state = init(jax.random.PRNGKey(seed))
        state = state.replace(step=jax.device_put(np.asarray(step, np.int32), shardings.step),
                              params=put(params, shardings.params), ema_params=put(params, shardings.ema_params),
                              opt_state=_schedule_at(state.opt_state, step))
        mesh_meta = {"shape": dict(mesh.shape), "process_count": jax.process_count()}
        ckpt.save(step, state, meta=dict(meta or {}, mesh=mesh_meta), force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    return f"{train_dir}/checkpoints/{step}"


# ---- into an experiment workdir ----

def load_experiment_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` → `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("imported_experiment_config", path)
    if module_spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _tokenizer_to_import(torch_dir: str, config, workdir: str) -> tuple[bytes, str] | None:
    """(bytes of the export's tokenizer.json, where training reads it) for a multimodal or TTS config, None when the
    destination already holds the same file. A missing file or a different tokenizer there is one clear error."""
    src = os.path.join(torch_dir, TOKENIZER)
    if not os.path.exists(src):
        raise MissingInputError(f"{src} not found: a run with text (model.arch={config.model.arch!r}) needs the text "
                                f"tokenizer its export ships beside the weights")
    TextTokenizer.load(src)  # one of ours: the special tokens are there
    with open(src, "rb") as f:
        data = f.read()
    dest = storage.join(data_paths(config, workdir).text_tokenizer, TOKENIZER_FILE)
    if storage.exists(dest):
        if storage.read_bytes(dest) != data:
            raise ConversionError(f"{dest} already holds another text tokenizer than {src}: import into a fresh "
                                  f"workdir (or one whose data.tokenizer_workdir holds this tokenizer)")
        return None
    return data, dest


def import_workdir(torch_dir: str, workdir: str, *, config: ml_collections.ConfigDict | None = None,
                   what: str = "all", step: int = 0, mesh=None) -> dict:
    """Writes `<workdir>/lm` (from `torch_dir`) and `<tokenizer dir>/vae` (from `torch_dir/vae`;
    `<data.vae_workdir>/vae` when set) checkpoints — a TTS run's `<tokenizer dir>/audio_vae` from
    `torch_dir/audio_vae` instead —, and for a multimodal or TTS run `<tokenizer dir>/text/tokenizer.json` (a byte
    copy of the export's); tokenizer dir = `experiment.tokenizer_dir(config, workdir)`, where training reads them.
    A checkpoints directory that holds one already is refused (`write_checkpoint`), so no run's σ-VAE is replaced.

    `mesh` defaults to the config's. `--mode=train` then starts the data afresh (the checkpoints hold no iterator
    state); a generator import still needs `--mode=encode` (TTS: `--mode=encode_audio`; or copied latents) before
    training.
    """
    if what not in ("all", "lm", "vae"):
        raise ValueError(f"what={what!r} must be 'all', 'lm' or 'vae'")
    if config is None:
        embedded = read_config(torch_dir).get("experiment_config")
        if embedded is None:
            raise ConversionError(f"{torch_dir}/config.json holds no experiment config: pass --config")
        config = ml_collections.ConfigDict(embedded)
    arch = config.model.get("arch", "latent_lm")
    if what in ("all", "lm") and arch not in EXPORTABLE_ARCHS:
        raise ConversionError(f"model.arch={arch!r} has no PyTorch twin to import from")
    tokenizer = (_tokenizer_to_import(torch_dir, config, workdir) if what in ("all", "lm") and arch in TEXT_ARCHS
                 else None)
    mesh, rules = mesh or make_mesh(config.mesh), logical_rules(config.mesh)
    written = {}
    if what in ("all", "vae"):
        speech = is_speech(config)
        task, sub = (AudioVAETask, AUDIO_VAE_DIR) if speech else (VAETask, VAE_DIR)
        task = task.from_config(config)
        params, _ = read_torch_params(os.path.join(torch_dir, sub), task.model)
        params = task.add_discriminator(params, jax.random.PRNGKey(0))  # a fresh discriminator when the GAN is on
        optim, train_config = ((config.audio_vae_optim, config.audio_vae_train) if speech else
                               (config.vae_optim, config.vae_train))
        written[sub] = write_checkpoint(params, task, optim_config=optim, train_config=train_config, mesh=mesh,
                                        rules=rules, train_dir=(audio_vae_dir if speech else vae_dir)(config, workdir),
                                        step=step, meta={"config": config.to_json(), "imported_from": torch_dir})
    if what in ("all", "lm"):
        lm_cfg = DiTConfig.from_config(config) if arch == "dit" else LatentLMConfig.from_config(config)
        params, tconfig = read_torch_params(torch_dir, lm_cfg)
        norm = LatentNormalization(**tconfig.get("latent_norm", {"scale": 1.0, "bias": 0.0}))
        task = make_generator_task(config, norm)
        written["lm"] = write_checkpoint(params, task, optim_config=config.optim, train_config=config.train,
                                         mesh=mesh, rules=rules, train_dir=f"{workdir}/lm", step=step,
                                         meta={"config": config.to_json(), "latent_norm": norm.to_dict(),
                                               "imported_from": torch_dir})
        if tokenizer is not None:
            data, dest = tokenizer
            if jax.process_index() == 0:
                storage.makedirs(storage.dirname(dest))
                storage.write_bytes_atomic(dest, data)
            written["tokenizer"] = dest
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--torch_dir", required=True, help="export directory (model.safetensors|model.pt + config.json)")
    p.add_argument("--workdir", required=True, help="experiment workdir to write lm/ and vae/ (TTS: audio_vae/) "
                   "checkpoints into")
    p.add_argument("--config", default=None, help="experiment config file[:arg] (default: the one in config.json)")
    p.add_argument("--what", choices=["all", "lm", "vae"], default="all")
    p.add_argument("--step", type=int, default=0, help="step of the written checkpoint (schedule position)")
    args = p.parse_args(argv)
    config = load_experiment_config(args.config) if args.config else None
    written = import_workdir(args.torch_dir, args.workdir, config=config, what=args.what, step=args.step)
    for k, v in written.items():
        print(f"imported {k} into {v}")


if __name__ == "__main__":
    cli.main(main)
