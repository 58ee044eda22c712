"""The VQ-MLLM baseline on the multimodal LatentLM's data (docs/method.md §9.4).

Same packed rows as `MultimodalTask` (its data path, unchanged), same backbone. The image tokenizer is the run's own
FSQ tokenizer at the same latent grid (`vae.kind="fsq"`, §2.5): the latent cache holds each image's exact quantized
grid vectors, and each becomes one code token, id = `code_offset` + code (code = `fsq.codes_from_latents`,
`code_offset` = `text.vocab_size`), so the LM head scores text and codes in one softmax over
`model.text_vocab_size` = text.vocab_size + ∏ L_i ids. Every position is a token (`is_latent` all False); the loss is
next-token CE alone, averaged over all targets (text and codes; `<pad>` and `<null>` never targets), reported split
as `text_ce` and `image_ce`. Text-to-image with CFG on logits: `generation` in code mode (`image_codes`, §8.5).

The model is `LatentLM` read through its token embedding, backbone and LM head only (`token_logits`): the task
neither creates nor runs the latent projection, the ConditionLayer or the diffusion head, so the parameter count and
the FLOPs (`training.flops.vq_train_flops_per_step`, `vq_sample_flops_per_image`) are those of a plain decoder LM.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_lm.latents import LatentNormalization
from latent_lm.models import fsq
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.models.layers import attention_mask
from latent_lm.text.tokenizer import SPECIAL_TOKENS
from latent_lm.training.batches import document_targets
from latent_lm.training.flops import vq_sample_flops_per_image, vq_train_flops_per_step
from latent_lm.training.tasks.mllm import BYTE_TOKENS, NULL_ID, PAD_ID, MultimodalTask
from latent_lm.training.tasks.registry import latent_grid_tokens, register_generator
from latent_lm.training.tasks.vae import fsq_levels

CODE_LM_PARAMS = ("token_embed", "backbone", "lm_head")  # the LatentLM submodules the VQ arm creates and runs


def token_hidden(module: LatentLM, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
    """`LatentLM` as a plain decoder (a `method=` for `apply`): token embedding → causal backbone → hidden [B, T, D];
    packed rows as `LatentLM.__call__` (`segment_ids` keep attention inside each document, positions restart)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = nn.with_logical_constraint(module.token_embed(tokens), ("batch", "length", "embed"))
    mask = None if segment_ids is None else attention_mask(segment_ids)
    return module.backbone(h, positions, None, mask)[0]


def token_logits(module: LatentLM, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
    """`token_hidden` → the LM head's fp32 logits [B, T, text.vocab_size + codes] (also `init`'s method)."""
    return module.lm_logits(token_hidden(module, tokens, positions, segment_ids))


@register_generator("vq")
@dataclasses.dataclass(frozen=True)
class VQMultimodalTask:
    """Discrete image codes in the vocabulary, CE only, on the multimodal documents of `MultimodalTask`
    (docs/method.md §9.4)."""

    model: LatentLM
    levels: tuple[int, ...]  # vae.fsq_levels: the codebook is their product grid
    code_offset: int  # token id of code 0: text.vocab_size
    norm: LatentNormalization  # the FSQ cache's normalisation; the codes do not use it (the protocol carries it)
    seq_len: int
    head_capacity: int  # latents per row the packer allows (MultimodalTask's data path); a whole number of images
    num_latents: int  # codes per image
    dataset: str
    documents: dict  # config.documents, as MultimodalTask

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "VQMultimodalTask":
        return cls(model=LatentLM(LatentLMConfig.from_config(config)), levels=fsq_levels(config),
                   code_offset=int(config.text.vocab_size), norm=norm, seq_len=config.model.max_len,
                   head_capacity=config.model.head_capacity, num_latents=latent_grid_tokens(config),
                   dataset=config.data.dataset, documents=config.documents.to_dict())

    @classmethod
    def config_checks(cls, config) -> list[tuple[bool, str]]:
        v, m = config.vae, config.model
        kind_ok = v.get("kind", "sigma") == "fsq"
        problem = fsq.levels_problem(fsq_levels(config), v.latent_dim) if kind_ok else None
        checks = [(kind_ok, f"vae.kind={v.get('kind', 'sigma')!r} must be 'fsq': the VQ arm reads discrete codes "
                            f"(docs/method.md §2.5)"),
                  (problem is None, f"vae.kind='fsq': {problem}")]
        if not (kind_ok and problem is None):
            return checks
        text = config.get("text", {}) or {}
        k = fsq.codebook_size(fsq_levels(config))
        text_vocab = text.get("vocab_size", 0)
        checks += [
            (text_vocab >= len(SPECIAL_TOKENS) + BYTE_TOKENS,
             f"text.vocab_size={text_vocab} must hold the {len(SPECIAL_TOKENS)} special tokens and {BYTE_TOKENS} "
             f"bytes"),
            (m.text_vocab_size == text_vocab + k,
             f"model.text_vocab_size={m.text_vocab_size} must be text.vocab_size={text_vocab} + the FSQ codebook "
             f"{k} (codes follow the text ids)")]
        # The data path's rules (one token table, an image fits a row, the packer's capacity); its vocabulary rule
        # is the one above.
        return checks + [c for c in MultimodalTask.config_checks(config) if "text_vocab_size" not in c[1]]

    @property
    def codebook_size(self) -> int:
        return fsq.codebook_size(self.levels)

    @property
    def image_codes(self) -> tuple[int, int]:
        """(offset, count) of the code tokens: `GenerationSettings(image_codes=…)` for text-to-image (§8.5)."""
        return self.code_offset, self.codebook_size

    def code_tokens(self, tokens: jax.Array, latents: jax.Array, is_latent: jax.Array) -> jax.Array:
        """Rows of the data path → token ids [..., T]: each image position's cached grid vector [C] becomes its code
        token `code_offset` + code; text positions keep their ids."""
        return jnp.where(is_latent, self.code_offset + fsq.codes_from_latents(latents, self.levels),
                         tokens).astype(jnp.int32)

    def image_latents(self, tokens: jax.Array) -> jax.Array:
        """Code tokens [...] → the FSQ grid vectors [..., C] the tokenizer's decoder reads (not normalised)."""
        return fsq.latents_from_codes(jnp.clip(tokens - self.code_offset, 0, self.codebook_size - 1), self.levels)

    def init_params(self, rng):
        """Only the token embedding, the backbone and the LM head (`CODE_LM_PARAMS`)."""
        return self.model.init(rng, jnp.zeros((1, self.seq_len), jnp.int32), method=token_logits)

    make_dataset = MultimodalTask.make_dataset  # the same packed rows as the LatentLM arm

    def make_batch(self, batch, rng=None):
        """Packed rows → token rows with codes at image positions and next-token targets (position i predicts i+1
        in its document: `<boi>` predicts code 1, code N predicts `<eoi>`); `image_mask`/`text_mask` split the CE
        targets (`mask`) into codes and text. Deterministic (`rng` unused)."""
        del rng
        tokens = self.code_tokens(batch["tokens"], batch["latents"], batch["is_latent"])
        none = jnp.zeros_like(batch["is_latent"])
        targets = document_targets(tokens, none, jnp.zeros(tokens.shape + (1,), jnp.float32), batch["segment_ids"],
                                   (PAD_ID, NULL_ID))
        mask, t = targets["text_mask"], targets["text_targets"]
        is_code = (t >= self.code_offset) & (t < self.code_offset + self.codebook_size)
        return dict(tokens=tokens, positions=batch["positions"], segment_ids=batch["segment_ids"], targets=t,
                    mask=mask, image_mask=mask & is_code, text_mask=mask & ~is_code)

    def logits(self, params, tokens, positions=None, segment_ids=None) -> jax.Array:
        """LM logits [B, T, V] of token rows (teacher-forced)."""
        return self.model.apply(params, tokens, positions, segment_ids, method=token_logits)

    def train_flops_per_example(self) -> float:
        """Exact training FLOPs of one packed row: backbone and LM head at every position (training.flops)."""
        return vq_train_flops_per_step(self.model.config, 1, self.seq_len)["total"]

    def sample_flops_per_image(self, prefix_len: int, guidance: bool = True) -> float:
        """Forward FLOPs of one text-to-image sample after a `prefix_len`-item prompt (training.flops)."""
        return vq_sample_flops_per_image(self.model.config, prefix_len, self.num_latents, guidance)["total"]

    def loss(self, params, batch, rng, train: bool = True):
        """CE over every next-token target (text and codes), averaged over targets. Condition dropout is data-side
        (captions dropped to `<null>`), and there are no draws: `rng` and `train` change nothing."""
        del rng, train
        return vq_loss(self, params, self.make_batch(batch))


def vq_loss(task: VQMultimodalTask, params, b: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = mean NLL over the targets of `VQMultimodalTask.make_batch`'s batch `b`; metrics: ce_loss (= loss), text_ce
    and image_ce (the same NLL averaged over text / code targets alone), text_accuracy and image_accuracy (argmax
    over the whole vocabulary)."""
    logits = task.logits(params, b["tokens"], b["positions"], b["segment_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), b["targets"][..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, -1) == b["targets"]).astype(jnp.float32)

    def mean(x, mask):
        mask = mask.astype(jnp.float32)
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    ce = mean(nll, b["mask"])
    return ce, dict(loss=ce, ce_loss=ce, text_ce=mean(nll, b["text_mask"]), image_ce=mean(nll, b["image_mask"]),
                    text_accuracy=mean(hit, b["text_mask"]), image_accuracy=mean(hit, b["image_mask"]))
