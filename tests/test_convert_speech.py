"""PyTorch export of the audio σ-VAE and of a TTS run (issue 16), docs/pytorch.md §2.2.

The PyTorch audio σ-VAE (`convert/torch_audio_vae.py`) against the JAX `AudioVAE` for the embedded stride preset (the
tiny TTS config's σ-VAE) and the 75 Hz preset with weight norm, SiLU and a linear output; its streaming decode
against its full decode. A tiny `configs/tts.py:tiny=1` run written without training (random params in every leaf,
`conftest.write_random_checkpoint`), sharing its tokenizer dir (`data.tokenizer_workdir="../tok"`), exported through
the CLI: `tokenizer.json` byte for byte, the audio σ-VAE in `audio_vae/`, and the PyTorch Transformer matching JAX
on packed TTS documents (fp32); imported back (`from_torch`) bit-exact. A missing input is one error line."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import write_random_checkpoint
# _one_torch_thread is an autouse fixture (one torch thread, see tests/test_convert.py).
from test_convert_mllm import (_assert_same_params, _one_device_mesh, _one_torch_thread,  # noqa: F401
                               export_run, import_sharing_a_tokenizer)

from configs import tts
from data_pipelines.packing import make_packed_dataset
from data_pipelines.tts_documents import BOD, BOS, EOD, EOS, NULL, SpeechDocuments, TTSDocumentSource
from latent_lm import cli
from latent_lm.audio.wav import read_wav, write_wav
from latent_lm.convert import from_torch, to_torch, torch_sampling, torch_tts
from latent_lm.convert.torch_audio_vae import AudioVAE as TorchAudioVAE
from latent_lm.convert.torch_files import ConversionError, load_audio_vae, load_model, read_config
from latent_lm.generation import GenerationSettings, make_generator, make_prompt, step_keys
from latent_lm.latents import LatentNormalization
from latent_lm.models.audio_vae import STRIDE_PRESETS, AudioVAE, make_audio_vae
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.parallel.mesh import logical_rules
from latent_lm.text.tokenizer import train_tokenizer
from latent_lm.training.tasks import make_generator_task
from latent_lm.training.tasks.audio_vae import AudioVAETask

PHONEMES = ["ðə kwɪk bɹaʊn fɒks dʒʌmps oʊvɚ ðə leɪzi dɑːɡ", "hiː sɛd ðæt ðə tɹeɪn wʊd biː leɪt",
            "ʃiː sɛlz siː ʃɛlz baɪ ðə siː ʃɔːɹ", "ðə bʊk ɪz ɑːn ðə teɪbəl", "wʌn tuː θɹiː fɔːɹ faɪv",
            "ɪt ɪz ə bjuːtɪfəl deɪ"] * 3
STEP = 7
FRAMES = 6  # latent frames of the parity audio
TOL = 1e-5


def _tiny_tts_config():
    config = tts.get_config("tiny=1")
    config.model.depth = 1
    config.data.tokenizer_workdir = "../tok"
    return config


def _random_audio_vae_variables(model: AudioVAE, rng) -> dict:
    """Random JAX variables of `model` at the PyTorch default init's scale (biases and gains too), built from the
    param shapes (`jax.eval_shape`: compiling the init costs more than the whole test)."""
    x = jnp.zeros((1, model.hop), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, rng=jax.random.PRNGKey(1)))

    def leaf(path, a):
        name = path[-1].key
        if name == "kernel":
            bound = 1.0 / np.sqrt(a.shape[0] * a.shape[1])
            return rng.uniform(-bound, bound, a.shape).astype(np.float32)
        low, high = (0.5, 1.5) if name == "weight_g" else (-0.2, 0.2)
        return rng.uniform(low, high, a.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _jax_codec(model: AudioVAE):
    encode = jax.jit(lambda v, x: model.apply(v, x, method=AudioVAE.encode))
    decode = jax.jit(lambda v, z: model.apply(v, z, method=AudioVAE.decode))
    return encode, decode


def _assert_codec_matches(torch_vae: TorchAudioVAE, jax_vae: AudioVAE, variables, rng) -> dict[str, float]:
    """Encode μ and decode of the PyTorch twin equal JAX's within TOL on non-trivial values; returns the errors."""
    audio = rng.uniform(-0.9, 0.9, (2, FRAMES * jax_vae.hop)).astype(np.float32)
    z = rng.standard_normal((2, FRAMES, jax_vae.latent_dim)).astype(np.float32)
    encode, decode = _jax_codec(jax_vae)
    want = {"mu": np.asarray(encode(variables, audio)), "audio": np.asarray(decode(variables, z))}
    with torch.no_grad():
        got = {"mu": torch_vae.encode(torch.from_numpy(audio)).numpy(),
               "audio": torch_vae.decode(torch.from_numpy(z)).numpy()}
    errors = {}
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert np.abs(want[k]).max() > 0.05, k  # non-trivial values
        errors[k] = float(np.abs(got[k] - want[k]).max())
        assert errors[k] <= TOL, (k, errors[k])
    return errors


AUDIO_VAES = {
    "embedded_25hz": lambda: make_audio_vae(_tiny_tts_config()),  # the tiny TTS run's σ-VAE
    "paper_75hz_weight_norm": lambda: AudioVAE(sample_rate=24_000, strides=STRIDE_PRESETS["paper_75hz"][0],
                                               channels=4, max_channels=16, latent_dim=8, res_dilations=(1, 3),
                                               activation="silu", weight_norm=True, output="none"),
}


@pytest.mark.parametrize("name", sorted(AUDIO_VAES))
def test_torch_audio_vae_matches_jax(name, tmp_path):
    """Export (`to_torch.export_audio_vae`) → `load_audio_vae` → encode μ and decode equal JAX's; a weight-normed
    model is exported with its effective kernels."""
    jax_vae = AUDIO_VAES[name]()
    rng = np.random.default_rng(0)
    variables = _random_audio_vae_variables(jax_vae, rng)
    config = to_torch.export_audio_vae(variables, jax_vae, str(tmp_path / "audio_vae"))
    torch_vae, loaded = load_audio_vae(str(tmp_path))
    assert loaded["kwargs"] == config["kwargs"] and loaded["audio"]["hop_length"] == jax_vae.hop
    assert loaded["audio"]["weight_norm_folded"] == jax_vae.weight_norm
    errors = _assert_codec_matches(torch_vae, jax_vae, variables, rng)
    # And back (`from_torch`): the export's kernels re-enter the JAX model (with weight norm, each gain is its
    # kernel's norm), and the imported model is the PyTorch one again.
    imported, _ = from_torch.read_torch_params(str(tmp_path / "audio_vae"), jax_vae)
    assert jax.tree.map(np.shape, imported) == jax.tree.map(np.shape, variables)
    assert _assert_codec_matches(torch_vae, jax_vae, imported, np.random.default_rng(0)).keys() == errors.keys()


def test_torch_stream_decode_equals_full_decode():
    """Chunks of any sizes, with the state carried, give the full decode; the state is not modified in place; the
    first frames' samples do not depend on later latents (causal)."""
    torch.manual_seed(0)
    vae = TorchAudioVAE(16_000, (2, 4, 5), channels=4, latent_dim=8, max_channels=16, res_dilations=(1, 3),
                        output="none").eval()
    z = torch.randn(2, 10, 8)
    with torch.no_grad():
        full = vae.decode(z)
        chunks, state = [], None
        for a, b in [(0, 1), (1, 4), (4, 6), (6, 10)]:
            audio, state = vae.decode_stream(z[:, a:b], state)
            chunks.append(audio)
        again, _ = vae.decode_stream(z[:, :1])
        prefix = vae.decode(z[:, :4])
    assert full.shape == (2, 10 * vae.hop) and full.abs().max() > 0.05
    assert (torch.cat(chunks, 1) - full).abs().max() <= 1e-6
    assert torch.equal(again, chunks[0])
    assert (prefix - full[:, :4 * vae.hop]).abs().max() <= 1e-6


def write_tiny_tts_run(root: str) -> dict:
    """`<root>/run`: lm/ checkpoints (step 7) of a `tts.py:tiny=1` run (depth 1) sharing `<root>/tok` (audio_vae/
    checkpoints and text/tokenizer.json) through `data.tokenizer_workdir="../tok"`, written without training.
    Returns dict(run, tok, config, lm_ema, audio_vae_raw, tokenizer)."""
    config = _tiny_tts_config()
    run, tok_dir = os.path.join(root, "run"), os.path.join(root, "tok")
    tokenizer = train_tokenizer(PHONEMES, config.text.vocab_size)
    tokenizer.save(os.path.join(tok_dir, "text"))
    norm = LatentNormalization(scale=0.8, bias=0.1)
    rng = np.random.default_rng(0)
    _, lm_ema = write_random_checkpoint(make_generator_task(config, norm), config.optim, config.train, f"{run}/lm",
                                        config, {"latent_norm": norm.to_dict()}, rng, STEP)
    audio_raw, _ = write_random_checkpoint(AudioVAETask.from_config(config), config.audio_vae_optim,
                                           config.audio_vae_train, f"{tok_dir}/audio_vae", config, {}, rng, STEP)
    return dict(run=run, tok=tok_dir, config=config, lm_ema=lm_ema, audio_vae_raw=audio_raw, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tts_run(tmp_path_factory):
    return write_tiny_tts_run(str(tmp_path_factory.mktemp("tts_run")))


@pytest.fixture(scope="module")
def tts_export(tts_run, tmp_path_factory):
    return export_run(tts_run["run"], str(tmp_path_factory.mktemp("tts_export") / "export"))


def test_export_holds_the_generator_the_tokenizer_and_the_audio_vae(tts_run, tts_export):
    run, (out, stdout) = tts_run, tts_export
    assert stdout == [f"exported lm to {out}", f"exported tokenizer to {out}/tokenizer.json",
                      f"exported audio_vae to {out}/audio_vae"]
    assert sorted(os.listdir(out)) == ["audio_vae", "config.json", "model.pt", "model.safetensors",
                                       "other_state.pth", "tokenizer.json"]
    with open(os.path.join(run["tok"], "text", "tokenizer.json"), "rb") as f, \
            open(os.path.join(out, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read()  # byte-identical
    config, tok, a = read_config(out), run["tokenizer"], run["config"].audio_vae
    assert config["multimodal"] == dict(arch="tts", tokenizer="tokenizer.json", text_vocab_size=512,
                                        tokenizer_vocab_size=tok.vocab_size, text_token_offset=0,
                                        special_tokens=tok.special, input="phonemes", latent_stop_id=EOD,
                                        max_frames=run["config"].tts.max_frames, audio_vae="audio_vae",
                                        sample_rate=16_000, hop_length=640, frame_rate=25.0, frames_per_step=2,
                                        positions="restart", position_scale=run["config"].tts.position_scale)
    k = config["kwargs"]
    assert (k["num_classes"], k["text_vocab_size"], k["max_len"], k["in_channels"]) == (0, 512, 192, 2 * a.latent_dim)
    assert config["latent_norm"] == {"scale": 0.8, "bias": 0.1} and config["source"]["step"] == STEP

    audio_config = read_config(os.path.join(out, "audio_vae"))
    assert audio_config["architecture"] == "AudioVAE" and audio_config["source"]["params"] == "raw"
    assert audio_config["source"]["checkpoint"] == os.path.abspath(os.path.join(run["tok"], "audio_vae"))
    assert audio_config["kwargs"] == dict(sample_rate=16_000, strides=[4, 4, 5, 8], channels=a.channels,
                                          latent_dim=a.latent_dim, std=a.std, max_channels=a.max_channels,
                                          res_dilations=list(a.res_dilations), kernel_size=7, activation="elu",
                                          output="tanh")
    # The exported audio σ-VAE is the checkpoint's (the task's param tree without discriminators).
    torch_vae, _ = load_audio_vae(out)
    jax_vae = make_audio_vae(run["config"])
    _assert_codec_matches(torch_vae, jax_vae, {"params": run["audio_vae_raw"]["params"]}, np.random.default_rng(1))


def _tts_rows(run: dict, rows: int = 2) -> dict[str, np.ndarray]:
    """Packed rows of TTS documents (pairs, singles, `<null>` prompts as configured) from the training pipeline
    (`TTSDocumentSource`, `make_packed_dataset`), over random phoneme ids and random latents of 2 speakers."""
    config, tok = run["config"], run["tokenizer"]
    rng = np.random.default_rng(0)
    ids = [np.asarray(i, np.int32) for i in tok.encode_batch(PHONEMES[:6])]
    mu = [rng.standard_normal((int(n), config.model.latent_dim)).astype(np.float32)
          for n in rng.integers(8, 30, len(ids))]
    data = SpeechDocuments(ids, mu, np.arange(len(ids)) % 2, PHONEMES[:6], config.model.max_len)
    source = TTSDocumentSource(data, seed=0, pair_rate=config.tts.pair_rate, null_prompt_rate=0.3)
    dataset = make_packed_dataset(source, config.model.max_len, rows, seed=0,
                                  latent_capacity=config.model.head_capacity, shuffle=False)
    return next(iter(dataset))


def test_tts_documents_match_jax(tts_run, tts_export):
    """Conditions, LM logits (p(<eod>) at every latent included) and diffusion-head outputs of the exported
    Transformer equal JAX's on packed TTS rows, with per-document positions and attention."""
    run, out = tts_run, tts_export[0]
    model, config = load_model(out)
    cfg = LatentLMConfig.from_config(run["config"])
    batch = _tts_rows(run)
    tokens, is_latent, segments, positions = (batch[k] for k in ("tokens", "is_latent", "segment_ids", "positions"))
    assert (tokens == EOD).sum() >= 2 and segments.max() >= 2 and is_latent.sum() > 40  # whole documents, packed
    rng = np.random.default_rng(1)
    latents = np.where(is_latent[..., None], batch["latents"], 0).astype(np.float32)
    t = rng.integers(0, 1000, tokens.shape)
    x_t = rng.standard_normal(latents.shape).astype(np.float32)
    m = LatentLM(cfg)

    @jax.jit
    def forward(p, tokens, latents, is_latent, positions, segments, x_t, t):
        cond, hidden = m.apply(p, tokens, latents, is_latent, positions, segments)
        return cond, m.apply(p, hidden, method=LatentLM.lm_logits), m.apply(p, x_t, t, cond, method=LatentLM.diffuse)

    inputs = dict(tokens=tokens, latents=latents, is_latent=is_latent, positions=positions, segments=segments,
                  x_t=x_t, t=t)
    want = dict(zip(("conditions", "logits", "head"), map(np.asarray, forward(run["lm_ema"], **inputs))))
    with torch.no_grad():
        tt = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        cond, hidden = model.forward_tokens(tt["tokens"].long(), tt["latents"], tt["is_latent"],
                                            positions=tt["positions"].long(), segment_ids=tt["segments"])
        got = dict(conditions=cond.numpy(), logits=model.lm_logits(hidden).numpy(),
                   head=model.diffuse_tokens(tt["x_t"], tt["t"].float(), cond).numpy())
    for name in want:
        assert np.abs(want[name]).max() > 0.05, name  # non-trivial values
        assert np.abs(got[name] - want[name]).max() <= TOL, name
    stop = config["multimodal"]["latent_stop_id"]
    p_stop = {k: jax.nn.softmax(v, axis=-1)[..., stop][is_latent] for k, v in (("jax", want["logits"]),
                                                                               ("torch", got["logits"]))}
    assert np.abs(np.asarray(p_stop["jax"]) - np.asarray(p_stop["torch"])).max() <= 1e-6


def _speak_both(run, model, params, max_frames: int, prompt_latents: int = 3, restart: bool = False,
                scale: float = 1.0):
    """The JAX generator's speech mode and `torch_tts.speak` on one prompt (phonemes, `<bod>`, latents), its null
    prompt and the JAX generator's own initial noise (`restart`: positions counted again from `<bod>`, times
    `scale`); returns
    ((latents, ended) JAX, (latents, ended) PyTorch)."""
    config, c = run["config"], run["config"].model.latent_dim
    task = make_generator_task(config, LatentNormalization(0.8, 0.1))
    rng = np.random.default_rng(2)
    z = rng.standard_normal((prompt_latents, c)).astype(np.float32)
    text = run["tokenizer"].encode(PHONEMES[0])
    items, null_items = [BOS, *text, BOD, *z], [BOS, NULL, BOD, *z]
    settings = GenerationSettings(max_new=max_frames + 1, num_latents=max_frames, num_steps=3, cfg_scale=2.0,
                                  prediction_type=task.prediction_type, boi_id=BOD, latent_stop_id=EOD,
                                  stop_ids=(EOD, EOS), restart_positions=restart, span_position_scale=scale)
    key = jax.random.PRNGKey(4)
    g = make_generator(task.model, task.schedule, settings)(params, make_prompt([items], c), key,
                                                           make_prompt([null_items], c))
    n = int(g.num_generated[0])
    ended = n > 0 and not g.is_latent[0, n - 1] and int(g.tokens[0, n - 1]) == EOD
    want = (np.asarray(g.latents[0, :n][np.asarray(g.is_latent[0, :n])]), bool(ended))
    noise = torch.from_numpy(np.stack([np.asarray(jax.random.normal(step_keys(key, i, 1)[1][0], (c,)))
                                       for i in range(max_frames + 1)]))

    def of(seq):
        return torch_tts.Items.of([x if np.ndim(x) == 0 else 0 for x in seq],
                                  [np.zeros(c, np.float32) if np.ndim(x) == 0 else x for x in seq],
                                  [np.ndim(x) > 0 for x in seq])

    sample_func = torch_sampling.make_sample_func(3, task.prediction_type)
    got = torch_tts.speak(model, of(items), of(null_items), sample_func=sample_func, cfg_scale=2.0,
                          max_frames=max_frames, latent_stop_id=EOD, bod_id=BOD, stop_ids=(EOD, EOS), noise=noise,
                          restart_positions=restart, position_scale=scale)
    return want, (got[0].numpy(), got[1])


def test_torch_speak_generates_what_the_jax_generator_does(tts_run, tts_export):
    """`torch_tts.speak` (PyTorch alone) against the JAX generator's speech mode from the same noise: a span that runs
    to `max_frames` (4 new latents after 3 prompt latents, then the LM head's greedy tokens), and one that the LM head
    ends with `<eod>` at once (its `<eod>` row made to point at the prompt's last hidden state)."""
    run, out = tts_run, tts_export[0]
    model, _ = load_model(out)
    (want, ended), (got, got_ended) = _speak_both(run, model, run["lm_ema"], max_frames=7)
    assert want.shape == got.shape == (4, run["config"].model.latent_dim) and not ended and not got_ended
    assert np.abs(want).max() > 0.05 and np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    # Positions counted again from `<bod>` (docs/method.md §12.2): both loops agree, on other latents.
    (restarted, _), (got, _) = _speak_both(run, model, run["lm_ema"], max_frames=7, restart=True)
    assert np.abs(got - restarted).max() <= 1e-4 and np.abs(restarted - want).max() > 1e-3
    (scaled, _), (got, _) = _speak_both(run, model, run["lm_ema"], max_frames=7, restart=True, scale=1.5)
    assert np.abs(got - scaled).max() <= 1e-4 and np.abs(scaled - restarted).max() > 1e-3

    # The <eod> row along the prompt's last hidden state (after the LM head's RMSNorm): p(<eod>) ≈ 1 right away.
    params, c = jax.tree.map(np.array, run["lm_ema"]), run["config"].model.latent_dim
    with torch.no_grad():
        head = [BOS, *run["tokenizer"].encode(PHONEMES[0]), BOD]  # `_speak_both`'s prompt without latents
        row = torch_tts._Row(model, torch_tts.Items.of(head, np.zeros((len(head), c), np.float32),
                                                       np.zeros(len(head), bool)), len(head))
        h = row.hidden[0] / row.hidden[0].pow(2).mean().sqrt()
        model.lm_head.weight[EOD] = 50 * h / h.norm()
        params["params"]["lm_head"]["kernel"][:, EOD] = model.lm_head.weight[EOD].numpy()
    (want, ended), (got, got_ended) = _speak_both(run, model, params, max_frames=7, prompt_latents=0)
    assert want.shape == got.shape == (0, c) and ended and got_ended


def test_torch_tts_cli_speaks_in_the_voice_of_a_recording(tts_export, tmp_path, capsys):
    """`python -m latent_lm.convert.torch_tts` on the export: a 0.2 s recording (5 latent frames at 25 Hz: 2 positions
    of 2 frames, the fifth dropped) as the reference, `--max_frames=4` (the span holds the prompt's 2 positions), so 2
    new positions, 4 frames; empty text is one error line."""
    out = tts_export[0]
    t = np.arange(3200) / 16_000
    write_wav(str(tmp_path / "ref.wav"), 0.3 * np.sin(2 * np.pi * 220 * t), 16_000)
    args = ["--export_dir", out, "--prompt", str(tmp_path / "ref.wav"), "--prompt_text", "a test",
            "--max_frames", "4", "--out", str(tmp_path / "speech.wav")]
    assert cli.run(torch_tts.main, [*args, "--text", "hello there"]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote 0.16 s of speech (4 latent frames, stopped at max_frames) to "
                                               f"{tmp_path}/speech.wav")
    audio = read_wav(str(tmp_path / "speech.wav"))
    assert audio.shape == (4 * 640,) and np.abs(audio).max() > 0
    assert cli.run(torch_tts.main, [*args, "--text", " "]) == 2
    assert capsys.readouterr().err.strip() == "error: --text is empty"


def test_import_round_trips_into_a_workdir_sharing_a_tokenizer(tts_run, tts_export, tmp_path, capsys):
    """`from_torch` with the embedded config: lm/ in the workdir, audio_vae/ and text/tokenizer.json where the speech
    stages read them (`../tok` of the new run), bit-exact; an image σ-VAE export into a TTS config is one error."""
    run, out = tts_run, tts_export[0]
    tok_dir = import_sharing_a_tokenizer(run, out, tmp_path, "audio_vae")
    config, mesh = run["config"], _one_device_mesh()
    rules = logical_rules(config.mesh)
    audio = to_torch.restore_state(AudioVAETask.from_config(config), config.audio_vae_optim, config.audio_vae_train,
                                   f"{tok_dir}/audio_vae", STEP, mesh, rules)
    _assert_same_params(jax.device_get(audio.params), run["audio_vae_raw"])

    image_export = str(tmp_path / "image_export")
    os.makedirs(os.path.join(image_export, "vae"))  # a σ-VAE where the audio σ-VAE should be
    assert cli.run(from_torch.main, ["--torch_dir", image_export, "--workdir", str(tmp_path / "other"),
                                     "--config", "configs/tts.py:tiny=1", "--what", "vae"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{image_export}/audio_vae" in err[0], err
    assert not os.path.exists(tmp_path / "other")


def test_missing_audio_vae_or_tokenizer_is_one_error_line(tts_run, tmp_path, capsys):
    """A run copied without its shared tokenizer dir: each --what names the path training would read; nothing is
    written. `--what=vae` of the intact run exports the audio σ-VAE alone; `load_audio_vae` of a directory without
    one says what holds it."""
    moved = str(tmp_path / "elsewhere" / "run")
    shutil.copytree(tts_run["run"], moved)
    out = str(tmp_path / "export")
    for what, message in [("lm", f"error: text tokenizer {tmp_path}/elsewhere/tok/text/tokenizer.json not found "
                                 f"(the run's data.tokenizer_workdir='../tok', relative to the workdir)"),
                          ("vae", f"error: no audio σ-VAE checkpoint under {tmp_path}/elsewhere/tok/audio_vae/"
                                  f"checkpoints (the run's data.tokenizer_workdir='../tok'")]:
        assert cli.run(to_torch.main, ["--workdir", moved, "--out", out, "--what", what]) == 2, what
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(message), (what, err)
    assert not os.path.exists(out)

    assert to_torch.export_workdir(tts_run["run"], out, what="vae") == {"audio_vae": f"{out}/audio_vae"}
    assert sorted(os.listdir(out)) == ["audio_vae"]
    with pytest.raises(ConversionError, match="only an export of a TTS run"):
        load_audio_vae(str(tmp_path))
