"""Speak your own text with a trained TTS run, in the voice of your own recording (docs/experiments.md §11.2).

  python -m latent_lm.tts_cli --workdir=runs/tts --text="The quick brown fox." --prompt=ref.wav
  python -m latent_lm.tts_cli --workdir=runs/tts --text="The quick brown fox." --prompt=ref.wav \
      --prompt_text="What the recording says." --mode=reference --num=3
  python -m latent_lm.tts_cli --workdir=runs/tts --text="The quick brown fox."       # no prompt: any voice

reference (default): the recording is another sentence of the voice, `<bos> x(prompt) x(text) <bod> z(prompt)`;
the model says the text next in that voice. continuation: the recording is the beginning of the text itself,
`<bos> x(prompt_text + text) <bod> z(prompt)`; the model goes on. Text is phonemised by espeak-ng in `--accent` as
the corpus was (docs/method.md §12.1) when the run reads phonemes (`tts.input`). The recording (any WAV: mono or
stereo, any rate, resampled to the run's) is encoded by the run's audio σ-VAE; without `--prompt_text` it is
transcribed by the run's phoneme recogniser (judges/recogniser.msgpack). The model stops each utterance with
`<eod>` (§12.3), at most `tts.max_frames` positions (of `tts.frames_per_step` latent frames each). Writes
`<out>/speech_<i>.wav` and `<out>/speech.json` (default out: `<workdir>/speech/`). The run's config is
`<workdir>/config.json`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from data_pipelines.tts_documents import prompt_document, stack_frames, unstack_frames
from latent_lm import cli, storage
from latent_lm.audio import espeak
from latent_lm.audio.wav import read_recording, write_wav
from latent_lm.errors import ConfigError, MissingInputError
from latent_lm.evaluation import speech_judges as judges
from latent_lm.evaluation import tts as tts_eval
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.speech_stages import audio_codec, judges_dir, tts_run_config
from latent_lm.stage_inputs import data_paths, generator_params
from latent_lm.text.tokenizer import TextTokenizer

MODES = ("reference", "continuation")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latent_lm.tts_cli", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a TTS run (configs/tts.py) whose stages up to `train` ran")
    p.add_argument("--text", required=True, help="what to say")
    p.add_argument("--prompt", default=None, help="a WAV of the voice to speak in")
    p.add_argument("--prompt_text", default=None, help="what --prompt says (default: the run's recogniser hears it)")
    p.add_argument("--mode", choices=MODES, default="reference")
    p.add_argument("--accent", default="en-us", help="espeak-ng voice that phonemises --text and --prompt_text")
    p.add_argument("--num", type=int, default=1, help="utterances to sample")
    p.add_argument("--cfg_scale", type=float, default=None, help="default: the run's diffusion.cfg_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.num < 1:
        raise ConfigError("--num must be ≥ 1")
    if not args.text.strip():
        raise ConfigError("--text is empty")
    if args.mode == "continuation" and args.prompt is None:
        raise ConfigError("--mode=continuation needs --prompt (the recording the model continues)")
    config = tts_run_config(args.workdir)
    if args.cfg_scale is not None:
        config.diffusion.cfg_scale = args.cfg_scale
    sr = int(config.speech.sample_rate)
    recording = read_recording(args.prompt, sr) if args.prompt else None  # bad input fails before anything loads
    mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(-1, 1, 1))), jax.devices()[:1])  # one device suffices
    rules = logical_rules(config.mesh)

    phonemes_in = config.tts.input == "phonemes"
    say = (lambda text: espeak.phonemes(text, args.accent)) if phonemes_in else (lambda text: text)
    prompt_text, heard = args.prompt_text, None
    if recording is not None and prompt_text is None:
        if not phonemes_in:
            raise ConfigError("this run reads text (tts.input='text'): give --prompt_text, what --prompt says")
        bundle = f"{judges_dir(config, args.workdir)}/recogniser.msgpack"
        if not storage.exists(bundle):
            raise MissingInputError(f"{bundle} not found: give --prompt_text, or run --mode=train_judges")
        heard = judges.transcribe(judges.load_judge(bundle), [recording], sr)[0]
    prompt_input = heard if heard is not None else say(prompt_text) if prompt_text else ""

    tok = TextTokenizer.load(data_paths(config, args.workdir).text_tokenizer)
    codec = audio_codec(config, args.workdir, mesh, rules)
    k = int(config.tts.frames_per_step)
    mu = codec.encode([recording])[0] if recording is not None else np.zeros((0, codec.latent_dim), np.float32)
    mu = mu[:len(mu) // k * k]  # whole positions
    if args.mode == "continuation":
        texts = [np.asarray(tok.encode(" ".join(x for x in (prompt_input, say(args.text)) if x)), np.int32)]
    else:
        texts = [np.asarray(tok.encode(x), np.int32) for x in (prompt_input, say(args.text)) if x]
    doc = prompt_document(texts, stack_frames(mu, k))
    task, params, _ = generator_params(config, args.workdir, mesh, rules)
    room = task.seq_len - len(doc["tokens"])
    if room < 1:
        raise ConfigError(f"the prompt takes {len(doc['tokens'])} positions and the model holds {task.seq_len}: "
                          f"use a shorter --prompt or --text")
    d = config.diffusion
    gen = tts_eval.TTSGenerator(task, params, d.num_sampling_steps, d.cfg_scale or None, d.x0_clip, args.num)
    speech = gen.speak([doc] * args.num, jax.random.PRNGKey(args.seed))
    generated = [unstack_frames(np.asarray(task.norm.denormalize(z)), k) for z in speech.latents]
    # Prompt and generation decode in one causal pass (the decoder's left context is the prompt's), then are cut.
    audio = [a[len(mu) * codec.hop:] for a in codec.decode([np.concatenate([mu, g]) for g in generated])]

    out_dir = args.out or f"{args.workdir}/speech"
    record = dict(text=args.text, input=say(args.text), prompt=args.prompt, prompt_text=args.prompt_text,
                  prompt_heard=heard, mode=args.mode, accent=args.accent, sample_rate=sr, utterances=[])
    for i, (a, g, e) in enumerate(zip(audio, generated, speech.ended)):
        name = f"speech_{i}.wav"
        write_wav(f"{out_dir}/{name}", a, sr)
        record["utterances"].append(dict(file=name, seconds=len(a) / sr, frames=len(g), ended_by_eod=bool(e)))
    storage.write_json_atomic(f"{out_dir}/speech.json", record, indent=1)
    if heard is not None:
        print(f"heard in --prompt: {heard}")
    for u in record["utterances"]:
        print(json.dumps(u))
    print(f"wrote {out_dir}/speech.json")


if __name__ == "__main__":
    cli.main(main)
