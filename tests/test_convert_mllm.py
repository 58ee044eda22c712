"""PyTorch export of a multimodal run (issue 15) that shares its tokenizer (issue 17), docs/pytorch.md §2.1.

A tiny `configs/mllm.py:tiny=1` run is written without training (random params in every leaf) with its σ-VAE and text
tokenizer in a sibling directory (`data.tokenizer_workdir="../tok"`): the export CLI finds them there for every
`--what`, ships `tokenizer.json` byte for byte, the PyTorch twin matches JAX on a packed text + latent row (LM logits,
conditions, diffusion head; fp32), the import round-trips bit-exactly, and a missing input is one error line."""

import contextlib
import io
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
from flax import traverse_util
from safetensors.torch import load_file

from configs import mllm
from conftest import write_random_checkpoint
from latent_lm import cli
from latent_lm.convert import from_torch, to_torch, torch_sampling
from latent_lm.convert.torch_files import load_model, load_tokenizer, read_config
from latent_lm.latents import LatentNormalization
from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.text.tokenizer import TextTokenizer, train_tokenizer
from latent_lm.training.batches import segment_positions
from latent_lm.training.tasks import VAETask, make_generator_task
from latent_lm.training.train_loop import load_state

TEXTS = ["a bold three, written small", "a thin seven leaning right", "the digit after four is five",
         "def f(x):\n    return x + 1  # Python docs", "an image of a wide zero", "two, eight and nine"] * 4
STEP = 7


def _one_device_mesh():
    return make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])


def write_tiny_mllm_run(root: str) -> dict:
    """`<root>/run`: lm/ checkpoints (step 7) of a `mllm.py:tiny=1` run (depth 1) sharing `<root>/tok` (vae/
    checkpoints and text/tokenizer.json) through `data.tokenizer_workdir="../tok"`, as `--mode=all` leaves them,
    without training or compiling: params random in every leaf, EMA other random values (as conftest.write_tiny_run).

    Returns dict(run, tok, config, lm_raw, lm_ema, vae_raw, tokenizer): host params and the TextTokenizer."""
    config = mllm.get_config("tiny=1")
    config.model.depth = 1
    config.data.tokenizer_workdir = "../tok"
    run, tok_dir = os.path.join(root, "run"), os.path.join(root, "tok")
    tokenizer = train_tokenizer(TEXTS, config.text.vocab_size)
    tokenizer.save(os.path.join(tok_dir, "text"))
    norm = LatentNormalization(scale=0.8, bias=0.1)  # not the identity: exports must carry it
    rng = np.random.default_rng(0)

    def write(task, optim, train, train_dir, meta):
        return write_random_checkpoint(task, optim, train, train_dir, config, meta, rng, STEP)

    lm_raw, lm_ema = write(make_generator_task(config, norm), config.optim, config.train, f"{run}/lm",
                           {"latent_norm": norm.to_dict()})
    vae_raw, _ = write(VAETask.from_config(config), config.vae_optim, config.vae_train, f"{tok_dir}/vae", {})
    return dict(run=run, tok=tok_dir, config=config, lm_raw=lm_raw, lm_ema=lm_ema, vae_raw=vae_raw,
                tokenizer=tokenizer)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_convert.py
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mllm_run(tmp_path_factory):
    return write_tiny_mllm_run(str(tmp_path_factory.mktemp("mllm_run")))


def export_run(run: str, out: str) -> tuple[str, list[str]]:
    """`python -m latent_lm.convert.to_torch --workdir=<run> --out=<out>` (--what=all): out and its stdout lines."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.run(to_torch.main, ["--workdir", run, "--out", out]) == 0
    return out, stdout.getvalue().splitlines()


@pytest.fixture(scope="module")
def mllm_export(mllm_run, tmp_path_factory):
    return export_run(mllm_run["run"], str(tmp_path_factory.mktemp("mllm_export") / "export"))


def _flat(params):
    return traverse_util.flatten_dict(params["params"], sep="/")


def _assert_same_params(got, want):
    a, b = _flat(jax.device_get(want)), _flat(got)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_export_holds_the_generator_the_shared_vae_the_tokenizer_and_round_trips(mllm_run, mllm_export):
    run, (out, stdout) = mllm_run, mllm_export
    assert stdout == [f"exported lm to {out}", f"exported tokenizer to {out}/tokenizer.json",
                      f"exported vae to {out}/vae"]
    with open(os.path.join(run["tok"], "text", "tokenizer.json"), "rb") as f, \
            open(os.path.join(out, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read()  # byte-identical
    config = read_config(out)
    tok = run["tokenizer"]
    assert config["multimodal"] == dict(arch="mllm", tokenizer="tokenizer.json", text_vocab_size=1024,
                                        tokenizer_vocab_size=tok.vocab_size, text_token_offset=0,
                                        special_tokens=tok.special, latents_per_image=49, latent_grid_size=7)
    k = config["kwargs"]
    assert (k["num_classes"], k["text_vocab_size"], k["input_size"], k["max_len"]) == (0, 1024, 7, 128)
    assert config["latent_norm"] == {"scale": 0.8, "bias": 0.1} and config["source"]["params"] == "ema"
    other = torch.load(os.path.join(out, "other_state.pth"), weights_only=True)
    assert (other["scaling_factor"], other["bias_factor"], other["steps"]) == (0.8, 0.1, STEP)
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert tuple(sd["text_embedder.weight"].shape) == (1024, 32) and tuple(sd["lm_head.weight"].shape) == (1024, 32)
    assert not any(key.startswith("y_embedder") for key in sd)  # no class table: text conditions the images

    back, _ = from_torch.read_torch_params(out, LatentLMConfig.from_config(run["config"]))
    _assert_same_params(back, run["lm_ema"])
    vdir = os.path.join(out, "vae")
    vback, vconfig = from_torch.read_torch_params(vdir, VAETask.from_config(run["config"]).model)
    _assert_same_params(vback, run["vae_raw"])
    assert vconfig["source"]["checkpoint"] == os.path.abspath(os.path.join(run["tok"], "vae"))  # the shared one


def test_every_what_finds_the_shared_vae_and_tokenizer(mllm_run, tmp_path):
    lm_out, vae_out = str(tmp_path / "lm"), str(tmp_path / "vae_only")
    to_torch.export_workdir(mllm_run["run"], lm_out, what="lm", params="raw", mesh=_one_device_mesh())
    assert sorted(os.listdir(lm_out)) == ["config.json", "model.pt", "model.safetensors", "other_state.pth",
                                          "tokenizer.json"]
    to_torch.export_workdir(mllm_run["run"], vae_out, what="vae", mesh=_one_device_mesh())
    assert sorted(os.listdir(vae_out)) == ["vae"]
    assert read_config(os.path.join(vae_out, "vae"))["architecture"] == "SigmaVAE"


def test_export_reads_the_vae_from_data_vae_workdir(mllm_run, tmp_path, capsys):
    """A run that reads another run's σ-VAE in place (`data.vae_workdir`, docs/experiments.md §10.4; its own
    tokenizer dir has none) exports that one; a vae_workdir without checkpoints is one line naming the setting."""
    config = mllm_run["config"].copy_and_resolve_references()
    config.data.update(dict(tokenizer_workdir="", vae_workdir=mllm_run["tok"]))
    run = tmp_path / "reader"
    run.mkdir()
    (run / "config.json").write_text(config.to_json())
    to_torch.export_workdir(str(run), str(tmp_path / "out"), what="vae", mesh=_one_device_mesh())
    source = read_config(str(tmp_path / "out" / "vae"))["source"]
    assert source["checkpoint"] == os.path.join(mllm_run["tok"], "vae") and source["step"] == STEP
    config.data.vae_workdir = "../nowhere"
    (run / "config.json").write_text(config.to_json())
    assert cli.run(to_torch.main, ["--workdir", str(run), "--what", "vae"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: no σ-VAE checkpoint under {tmp_path}/nowhere/vae/checkpoints (the run's "
                   f"data.vae_workdir='../nowhere', relative to the workdir)"]


def _packed_rows(tok: TextTokenizer, seq_len: int, n: int, c: int, rng):
    """Two rows: [t2i document | i2t document | padding] and [a text paragraph | padding], as the packer lays them
    out (data_pipelines/packing.py): one segment id per document, pads in segment 0."""
    def doc(*parts):
        ids, lat = [], []
        for p in parts:
            if p == "image":
                ids += [tok.boi_id] + [tok.pad_id] * n + [tok.eoi_id]
                lat += [False] + [True] * n + [False]
            else:
                ids += p
                lat += [False] * len(p)
        return ids, lat

    docs = [[doc([tok.bos_id] + tok.encode("a bold three"), "image", [tok.eos_id]),
             doc([tok.bos_id], "image", tok.encode("a thin seven leaning right") + [tok.eos_id])],
            [doc([tok.bos_id] + tok.encode(" ".join(TEXTS[:6]))[:seq_len - 10] + [tok.eos_id])]]
    tokens = np.full((2, seq_len), tok.pad_id, np.int32)
    is_latent = np.zeros((2, seq_len), bool)
    segments = np.zeros((2, seq_len), np.int32)
    for r, row in enumerate(docs):
        at = 0
        for s, (ids, lat) in enumerate(row, start=1):
            tokens[r, at:at + len(ids)], is_latent[r, at:at + len(ids)], segments[r, at:at + len(ids)] = ids, lat, s
            at += len(ids)
        assert at <= seq_len
    latents = np.where(is_latent[..., None], rng.standard_normal((2, seq_len, c)), 0).astype(np.float32)
    return tokens, latents, is_latent, segments


def test_packed_multimodal_sequence_matches_jax(mllm_run, mllm_export):
    """LM logits, conditions and diffusion-head outputs of the PyTorch twin equal JAX's (fp32) on packed rows of text
    and image latents, with per-document positions and attention."""
    run, (out, _) = mllm_run, mllm_export
    model, _ = load_model(out)
    cfg = LatentLMConfig.from_config(run["config"])
    params = run["lm_ema"]
    rng = np.random.default_rng(0)
    tokens, latents, is_latent, segments = _packed_rows(run["tokenizer"], cfg.max_len, 49, cfg.latent_dim, rng)
    positions = np.array(segment_positions(jnp.asarray(segments)))
    assert positions[0].max() < 70 and positions[1, 0] == 0  # documents restart at 0
    t = rng.integers(0, 1000, tokens.shape)
    x_t = rng.standard_normal(latents.shape).astype(np.float32)
    m = LatentLM(cfg)

    @jax.jit
    def forward(p, tokens, latents, is_latent, positions, segments, x_t, t):
        cond, hidden = m.apply(p, tokens, latents, is_latent, positions, segments)
        return cond, m.apply(p, hidden, method=LatentLM.lm_logits), m.apply(p, x_t, t, cond, method=LatentLM.diffuse)

    cond, logits, head = map(np.asarray, forward(params, *map(jnp.asarray, (tokens, latents, is_latent, positions,
                                                                             segments, x_t, t))))
    with torch.no_grad():
        tt = {k: torch.from_numpy(v) for k, v in dict(tokens=tokens, latents=latents, is_latent=is_latent,
                                                        positions=positions, segments=segments, x_t=x_t, t=t).items()}
        t_cond, t_hidden = model.forward_tokens(tt["tokens"].long(), tt["latents"], tt["is_latent"],
                                                positions=tt["positions"], segment_ids=tt["segments"])
        t_logits = model.lm_logits(t_hidden)
        t_head = model.diffuse_tokens(tt["x_t"], tt["t"].float(), t_cond)
        # One image through the official per-image signature: the conditions that predict its 49 latents.
        first = int(np.argmax(is_latent[0]))
        img = slice(first - 1, first + 48)
        t_img = model.forward_diffusion(tt["x_t"][:1, img].permute(0, 2, 1).reshape(1, cfg.latent_dim, 7, 7),
                                        tt["t"][:1, img].float(), t_cond[:1, img])
        unpacked, _ = model.forward_tokens(tt["tokens"].long(), tt["latents"], tt["is_latent"])
    for name, got, want in [("conditions", t_cond, cond), ("lm logits", t_logits, logits), ("head", t_head, head)]:
        assert np.abs(want).max() > 0.05, name  # non-trivial values
        assert np.abs(got.numpy() - want).max() <= 1e-5, name
    assert np.abs(t_img.reshape(cfg.latent_dim, 49).T.numpy() - head[0, img]).max() <= 1e-5
    second_doc = segments[0] == 2
    assert np.abs(unpacked.numpy()[0, second_doc] - cond[0, second_doc]).max() > 1e-3  # the packing matters


def test_exported_tokenizer_encodes_like_the_text_tokenizer(mllm_run, mllm_export):
    out, tok = mllm_export[0], mllm_run["tokenizer"]
    plain = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    texts = TEXTS[:6] + ["unseen wörds ∑ 数字 😀", ""]
    for text in texts:
        assert plain.encode(text, add_special_tokens=False).ids == tok.encode(text)
        assert plain.decode(tok.encode(text), skip_special_tokens=False) == text
    assert {name: plain.token_to_id(name) for name in tok.special} == read_config(out)["multimodal"]["special_tokens"]
    # A special token's spelling inside text stays text in training; `load_tokenizer` sets the tokenizers flag.
    spelled = "a caption that spells <boi> and <eos>"
    assert load_tokenizer(out).encode(spelled, add_special_tokens=False).ids == tok.encode(spelled)
    assert tok.boi_id not in tok.encode(spelled)


def import_sharing_a_tokenizer(run: dict, out: str, root, vae: str) -> str:
    """`from_torch.import_workdir(out)` into `<root>/ft/run` with the run's embedded config: lm/ there, `vae` (vae or
    audio_vae) and text/tokenizer.json in `../tok`; checks what it wrote, the tokenizer's bytes and the generator (the
    run's EMA, bit-exact, at STEP). Returns the tokenizer dir."""
    new, tok_dir = str(root / "ft" / "run"), str(root / "ft" / "tok")
    written = from_torch.import_workdir(out, new, what="all", step=STEP, mesh=_one_device_mesh())
    assert written == {vae: f"{tok_dir}/{vae}/checkpoints/{STEP}", "lm": f"{new}/lm/checkpoints/{STEP}",
                       "tokenizer": f"{tok_dir}/text/tokenizer.json"}
    with open(written["tokenizer"], "rb") as f, open(os.path.join(out, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read()
    config = run["config"]
    task = make_generator_task(config, LatentNormalization(0.8, 0.1))
    state = load_state(task, optim_config=config.optim, train_config=config.train, mesh=_one_device_mesh(),
                       rules=logical_rules(config.mesh), workdir=f"{new}/lm")
    assert int(state.step) == STEP
    _assert_same_params(jax.device_get(state.params), run["lm_ema"])
    return tok_dir


def test_import_round_trips_into_a_workdir_sharing_a_tokenizer(mllm_run, mllm_export, tmp_path, capsys):
    """`from_torch` with the embedded config: lm/ in the workdir, vae/ and text/tokenizer.json where training reads
    them (`../tok` of the new run), bit-exact; a different tokenizer already there is one clear error."""
    run, out = mllm_run, mllm_export[0]
    tok_dir = import_sharing_a_tokenizer(run, out, tmp_path, "vae")
    config = run["config"]
    vstate = to_torch.restore_state(VAETask.from_config(config), config.vae_optim, config.vae_train, f"{tok_dir}/vae",
                                    STEP, _one_device_mesh(), logical_rules(config.mesh))
    _assert_same_params(jax.device_get(vstate.params), run["vae_raw"])

    other = str(tmp_path / "other" / "run")
    train_tokenizer(TEXTS[:2], 300).save(str(tmp_path / "other" / "tok" / "text"))
    assert cli.run(from_torch.main, ["--torch_dir", out, "--workdir", other, "--what", "lm"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path}/other/tok/text/tokenizer.json already holds "
                                               f"another text tokenizer")
    assert not os.path.exists(other)  # nothing written


def test_missing_tokenizer_or_vae_is_one_error_line_and_status_2(mllm_run, mllm_export, tmp_path, capsys):
    """A run copied without its shared tokenizer dir: the export names the path training would read. Also one line:
    the class-conditional PyTorch sampler on a multimodal export, and an import of an export without tokenizer.json."""
    moved = str(tmp_path / "elsewhere" / "run")
    shutil.copytree(mllm_run["run"], moved)
    out = str(tmp_path / "export")
    for what, message in [("lm", f"error: text tokenizer {tmp_path}/elsewhere/tok/text/tokenizer.json not found "
                                 f"(the run's data.tokenizer_workdir='../tok', relative to the workdir)"),
                          ("all", f"error: text tokenizer {tmp_path}/elsewhere/tok/text/tokenizer.json not found"),
                          ("vae", f"error: no σ-VAE checkpoint under {tmp_path}/elsewhere/tok/vae/checkpoints (the "
                                  f"run's data.tokenizer_workdir='../tok'")]:
        assert cli.run(to_torch.main, ["--workdir", moved, "--out", out, "--what", what]) == 2, what
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(message), (what, err)
    assert not os.path.exists(out)  # found missing before anything is written

    assert cli.run(torch_sampling.main, ["--export_dir", mllm_export[0]]) == 2  # class-conditional sampler only
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "holds a model without classes (a multimodal run)" in err[0]

    no_tok = str(tmp_path / "export_without_tokenizer")
    shutil.copytree(mllm_export[0], no_tok)
    os.remove(os.path.join(no_tok, "tokenizer.json"))
    assert cli.run(from_torch.main, ["--torch_dir", no_tok, "--workdir", str(tmp_path / "imp")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {no_tok}/tokenizer.json not found")
