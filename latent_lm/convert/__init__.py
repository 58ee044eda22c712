"""PyTorch export/import of LatentLM and σ-VAE checkpoints, and PyTorch twins of the models (issue #6).

  to_torch.py         orbax checkpoint → `model.safetensors`, `model.pt`, `config.json` (+ `other_state.pth`, `vae/`,
                      a multimodal or TTS run's `tokenizer.json`, a TTS run's `audio_vae/` instead of `vae/`)
  from_torch.py       those files (or an official state_dict + config.json) → an orbax checkpoint `train` resumes
  param_mapping.py    the JAX ↔ PyTorch key/layout tables, one per architecture
  torch_modules.py    PyTorch LatentLM `Transformer` with the official keys and forward signatures
  torch_sigma_vae.py  PyTorch σ-VAE with the official keys
  torch_audio_vae.py  PyTorch audio σ-VAE of a TTS run (causal convs, streaming decode)
  torch_sampling.py   PyTorch DPM-Solver++(2M) and CFG image generation from an export directory
  torch_files.py      the export directory format (reading and writing; PyTorch only)

The `torch_*` modules import only torch, numpy and safetensors, so an export can be used without JAX installed.
"""
