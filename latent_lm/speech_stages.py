"""The speech stages of an experiment (docs/method.md §12), each `(config, workdir, mesh, rules) -> dict | None` as the
stages of `latent_lm.experiment` (which registers them in `RUNNERS`):

  build_corpus      the espeak-ng corpus (data_pipelines/speech_corpus.py)  → <tok>/speech_corpus/
                    or LibriSpeech (speech.source="librispeech", data_pipelines/librispeech.py)
  train_audio_vae   the audio σ-VAE on random crops (AudioVAETask)           → <tok>/audio_vae/
  encode_audio      μ of every utterance of every split                      → <tok>/audio_latents/{split}/
  train_judges      the CTC phoneme recogniser and the speaker model, and    → <judges>/judges/recogniser.msgpack,
                    their floors on real held-out audio                        speaker.msgpack, floors.json
  eval_audio_vae    mel distance, STOI, collapse ratio on test_speakers,     → <workdir>/eval/audio_vae.json,
                    and with the judges the resynthesis's WER/PER and SIM      <workdir>/samples/audio_vae/*.wav

<tok>, the tokenizer dir, is `data.tokenizer_workdir` (relative to the workdir) or the workdir, as for images;
<judges> is `judges.workdir` (relative to the workdir) or <tok>.

Utterances of any length go through the σ-VAE in few compiled shapes (`_Codec`): each is zero-padded at the end to a
whole number of `audio_latents.bucket_frames` latent frames and batched with others of its bucket. Encoder and
decoder are causal (μ_t reads samples < (t+1)·hop; the samples of frame t read latents ≤ t), so the kept frames
n = ceil(len / hop) are those of the utterance padded to a multiple of the hop alone, and the kept samples are
those of decoding the n frames alone.

No stage holds a split's audio: `speech_corpus.load_corpus` keeps the text, ids and lengths and decodes an
utterance when it is indexed; the σ-VAE trains on grain batches, encode_audio and eval_audio_vae code `_chunk`
utterances at a time, the judges train and score a batch at a time (docs/experiments.md §11.1).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import speech_corpus
from data_pipelines.audio_batches import make_audio_training_batches
from data_pipelines.audio_latents import write_audio_latent_cache
from latent_lm import storage
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.evaluation import speech_judges as judges
from latent_lm.evaluation.audio_metrics import mean_stoi, mel_distance, sigma_vae_collapse_ratio
from latent_lm.models.audio_vae import AudioVAE, frame_rate, hop_length
from latent_lm.audio.wav import read_wav, write_wav
from latent_lm.parallel.distributed import barrier
from latent_lm.parallel.mesh import host_arrays
from data_pipelines.tts_documents import load_speech_documents, unstack_frames
from latent_lm.evaluation import tts as tts_eval
from latent_lm.stage_inputs import data_paths, generator_params, relative_to, tokenizer_dir
from latent_lm.text.tokenizer import TextTokenizer
from latent_lm.training.tasks.audio_vae import AudioVAETask
from latent_lm.training.train_loop import load_state, train
from latent_lm.training.train_loop import log_process0 as _log

# The speech tokenizer stages in pipeline order (a TTS run then trains the generator on the audio latents).
SPEECH_STAGES = ("build_corpus", "train_audio_vae", "encode_audio", "train_judges", "eval_audio_vae")
SPLITS = speech_corpus.SPLITS


# ---------------------------------------------------------------------------------------------------------------
# Paths.

def tts_run_config(workdir: str) -> ml_collections.ConfigDict:
    """A TTS run's resolved config (`<workdir>/config.json`) as a ConfigDict; one error line for any other run."""
    path = f"{workdir}/config.json"
    if not storage.exists(path):
        raise MissingInputError(f"{path} not found: is --workdir a TTS run (configs/tts.py)?")
    config = ml_collections.ConfigDict(json.loads(storage.read_text(path)))
    if config.model.get("arch") != "tts":
        raise ConfigError(f"{workdir} is a model.arch={config.model.get('arch')!r} run; speech needs a TTS run "
                          f"(configs/tts.py)")
    return config

def corpus_dir(config, workdir: str) -> str:
    return f"{tokenizer_dir(config, workdir)}/speech_corpus"


def audio_vae_dir(config, workdir: str) -> str:
    return f"{tokenizer_dir(config, workdir)}/audio_vae"


def audio_latents_dir(config, workdir: str) -> str:
    return f"{tokenizer_dir(config, workdir)}/audio_latents"


def judges_dir(config, workdir: str) -> str:
    """`<judges.workdir>/judges` when set (relative to the workdir: a sweep's σ-VAE runs score with the main run's
    judges), else `<tokenizer dir>/judges`."""
    base = config.judges.get("workdir")
    return f"{relative_to(workdir, base) if base else tokenizer_dir(config, workdir)}/judges"


def _check_sample_rates(config) -> None:
    rates = {"speech.sample_rate": int(config.speech.sample_rate),
             "audio_vae.sample_rate": int(config.audio_vae.sample_rate)}
    if len(set(rates.values())) > 1:
        raise ConfigError(f"{' and '.join(f'{k}={v}' for k, v in rates.items())} must be equal")


def _corpus_meta(config, workdir: str) -> dict[str, Any]:
    """The corpus's meta.json; MissingInputError naming the stage that builds it."""
    _check_sample_rates(config)
    path = corpus_dir(config, workdir)
    try:
        meta = speech_corpus.read_meta(path)
    except MissingInputError:
        raise MissingInputError(f"speech corpus not found at {path}: run --mode=build_corpus first") from None
    if int(meta["sample_rate"]) != int(config.audio_vae.sample_rate):
        raise ConfigError(f"the speech corpus at {path} is at {meta['sample_rate']} Hz but audio_vae.sample_rate="
                          f"{config.audio_vae.sample_rate}: rebuild it (--mode=build_corpus) with this config")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Stages.

def build_corpus(config, workdir, mesh, rules):
    """Builds the corpus of `config.speech` (espeak-ng synthesis, or LibriSpeech by `speech.source`; a no-op when it
    is there with the same fingerprint)."""
    _check_sample_rates(config)
    path = corpus_dir(config, workdir)
    if jax.process_index() == 0:
        speech_corpus.build(path, config.speech, log=_log)
    barrier("build_corpus")
    meta = _corpus_meta(config, workdir)
    splits = meta["splits"]
    _log(f"speech corpus at {path}: " + ", ".join(
        f"{s} {splits[s]['count']} ({splits[s]['seconds'] / 60:.1f} min)" for s in SPLITS)
        + f"; {meta['num_speakers']} speakers, espeak-ng {meta['espeak_version']}")
    return {"corpus_utterances": sum(splits[s]["count"] for s in SPLITS),
            "corpus_hours": round(sum(splits[s]["seconds"] for s in SPLITS) / 3600, 3)}


def train_audio_vae(config, workdir, mesh, rules):
    """Trains the audio σ-VAE (AudioVAETask) on random `audio_vae_train.crop_seconds` crops of the train split."""
    _corpus_meta(config, workdir)
    task = AudioVAETask.from_config(config)
    t = config.audio_vae_train
    # Each process reads its own slice of the utterances and yields its rows of every global batch.
    it = iter(make_audio_training_batches(corpus_dir(config, workdir), t.batch_size, task.crop_samples, seed=t.seed,
                                          num_workers=config.speech.get("loader_workers", 0)))
    res = train(task, it, optim_config=config.audio_vae_optim, train_config=t, mesh=mesh, rules=rules,
                workdir=audio_vae_dir(config, workdir), meta={"config": config.to_json()},
                checkpoint_config=config.checkpoint, log=_log)
    return {"audio_vae_final_loss": res.final_metrics.get("loss"),
            "audio_vae_final_mel_l1": res.final_metrics.get("mel_l1"),
            "audio_vae_steps_per_sec": res.steps_per_sec}


def _load_audio_vae(config, workdir, mesh, rules) -> tuple[AudioVAETask, Any, int]:
    """(task, the σ-VAE's variables on the host — without the discriminators —, trained steps)."""
    task = AudioVAETask.from_config(config)
    state = load_state(task, optim_config=config.audio_vae_optim, train_config=config.audio_vae_train, mesh=mesh,
                       rules=rules, workdir=audio_vae_dir(config, workdir))
    variables = task.vae_variables(state.params)
    return task, host_arrays(variables), int(state.step)


class _Codec:
    """The audio σ-VAE's encoder and decoder on this process's devices for utterances of any length: bucketed to
    whole multiples of `bucket_frames` frames, `batch` utterances per call (rows padded), one compile per bucket."""

    def __init__(self, model: AudioVAE, params, batch: int, bucket_frames: int):
        if batch < 1 or bucket_frames < 1:
            raise ConfigError(f"audio_latents.batch_size={batch} and bucket_frames={bucket_frames} must be ≥ 1")
        local = Mesh(np.array(jax.local_devices()), ("batch",))
        self.model, self.hop, self.latent_dim = model, model.hop, model.latent_dim
        self.params = jax.device_put(params, NamedSharding(local, PartitionSpec()))
        self.rows = NamedSharding(local, PartitionSpec("batch"))
        self.batch = -(-batch // local.size) * local.size
        self.bucket = int(bucket_frames)
        self._encode = jax.jit(lambda p, x: model.apply(p, x, method=AudioVAE.encode))
        self._decode = jax.jit(lambda p, z: model.apply(p, z, method=AudioVAE.decode))

    def frames(self, num_samples: int) -> int:
        """Latent frames kept for an utterance: ceil(samples / hop), at least 1."""
        return max(1, -(-int(num_samples) // self.hop))

    def _groups(self, frames: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(bucket frames, up to `batch` utterance indices) per call."""
        by_bucket: dict[int, list[int]] = {}
        for i, n in enumerate(frames):
            by_bucket.setdefault(-(-n // self.bucket) * self.bucket, []).append(i)
        return [(size, idx[k:k + self.batch]) for size, idx in sorted(by_bucket.items())
                for k in range(0, len(idx), self.batch)]

    def encode(self, audio: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Waveforms [T_i] → μ [ceil(T_i / hop), C] each (float32)."""
        frames = [self.frames(len(a)) for a in audio]
        out: list[np.ndarray | None] = [None] * len(audio)
        for size, idx in self._groups(frames):
            x = np.zeros((self.batch, size * self.hop), np.float32)
            for r, i in enumerate(idx):
                x[r, :len(audio[i])] = audio[i]
            mu = np.asarray(self._encode(self.params, jax.device_put(x, self.rows)))
            for r, i in enumerate(idx):
                out[i] = mu[r, :frames[i]].astype(np.float32)
        return out

    def decode(self, latents: Sequence[np.ndarray]) -> list[np.ndarray]:
        """μ or z [n_i, C] → waveforms [n_i·hop] each (float32)."""
        frames = [len(z) for z in latents]
        out: list[np.ndarray | None] = [None] * len(latents)
        for size, idx in self._groups(frames):
            z = np.zeros((self.batch, size, self.latent_dim), np.float32)
            for r, i in enumerate(idx):
                z[r, :frames[i]] = latents[i]
            audio = np.asarray(self._decode(self.params, jax.device_put(z, self.rows)))
            for r, i in enumerate(idx):
                out[i] = audio[r, :frames[i] * self.hop].astype(np.float32)
        return out


def _chunk(codec: _Codec) -> int:
    """Utterances read (and bucketed together) at a time by the stages that code a whole split."""
    return max(codec.batch * 4, 64)


def _codec(config, task: AudioVAETask, params) -> _Codec:
    c = config.audio_latents
    return _Codec(task.model, params, int(c.batch_size), int(c.bucket_frames))


def audio_codec(config, workdir, mesh, rules) -> _Codec:
    """The run's trained audio σ-VAE as a codec for utterances of any length (`encode`, `decode`)."""
    task, params, _ = _load_audio_vae(config, workdir, mesh, rules)
    return _codec(config, task, params)


def _digest(params) -> str:
    """A short hash of the σ-VAE's weights: a cache of another training (same step count) is not taken as current."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def _latent_norm(moments: dict[str, float], path: str) -> dict[str, float]:
    """LM-space normalisation z' = (z + bias)·scale from the moments of the σ-sampled latents (docs/method.md §3.1)."""
    if moments["std"] <= 0:
        raise DataError(f"the audio latents at {path} have zero variance: train the audio σ-VAE (longer)")
    return {"scale": float(moments["std"] ** -1), "bias": -float(moments["mean"])}


def encode_audio(config, workdir, mesh, rules):
    """Encodes every utterance of every corpus split to the σ-VAE means μ [ceil(len / hop), C] in the audio latent
    cache (data_pipelines/audio_latents.py); train first, whose σ-sampled moments give every split's
    `metadata["latent_norm"]`. Every process encodes its own shards with a full copy of the σ-VAE."""
    corpus_meta = _corpus_meta(config, workdir)
    task, params, step = _load_audio_vae(config, workdir, mesh, rules)
    codec = _codec(config, task, params)
    cdir = corpus_dir(config, workdir)
    out_dir = audio_latents_dir(config, workdir)
    a = config.audio_vae
    fingerprint = {"audio_vae_step": step, "audio_vae_sha256": _digest(params), "audio_vae": a.to_dict(),
                   "corpus": corpus_meta["fingerprint"]}
    rate = frame_rate(int(a.sample_rate), task.model.strides)
    chunk = _chunk(codec)
    norm: dict[str, float] = {}
    out: dict[str, Any] = {}
    t0 = time.time()
    for split in SPLITS:
        source = speech_corpus.SpeechCorpusSource(cdir, split)

        def encode_range(start: int, end: int, source=source):
            for lo in range(start, end, chunk):
                records = [source[i] for i in range(lo, min(lo + chunk, end))]
                mus = codec.encode([r["audio"] for r in records])
                for r, mu in zip(records, mus):
                    yield mu, int(r["speaker"]), int(r["sentence"])

        path = f"{out_dir}/{split}"
        metadata: Any = ((lambda moments, path=path: {"latent_norm": _latent_norm(moments, path)})
                         if split == "train" else {"latent_norm": norm})
        meta = write_audio_latent_cache(path, num_examples=len(source), encode_range=encode_range,
                                        latent_dim=task.model.latent_dim, frame_rate=rate, std=float(a.std),
                                        num_shards=int(config.audio_latents.shards),
                                        fingerprint=dict(fingerprint, split=split), metadata=metadata)
        if split == "train":
            norm = meta["metadata"]["latent_norm"]
        out[f"{split}_audio_latent_frames"] = int(meta["frames"])
    elapsed = time.time() - t0
    _log(f"encoded audio latents at {rate:g} Hz ({task.model.latent_dim} channels) into {out_dir} in {elapsed:.1f}s: "
         + ", ".join(f"{s} {out[f'{s}_audio_latent_frames']} frames" for s in SPLITS))
    return {**out, "audio_latent_scale": norm["scale"], "audio_latent_bias": norm["bias"]}


def eval_audio_vae(config, workdir, mesh, rules):
    """Reconstruction of held-out speakers (test_speakers): mel distance, STOI and the variance-collapse ratio
    (docs/method.md §12) → eval/audio_vae.json; `audio_vae_eval.wav_samples` real/reconstructed pairs →
    samples/audio_vae/. Reconstructions decode μ (z = μ, no posterior noise). The utterances are read, coded and
    scored `_chunk(codec)` at a time (the scores are means over utterances: the same as all at once). With the
    judges (`train_judges` runs first; `judges.workdir` names another run's), the reconstructions are also scored as
    speech: the recogniser's WER/PER and the speaker judge's cosine to the speaker's other real utterances, beside
    the judges' floors on the real audio: what the tokenizer alone costs the TTS scores (docs/method.md §12.4)."""
    corpus_meta = _corpus_meta(config, workdir)
    task, params, step = _load_audio_vae(config, workdir, mesh, rules)
    codec = _codec(config, task, params)
    e, a = config.audio_vae_eval, config.audio_vae
    split = speech_corpus.load_corpus(corpus_dir(config, workdir), "test_speakers")
    n = len(split) if int(e.utterances) <= 0 else min(int(e.utterances), len(split))
    sr = split.sample_rate
    judged = _reconstruction_judges(config, workdir, corpus_meta["fingerprint"])
    mel, stoi, mus, heard, voices = [], [], [], [], ([], [])
    codec_seconds = 0.0
    for lo in range(0, n, _chunk(codec)):
        audio = split.audio.take(range(lo, min(lo + _chunk(codec), n)))
        t0 = time.time()
        mu = codec.encode(audio)
        recon = [r[:len(x)] for r, x in zip(codec.decode(mu), audio)]
        codec_seconds += time.time() - t0
        mus += mu
        mel += [mel_distance([x], [r], sr) for x, r in zip(audio, recon)]
        stoi += [mean_stoi([x], [r], sr) for x, r in zip(audio, recon)]
        if jax.process_index() == 0:
            for i in range(lo, min(int(e.wav_samples), lo + len(audio))):
                name = f"{workdir}/samples/audio_vae/{i:02d}_speaker{int(split.speaker[i])}"
                write_wav(f"{name}_real.wav", audio[i - lo], sr)
                write_wav(f"{name}_recon.wav", recon[i - lo], sr)
        if judged is not None:
            heard += judges.transcribe(judged["recogniser"], recon, sr)
            voices[0].extend(judges.speaker_embeddings(judged["speaker"], recon, sr))
            voices[1].extend(judges.speaker_embeddings(judged["speaker"], audio, sr))
    seconds = float(split.samples[:n].sum()) / sr
    metrics = {"mel_distance": float(np.mean(mel)), "stoi": float(np.mean(stoi)), "num_utterances": n,
               "variance_collapse_ratio": sigma_vae_collapse_ratio(float(a.std), np.concatenate(mus))}
    if judged is not None:
        metrics["judges"] = _judge_resynthesis(judged, split.phonemes[:n], split.speaker[:n], heard, voices)
    result = {**metrics, "split": "test_speakers", "frame_rate": frame_rate(sr, task.model.strides),
              "hop": task.model.hop, "latent_dim": task.model.latent_dim, "strides": list(task.model.strides),
              "std": float(a.std), "audio_vae_steps": step, "audio_seconds": round(seconds, 3),
              "codec_real_time_factor": codec_seconds / max(seconds, 1e-9),
              "audio_vae_params": int(sum(x.size for x in jax.tree.leaves(params)))}
    if jax.process_index() == 0:
        storage.write_json_atomic(f"{workdir}/eval/audio_vae.json", result, indent=2, sort_keys=True)
    _log(f"audio σ-VAE on {n} test_speakers utterances: mel distance {metrics['mel_distance']:.4f}, STOI "
         f"{metrics['stoi']:.3f}, collapse ratio {metrics['variance_collapse_ratio']:.3f}")
    summary = {"audio_vae_mel_distance": metrics["mel_distance"], "audio_vae_stoi": metrics["stoi"],
               "audio_vae_collapse_ratio": metrics["variance_collapse_ratio"]}
    if judged is not None:
        j = metrics["judges"]
        _log(f"its resynthesis judged: WER {j['wer']:.3f} (real {j['real']['wer']:.3f}), PER {j['per']:.3f} (real "
             f"{j['real']['per']:.3f}), SIM {j['sim']:.3f} (real same speaker {j['real']['same']:.3f}, different "
             f"{j['real']['different']:.3f})")
        summary.update(audio_vae_resynthesis_wer=j["wer"], audio_vae_resynthesis_sim=j["sim"])
    return summary


def _reconstruction_judges(config, workdir: str, corpus_fingerprint: str) -> dict[str, Any] | None:
    """The judges and their floors for eval_audio_vae, or None (logged) where the tokenizer dir has none yet. A
    `judges.workdir` that holds none, or judges of another corpus, is an error: their scores would not compare."""
    jdir = judges_dir(config, workdir)
    if not storage.exists(f"{jdir}/floors.json"):
        if config.judges.get("workdir"):
            raise MissingInputError(f"judges.workdir: {jdir}/floors.json not found: run --mode=train_judges there")
        _log(f"no judges at {jdir} (train_judges): the reconstructions are not scored as speech")
        return None
    floors = load_floors(config, workdir)
    if floors.get("fingerprint", {}).get("corpus") != corpus_fingerprint:
        raise ConfigError(f"the judges at {jdir} were trained on another speech corpus than this run's: retrain them "
                          f"(--mode=train_judges) or point judges.workdir at a run of the same corpus")
    return {"floors": floors, "recogniser": judges.load_judge(f"{jdir}/recogniser.msgpack"),
            "speaker": judges.load_judge(f"{jdir}/speaker.msgpack")}


def _judge_resynthesis(judged: dict[str, Any], phonemes: Sequence[str], speakers: np.ndarray, heard: list[str],
                       voices: tuple[list, list]) -> dict[str, Any]:
    """WER/PER of the resynthesis's transcripts, and SIM: the cosine of each resynthesis to the speaker's other real
    utterances (`embedding_baselines`); beside them the real audio's floors (every test_speakers utterance)."""
    sim = judges.embedding_baselines(np.stack(voices[0]), speakers, against=np.stack(voices[1]))
    real = judged["floors"]["recogniser"]["test_speakers"]
    same = judged["floors"]["speaker"]["test_speakers"]
    return {"per": judges.phoneme_error_rate(phonemes, heard), "wer": judges.word_error_rate(phonemes, heard),
            "sim": sim["same"], "sim_different": sim["different"],
            "real": {"per": real["per"], "wer": real["wer"], "same": same["same"], "different": same["different"]}}


def _judge(path: str, fingerprint: dict[str, Any], fit: Callable[[], judges.Bundle], what: str) -> judges.Bundle:
    """The judge bundle at `path` if its sidecar (`.json`, written after it) holds `fingerprint`; else `fit()`,
    saved by process 0 (the others wait and read it)."""
    side = path[:-len(".msgpack")] + ".json"

    def current() -> bool:
        if not (storage.exists(path) and storage.exists(side)):
            return False
        try:
            return json.loads(storage.read_text(side)) == fingerprint
        except ValueError:
            return False

    if not current():
        if jax.process_index() == 0:
            t0 = time.time()
            bundle = fit()
            storage.remove(side, missing_ok=True)  # the old sidecar must not vouch for the new file
            judges.save_judge(bundle, path)
            storage.write_json_atomic(side, fingerprint, indent=2, sort_keys=True)
            _log(f"trained the {what} in {time.time() - t0:.1f}s → {path}")
        barrier(f"train_judges {what}")
    return judges.load_judge(path)


def train_judges(config, workdir, mesh, rules):
    """Trains the judges on the train split (docs/method.md §12) — the CTC phoneme recogniser and the speaker model —
    and writes their floors on real held-out audio to judges/floors.json: PER/WER on test_speakers and
    test_sentences, same- and different-speaker cosine similarity on test_speakers. A judge whose corpus and config
    are unchanged is kept. The splits' audio is read a batch at a time (`speech_corpus.SpeechAudio`): memory holds
    their text and lengths and a few batches, not the train split's audio (docs/experiments.md §11.1)."""
    corpus_meta = _corpus_meta(config, workdir)
    cdir, jdir = corpus_dir(config, workdir), judges_dir(config, workdir)
    j = config.judges
    seed = int(j.seed)
    rec_cfg, spk_cfg = j.recogniser.to_dict(), j.speaker.to_dict()
    base = {"corpus": corpus_meta["fingerprint"], "seed": seed}
    cache: dict[str, speech_corpus.SpeechSplit] = {}

    def load(split: str) -> speech_corpus.SpeechSplit:
        if split not in cache:
            cache[split] = speech_corpus.load_corpus(cdir, split)
        return cache[split]

    recogniser = _judge(f"{jdir}/recogniser.msgpack", dict(base, recogniser=rec_cfg),
                        lambda: judges.train_recogniser(load("train").audio, load("train").phonemes,
                                                        load("train").sample_rate, rec_cfg, seed=seed),
                        "phoneme recogniser")
    speaker = _judge(f"{jdir}/speaker.msgpack", dict(base, speaker=spk_cfg),
                     lambda: judges.train_speaker_model(load("train").audio, load("train").speaker,
                                                        load("train").sample_rate, spk_cfg, seed=seed),
                     "speaker model")
    t0 = time.time()
    floors: dict[str, Any] = {"recogniser": {}, "fingerprint": dict(base, recogniser=rec_cfg, speaker=spk_cfg)}
    for split in ("test_speakers", "test_sentences"):
        s = load(split)
        floors["recogniser"][split] = dict(judges.recogniser_error_rates(recogniser, s.audio, s.phonemes),
                                           num_utterances=len(s))
    held_out = load("test_speakers")
    floors["speaker"] = {"test_speakers": judges.speaker_baselines(speaker, held_out.audio, held_out.speaker)}
    if jax.process_index() == 0:
        storage.write_json_atomic(f"{jdir}/floors.json", floors, indent=2, sort_keys=True)
    rec, sim = floors["recogniser"]["test_speakers"], floors["speaker"]["test_speakers"]
    _log(f"judges on real test_speakers audio ({time.time() - t0:.1f}s): PER {rec['per']:.3f}, WER {rec['wer']:.3f}; "
         f"speaker cosine same {sim['same']:.3f} vs different {sim['different']:.3f}")
    return {"judge_per": rec["per"], "judge_wer": rec["wer"], "judge_sim_same": sim["same"],
            "judge_sim_different": sim["different"]}


def load_floors(config, workdir: str) -> dict[str, Any]:
    """judges/floors.json (what `train_judges` wrote); MissingInputError otherwise."""
    path = f"{judges_dir(config, workdir)}/floors.json"
    if not storage.exists(path):
        raise MissingInputError(f"{path} not found: run --mode=train_judges first")
    return json.loads(storage.read_text(path))


def _tts_setup(config, workdir, mesh, rules):
    """(TTS generator, held-out TTS documents of `tts_eval.split`, the audio codec, the corpus split)."""
    task, params, _ = generator_params(config, workdir, mesh, rules)
    e, d = config.tts_eval, config.diffusion
    paths = data_paths(config, workdir)
    data = load_speech_documents(paths.speech_corpus, paths.latents, e.split, TextTokenizer.load(paths.text_tokenizer),
                                 task.seq_len, config.tts.input, config.tts.frames_per_step)
    gen = tts_eval.TTSGenerator(task, params, d.num_sampling_steps, d.cfg_scale or None, d.x0_clip, e.batch)
    return (gen, data, audio_codec(config, workdir, mesh, rules),
            speech_corpus.load_corpus(corpus_dir(config, workdir), e.split))


def generate_tts(config, workdir, mesh, rules):
    """Zero-shot TTS on held-out speakers (docs/method.md §12.4): `tts_eval.utterances` (reference, target) pairs,
    both modes → samples/tts/<mode>_<i>.wav, the prompts' audio beside them, samples/tts/manifest.json (text,
    speaker, prompt file, mode, duration, …) and samples/tts/speed.json (generation and compile seconds, real-time
    factor, per mode)."""
    gen, data, codec, split = _tts_setup(config, workdir, mesh, rules)
    e = config.tts_eval
    fps = frame_rate(split.sample_rate, codec.model.strides)
    pairs = tts_eval.evaluation_pairs(data, int(e.utterances), int(e.seed))
    if not pairs:
        raise DataError(f"the {e.split} split has no speaker with two utterances to evaluate zero-shot TTS on")
    k = int(config.tts.frames_per_step)
    out = tts_eval.zero_shot(gen, data, pairs, max(1, round(float(e.prompt_seconds) * fps / k)),
                             jax.random.PRNGKey(int(e.seed)))
    manifest, root = [], f"{workdir}/samples/tts"
    for mode, res in out.items():
        # Positions back to latent frames; prompt + generation decode in one causal pass (the decoder's left context
        # is the prompt's), then are cut.
        prompts, generated = ([unstack_frames(z, k) for z in res[key]] for key in ("prompt_mu", "generated"))
        full = codec.decode([np.concatenate([p, g]) for p, g in zip(prompts, generated)])
        for i, ((r, u), p, g, audio) in enumerate(zip(pairs, prompts, generated, full)):
            cut = len(p) * codec.hop
            prompt_audio = split.audio[u][:cut] if mode == "continuation" else split.audio[r]
            speech = audio if mode == "continuation" else audio[cut:]
            name = f"{mode}_{i:03d}"
            if jax.process_index() == 0:
                write_wav(f"{root}/{name}.wav", speech, split.sample_rate)
                write_wav(f"{root}/{name}_prompt.wav", prompt_audio, split.sample_rate)
            manifest.append(dict(
                file=f"{name}.wav", prompt_file=f"{name}_prompt.wav", mode=mode, text=split.text[u],
                phonemes=split.phonemes[u], speaker=int(split.speaker[u]), target=u, reference=r,
                duration=len(speech) / split.sample_rate, real_duration=float(split.durations[u]),
                generated_frames=len(g), prompt_frames=len(p),
                ended_by_eod=bool(res["ended"][i])))
        _log(f"{mode}: {len(pairs)} utterances generated in {res['seconds']:.1f}s")
    # Speed (docs/method.md §12.4): generation wall time without the compile, per second of generated audio.
    speed = {}
    for m, res in out.items():
        rows = [x for x in manifest if x["mode"] == m]
        audio_seconds = sum(x["generated_frames"] for x in rows) * codec.hop / split.sample_rate
        speed[m] = dict(generation_seconds=res["seconds"], compile_seconds=res["compile_seconds"],
                        generated_audio_seconds=audio_seconds, rtf=res["seconds"] / max(audio_seconds, 1e-9),
                        utterances=len(rows), batch=int(e.batch), device=jax.devices()[0].device_kind)
    if jax.process_index() == 0:
        storage.write_json_atomic(f"{root}/manifest.json", manifest, indent=1)
        storage.write_json_atomic(f"{root}/speed.json", speed, indent=1)
    return {f"tts_{m}_rtf": s["rtf"] for m, s in speed.items()}


def eval_tts(config, workdir, mesh, rules):
    """Scores samples/tts/ (docs/method.md §12.4) → eval/tts.json: per mode, the recogniser's WER and PER against the
    target phonemes (continuation: the whole utterance, prefix included), the speaker judge's cosine between the
    generated speech and the prompt's real audio, the share of utterances whose duration is within ±20% of the real
    one and that `<eod>` ended, the real-time factor (speed.json), autoregressive steps per audio second against a
    75 Hz codec; beside them the judges' floors on real held-out audio (judges/floors.json), the floors of the issue
    checked, and the scores of the targets' real audio (`real`) and of its σ-VAE resynthesis (`resynthesis`)."""
    root = f"{workdir}/samples/tts"
    if not storage.exists(f"{root}/manifest.json"):
        raise MissingInputError(f"{root}/manifest.json not found: run --mode=generate_tts first")
    manifest = json.loads(storage.read_text(f"{root}/manifest.json"))
    speed = json.loads(storage.read_text(f"{root}/speed.json")) if storage.exists(f"{root}/speed.json") else {}
    floors = load_floors(config, workdir)
    jdir = judges_dir(config, workdir)
    recogniser, speaker = judges.load_judge(f"{jdir}/recogniser.msgpack"), judges.load_judge(f"{jdir}/speaker.msgpack")
    sr = int(config.speech.sample_rate)
    fps = frame_rate(sr, tuple(config.audio_vae.strides))
    steps = fps / int(config.tts.frames_per_step)  # autoregressive steps per second of speech
    result: dict[str, Any] = {"split": config.tts_eval.split, "frame_rate": fps, "ar_steps_per_second": steps,
                              "codec_ar_steps_per_second": tts_eval.CODEC_FRAME_RATE,
                              "fewer_ar_steps_than_codec": tts_eval.CODEC_FRAME_RATE / steps, "floors": floors}
    real_wer = floors["recogniser"][config.tts_eval.split]["wer"]
    sim_floor = floors["speaker"][config.tts_eval.split]
    for mode in tts_eval.MODES:
        rows = [m for m in manifest if m["mode"] == mode]
        if not rows:
            continue
        audio = [read_wav(f"{root}/{m['file']}") for m in rows]
        prompts = [read_wav(f"{root}/{m['prompt_file']}") for m in rows]
        hop = hop_length(config.audio_vae.strides)
        own = [a[m["prompt_frames"] * hop:] if mode == "continuation" else a for a, m in zip(audio, rows)]
        err = judges.recogniser_error_rates(recogniser, audio, [m["phonemes"] for m in rows])
        sim = judges.speaker_similarity(speaker, own, prompts)
        within = tts_eval.duration_within([m["duration"] for m in rows], [m["real_duration"] for m in rows])
        r = {"wer": err["wer"], "per": err["per"], "sim": float(np.mean(sim)),
             "duration_within_20pct": float(within.mean()),
             "ended_by_eod": float(np.mean([m["ended_by_eod"] for m in rows])), "utterances": len(rows),
             "rtf": speed.get(mode, {}).get("rtf")}
        r["floors_met"] = {"wer": r["wer"] <= 2 * real_wer,
                           "sim": abs(r["sim"] - sim_floor["same"]) < abs(r["sim"] - sim_floor["different"]),
                           "duration": r["duration_within_20pct"] >= 0.95}
        result[mode] = r
        _log(f"{mode}: WER {r['wer']:.3f} (real {real_wer:.3f}), PER {r['per']:.3f}, SIM {r['sim']:.3f} (same "
             f"{sim_floor['same']:.3f}, different {sim_floor['different']:.3f}), duration ±20% "
             f"{r['duration_within_20pct']:.0%}, <eod> {r['ended_by_eod']:.0%}")
    # The same targets and references as real audio and as the audio σ-VAE's resynthesis (μ encoded and decoded):
    # what the judges give speech that is right, and what the tokenizer alone costs.
    rows = [m for m in manifest if m["mode"] == "reference"] or manifest
    split = speech_corpus.load_corpus(corpus_dir(config, workdir), config.tts_eval.split)
    real = [split.audio[m["target"]] for m in rows]
    refs = [split.audio[m["reference"]] for m in rows]
    codec = audio_codec(config, workdir, mesh, rules)
    for name, audio in (("real", real), ("resynthesis", codec.decode(codec.encode(real)))):
        err = judges.recogniser_error_rates(recogniser, audio, [m["phonemes"] for m in rows])
        result[name] = {"wer": err["wer"], "per": err["per"], "utterances": len(rows),
                        "sim": float(np.mean(judges.speaker_similarity(speaker, audio, refs)))}
        _log(f"{name} targets: WER {err['wer']:.3f}, PER {err['per']:.3f}, SIM {result[name]['sim']:.3f}")
    if jax.process_index() == 0:
        storage.write_json_atomic(f"{workdir}/eval/tts.json", result, indent=2, sort_keys=True)
    return {f"tts_{m}_{k}": result[m][k] for m in tts_eval.MODES if m in result for k in ("wer", "sim")}
