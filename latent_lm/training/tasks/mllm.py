"""Multimodal LatentLM: one model over packed documents of text and image latents (docs/method.md §7.3).

Text positions are trained by the LM head (CE), image latents by the diffusion head on gathered latent positions
(next-token diffusion), L = CE + λ·MSE, each averaged over its own targets (docs/method.md §6.3). The data pipeline
(`data_pipelines/mllm_documents.py`) packs documents into rows; this task noises each image's cached σ-VAE means with
its own σ, normalises them, builds the next-position targets and calls the shared loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from data_pipelines import coco_captions, coco_documents
from data_pipelines.mllm_documents import load_split
from data_pipelines.packing import make_document_dataset, make_packed_dataset, packed_batch_shapes
from latent_lm.diffusion import NoiseSchedule, make_schedule
from latent_lm.latents import LatentNormalization, LatentPosterior
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.text.tokenizer import SPECIAL_TOKENS, TextTokenizer
from latent_lm.training.batches import document_targets, image_span_ids, restart_positions
from latent_lm.training.flops import train_flops_per_step
from latent_lm.training.generator_losses import latent_lm_loss
from latent_lm.training.tasks.registry import DataPaths, latent_grid_tokens, register_generator

PAD_ID, NULL_ID, BOI_ID = (SPECIAL_TOKENS.index(t) for t in ("<pad>", "<null>", "<boi>"))
BYTE_TOKENS = 256  # byte-level BPE holds every byte as a token
# eval.prompt_latents → the σ of a prompt's image latents in `model_latents` (docs/method.md §10.5): "sampled" draws
# one per image as training does, "mean" shows the σ-VAE's posterior mean μ (σ = 0).
PROMPT_LATENTS = {"sampled": None, "mean": 0.0}


@register_generator("mllm")
@dataclasses.dataclass(frozen=True)
class MultimodalTask:
    """Text, text-to-image, image-to-text and interleaved documents in one causal model (docs/method.md §7.3)."""

    model: LatentLM
    schedule: NoiseSchedule
    prediction_type: str
    batch_mul: int
    diffusion_weight: float
    posterior: LatentPosterior
    norm: LatentNormalization
    seq_len: int
    head_capacity: int  # latent targets per row the diffusion head runs on (gathered)
    num_latents: int  # latent vectors per image
    dataset: str
    documents: dict  # config.documents: the document mix, null-prompt rate, ...
    # Training only: the rate at which a teacher-forced input latent is replaced by 0 (its targets are kept), so the
    # next latent must come from the condition and the earlier latents (docs/method.md §12.2).
    latent_input_dropout: float = 0.0
    # Positions count again from the span's opening token (`span_open_id`) instead of running on from the text
    # (`positions="restart"` in the documents' config; docs/method.md §12.2).
    restart_positions: bool = False
    # With `restart_positions`: a span's positions times this (`tts.position_scale`, docs/method.md §12.2).
    span_position_scale: float = 1.0
    # Images have N latents each; a kind with variable-length spans (speech) names the token that ends one, which
    # the LM head learns at every latent (docs/method.md §12.3).
    latent_stop_id: ClassVar[int | None] = None
    span_open_id: ClassVar[int] = BOI_ID

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "MultimodalTask":
        return cls.build(config, norm, tokenizer=config.vae, num_latents=latent_grid_tokens(config),
                         dataset=config.data.dataset, documents=config.documents.to_dict())

    @classmethod
    def build(cls, config, norm: LatentNormalization, *, tokenizer, num_latents: int, dataset: str, documents: dict):
        """The model, diffusion and head settings of `config`; the latent tokenizer's config section (its σ) and
        the data side given by the kind."""
        d = config.diffusion
        return cls(model=LatentLM(LatentLMConfig.from_config(config)),
                   schedule=make_schedule(d.schedule, d.num_train_steps), prediction_type=d.prediction_type,
                   batch_mul=d.batch_mul, diffusion_weight=d.diffusion_weight,
                   posterior=LatentPosterior.from_vae_config(tokenizer), norm=norm, seq_len=config.model.max_len,
                   head_capacity=config.model.head_capacity, num_latents=num_latents, dataset=dataset,
                   documents=documents, latent_input_dropout=documents.get("latent_input_dropout", 0.0),
                   restart_positions=documents.get("positions", "continue") == "restart",
                   span_position_scale=float(documents.get("position_scale", 1.0)))

    @classmethod
    def config_checks(cls, config) -> list[tuple[bool, str]]:
        m, n = config.model, latent_grid_tokens(config)
        return [
            (m.num_classes == 0, f"model.num_classes={m.num_classes} must be 0: multimodal runs condition on text"),
            (m.text_vocab_size >= len(SPECIAL_TOKENS) + BYTE_TOKENS,
             f"model.text_vocab_size={m.text_vocab_size} must hold the {len(SPECIAL_TOKENS)} special tokens and "
             f"{BYTE_TOKENS} bytes"),
            (m.max_len >= n + 4, f"model.max_len={m.max_len} cannot hold one image ({n} latents) with <bos> <boi> "
                                 f"<eoi> <eos>"),
            (n <= m.get("head_capacity", 0) <= m.max_len,
             f"model.head_capacity={m.get('head_capacity')} must lie in [{n} (one image), model.max_len={m.max_len}]"),
            (config.eval.get("prompt_latents", "sampled") in PROMPT_LATENTS,
             f"eval.prompt_latents={config.eval.get('prompt_latents')!r} must be one of {list(PROMPT_LATENTS)}"),
            # Restarted positions assume one span per document and are generated for speech only.
            ((config.get("documents") or {}).get("positions", "continue") == "continue",
             "documents.positions: only 'continue' for image documents (restarted positions are tts.positions)"),
        ] + cls.source_checks(config)

    @staticmethod
    def source_checks(config) -> list[tuple[bool, str]]:
        """Where the documents come from: the embedded data (default) or, at paper scale, COCO and web text
        (`documents.source="coco"`, docs/experiments.md §10.4)."""
        documents = config.get("documents") or {}
        source = documents.get("source", "embedded")
        if source not in ("embedded", coco_documents.SOURCE):
            return [(False, f"documents.source={source!r} must be 'embedded' or {coco_documents.SOURCE!r}")]
        if source == "embedded":
            return []
        problem = coco_documents.config_problem(documents)
        return [(config.data.dataset == coco_captions.NAME,
                 f"documents.source={source!r} reads images of data.dataset={coco_captions.NAME!r}, not "
                 f"{config.data.dataset!r}"),
                (problem is None, problem or "")]

    def init_params(self, rng):
        t, c = self.seq_len, self.model.config.latent_dim
        return self.model.init(rng, jnp.zeros((1, t), jnp.int32), jnp.zeros((1, t, c)), jnp.zeros((1, t), bool))

    def make_dataset(self, paths: DataPaths, split: str, batch_size: int, seed: int, num_workers: int = 0):
        """Packed rows of documents built from the latent cache, the images' captions and English text
        (data_pipelines/mllm_documents.py, data_pipelines/packing.py); "test" keeps every caption (no CFG drop).
        `documents.source="coco"`: COCO pairs and web text at paper scale (data_pipelines/coco_documents.py)."""
        tokenizer = TextTokenizer.load(paths.text_tokenizer)
        train = split == "train"
        if self.documents.get("source", "embedded") == coco_documents.SOURCE:
            source = coco_documents.document_source(self.documents, split, f"{paths.latents}/{split}", tokenizer,
                                                    self.seq_len, seed, train)
            return make_packed_dataset(source, self.seq_len, batch_size, seed, latent_capacity=self.head_capacity,
                                       shuffle=train, repeat=train, num_workers=num_workers if train else 0)
        data = load_split(self.dataset, split, f"{paths.latents}/{split}", tokenizer, self.seq_len)
        return make_document_dataset(data, batch_size, seed, mix=self.documents["mix"],
                                     latent_capacity=self.head_capacity,
                                     null_prompt_rate=self.documents["null_prompt_rate"] if train else 0.0,
                                     shuffle=train, repeat=train, num_workers=num_workers if train else 0)

    def batch_shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{key: (shape, dtype)} of `batch_size` packed rows as `loss` takes them (latent_lm/planning.py lowers the
        train step on them)."""
        return packed_batch_shapes(batch_size, self.seq_len, self.model.config.latent_dim)

    def model_latents(self, rng, latents, is_latent, sampling_std: float | None = None):
        """Cached μ at the latent positions of rows [B, T, C] → the model's latents: z = μ + σ·ε with one σ per image
        as training draws it (`sampling_std` fixes σ instead: 0 for prompts of the mean μ), normalised; 0 elsewhere."""
        z = self.posterior.sample(rng, latents, example_ids=image_span_ids(is_latent), sampling_std=sampling_std)
        return jnp.where(is_latent[..., None], self.norm.normalize(z), 0.0)

    def make_batch(self, batch, rng, train: bool = False):
        """Packed rows → model inputs and targets (`model_latents`, `batches.document_targets`); with `train`, input
        latents dropped at `latent_input_dropout`; positions restarted at each span's opener (and scaled by
        `span_position_scale`) with `restart_positions`."""
        is_latent = batch["is_latent"]
        z = self.model_latents(rng, batch["latents"], is_latent)
        targets = document_targets(batch["tokens"], is_latent, z, batch["segment_ids"], (PAD_ID, NULL_ID),
                                   variable_spans=self.latent_stop_id is not None)
        inputs = z
        if train and self.latent_input_dropout:
            # A key folded from `rng`: the σ draws stay those of `train=False` (and of runs without the dropout).
            dropped = jax.random.bernoulli(jax.random.fold_in(rng, 1), self.latent_input_dropout, is_latent.shape)
            inputs = jnp.where(dropped[..., None], 0.0, z)
        positions = batch["positions"]
        if self.restart_positions:
            positions = restart_positions(batch["tokens"], positions, self.span_open_id, self.span_position_scale)
        return dict(tokens=batch["tokens"], latents=inputs, is_latent=is_latent, positions=positions,
                    segment_ids=batch["segment_ids"], **targets)

    def train_flops_per_example(self) -> float:
        """Exact training FLOPs of one packed row (backbone on every position, head × batch_mul on the gathered
        capacity, training.flops)."""
        return train_flops_per_step(self.model.config, 1, self.seq_len, self.batch_mul, self.head_capacity)["total"]

    def loss(self, params, batch, rng, train: bool = True):
        """Condition dropout is data-side here (captions dropped to `<null>`); `train` turns on the input latents'
        dropout."""
        rng_vae, rng_loss = jax.random.split(rng)
        return latent_lm_loss(self.model, params, self.make_batch(batch, rng_vae, train), rng_loss,
                              schedule=self.schedule, prediction_type=self.prediction_type,
                              batch_mul=self.batch_mul, class_dropout=0.0, diffusion_weight=self.diffusion_weight,
                              head_capacity=self.head_capacity, latent_stop_id=self.latent_stop_id)
