"""Zero-shot text-to-speech from a TTS export with PyTorch alone (docs/pytorch.md §2.2, docs/method.md §12.3–12.4).

  python -m latent_lm.convert.torch_tts --export_dir=runs/tts/export --text="The quick brown fox." \
      --prompt=ref.wav --prompt_text="What the recording says." [--mode=reference|continuation] [--out=speech.wav]

`speak` is the JAX generator's speech mode (`latent_lm/generation.py`) for one utterance, eager: the prompt
`<bos> x… <bod> z…` and its null prompt `<bos> <null> <bod> z…` (the same latents) fill two KV caches; at every step
the LM head reads the prompt row's last hidden state and ends the span with `<eod>` where p(`<eod>`) ≥ ½, otherwise
DPM-Solver++ draws the next latent from the CFG-guided diffusion head (u + s·(c − u)), and what is emitted is fed to
both rows. A span holds at most `max_frames` latents (the prompt's included); the LM head then picks the next token
greedily: a stop token (`<eod>`, `<eos>`) ends the utterance, `<bod>` opens another span. From the same initial noise it
generates what the JAX generator does (tests/test_convert_speech.py). The CLI builds the prompt as `latent_lm.tts_cli`
does (espeak-ng phonemes when the run reads phonemes, the recording encoded by the exported audio σ-VAE and σ-noised
as in training) and writes the new speech as a WAV.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Callable

import numpy as np
import torch

from data_pipelines.tts_documents import stack_frames, unstack_frames
from latent_lm import cli, storage
from latent_lm.audio import espeak
from latent_lm.audio.wav import read_recording, write_wav
from latent_lm.convert.torch_files import ConversionError, load_audio_vae, load_model, load_tokenizer
from latent_lm.convert.torch_sampling import make_sample_func
from latent_lm.convert.torch_sigma_vae import SIGMA_DIVISOR


@dataclasses.dataclass(frozen=True)
class Items:
    """One prompt: item j is tokens[j], or latents[j] (normalised) where is_latent[j]."""

    tokens: torch.Tensor     # int64 [P]
    latents: torch.Tensor    # float32 [P, C]
    is_latent: torch.Tensor  # bool [P]

    @classmethod
    def of(cls, tokens, latents, is_latent) -> "Items":
        return cls(torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                   torch.as_tensor(np.asarray(latents), dtype=torch.float32),
                   torch.as_tensor(np.asarray(is_latent), dtype=torch.bool))


class _Row:
    """One sequence with its own KV cache (`slots` long), fed item by item after its prompt. `restart_id`: positions
    count again from each such token of the prompt (`positions="restart"`, docs/method.md §12.2), times `scale` from
    there on (`position_scale`)."""

    def __init__(self, model, prompt: Items, slots: int, restart_id: int | None = None, scale: float = 1.0):
        self.model, self.state = model, {
            i: {k: torch.zeros(1, slots, model.num_kv_heads, model.head_dim) for k in ("key", "value")}
            for i in range(len(model.blocks))}
        self.length, self.opened, self.scale = 0, 0, 1.0  # the slot positions count from, and their scale
        openers = [] if restart_id is None else (
            torch.nonzero((prompt.tokens == restart_id) & ~prompt.is_latent)[:, 0].tolist())
        bounds = [0, *openers, len(prompt.tokens)]
        for a, b in zip(bounds, bounds[1:]):  # the prompt in pieces, each opener starting one
            if a in openers:
                self.opened, self.scale = a, scale
            self.feed(prompt.tokens[a:b], prompt.latents[a:b], prompt.is_latent[a:b])

    def feed(self, tokens: torch.Tensor, latents: torch.Tensor, is_latent: torch.Tensor) -> None:
        n = tokens.shape[0]
        if n == 0:
            return
        positions = torch.arange(self.length - self.opened, self.length - self.opened + n)[None] * self.scale
        cond, hidden = self.model.forward_tokens(tokens[None], latents[None], is_latent[None], self.length,
                                                 self.state, positions=positions)
        self.length += n
        self.cond, self.hidden = cond[:, -1], hidden[:, -1]


@torch.no_grad()
def speak(model, prompt: Items, null_prompt: Items | None, *, sample_func: Callable, cfg_scale: float | None,
          max_frames: int, latent_stop_id: int, bod_id: int, stop_ids: tuple[int, ...],
          noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
          restart_positions: bool = False, position_scale: float = 1.0) -> tuple[torch.Tensor, bool]:
    """(the generated normalised latents [n, C], whether `<eod>` ended the span) after `prompt`, which ends inside a
    speech span (with `<bod>` or latents). `null_prompt` and `cfg_scale` turn on CFG (both or neither). `noise`
    [max_frames + 1, C] fixes x_T of loop step i (the JAX generator's per-step draws); by default torch.randn.
    `restart_positions`: positions count again from the prompt's `<bod>` (an export's `positions="restart"`), times
    `position_scale` (its `position_scale`)."""
    if (null_prompt is None) != (cfg_scale is None):
        raise ValueError("classifier-free guidance needs both a null prompt and cfg_scale (or neither)")
    max_new = max_frames + 1
    rows = [_Row(model, p, len(p.tokens) + max_new, bod_id if restart_positions else None, position_scale)
            for p in (prompt, null_prompt) if p is not None]
    # The trailing latents of the prompt count towards the span (as generation.prompt_state).
    trailing = int(prompt.is_latent.flip(0).int().cumprod(0).sum())
    latent_mode, n_lat = trailing < max_frames if trailing else int(prompt.tokens[-1]) == bod_id, trailing
    c = model.in_channels
    items: list[tuple[int, torch.Tensor | None]] = []

    def head(x, t):
        cond = torch.cat([r.cond for r in rows])[:, None]
        out = model.diffuse_tokens(torch.cat([x] * len(rows))[:, None], t.repeat(len(rows))[:, None], cond)[:, 0]
        if cfg_scale is None:
            return out
        u_c, u_n = out.chunk(2)
        return u_n + cfg_scale * (u_c - u_n)

    for i in range(max_new):
        probs = torch.softmax(model.lm_logits(rows[0].hidden), dim=-1)[0]
        if latent_mode and probs[latent_stop_id] < 0.5:
            x_t = noise[i][None].float() if noise is not None else torch.randn(1, c, generator=generator)
            x0 = sample_func(head, x_t)[0]
            items.append((0, x0))
            n_lat += 1
            latent_mode = n_lat < max_frames
        else:
            token = latent_stop_id if latent_mode else int(probs.argmax())
            items.append((token, None))
            if token in stop_ids:
                break
            latent_mode, n_lat = token == bod_id, 0
        token, x0 = items[-1]
        for r in rows:
            r.feed(torch.tensor([token]), (x0 if x0 is not None else torch.zeros(c))[None],
                   torch.tensor([x0 is not None]))
    latents = [x0 for _, x0 in items if x0 is not None]
    ended = bool(items) and items[-1][1] is None and items[-1][0] == latent_stop_id
    return (torch.stack(latents) if latents else torch.zeros(0, c)), ended


def prompt_pair(ids: list[np.ndarray], mu: np.ndarray, special: dict[str, int], latent_norm: dict, std: float,
                generator: torch.Generator | None = None) -> tuple[Items, Items]:
    """(prompt, null prompt): `<bos> x… <bod> z…` and `<bos> <null> <bod> z…` with the same z, the recording's μ
    [n, C] σ-noised once as in training (σ_b = N(0, 1)·std/0.8 times ε ~ N(0, I)) and normalised ((z + bias)·scale)."""
    mu = torch.as_tensor(np.asarray(mu, np.float32))
    sigma = torch.randn((), generator=generator) * std / SIGMA_DIVISOR
    z = (mu + sigma * torch.randn(mu.shape, generator=generator) + latent_norm["bias"]) * latent_norm["scale"]

    def items(head: list[int]) -> Items:
        n = len(head)
        return Items(torch.tensor(head + [0] * len(z)), torch.cat([torch.zeros(n, z.shape[-1]), z]),
                     torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(len(z), dtype=torch.bool)]))

    text = np.concatenate(ids).tolist() if ids else []
    return (items([special["<bos>"], *text, special["<bod>"]]),
            items([special["<bos>"], special["<null>"], special["<bod>"]]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export_dir", required=True, help="a TTS run's export (to_torch --what=all)")
    p.add_argument("--text", required=True, help="what to say")
    p.add_argument("--prompt", required=True, help="a WAV of the voice to speak in")
    p.add_argument("--prompt_text", required=True, help="what --prompt says")
    p.add_argument("--mode", choices=("reference", "continuation"), default="reference")
    p.add_argument("--accent", default="en-us", help="espeak-ng voice that phonemises the texts (tts.input=phonemes)")
    p.add_argument("--cfg_scale", type=float, default=None, help="default: the export's diffusion.cfg_scale")
    p.add_argument("--max_frames", type=int, default=None, help="longest span in positions (of frames_per_step "
                   "latent frames), the prompt's included (default: the export's multimodal.max_frames)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", default="speech.wav")
    args = p.parse_args(argv)
    if not args.text.strip():
        raise ConversionError("--text is empty")
    if args.max_frames is not None and args.max_frames < 1:
        raise ConversionError("--max_frames must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = load_model(args.export_dir)
    speech = cfg.get("multimodal") or {}
    if speech.get("arch") != "tts":
        raise ConversionError(f"{args.export_dir} is not a TTS export (config.json multimodal.arch != 'tts')")
    vae, vae_cfg = load_audio_vae(args.export_dir)
    tok = load_tokenizer(args.export_dir)
    rate = int(speech["sample_rate"])
    recording = read_recording(args.prompt, rate)
    k = int(speech.get("frames_per_step", 1))  # latent frames per position (docs/method.md §12.2)
    recording = recording[:len(recording) // (k * vae.hop) * k * vae.hop]  # whole positions
    say = (lambda text: espeak.phonemes(text, args.accent)) if speech["input"] == "phonemes" else (lambda text: text)
    texts = ([say(args.prompt_text), say(args.text)] if args.mode == "reference" else
             [" ".join((say(args.prompt_text), say(args.text)))])
    ids = [np.asarray(tok.encode(t, add_special_tokens=False).ids, np.int64) for t in texts]
    with torch.no_grad():
        mu = vae.encode(torch.from_numpy(recording)[None])[0].numpy()
    gen = torch.Generator().manual_seed(args.seed)
    special, norm, d = speech["special_tokens"], cfg["latent_norm"], cfg["diffusion"]
    prompt, null = prompt_pair(ids, stack_frames(mu, k), special, norm, float(vae_cfg["kwargs"]["std"]), gen)
    cfg_scale = (d["cfg_scale"] if args.cfg_scale is None else args.cfg_scale) or None
    sample_func = make_sample_func(d["num_sampling_steps"], d["prediction_type"], d["schedule"], d["num_train_steps"],
                                   d.get("x0_clip"))
    z, ended = speak(model, prompt, null if cfg_scale else None, sample_func=sample_func, cfg_scale=cfg_scale,
                     max_frames=args.max_frames or int(speech["max_frames"]),
                     latent_stop_id=int(speech["latent_stop_id"]), bod_id=special["<bod>"],
                     stop_ids=(special["<eod>"], special["<eos>"]), generator=gen,
                     restart_positions=speech.get("positions", "continue") == "restart",
                     position_scale=float(speech.get("position_scale", 1.0)))
    # The prompt's μ and the new latents decode in one causal pass (the prompt is the decoder's left context).
    with torch.no_grad():
        frames = unstack_frames((z / norm["scale"] - norm["bias"]).numpy(), k)
        full = torch.cat([torch.from_numpy(mu), torch.from_numpy(frames)])
        audio = vae.decode(full[None])[0, len(mu) * vae.hop:].numpy()
    storage.makedirs(os.path.dirname(os.path.abspath(args.out)))
    write_wav(args.out, audio, rate)
    print(f"wrote {len(audio) / rate:.2f} s of speech ({len(z) * k} latent frames, "
          f"{'ended by <eod>' if ended else 'stopped at max_frames'}) to {args.out}")


if __name__ == "__main__":
    cli.main(main)
