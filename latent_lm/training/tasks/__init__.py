"""Tasks for the one train loop: what to initialise and which loss to minimise. Configs pick the task.

`registry.py` declares the interface (`Task`, `GeneratorTask`) and the registry; each generator kind registers itself
on import below, so `GENERATOR_TASKS` lists every `model.arch` a config may name.
"""

from latent_lm.training.tasks.registry import (GENERATOR_TASKS, ClassConditionalTask, DataPaths, GeneratorTask, Task,
                                               make_generator_task, register_generator)
from latent_lm.training.tasks.vae import VAETask, make_vae
from latent_lm.training.tasks.latent_lm import LatentLMTask  # noqa: E402  (registers "latent_lm")
from latent_lm.training.tasks.dit import DiTTask  # noqa: E402  (registers "dit")
from latent_lm.training.tasks.mllm import MultimodalTask  # noqa: E402  (registers "mllm")
from latent_lm.training.tasks.transfusion import TransfusionTask  # noqa: E402  (registers "transfusion")
from latent_lm.training.tasks.vq_mllm import VQMultimodalTask  # noqa: E402  (registers "vq")
from latent_lm.training.tasks.tts import TTSTask  # noqa: E402  (registers "tts")

__all__ = ["GENERATOR_TASKS", "ClassConditionalTask", "DataPaths", "DiTTask", "GeneratorTask", "LatentLMTask",
           "MultimodalTask", "Task", "TransfusionTask", "TTSTask", "VAETask", "VQMultimodalTask", "make_generator_task",
           "make_vae", "register_generator"]
