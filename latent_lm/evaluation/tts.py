"""Zero-shot TTS with the trained model, and its scores (docs/method.md §12.4).

Two prompt modes on held-out speakers and sentences (`data_pipelines.tts_documents`): continuation (the whole text,
`<bod>`, the first `tts.prompt_seconds` of the utterance's latents) and reference utterance (another sentence of the
speaker with its audio, then the target text). The model goes on in speech mode: before each latent the LM head may
end the span with `<eod>` (§12.3); latents come from the diffusion head with text CFG, whose null prompt keeps the
audio prompt and drops the text to `<null>`. The generated latents are decoded by the audio σ-VAE and scored by the
in-repo judges: word and phoneme error rate of the recogniser against the target's phonemes, cosine similarity of
the speaker judge to the prompt speaker's real audio, the duration against the real one, and speed (autoregressive
steps per second of audio, real-time factor).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.tts_documents import (BOD, BOS, EOD, EOS, NULL, SpeechDocuments, continuation_prompt,
                                          reference_prompt)
from latent_lm.generation import GenerationSettings, make_generator, make_prompt

CODEC_FRAME_RATE = 75.0  # the 75 Hz codec LMs the paper compares autoregressive steps against (Table 4)


@dataclasses.dataclass
class Speech:
    """What `TTSGenerator.speak` returns: normalised latents [n_i, C] per prompt, `<eod>` ended it (else
    `tts.max_frames` did), generation wall time without compiling, and the compile time."""

    latents: list[np.ndarray]
    ended: np.ndarray
    seconds: float
    compile_seconds: float


@dataclasses.dataclass
class TTSGenerator:
    """A trained TTS model ready to speak: its task and parameters and the sampler settings of the config. Prompts
    go in batches of `batch` (one compiled shape per prompt width; the last batch is filled with repeats)."""

    task: Any
    params: Any
    num_steps: int
    cfg_scale: float | None
    x0_clip: float | None
    batch: int

    def settings(self) -> GenerationSettings:
        return GenerationSettings(max_new=self.task.num_latents + 1, num_latents=self.task.num_latents,
                                  num_steps=self.num_steps, cfg_scale=self.cfg_scale,
                                  prediction_type=self.task.prediction_type, x0_clip=self.x0_clip, boi_id=BOD,
                                  latent_stop_id=EOD, stop_ids=(EOD, EOS),
                                  restart_positions=self.task.restart_positions,
                                  span_position_scale=self.task.span_position_scale)

    def _items(self, doc: dict, key: jax.Array) -> tuple[list, list]:
        """(conditional items, null items) of a prompt document: its latents σ-noised and normalised as in training
        (`task.model_latents`), the same values in both; the null prompt is `<bos> <null> <bod>` + those latents."""
        z = np.asarray(self.task.model_latents(key, jnp.asarray(doc["latents"])[None],
                                               jnp.asarray(doc["is_latent"])[None]))[0]
        items = [z[k] if doc["is_latent"][k] else int(doc["tokens"][k]) for k in range(len(doc["tokens"]))]
        speech = [z[k] for k in np.flatnonzero(doc["is_latent"])]
        return items, [BOS, NULL, BOD, *speech]

    def speak(self, prompts: Sequence[dict], rng: jax.Array) -> Speech:
        """Prompt documents ending inside a speech span → the generated normalised latents of each, whether each
        ended with `<eod>`, and the wall time of generation apart from the one compile (its own figure)."""
        settings = self.settings()
        run = make_generator(self.task.model, self.task.schedule, settings)
        c = self.task.model.config.latent_dim
        pairs = [self._items(d, jax.random.fold_in(rng, i)) for i, d in enumerate(prompts)]
        width, null_width = (max(len(p[k]) for p in pairs) for k in (0, 1))  # one shape for every call
        calls = []
        for i in range(0, len(pairs), self.batch):
            part = pairs[i:i + self.batch]
            part = part + [part[-1]] * (self.batch - len(part))
            null = make_prompt([p[1] for p in part], c, null_width) if self.cfg_scale is not None else None
            calls.append((make_prompt([p[0] for p in part], c, width), jax.random.fold_in(rng, 1_000_003 + i), null))
        t0 = time.perf_counter()
        compiled = run.lower(self.params, *calls[0]).compile()
        compile_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        latents, ended = [], []
        for k, (prompt, key, null) in enumerate(calls):
            g = jax.device_get(compiled(self.params, prompt, key, null))
            for b in range(min(self.batch, len(pairs) - k * self.batch)):
                count = int(g.num_generated[b])
                latents.append(np.asarray(g.latents[b, :count][g.is_latent[b, :count]]))
                ended.append(count > 0 and not g.is_latent[b, count - 1] and int(g.tokens[b, count - 1]) == EOD)
        return Speech(latents, np.asarray(ended), time.perf_counter() - t0, compile_seconds)


def duration_within(generated_seconds: np.ndarray, real_seconds: np.ndarray, tolerance: float = 0.2) -> np.ndarray:
    """Whether each generated duration lies within ±tolerance of the real one (the `<eod>` floor of §12.4)."""
    return np.abs(np.asarray(generated_seconds) / np.asarray(real_seconds) - 1.0) <= tolerance


MODES = ("continuation", "reference")


def evaluation_pairs(data: SpeechDocuments, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (reference, target) pairs of the split: a target utterance and another sentence of its speaker
    (seeded; targets without a second sentence of their speaker are skipped)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for u in rng.permutation(len(data)):
        others = np.flatnonzero((data.speaker == data.speaker[u]) & (np.arange(len(data)) != u))
        if len(others):
            pairs.append((int(rng.choice(others)), int(u)))
        if len(pairs) == count:
            break
    return pairs


def zero_shot(gen: TTSGenerator, data: SpeechDocuments, pairs: Sequence[tuple[int, int]], prompt_frames: int,
              rng: jax.Array) -> dict[str, dict[str, Any]]:
    """Both zero-shot modes on `pairs`: per mode, the prompt μ frames that precede the generation (data space), the
    generated latents (data space, denormalised), whether `<eod>` ended them, and the generation's wall time (without
    its compile, `compile_seconds`)."""
    out = {}
    for m, mode in enumerate(MODES):
        if mode == "continuation":
            prompts = [continuation_prompt(data, u, prompt_frames) for _, u in pairs]
        else:
            prompts = [reference_prompt(data, r, u) for r, u in pairs]
        speech = gen.speak(prompts, jax.random.fold_in(rng, m))
        out[mode] = {"prompt_mu": [d["latents"][d["is_latent"]] for d in prompts],
                     "generated": [np.asarray(gen.task.norm.denormalize(z)) for z in speech.latents],
                     "ended": speech.ended, "seconds": speech.seconds, "compile_seconds": speech.compile_seconds}
    return out
