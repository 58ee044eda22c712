"""Zero-shot TTS (docs/method.md §12, issue 16): the speech corpus, the audio σ-VAE, its latent caches, its
reconstruction scores, the judges of intelligibility and voice, and the TTS model.

  python -m latent_lm.main --config=configs/tts.py --workdir=runs/tts --mode=all            # every stage
  python -m latent_lm.main --config=configs/tts.py:tiny=1 --workdir=runs/tts_try --mode=build_corpus
  python -m latent_lm.main --config=configs/tts.py:scale=paper --workdir=$RUN --mode=all \
      --config.speech.data_dir=$TFDS                                                        # paper scale
`scale=embedded` (default): the espeak-ng corpus, 16 kHz → 25 Hz latents. `scale=paper` (docs/experiments.md §11.1):
LibriSpeech through tfds (data_pipelines/librispeech.py) at 24 kHz, the paper's 7.5 Hz σ-VAE₆₄ (docs/method.md
§12.1) and a `size=` preset of latent_lm/models/presets.py for the TTS model (Medium by default); the
paper's TTS model size and recipe are not recovered, so those values are our defaults, marked below.
Stages (latent_lm/speech_stages.py): build_corpus → train_audio_vae → encode_audio → train_judges → eval_audio_vae.
`tiny=1` shrinks every part to a smoke run of about a minute. `role=tokenizer` runs the same stages (the sweep's
shared tokenizer run). The sections of the image default (data, vae, model, …) are kept so that the generic
validation applies; the TTS model's sections replace `model` when the TTS stages are added.
Derived values (the σ-VAE's and the judges' sample rates from the corpus's) are computed here.
"""

import math

import ml_collections

from configs import args
from configs.default import get_config as image_config
from data_pipelines import librispeech, speech_corpus
from latent_lm.errors import ConfigError
from latent_lm.evaluation import speech_judges
from latent_lm.models.audio_vae import STRIDE_PRESETS, hop_length
from latent_lm.models.presets import apply_preset
from latent_lm.speech_stages import SPEECH_STAGES

ARGS = dict(role="all", seed=0, tiny=False, scale="embedded", size="Medium", rate="25", frames_per_step=0)
ROLES = ("all", "tokenizer", "generator", "audio_vae")
# The frame-rate study of the audio σ-VAE (`get_sweep`, docs/experiments.md §11): embedded rates besides the
# default's 25 Hz, each σ-VAE trained and scored alone (`role=audio_vae`).
RATE_STUDY = ("12.5", "50")
SCALES = ("embedded", "paper")
# The TTS model's stages (docs/method.md §12.2–12.4): the phoneme tokenizer, the model, its held-out loss, zero-shot
# generation on held-out speakers and its scores.
TTS_STAGES = ("train_tokenizer", "train", "eval_loss", "generate_tts", "eval_tts")
# The embedded corpus's speaking rate in phoneme symbols (one token each with `text.split="characters"`) per second
# of speech, measured on its train split (2,600 utterances: 47.0 symbols in 2.59 s on average).
PHONEME_SYMBOLS_PER_SECOND = 18.13


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`tts.py:tiny=1`, `tts.py:role=tokenizer`, `tts.py:seed=1` (the audio σ-VAE's and the judges' seed),
    `tts.py:scale=paper,size=L` (`size` is read at paper scale only), `tts.py:role=audio_vae,rate=50` (the audio
    σ-VAE alone at another embedded frame rate), `tts.py:frames_per_step=3` (latent frames per autoregressive step of
    the TTS model; 0: the scale's default)."""
    a = args.parse(arg, ARGS)
    if a.role not in ROLES:
        raise ConfigError(f"unknown role {a.role!r}; choose one of {list(ROLES)}")
    if a.scale not in SCALES:
        raise ConfigError(f"unknown scale {a.scale!r}; choose one of {list(SCALES)}")
    if a.tiny and a.scale == "paper":
        raise ConfigError("tiny=1 is the embedded smoke run; it does not combine with scale=paper")
    c = image_config("mnist,tiny=1" if a.tiny else "mnist")
    c.stages = {"all": SPEECH_STAGES + TTS_STAGES, "tokenizer": SPEECH_STAGES, "generator": TTS_STAGES,
                "audio_vae": ("build_corpus", "train_audio_vae", "eval_audio_vae")}[a.role]
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
    if f"embedded_{a.rate}hz" not in STRIDE_PRESETS:
        raise ConfigError(f"rate={a.rate!r} has no embedded stride preset; choose one of "
                          f"{[k[9:-2] for k in STRIDE_PRESETS if k.startswith('embedded_')]}")
    strides, _ = STRIDE_PRESETS[f"embedded_{a.rate}hz"]
    c.audio_vae = ml_collections.ConfigDict(dict(
        sample_rate=c.speech.sample_rate, strides=strides, channels=16, max_channels=256, latent_dim=16, std=0.5,
        res_dilations=(1, 3, 9), kernel_size=7, activation="elu", weight_norm=False, output="tanh", dtype="float32"))
    # Its loss (training/audio_losses.py): MR-STFT + log-mel L1 + waveform L1 + kl_weight·mean(μ²); the HiFi-GAN
    # multi-period/multi-scale discriminators when disc_weight > 0 (from step disc_start). Empty resolutions: the
    # 24 kHz defaults scaled to the sample rate.
    c.audio_vae_loss = ml_collections.ConfigDict(dict(
        stft_weight=1.0, mel_weight=1.0, l1_weight=0.1, kl_weight=0.01, stft_resolutions=(), mel_resolution=(),
        disc_weight=0.0, fm_ratio=2.0, disc_start=0, gan_loss="lsgan", disc_periods=(2, 3, 5, 7, 11), disc_scales=3,
        disc_period_channels=16, disc_scale_channels=32, disc_max_channels=256,
        # The discriminators' strided and grouped convolutions as matmuls over their windows: 4× faster on XLA:CPU
        # (docs/method.md §12.1); "native" (XLA's convolutions) at paper scale, where the windows would not fit.
        disc_conv="matmul"))
    # Training on random crops of the train split (a whole number of latent frames; shorter utterances zero-padded).
    # Many small steps: the decoder's output ignores its input for the first ≈ 700 steps whatever the batch, then
    # reconstruction improves steadily (docs/experiments.md §11): 4 × 0.64 s at ≈ 0.17 s per step here. 3,200 steps
    # (≈ 11 min) → held-out mel distance 0.95, STOI 0.70, resynthesis judged WER 1.02, SIM 0.21; 9,600 (28–34 min) →
    # 0.72, 0.77, 0.88, 0.45, and the TTS model's SIM 0.16–0.22 → 0.31–0.36.
    c.audio_vae_train = ml_collections.ConfigDict(dict(steps=9600, batch_size=4, crop_seconds=0.64, log_every=100,
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
    # `workdir`: score with the judges of another run of the same corpus (relative to the workdir; "": this one's).
    c.judges = ml_collections.ConfigDict(dict(seed=a.seed, workdir="", recogniser=rec, speaker=spk))

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
    if a.scale == "paper":
        _paper_scale(c)
    # Latent frames per autoregressive step (docs/method.md §12.2): 2 (12.5 steps per second) at embedded scale, 1 at
    # paper scale, whose σ-VAE already runs at 7.5 Hz.
    _tts_model(c, a.tiny, frames_per_step=a.frames_per_step or (1 if a.scale == "paper" else 2))
    if a.scale == "paper":
        _paper_tts_model(c, a.size)
    return c


def _paper_scale(c: ml_collections.ConfigDict) -> None:
    """LibriSpeech at 24 kHz and the paper's audio σ-VAE₆₄ (docs/method.md §12.1; paper Table 5: 7.5 Hz, 64 latent
    channels, 3200×). Its width follows the tokenizer the paper builds on (32 base filters doubling per stage);
    the σ-VAE's training recipe and the GAN settings are not recovered → our defaults."""
    c.speech = librispeech.default_config()
    c.speech.loader_workers = 8  # grain processes reading the σ-VAE's crops
    strides, rate = STRIDE_PRESETS["paper_7.5hz"]
    c.speech.sample_rate = rate
    c.audio_vae.update(dict(sample_rate=rate, strides=strides, channels=32, max_channels=32 * 2 ** len(strides),
                            latent_dim=64, std=0.5))
    # Not recovered → our default: the HiFi-GAN discriminators on after the reconstruction losses have converged
    # a first time, at widths like HiFi-GAN's.
    c.audio_vae_loss.update(dict(disc_weight=1.0, disc_start=10_000, disc_period_channels=32,
                                 disc_scale_channels=128, disc_max_channels=1024, disc_conv="native"))
    crop_frames = 15  # 2 s at 7.5 Hz: whole latent frames
    c.audio_vae_train.update(dict(steps=200_000, batch_size=64, crop_seconds=crop_frames * hop_length(strides) / rate,
                                  log_every=100))
    c.audio_vae_optim.update(dict(lr=3e-4, warmup_steps=1000))
    c.audio_latents.update(dict(batch_size=64, bucket_frames=crop_frames, shards=256))
    c.audio_vae_eval.wav_samples = 8
    c.judges.recogniser.sample_rate = c.judges.speaker.sample_rate = rate
    c.checkpoint.update(dict(every=5000, max_to_keep=3))


def _paper_tts_model(c: ml_collections.ConfigDict, size: str) -> None:
    """The TTS model at paper scale: not recovered (the paper's Tables 8–9) → a preset of
    latent_lm/models/presets.py (`size`, Medium by default: 24 × 1024, 16 heads, 3-block head, the size of the
    paper's tokenizer study) with that study's recipe (docs/method.md §6.4: lr 10⁻⁴, warm-up 100, weight decay 0.1,
    batch 256, 200k steps), rows long enough for a pair of the longest training utterances."""
    fps = c.speech.sample_rate / math.prod(c.audio_vae.strides)
    apply_preset(c.model, c.head, size)
    # Phonemes run at ≈ 12–15 per second of speech (fewer BPE tokens); a pair of two 20 s utterances is 300 latents
    # + ≲ 600 tokens, so 1024 positions hold one with room to pack shorter documents beside it.
    seq_len = 1024
    max_frames = int(round(2 * float(c.speech.train_seconds[1]) * fps))
    c.text.update(dict(vocab_size=1024, split="words"))
    c.tts.update(dict(positions="continue", position_scale=1.0))  # the paper's one sequence (restarted, scaled
    # positions are measured at embedded scale only)
    # Latent positions are ≈ half of a packed row (7.5 latents per second against ≈ 5–8 tokens): the gathered head
    # runs on 5/8 of the row, and a row whose latents fill it packs its remaining documents into the next row.
    c.model.update(dict(text_vocab_size=c.text.vocab_size, max_len=seq_len, head_capacity=seq_len * 5 // 8,
                        dtype="bfloat16", remat="full"))
    c.tts.max_frames = max_frames
    c.train.update(dict(steps=200_000, batch_size=256, log_every=100))
    c.optim.update(dict(lr=1e-4, warmup_steps=100, final_lr_ratio=0.0, weight_decay=0.1, ema_decay=0.9999))
    # Zero-shot evaluation (docs/method.md §12.4) on every 4–10 s test-clean utterance (test-clean holds 2,620 in
    # all) with the paper's 3 s prefix prompt (its Table 4).
    c.tts_eval.update(dict(utterances=2620, prompt_seconds=3.0, batch=64))
    c.eval.update(dict(loss_batch=64))


def _tts_model(c: ml_collections.ConfigDict, tiny: bool, frames_per_step: int) -> None:
    """The TTS model (docs/method.md §12.2–12.4, training/tasks/tts.py): the multimodal LatentLM over
    `<bos> phonemes <bod> z₁ … z_n <eod> <eos>` documents, its phoneme tokenizer and its zero-shot evaluation."""
    fps = c.speech.sample_rate / math.prod(c.audio_vae.strides)
    # Byte-level BPE on the train phonemes (`tts.input`), with the special tokens of docs/method.md §7.3; split into
    # characters, one token per phoneme symbol (with restarted positions, docs/experiments.md §11: the text is then
    # read further into the utterance).
    c.text = ml_collections.ConfigDict(dict(vocab_size=512, min_frequency=2, split="characters"))
    # `frames_per_step` latent frames are stacked into each sequence position (one autoregressive step, docs/method.md
    # §12.2): the model then speaks at fps / frames_per_step steps per second.
    k = frames_per_step
    steps_per_second = fps / k
    # Rows hold a pair of utterances (reference-utterance documents): up to 2 × 4.5 s of latents plus their phonemes
    # (95 positions: a pair of average utterances, 2 × 47 phoneme symbols; longer pairs are single documents): 207
    # at 25 Hz and 2 frames per step.
    seq_len = 192 if tiny else int(round(9.0 * steps_per_second)) + 95
    # The longest span in positions (a reference's included).
    max_frames = int(round((6.0 if tiny else 10.0) * steps_per_second))
    # `latent_input_dropout`: the rate at which training hides a teacher-forced input latent; `positions`: "continue"
    # (one sequence, as the paper) or "restart" (speech positions count again from `<bod>`, as the text's do from
    # `<bos>`: docs/method.md §12.2; with characters, the embedded default's best durations and PER), the speech's
    # then times `position_scale`: phoneme symbols per step, so that a step's position is that of the symbol it says.
    c.tts = ml_collections.ConfigDict(dict(input="phonemes", pair_rate=0.5, null_prompt_rate=0.1,
                                           max_frames=max_frames, frames_per_step=k, latent_input_dropout=0.0,
                                           positions="restart",
                                           position_scale=round(PHONEME_SYMBOLS_PER_SECOND / steps_per_second, 3)))
    c.model.update(dict(arch="tts", num_classes=0, text_vocab_size=c.text.vocab_size, max_len=seq_len,
                        latent_dim=k * c.audio_vae.latent_dim, class_dropout=0.0, head_capacity=seq_len - 8))
    if not tiny:
        # With 2 frames per step (rows of 207): 1.9e10 training FLOPs per step (44% in the head), 4.3–4.6 steps/s
        # here, 5,000 steps ≈ 19 min (1 frame per step, rows of 320: 3.1e10, 1.8 steps/s). The first default (width
        # 192, depth 6, batch 16, batch_mul 4: 2.3e11 per step) took ≈ 8 s per step. 5,000 steps rather than 2,500
        # (docs/experiments.md §11): with scaled positions the second half doubles the text's share of the held-out
        # loss and gives the best PER and durations; `make tts` then takes about an hour.
        c.model.update(dict(width=128, depth=4, num_heads=4))
        c.train.update(dict(steps=5000, batch_size=8))
        # Twice the image default's rate: at 5,000 steps the held-out diffusion loss 0.541 → 0.515, the text's share
        # of it 7.2% → 11.1%, continuation WER 1.048 → 1.004 (docs/experiments.md §11).
        c.optim.lr = 2e-3
        c.diffusion.batch_mul = 2
    c.diffusion.diffusion_weight = 5.0  # as the multimodal model (docs/experiments.md §10.3)
    # Zero-shot TTS on `utterances` held-out-speaker targets, both modes (continuation of the first
    # `prompt_seconds`, and another sentence of the speaker as the reference), `batch` prompts per compiled call.
    c.tts_eval = ml_collections.ConfigDict(dict(split="test_speakers", utterances=8 if tiny else 100,
                                                prompt_seconds=1.0, batch=8 if tiny else 50, seed=1))
    c.eval.update(dict(loss_batch=2 if tiny else 16))
    if tiny:
        c.eval.use_ema = False  # 20 steps: the EMA would still be mostly the initial weights


def get_sweep(arg: str | None = None) -> list[dict]:
    """The audio σ-VAE's frame-rate study (`make tts-rates`, docs/experiments.md §11): one `role=audio_vae` run per
    rate of RATE_STUDY, with the default's corpus, model widths, loss and budget; the 25 Hz row is the TTS run's
    own."""
    a = args.parse(arg, dict(tiny=False))
    base = "tiny=1," if a.tiny else ""
    return [{"name": f"audio_vae_{rate}hz", "config_arg": f"{base}role=audio_vae,rate={rate}"} for rate in RATE_STUDY]
