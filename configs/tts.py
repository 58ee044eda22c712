"""Speech at embedded scale (docs/method.md §12, issue 16): the espeak-ng corpus, the audio σ-VAE (16 kHz → 25 Hz
latents), its latent caches, its reconstruction scores and the judges of intelligibility and voice.

  python -m latent_lm.main --config=configs/tts.py --workdir=runs/tts --mode=all            # every stage
  python -m latent_lm.main --config=configs/tts.py:tiny=1 --workdir=runs/tts_try --mode=build_corpus
Stages (latent_lm/speech_stages.py): build_corpus → train_audio_vae → encode_audio → eval_audio_vae → train_judges.
`tiny=1` shrinks every part to a smoke run of about a minute. `role=tokenizer` runs the same stages (the sweep's
shared tokenizer run). The sections of the image default (data, vae, model, …) are kept so that the generic
validation applies; the TTS model's sections replace `model` when the TTS stages are added.
Derived values (the σ-VAE's and the judges' sample rates from the corpus's) are computed here.
"""

import math

import ml_collections

from configs import args
from configs.default import get_config as image_config
from data_pipelines import speech_corpus
from latent_lm.errors import ConfigError
from latent_lm.evaluation import speech_judges
from latent_lm.models.audio_vae import STRIDE_PRESETS
from latent_lm.speech_stages import SPEECH_STAGES

ARGS = dict(role="all", seed=0, tiny=False)
ROLES = ("all", "tokenizer", "generator")
# The TTS model's stages (docs/method.md §12.2–12.4): the phoneme tokenizer, the model, its held-out loss, zero-shot
# generation on held-out speakers and its scores.
TTS_STAGES = ("train_tokenizer", "train", "eval_loss", "generate_tts", "eval_tts")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`tts.py:tiny=1`, `tts.py:role=tokenizer`, `tts.py:seed=1` (the audio σ-VAE's and the judges' seed)."""
    a = args.parse(arg, ARGS)
    if a.role not in ROLES:
        raise ConfigError(f"unknown role {a.role!r}; choose one of {list(ROLES)}")
    c = image_config("mnist,tiny=1" if a.tiny else "mnist")
    c.stages = {"all": SPEECH_STAGES + TTS_STAGES, "tokenizer": SPEECH_STAGES, "generator": TTS_STAGES}[a.role]
    if a.role == "generator":
        c.data.tokenizer_workdir = "../tokenizer"

    # The corpus (data_pipelines/speech_corpus.py): espeak-ng accents × variants × pitch × rate as speakers, sentences
    # from templates and Python's docs; held-out speakers and sentences; `workers` synthesis processes.
    # `loader_workers`: grain processes that read the σ-VAE's training crops (0: in the training process).
    c.speech = speech_corpus.default_config()
    c.speech.loader_workers = 0

    # Audio σ-VAE (docs/method.md §12; models/audio_vae.py): causal SEANet-like convs, 16 kHz / (4·4·5·8 = 640) = 25
    # latent frames per second, fixed σ scale `std` (C_σ, as the image σ-VAE), widths channels·2^i capped at
    # max_channels. Paper scale: STRIDE_PRESETS["paper_7.5hz"] (24 kHz, 3200×).
    strides, _ = STRIDE_PRESETS["embedded_25hz"]
    c.audio_vae = ml_collections.ConfigDict(dict(
        sample_rate=c.speech.sample_rate, strides=strides, channels=16, max_channels=256, latent_dim=16, std=0.5,
        res_dilations=(1, 3, 9), kernel_size=7, activation="elu", weight_norm=False, output="tanh", dtype="float32"))
    # Its loss (training/audio_losses.py): MR-STFT + log-mel L1 + waveform L1 + kl_weight·mean(μ²); the HiFi-GAN
    # multi-period/multi-scale discriminators when disc_weight > 0 (from step disc_start). Empty resolutions: the
    # 24 kHz defaults scaled to the sample rate.
    c.audio_vae_loss = ml_collections.ConfigDict(dict(
        stft_weight=1.0, mel_weight=1.0, l1_weight=0.1, kl_weight=0.01, stft_resolutions=(), mel_resolution=(),
        disc_weight=0.0, fm_ratio=2.0, disc_start=0, gan_loss="lsgan", disc_periods=(2, 3, 5, 7, 11), disc_scales=3,
        disc_period_channels=16, disc_scale_channels=32, disc_max_channels=256))
    # Training on random crops of the train split (a whole number of latent frames; shorter utterances zero-padded).
    # Many small steps: the decoder's output ignores its input for the first ≈ 700 steps whatever the batch, then
    # reconstruction improves steadily (docs/experiments.md §11): 4 × 0.64 s at ≈ 0.16 s per step here, 3,200 steps
    # ≈ 9 min → held-out mel distance 0.96, STOI 0.70 (400 steps of 8 × 1.28 s: 1.71 and 0.47, on the plateau).
    c.audio_vae_train = ml_collections.ConfigDict(dict(steps=3200, batch_size=4, crop_seconds=0.64, log_every=100,
                                                       seed=a.seed))
    c.audio_vae_optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=40, final_lr_ratio=0.1, b1=0.8, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
        ema_decay=0.0))
    # encode_audio / eval_audio_vae: utterances go through the σ-VAE `batch_size` at a time, zero-padded to a
    # multiple of `bucket_frames` latent frames (one compile per bucket); the cache has `shards` files per split.
    c.audio_latents = ml_collections.ConfigDict(dict(batch_size=16, bucket_frames=25, shards=4))
    # eval_audio_vae: `utterances` of test_speakers (0: all), `wav_samples` real/recon pairs in samples/audio_vae/.
    c.audio_vae_eval = ml_collections.ConfigDict(dict(utterances=0, wav_samples=4))

    # The judges (evaluation/speech_judges.py): CTC phoneme recogniser (PER, WER) and speaker model (cosine SIM).
    rec, spk = speech_judges.recogniser_config(), speech_judges.speaker_config()
    rec.sample_rate = spk.sample_rate = c.speech.sample_rate
    c.judges = ml_collections.ConfigDict(dict(seed=a.seed, recogniser=rec, speaker=spk))

    if a.tiny:
        c.speech.update(dict(num_speakers=20, num_sentences=30, workers=1))
        c.speech.utterances.update(dict(train=12, test_sentences=4, test_speakers=4))
        c.audio_vae.update(dict(channels=4, max_channels=16, latent_dim=8, res_dilations=(1,)))
        c.audio_vae_loss.update(dict(disc_periods=(2, 3), disc_scales=1, disc_period_channels=4,
                                     disc_scale_channels=4, disc_max_channels=16))
        c.audio_vae_train.update(dict(steps=3, batch_size=4, crop_seconds=0.32, log_every=1))
        c.audio_vae_optim.warmup_steps = 1
        c.audio_latents.update(dict(batch_size=4, bucket_frames=50, shards=2))
        c.audio_vae_eval.wav_samples = 2
        c.judges.recogniser.update(dict(conv_channels=16, dim=16, depth=1, num_heads=2, steps=2, batch_size=4,
                                        warmup_steps=1, eval_batch_size=8, norm_examples=8, fast_compile=True))
        c.judges.speaker.update(dict(channels=16, conv_layers=2, embed_dim=8, steps=2, batch_size=4, warmup_steps=1,
                                     eval_batch_size=8, norm_examples=8, fast_compile=True))
    _tts_model(c, a.tiny)
    return c


def _tts_model(c: ml_collections.ConfigDict, tiny: bool) -> None:
    """The TTS model (docs/method.md §12.2–12.4, training/tasks/tts.py): the multimodal LatentLM over
    `<bos> phonemes <bod> z₁ … z_n <eod> <eos>` documents, its phoneme tokenizer and its zero-shot evaluation."""
    fps = c.speech.sample_rate / math.prod(c.audio_vae.strides)
    # Byte-level BPE on the train phonemes (`tts.input`), with the special tokens of docs/method.md §7.3.
    c.text = ml_collections.ConfigDict(dict(vocab_size=512, min_frequency=2))
    # Rows hold a pair of utterances (reference-utterance documents): up to 2 × 4.5 s of latents plus their phonemes.
    seq_len = 192 if tiny else 320
    max_frames = int(round((6.0 if tiny else 10.0) * fps))  # the longest span (a reference's frames included)
    c.tts = ml_collections.ConfigDict(dict(input="phonemes", pair_rate=0.5, null_prompt_rate=0.1,
                                           max_frames=max_frames))
    c.model.update(dict(arch="tts", num_classes=0, text_vocab_size=c.text.vocab_size, max_len=seq_len,
                        latent_dim=c.audio_vae.latent_dim, class_dropout=0.0, head_capacity=seq_len - 8))
    if not tiny:
        c.model.update(dict(width=192, depth=6, num_heads=6))
        c.train.update(dict(steps=3000, batch_size=16))
    c.diffusion.diffusion_weight = 5.0  # as the multimodal model (docs/experiments.md §10.3)
    # Zero-shot TTS on `utterances` held-out-speaker targets, both modes (continuation of the first
    # `prompt_seconds`, and another sentence of the speaker as the reference), `batch` prompts per compiled call.
    c.tts_eval = ml_collections.ConfigDict(dict(split="test_speakers", utterances=8 if tiny else 100,
                                                prompt_seconds=1.0, batch=8 if tiny else 50, seed=1))
    c.eval.update(dict(loss_batch=2 if tiny else 16))
    if tiny:
        c.eval.use_ema = False  # 20 steps: the EMA would still be mostly the initial weights
