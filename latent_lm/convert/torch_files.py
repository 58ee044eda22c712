"""The export directory format, read and written with PyTorch alone.

  <dir>/model.safetensors   the state dict (official key names), fp32 or bf16
  <dir>/model.pt            the same state dict, `torch.save` format
  <dir>/config.json         {"format", "architecture", "kwargs": constructor arguments, …metadata}
  <dir>/other_state.pth     LatentLM and DiT: the official `{"scaling_factor", "bias_factor", "steps", "ema"}`
  <dir>/tokenizer.json      multimodal runs: the text tokenizer, byte-identical to the run's (config.json "multimodal")
  <dir>/vae/                the σ-VAE, same three files (no other_state.pth)
  <dir>/audio_vae/          TTS runs: the audio σ-VAE instead (`torch_audio_vae.AudioVAE`), same three files

`load_model(dir)` rebuilds the PyTorch module from config.json and loads the weights with `strict=True`;
`load_tokenizer(dir)` loads the text tokenizer as training encodes with it (docs/pytorch.md §2.1);
`load_audio_vae(dir)` loads a TTS export's audio σ-VAE (docs/pytorch.md §2.2).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from latent_lm.convert.torch_audio_vae import AudioVAE
from latent_lm.convert.torch_modules import DiT, Transformer
from latent_lm.convert.torch_sigma_vae import SigmaVAE
from latent_lm.errors import UserError

FORMAT = "latent_lm.convert/1"
SAFETENSORS, TORCH_PT, CONFIG, OTHER_STATE, VAE_DIR = "model.safetensors", "model.pt", "config.json", \
    "other_state.pth", "vae"
AUDIO_VAE_DIR = "audio_vae"
TOKENIZER = "tokenizer.json"  # latent_lm.text.tokenizer.TOKENIZER_FILE (not imported: this module needs no JAX)
MODEL_CLASSES = {"Transformer": Transformer, "DiT": DiT, "SigmaVAE": SigmaVAE, "AudioVAE": AudioVAE}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ConversionError(UserError, ValueError):
    """A checkpoint that does not fit the target model: wrong architecture, missing/unexpected key, wrong shape."""


def build_model(config: dict[str, Any], device: str | torch.device | None = None) -> torch.nn.Module:
    arch = config.get("architecture")
    if arch not in MODEL_CLASSES:
        raise ConversionError(f"config.json architecture {arch!r} is not one of {sorted(MODEL_CLASSES)}")
    with torch.device(device or "cpu"):
        return MODEL_CLASSES[arch](**config["kwargs"])


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key → shape of the model config.json describes, in state-dict order (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in build_model(config, "meta").state_dict().items()}


def check_state_dict(state_dict: dict[str, Any], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raises one ConversionError naming the first missing key, unexpected key or shape mismatch."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{what}: missing key {missing[0]!r} of shape {list(expected[missing[0]])}{more}")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{what}: unexpected key {unexpected[0]!r}{more}: the checkpoint is not the "
                              f"architecture config.json describes")
    for k, shape in expected.items():
        got = tuple(state_dict[k].shape)
        if got != shape:
            raise ConversionError(f"{what}: key {k!r} has shape {list(got)} but the model expects {list(shape)}")


def write_export(out_dir: str, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
                 other_state: dict[str, Any] | None = None, files: dict[str, bytes] | None = None) -> None:
    """Writes the files of one model (and `files`, name → bytes, verbatim); the state dict is checked against
    config.json first, and config.json is written last."""
    expected = expected_shapes(config)
    check_state_dict(state_dict, expected, f"export to {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    ordered = {k: state_dict[k].contiguous() for k in expected}  # the official state-dict order
    _atomic(os.path.join(out_dir, SAFETENSORS), lambda p: save_file(ordered, p, metadata={"format": "pt"}))
    _atomic(os.path.join(out_dir, TORCH_PT), lambda p: torch.save(ordered, p))
    if other_state is not None:
        _atomic(os.path.join(out_dir, OTHER_STATE), lambda p: torch.save(other_state, p))
    for name, data in (files or {}).items():
        _atomic(os.path.join(out_dir, name), lambda p, data=data: _write_bytes(p, data))
    config = dict(config, format=FORMAT)

    def dump(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2)

    _atomic(os.path.join(out_dir, CONFIG), dump)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_config(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, CONFIG)
    if not os.path.exists(path):
        raise ConversionError(f"{path} not found: an export directory holds config.json (the constructor arguments "
                              f"under 'kwargs' and the 'architecture'); write one for an official checkpoint")
    with open(path) as f:
        config = json.load(f)
    if "architecture" not in config or "kwargs" not in config:
        raise ConversionError(f"{path} must hold 'architecture' and 'kwargs'")
    return config


def read_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    """model.safetensors, else model.pt (a plain state dict, or an official {"model": …} / DeepSpeed {"module": …})."""
    st, pt = os.path.join(model_dir, SAFETENSORS), os.path.join(model_dir, TORCH_PT)
    if os.path.exists(st):
        return load_file(st)
    if os.path.exists(pt):
        obj = torch.load(pt, map_location="cpu", weights_only=True)
        for wrapper in ("model", "module", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        return obj
    raise ConversionError(f"no {SAFETENSORS} or {TORCH_PT} in {model_dir}")


def load_model(model_dir: str, device: str = "cpu", dtype: torch.dtype | None = None
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(module in eval mode with the weights loaded strictly, config.json)."""
    config = read_config(model_dir)
    state_dict = read_state_dict(model_dir)
    check_state_dict(state_dict, expected_shapes(config), model_dir)
    model = build_model(config, device)
    model.load_state_dict(state_dict, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), config


def load_audio_vae(export_dir: str, device: str = "cpu", dtype: torch.dtype | None = None
                   ) -> tuple[AudioVAE, dict[str, Any]]:
    """(the audio σ-VAE of a TTS export, in eval mode, its config.json): `<export_dir>/audio_vae` (or that directory
    itself), loaded as `load_model` does."""
    model_dir = export_dir if os.path.basename(os.path.normpath(export_dir)) == AUDIO_VAE_DIR else \
        os.path.join(export_dir, AUDIO_VAE_DIR)
    if not os.path.exists(os.path.join(model_dir, CONFIG)):
        raise ConversionError(f"{model_dir}/{CONFIG} not found: only an export of a TTS run (model.arch='tts') holds "
                              f"the audio σ-VAE")
    model, config = load_model(model_dir, device, dtype)
    if not isinstance(model, AudioVAE):
        raise ConversionError(f"{model_dir}: architecture {config['architecture']!r} is not an 'AudioVAE'")
    return model, config


def load_tokenizer(model_dir: str):
    """The text tokenizer of a multimodal export (`tokenizers.Tokenizer`), set to encode as training does: a special
    token's spelling inside text stays text (`encode_special_tokens = True`; `tokenizer.json` does not store it).
    Encode with `add_special_tokens=False`; config.json's "multimodal" entry has the special tokens' ids."""
    import tokenizers  # noqa: PLC0415  (only multimodal exports need it)

    path = os.path.join(model_dir, TOKENIZER)
    if not os.path.exists(path):
        raise ConversionError(f"{path} not found: only an export of a multimodal or TTS run (model.arch='mllm' or "
                              f"'tts') holds the text tokenizer")
    tok = tokenizers.Tokenizer.from_file(path)
    tok.encode_special_tokens = True
    return tok
