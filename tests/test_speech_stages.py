"""The speech stages (latent_lm/speech_stages.py) through `experiment.run`, tiny (configs/tts.py:tiny=1) on one device:
build_corpus (20 utterances) → train_audio_vae (2 steps) → encode_audio → eval_audio_vae, then train_judges (untrained
judges: their training is test_speech_judges') and eval_audio_vae with them; the latent cache against a direct encode, a
killed cache resumed and never read; the audio σ-VAE task's loss with and without the GAN; the training crops."""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io.wavfile

from configs import tts
from data_pipelines import speech_corpus
from data_pipelines.audio_batches import make_audio_training_batches
from data_pipelines.audio_latents import AudioLatentSource, load_audio_latents
from latent_lm import experiment, speech_stages
from latent_lm.config_validation import validate
from latent_lm.errors import ConfigError, MissingInputError
from latent_lm.models.audio_vae import AudioVAE
from latent_lm.parallel import mesh as mesh_lib
from latent_lm.training.tasks.audio_vae import AudioVAETask
from conftest import ESPEAK_PROBLEM, requires_espeak


STAGES = ("build_corpus", "train_audio_vae", "encode_audio", "eval_audio_vae")


# The stages on a tiny corpus share one ≈ 15 s pipeline (the slow tier, with tests/test_tts_pipeline.py).
SLOW = pytest.mark.slow


def tiny_config():
    c = tts.get_config("tiny=1")
    c.audio_vae.strides = (16, 40)  # the 25 Hz hop in two stages: half the compile of the four-stage preset
    c.audio_vae_train.update(dict(steps=2, batch_size=2))
    c.checkpoint.every = 2
    c.mesh.shape = (1, 1, 1)
    for judge in (c.judges.recogniser, c.judges.speaker):
        judge.steps = 0  # untrained: the stage's plumbing, not the judges' training (test_speech_judges)
    return c


@pytest.fixture(scope="module")
def one_device():
    mesh = mesh_lib.make_mesh(None, jax.devices()[:1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment, "make_mesh", lambda cfg: mesh)
        yield mesh


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, one_device):
    if ESPEAK_PROBLEM is not None:
        pytest.skip(ESPEAK_PROBLEM)
    workdir = str(tmp_path_factory.mktemp("tts") / "run")
    config = tiny_config()
    summaries = {stage: experiment.run(config, workdir, stage) for stage in STAGES}
    return workdir, config, summaries


@requires_espeak
@SLOW
def test_stages_write_their_outputs(pipeline):
    workdir, config, s = pipeline
    tok = speech_stages.tokenizer_dir(config, workdir)
    assert tok == workdir and s["build_corpus"]["corpus_utterances"] == 20
    assert np.isfinite(s["train_audio_vae"]["audio_vae_final_loss"])
    assert os.listdir(f"{workdir}/audio_vae/checkpoints")
    # The task's loss without the GAN: reconstruction + kl·mean(μ²), logged every step.
    logged = [json.loads(line) for line in open(f"{workdir}/audio_vae/metrics.jsonl")]
    kl = config.audio_vae_loss.kl_weight
    assert [r["step"] for r in logged] == [1, 2] and "d_loss" not in logged[0]
    for r in logged:
        assert r["loss"] == pytest.approx(r["rec_loss"] + kl * r["mu_reg"], rel=1e-5) and r["mel_l1"] > 0
    result = json.loads(open(f"{workdir}/eval/audio_vae.json").read())
    assert result["num_utterances"] == 4 and result["frame_rate"] == 25.0 and result["audio_vae_steps"] == 2
    assert np.isfinite(result["mel_distance"]) and -1 <= result["stoi"] <= 1
    assert result["variance_collapse_ratio"] > 0
    assert s["eval_audio_vae"]["audio_vae_mel_distance"] == result["mel_distance"]
    assert "judges" not in result and "audio_vae_resynthesis_wer" not in s["eval_audio_vae"]  # none trained yet
    test = speech_corpus.load_corpus(f"{workdir}/speech_corpus", "test_speakers")
    wavs = sorted(os.listdir(f"{workdir}/samples/audio_vae"))
    assert len(wavs) == 2 * config.audio_vae_eval.wav_samples and not [w for w in wavs if ".tmp-" in w]
    for i in range(config.audio_vae_eval.wav_samples):
        rate, real = scipy.io.wavfile.read(f"{workdir}/samples/audio_vae/{i:02d}_speaker{test.speaker[i]}_real.wav")
        _, recon = scipy.io.wavfile.read(f"{workdir}/samples/audio_vae/{i:02d}_speaker{test.speaker[i]}_recon.wav")
        assert rate == 16000 and real.dtype == np.int16 and real.shape == recon.shape == test.audio[i].shape
        np.testing.assert_allclose(real / 32768, test.audio[i], atol=1 / 32768)


@requires_espeak
@SLOW
def test_latent_cache_is_the_direct_encode_of_each_utterance(pipeline, one_device):
    """Record i of a split is utterance i of the corpus split: its ids, and μ of the utterance zero-padded to a
    multiple of the hop, encoded alone (the stage buckets and batches; causality makes that exact)."""
    workdir, config, _ = pipeline
    task, params, _ = speech_stages._load_audio_vae(config, workdir, one_device, mesh_lib.DEFAULT_RULES)
    hop, c = task.model.hop, config.audio_vae.latent_dim
    norms = []
    encode = jax.jit(lambda x: task.model.apply(params, x, method=AudioVAE.encode))
    norms = []
    for split in speech_corpus.SPLITS:
        corpus = speech_corpus.load_corpus(f"{workdir}/speech_corpus", split)
        cache = load_audio_latents(f"{workdir}/audio_latents", split)
        assert len(cache) == len(corpus) == cache.meta["count"]
        np.testing.assert_array_equal(cache.speaker, corpus.speaker)
        np.testing.assert_array_equal(cache.sentence, corpus.sentence)
        assert [len(m) for m in cache.mu] == [-(-len(a) // hop) for a in corpus.audio]
        if split != "test_sentences":  # two utterances of two splits (one compile per length)
            i = len(corpus) - 1
            x = np.zeros((1, len(cache.mu[i]) * hop), np.float32)
            x[0, :len(corpus.audio[i])] = corpus.audio[i]
            assert cache.mu[i].shape[1] == c
            np.testing.assert_allclose(cache.mu[i], np.asarray(encode(jnp.asarray(x)))[0], atol=1e-5)
        allmu = np.concatenate(cache.mu).astype(np.float64)
        m = cache.meta["moments"]
        assert m["mean"] == pytest.approx(allmu.mean(), abs=1e-6)
        assert m["std"] == pytest.approx(np.sqrt(allmu.var() + (config.audio_vae.std / 0.8) ** 2), rel=1e-5)
        assert cache.meta["frame_rate"] == 25.0 and cache.meta["latent_dim"] == c
        norms.append(cache.meta["metadata"]["latent_norm"])
    train_m = load_audio_latents(f"{workdir}/audio_latents", "train").meta["moments"]
    assert norms[0] == norms[1] == norms[2] == {"scale": pytest.approx(1 / train_m["std"]),
                                                "bias": pytest.approx(-train_m["mean"])}
    np.testing.assert_array_equal(AudioLatentSource(f"{workdir}/audio_latents", "train")[1]["latents"],
                                  load_audio_latents(f"{workdir}/audio_latents", "train").mu[1])


@requires_espeak
@SLOW
def test_killed_encode_is_never_read_and_resumes(pipeline):
    workdir, config, _ = pipeline
    split_dir = f"{workdir}/audio_latents/train"
    before = {f: os.stat(f"{split_dir}/{f}").st_mtime_ns for f in os.listdir(split_dir)}
    experiment.run(config, workdir, "encode_audio")  # current: nothing rewritten
    assert {f: os.stat(f"{split_dir}/{f}").st_mtime_ns for f in os.listdir(split_dir)} == before
    # What a kill between the shards leaves: no meta.json, one shard missing.
    os.remove(f"{split_dir}/meta.json")
    os.remove(f"{split_dir}/audio_latents-00001-of-00002.array_record")
    with pytest.raises(MissingInputError, match="run --mode=encode_audio"):
        load_audio_latents(f"{workdir}/audio_latents", "train")
    experiment.run(config, workdir, "encode_audio")
    after = {f: os.stat(f"{split_dir}/{f}").st_mtime_ns for f in os.listdir(split_dir)}
    assert after["audio_latents-00000-of-00002.array_record"] == before["audio_latents-00000-of-00002.array_record"]
    assert after["meta.json"] != before["meta.json"]
    assert len(load_audio_latents(f"{workdir}/audio_latents", "train")) == 12


@requires_espeak
@SLOW
def test_train_judges_writes_floors_keeps_current_judges_and_scores_the_resynthesis(pipeline):
    workdir, config, _ = pipeline
    summary = experiment.run(config, workdir, "train_judges")
    floors = json.loads(open(f"{workdir}/judges/floors.json").read())
    rec = floors["recogniser"]["test_speakers"]
    assert rec["num_utterances"] == 4 and summary["judge_per"] == rec["per"] >= 0
    assert set(floors["recogniser"]) == {"test_speakers", "test_sentences"}
    sim = floors["speaker"]["test_speakers"]
    assert -1 <= sim["different"] <= 1 and summary["judge_sim_same"] == sim["same"]
    files = ("recogniser.msgpack", "speaker.msgpack")
    mtimes = [os.stat(f"{workdir}/judges/{f}").st_mtime_ns for f in files]
    experiment.run(config, workdir, "train_judges")  # same corpus and configs: kept
    assert [os.stat(f"{workdir}/judges/{f}").st_mtime_ns for f in files] == mtimes
    assert speech_stages.load_floors(config, workdir) == floors

    # With the judges, eval_audio_vae also scores the reconstructions as speech, beside the real audio's floors.
    before = json.loads(open(f"{workdir}/eval/audio_vae.json").read())
    summary = experiment.run(config, workdir, "eval_audio_vae")
    judged = json.loads(open(f"{workdir}/eval/audio_vae.json").read())
    assert judged["mel_distance"] == before["mel_distance"]
    j = judged["judges"]
    assert j["wer"] >= 0 and j["per"] >= 0 and -1 <= j["sim"] <= 1 and -1 <= j["sim_different"] <= 1
    assert j["real"] == {"per": rec["per"], "wer": rec["wer"], "same": sim["same"], "different": sim["different"]}
    assert summary["audio_vae_resynthesis_wer"] == j["wer"] and summary["audio_vae_resynthesis_sim"] == j["sim"]
    # Another run's judges (`judges.workdir`): the same scores; none there, or another corpus's, is one clear error.
    other = copy.deepcopy(config)
    other.judges.workdir = f"{workdir}/.."  # holds no judges/
    with pytest.raises(MissingInputError, match="judges.workdir"):
        experiment.run(other, workdir, "eval_audio_vae")
    shutil.copytree(f"{workdir}/judges", f"{workdir}/../elsewhere/judges")
    other.judges.workdir = "../elsewhere"
    assert experiment.run(other, workdir, "eval_audio_vae")["audio_vae_resynthesis_wer"] == j["wer"]
    stale = dict(floors, fingerprint=dict(floors["fingerprint"], corpus="another"))
    open(f"{workdir}/../elsewhere/judges/floors.json", "w").write(json.dumps(stale))
    with pytest.raises(ConfigError, match="another speech corpus"):
        experiment.run(other, workdir, "eval_audio_vae")


@requires_espeak
@SLOW
def test_training_crops(pipeline):
    workdir, config, _ = pipeline
    corpus = f"{workdir}/speech_corpus"
    lengths = sorted(len(a) for a in speech_corpus.load_corpus(corpus, "train").audio)
    for crop in (lengths[0] // 2, lengths[-1] + 640):  # cut from every utterance / longer than all: zero-padded
        it = iter(make_audio_training_batches(corpus, 4, crop, seed=0))
        batch = next(it)
        assert batch["audio"].shape == (4, crop) and batch["audio"].dtype == np.float32
        if crop > lengths[-1]:
            assert np.all(batch["audio"][:, lengths[-1]:] == 0)
    state = it.get_state()
    nxt = next(it)["audio"]
    again = iter(make_audio_training_batches(corpus, 4, crop, seed=0))
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["audio"], nxt)
    # Two processes read disjoint halves of the utterances.
    rows = [next(iter(make_audio_training_batches(corpus, 12, lengths[-1], seed=0, process_index=p,
                                                  process_count=2)))["audio"] for p in (0, 1)]
    assert rows[0].shape == (6, lengths[-1])
    key = lambda a: a[:1000].tobytes()  # noqa: E731
    assert not {key(r) for r in rows[0]} & {key(r) for r in rows[1]}


def test_stages_before_their_inputs_fail_with_one_clear_error(tmp_path, one_device):
    config = tiny_config()
    with pytest.raises(MissingInputError, match="run --mode=build_corpus first"):
        experiment.run(config, str(tmp_path), "train_audio_vae")
    bad = tiny_config()
    bad.audio_vae.sample_rate = 24000
    with pytest.raises(ConfigError, match="must be equal"):
        experiment.run(bad, str(tmp_path), "build_corpus")


def test_configs_validate():
    for arg, stages in ((None, speech_stages.SPEECH_STAGES + tts.TTS_STAGES),
                        ("tiny=1", speech_stages.SPEECH_STAGES + tts.TTS_STAGES),
                        ("role=tokenizer", speech_stages.SPEECH_STAGES), ("role=generator", tts.TTS_STAGES)):
        config = tts.get_config(arg)
        validate(config, experiment.STAGES)
        assert tuple(config.stages) == stages
        assert config.audio_vae.sample_rate == config.speech.sample_rate == config.judges.recogniser.sample_rate
    config = tts.get_config("tiny=1")
    config.audio_vae_optim.warmup_steps = config.audio_vae_train.steps
    with pytest.raises(ConfigError, match="audio_vae_optim.warmup_steps"):
        validate(config, experiment.STAGES)
    for changes, message in ((dict(latent_input_dropout=1.0), r"tts.latent_input_dropout=1.0 must lie in \[0, 1\)"),
                             (dict(positions="relative"), r"tts.positions='relative' must be one of"),
                             (dict(position_scale=0.0), r"tts.position_scale=0.0 must be > 0"),
                             (dict(positions="continue"), r"tts.position_scale=1.45 scales restarted speech")):
        config = tts.get_config("tiny=1")
        config.tts.update(changes)
        with pytest.raises(ConfigError, match=message):
            validate(config, experiment.STAGES)
    assert tts.get_config("scale=paper").tts.position_scale == 1.0
    with pytest.raises(ConfigError, match="unknown role"):
        tts.get_config("role=judge")


def test_audio_vae_task_loss_with_and_without_gan():
    """Without the GAN the param tree is the σ-VAE's alone (the loss itself trains in the pipeline fixture: see
    test_stages_write_their_outputs); with it the discriminators' params sit under "disc", the loss needs the step,
    and the GAN terms (and the discriminators' gradient) are off before disc_start, on from it."""
    config = tts.get_config("tiny=1")
    config.audio_vae.strides = (16, 40)
    config.audio_vae_train.crop_seconds = 0.08  # 2 frames of 640 samples
    key = jax.random.PRNGKey(0)
    plain = AudioVAETask.from_config(config)
    assert plain.disc is None and set(jax.eval_shape(plain.init_params, key)) == {"params"}
    config.audio_vae_loss.update(dict(disc_weight=0.5, disc_start=3, disc_periods=(2,), disc_scales=1))
    task = AudioVAETask.from_config(config)
    assert task.crop_samples == 1280 and task.disc is not None
    rng = np.random.default_rng(0)  # random params from the shapes: no init program to compile
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                          jax.eval_shape(task.init_params, key))
    assert set(params) == {"params", "disc"}
    assert set(params["params"]) == set(jax.eval_shape(plain.init_params, key)["params"])
    audio = 0.3 * jnp.sin(jnp.arange(2 * 1280, dtype=jnp.float32).reshape(2, 1280) * 0.05)
    with pytest.raises(ValueError, match="batch\\['step'\\]"):
        task.loss(params, {"audio": audio}, key)
    fn = jax.jit(jax.value_and_grad(lambda p, b: task.loss(p, b, key), has_aux=True))
    norm = lambda t: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(jax.device_get(t)))))  # noqa
    kl = task.loss_config.kl_weight
    (off, m), grads = fn(params, {"audio": audio, "step": jnp.int32(2)})
    m = jax.device_get(m)
    assert m["gan_gate"] == 0.0 and norm(grads["disc"]) == 0.0 and norm(grads["params"]) > 0
    assert m["d_loss"] == m["g_adv"] == m["feature_matching"] == 0.0  # not computed: the discriminators did not run
    assert float(off) == pytest.approx(m["rec_loss"] + kl * m["mu_reg"], rel=1e-6)  # the loss without the GAN
    (on, m), grads = fn(params, {"audio": audio, "step": jnp.int32(3)})
    m = jax.device_get(m)
    assert m["gan_gate"] == 1.0 and norm(grads["disc"]) > 0
    expected = m["rec_loss"] + kl * m["mu_reg"] + 0.5 * (m["g_adv"] + 2.0 * m["feature_matching"]) + m["d_loss"]
    assert float(on) == pytest.approx(expected, rel=1e-5)
