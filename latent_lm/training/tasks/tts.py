"""Zero-shot text-to-speech by next-token diffusion (docs/method.md §12.2–12.3).

The multimodal task's model, σ per latent span and gathered head, over TTS documents
(`data_pipelines/tts_documents.py`): `<bos> phonemes <bod> z_1 … z_n <eod> <eos>`. A speech span has no fixed length:
the LM head learns to say `<eod>` after its last latent and, at every other latent, that the span goes on
(`batches.document_targets(variable_spans=True)`, `latent_lm_loss(latent_stop_id=<eod>)`); generation stops a span
where the LM head says so (`generation.GenerationSettings.latent_stop_id`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from data_pipelines.packing import make_packed_dataset
from data_pipelines.tts_documents import TTSDocumentSource, load_speech_documents
from latent_lm.latents import LatentNormalization
from latent_lm.text.tokenizer import SPECIAL_TOKENS, TextTokenizer
from latent_lm.training.tasks.mllm import BYTE_TOKENS, MultimodalTask
from latent_lm.training.tasks.registry import DataPaths, register_generator

BOD_ID, EOD_ID = SPECIAL_TOKENS.index("<bod>"), SPECIAL_TOKENS.index("<eod>")
# Speech positions run on from the text's ("continue", the paper's one sequence) or count again from `<bod>`
# ("restart", VALL-E's separate positions; docs/method.md §12.2).
POSITIONS = ("continue", "restart")


@register_generator("tts")
@dataclasses.dataclass(frozen=True)
class TTSTask(MultimodalTask):
    """`num_latents` is the longest speech span generation allows (`tts.max_frames`); `documents` is `config.tts`;
    spans end where the LM head says `<eod>`."""

    latent_stop_id: ClassVar[int | None] = EOD_ID
    span_open_id: ClassVar[int] = BOD_ID

    @classmethod
    def from_config(cls, config, norm: LatentNormalization) -> "TTSTask":
        return cls.build(config, norm, tokenizer=config.audio_vae, num_latents=config.tts.max_frames,
                         dataset="speech", documents=config.tts.to_dict())

    @classmethod
    def config_checks(cls, config) -> list[tuple[bool, str]]:
        m, t = config.model, config.get("tts")
        if t is None:
            return [(False, "model.arch='tts' needs a `tts` config section (configs/tts.py)")]
        return [
            (m.num_classes == 0, f"model.num_classes={m.num_classes} must be 0: TTS conditions on text"),
            (m.text_vocab_size >= len(SPECIAL_TOKENS) + BYTE_TOKENS,
             f"model.text_vocab_size={m.text_vocab_size} must hold the {len(SPECIAL_TOKENS)} special tokens and "
             f"{BYTE_TOKENS} bytes"),
            (0 < m.get("head_capacity", 0) <= m.max_len,
             f"model.head_capacity={m.get('head_capacity')} must lie in [1, model.max_len={m.max_len}]"),
            (0 < t.max_frames < m.max_len, f"tts.max_frames={t.max_frames} must lie in [1, model.max_len)"),
            (t.frames_per_step >= 1, f"tts.frames_per_step={t.frames_per_step} must be ≥ 1"),
            (t.get("positions", "continue") in POSITIONS,
             f"tts.positions={t.get('positions')!r} must be one of {list(POSITIONS)}"),
            (t.get("position_scale", 1.0) > 0, f"tts.position_scale={t.get('position_scale')} must be > 0"),
            (t.get("position_scale", 1.0) == 1.0 or t.get("positions", "continue") == "restart",
             f"tts.position_scale={t.get('position_scale')} scales restarted speech positions: it needs "
             f"tts.positions='restart'"),
            (0.0 <= t.get("latent_input_dropout", 0.0) < 1.0,
             f"tts.latent_input_dropout={t.get('latent_input_dropout')} must lie in [0, 1)"),
        ]

    # The held-out loss once more with every text dropped to `<null>` (`eval_loss` → eval/loss.json
    # "null_text"): how much the model's predictions use the text (docs/method.md §12.4).
    eval_loss_variants: ClassVar[dict[str, dict]] = {"null_text": {"null_text": True}}

    def make_dataset(self, paths: DataPaths, split: str, batch_size: int, seed: int, num_workers: int = 0,
                     null_text: bool = False):
        """Packed TTS documents of `split`; "train" shuffled, repeated, half of them pairs, 10% null prompts (by
        `config.tts`); any other split once in order, single utterances, every text kept (`null_text`: every text
        dropped). "test" (the generic held-out split of `eval_loss`) is the corpus's `test_speakers`: unseen voices
        saying unseen sentences."""
        t = self.documents
        split = "test_speakers" if split == "test" else split
        data = load_speech_documents(paths.speech_corpus, paths.latents, split,
                                     TextTokenizer.load(paths.text_tokenizer), self.seq_len, t["input"],
                                     t["frames_per_step"])
        train = split == "train"
        source = TTSDocumentSource(data, seed, pair_rate=t["pair_rate"] if train else 0.0,
                                   null_prompt_rate=t["null_prompt_rate"] if train else float(null_text))
        return make_packed_dataset(source, self.seq_len, batch_size, seed, latent_capacity=self.head_capacity,
                                   shuffle=train, repeat=train, num_workers=num_workers if train else 0)
