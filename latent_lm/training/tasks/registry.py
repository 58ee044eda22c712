"""What the one train loop, the stages and the tools ask of a task, and the registry of generator tasks.

A new experiment kind is a class that satisfies `GeneratorTask` and is registered by name with
`@register_generator("name")`; `config.model.arch` picks it. Nothing in the loop, the stages, planning or export
branches on the kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import jax

from latent_lm.errors import ConfigError
from latent_lm.latents import LatentNormalization
from latent_lm.sampling import SamplerSettings

Metrics = dict[str, jax.Array]


@runtime_checkable
class Task(Protocol):
    """Anything the train loop (`training.train_loop.train`) can optimise."""

    def init_params(self, rng: jax.Array) -> Any:
        """Fresh parameters (a pytree with Flax logical-partitioning metadata)."""

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, Metrics]:
        """Scalar loss and metrics of one batch as the data pipeline yields it."""


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where a generator's inputs live: the σ-VAE latent caches (`<dir>/train`, `<dir>/test`; audio latents for TTS),
    the text tokenizer (`tokenizer.json` in `text_tokenizer`) and, for TTS, the speech corpus."""

    latents: str
    text_tokenizer: str
    speech_corpus: str = ""


@runtime_checkable
class GeneratorTask(Task, Protocol):
    """A generator trained on σ-VAE latents: LatentLM, its DiT twin, the multimodal LatentLM, and what comes next.

    Optional: `eval_loss_variants`, {name: keyword arguments of `make_dataset`}: `eval_loss` scores the held-out split
    once more per entry (TTS: every text dropped, training/tasks/tts.py)."""

    model: Any  # the Flax module; `model.config` is its dataclass config
    norm: LatentNormalization  # cached latents → LM space

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "GeneratorTask":
        """The task that `config` describes, for latents normalised by `norm`."""

    @classmethod
    def config_checks(cls, config) -> Iterable[tuple[bool, str]]:
        """(ok, message) pairs `config_validation.validate` adds for this kind (e.g. sequence length rules)."""

    def make_dataset(self, paths: DataPaths, split: str, batch_size: int, seed: int, num_workers: int = 0) -> Any:
        """This process's batches of `split` as `loss` takes them: "train" shuffled and repeated, a checkpointable
        grain iterator; "test" once in order."""

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
             train: bool = True) -> tuple[jax.Array, Metrics]:
        """`train=False`: the held-out loss (no condition dropout), as the eval_loss stage measures it."""

    def train_flops_per_example(self) -> float:
        """Exact training FLOPs of one example (the scaling-law x axis)."""


@runtime_checkable
class ClassConditionalTask(GeneratorTask, Protocol):
    """A generator of images from class labels (the sample and eval stages)."""

    def make_sampler(self, settings: SamplerSettings) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        """Jitted `sample(params, labels [B], rng) -> normalised latents [B, N, C]`."""


GENERATOR_TASKS: dict[str, type] = {}


def latent_grid_tokens(config) -> int:
    """Latent vectors per image: the σ-VAE's patch grid, (image_size / patch_size)²."""
    return (config.data.image_size // config.vae.patch_size) ** 2


def one_image_sequence_checks(config) -> list[tuple[bool, str]]:
    """The class-conditional kinds read one image's latent grid per sequence (docs/method.md §7.1)."""
    n, m = latent_grid_tokens(config), config.model
    return [(m.max_len == n, f"model.max_len={m.max_len} must equal the number of latent tokens {n} "
                             f"(image_size/patch_size)²")]


def register_generator(name: str) -> Callable[[type], type]:
    """Class decorator: makes `config.model.arch=name` build this task."""

    def register(cls: type) -> type:
        if name in GENERATOR_TASKS:
            raise ValueError(f"generator task {name!r} is already registered ({GENERATOR_TASKS[name].__name__})")
        GENERATOR_TASKS[name] = cls
        return cls

    return register


def make_generator_task(config, norm: LatentNormalization) -> GeneratorTask:
    """The generator task that `config.model.arch` names (default "latent_lm")."""
    arch = config.model.get("arch", "latent_lm")
    if arch not in GENERATOR_TASKS:
        raise ConfigError(f"unknown model.arch {arch!r}; choose one of {sorted(GENERATOR_TASKS)}")
    return GENERATOR_TASKS[arch].from_config(config, norm)
