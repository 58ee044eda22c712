"""PyTorch export/import (issue #6): official keys, JAX ↔ PyTorch parity (fp32, CPU), bit-exact round trips, the
three CLIs (to_torch, from_torch, torch_sampling) on a workdir, resuming training from an imported checkpoint, and
one clear error for bad input."""

import dataclasses
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from safetensors.torch import load_file, save_file

from configs import default
from data_pipelines.latent_cache import make_latent_dataset, write_latent_cache
from latent_lm import cli
from latent_lm.convert import from_torch, param_mapping, to_torch, torch_modules, torch_sampling
from latent_lm.convert.torch_files import ConversionError, load_model, read_config
from latent_lm.diffusion import dpm_solver_sample, make_schedule
from latent_lm.models.dit import DiT, DiTConfig
from latent_lm.models.latent_lm import init_cache, LatentLM, LatentLMConfig
from latent_lm.training.batches import class_conditional_batch
from latent_lm.models.sigma_vae import SigmaVAE
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.sampling import SamplerSettings, sample_dit_latents, sample_latents
from latent_lm.training.metrics_writer import read_metrics
from latent_lm.training.tasks import DiTTask, VAETask, make_generator_task
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import load_state, train

# The configuration official_state_dict_keys.md records (input_size 4, C 4, D 64, depth 2, head depth 2, 4 heads,
# 10 classes), with its state-dict keys and shapes in order.
OFFICIAL_CFG = LatentLMConfig(width=64, depth=2, num_heads=4, latent_dim=4, head_depth=2, num_classes=10, max_len=16)
OFFICIAL_KEYS = [
    ("x_embedder.proj.weight", (64, 4, 1, 1)), ("x_embedder.proj.bias", (64,)),
    ("noisy_x_embedder.proj.weight", (64, 4, 1, 1)), ("noisy_x_embedder.proj.bias", (64,)),
    ("t_embedder.mlp.0.weight", (64, 256)), ("t_embedder.mlp.2.weight", (64, 64)),
    ("y_embedder.embedding_table.weight", (11, 64)),
    *[(f"blocks.{i}.{k}", s) for i in range(2) for k, s in (
        ("attn.qkv.weight", (192, 64)), ("attn.proj.weight", (64, 64)), ("mlp.fc1.weight", (128, 64)),
        ("mlp.gate.weight", (128, 64)), ("mlp.fc2.weight", (64, 128)))],
    *[(f"diffusion_blocks.{i}.{k}", s) for i in range(2) for k, s in (
        ("mlp.fc1.weight", (128, 64)), ("mlp.gate.weight", (128, 64)), ("mlp.fc2.weight", (64, 128)),
        ("adaLN_modulation.1.weight", (192, 64)))],
    ("condition_layer.linear.weight", (64, 64)), ("final_layer.linear.weight", (4, 64)),
    ("final_layer.adaLN_modulation.1.weight", (128, 64)),
]
GQA_CFG = LatentLMConfig(width=64, depth=2, num_heads=4, num_kv_heads=2, latent_dim=4, head_depth=2, num_classes=10,
                         max_len=16)
TEXT_CFG = LatentLMConfig(width=64, depth=2, num_heads=4, latent_dim=3, head_depth=1, head_mlp_ratio=2.0,
                          num_classes=3, text_vocab_size=7, max_len=12)
VAE_SMALL = SigmaVAE(image_size=32, in_channels=3, patch_size=8, width=64, depth=2, num_heads=4, latent_dim=4)
# The DiT configuration official_state_dict_keys.md records (input_size 4, C 4, D 64, depth 2, 4 heads, 10 classes).
DIT_CFG = DiTConfig(width=64, depth=2, num_heads=4, latent_dim=4, num_classes=10, max_len=16)
DIT_KEYS = [
    ("pos_embed", (1, 16, 64)), ("x_embedder.proj.weight", (64, 4, 1, 1)), ("x_embedder.proj.bias", (64,)),
    ("t_embedder.mlp.0.weight", (64, 256)), ("t_embedder.mlp.2.weight", (64, 64)),
    ("y_embedder.embedding_table.weight", (11, 64)),
    *[(f"blocks.{i}.{k}", s) for i in range(2) for k, s in (
        ("attn.qkv.weight", (192, 64)), ("attn.proj.weight", (64, 64)), ("mlp.fc1.weight", (128, 64)),
        ("mlp.gate.weight", (128, 64)), ("mlp.fc2.weight", (64, 128)), ("adaLN_modulation.1.weight", (384, 64)))],
    ("final_layer.linear.weight", (4, 64)), ("final_layer.adaLN_modulation.1.weight", (128, 64)),
]
DIT_GQA = dataclasses.replace(DIT_CFG, num_kv_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """PyTorch's intra-op threads spin against the other test worker's: the tiny export sampled 20 images in 18 s
    with 2 threads and 0.5 s with 1 on this 2-core machine under load (docs/pytorch.md §4.1 saw the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_params(init_fn, seed: int = 0, std: float = 0.05):
    """N(0, std²) for every parameter of `init_fn`'s tree (shapes from eval_shape: nothing to compile), so the
    zero-initialised head layers are exercised too."""
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), jnp.float32), abstract)


@functools.lru_cache(maxsize=None)
def _lm_params(cfg):
    n = cfg.max_len
    return _random_params(lambda k: LatentLM(cfg).init(k, jnp.zeros((1, n), jnp.int32),
                                                       jnp.zeros((1, n, cfg.latent_dim)), jnp.zeros((1, n), bool)))


@functools.lru_cache(maxsize=None)
def _dit_params(cfg):
    labels = jnp.zeros((1,), jnp.int32)
    return _random_params(lambda k: DiT(cfg).init(k, jnp.zeros((1, cfg.max_len, cfg.latent_dim)), labels, labels))


@functools.lru_cache(maxsize=None)
def _vae_params():
    return _random_params(lambda k: VAE_SMALL.init(k, jnp.zeros((1, 32, 32, 3)), rng=k))


def _export_lm(tmp_path, cfg, params, name="lm", **kw):
    out = str(tmp_path / name)
    to_torch.export_latent_lm(params, cfg, out, **kw)
    return out


def _to_nchw(x, side):  # JAX [B, T, C] → PyTorch (B, C, h, w)
    return torch.from_numpy(np.array(x)).permute(0, 2, 1).reshape(x.shape[0], x.shape[2], side, side)


def _to_btc(x):  # PyTorch (B, C, h, w) → [B, T, C]
    return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1).numpy()


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A random GQA LatentLM, its export, and the PyTorch model loaded from the export."""
    params = _lm_params(GQA_CFG)
    out = _export_lm(tmp_path_factory.mktemp("gqa"), GQA_CFG, params,
                     diffusion=dict(prediction_type="v_prediction", schedule="cosine", num_train_steps=1000,
                                    num_sampling_steps=5, cfg_scale=3.0, x0_clip=None))
    model, _ = load_model(out)
    return params, model


def test_keys_shapes_and_order_are_the_official_ones(tmp_path):
    out = _export_lm(tmp_path, OFFICIAL_CFG, _lm_params(OFFICIAL_CFG))
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(OFFICIAL_KEYS)  # safetensors sorts its keys
    pt = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in pt.items()] == OFFICIAL_KEYS  # state-dict order kept
    config = read_config(out)
    assert config["architecture"] == "Transformer" and config["kwargs"]["input_size"] == 4
    other = torch.load(os.path.join(out, "other_state.pth"), weights_only=True)
    assert set(other) == {"scaling_factor", "bias_factor", "steps", "ema"}
    # GQA shrinks only the fused qkv rows: D + 2·n_kv·d_head.
    qkv = next(r for r in param_mapping.latent_lm_table(GQA_CFG) if r.torch_keys == ("blocks.0.attn.qkv.weight",))
    assert qkv.to_torch(np.zeros((64, 4, 16)), np.zeros((64, 2, 16)), np.zeros((64, 2, 16)))[0].shape == (128, 64)


def test_conditions_and_head_match_jax(gqa):
    params, model = gqa
    rng = np.random.default_rng(0)
    b, n, c = 3, 16, 4
    lat = rng.standard_normal((b, n, c)).astype(np.float32)
    labels = np.array([1, 5, 10])  # 10 = the null class
    batch = class_conditional_batch(jnp.asarray(lat), jnp.asarray(labels))
    cond, _ = jax.jit(LatentLM(GQA_CFG).apply)(params, batch["tokens"], batch["latents"], batch["is_latent"])
    with torch.no_grad():
        t_cond = model.forward_parallel(_to_nchw(lat, 4), torch.from_numpy(labels)).numpy()
    assert np.abs(t_cond - np.asarray(cond)).max() <= 1e-5

    t = rng.integers(0, 1000, (b, n))
    x_t = rng.standard_normal((b, n, c)).astype(np.float32)
    out = jax.jit(lambda *a: LatentLM(GQA_CFG).apply(params, *a, method=LatentLM.diffuse))(
        jnp.asarray(x_t), jnp.asarray(t), cond)
    with torch.no_grad():
        t_out = model.forward_diffusion(_to_nchw(x_t, 4), torch.from_numpy(t).float(), torch.from_numpy(t_cond))
    assert np.abs(np.asarray(out)).max() > 0.1  # a non-trivial head
    assert np.abs(_to_btc(t_out) - np.asarray(out)).max() <= 1e-5


def test_incremental_conditions_with_kv_cache_match_jax(gqa):
    params, model = gqa
    model_j = LatentLM(GQA_CFG)
    rng = np.random.default_rng(1)
    b, n, c = 2, 16, 4
    lat = rng.standard_normal((b, n, c)).astype(np.float32)
    labels = np.array([3, 7])

    @jax.jit
    def step(tokens, latents, is_latent, pos, caches):
        h = model_j.apply(params, tokens, latents, is_latent, method=LatentLM.embed)
        cond, _, caches = model_j.apply(params, h, pos, caches, method=LatentLM.backbone_forward)
        return cond[:, -1], caches

    caches = init_cache(GQA_CFG, b, n)
    jax_conds, torch_conds, state = [], [], {}
    for i in range(n):
        if i == 0:
            toks, lats, is_lat = labels[:, None], np.zeros((b, 1, c), np.float32), np.zeros((b, 1), bool)
        else:
            toks, lats, is_lat = np.zeros((b, 1), np.int32), lat[:, i - 1:i], np.ones((b, 1), bool)
        cond, caches = step(jnp.asarray(toks, jnp.int32), jnp.asarray(lats), jnp.asarray(is_lat),
                            jnp.full((b, 1), i), caches)
        jax_conds.append(np.asarray(cond))
        x = torch.from_numpy(labels) if i == 0 else torch.from_numpy(lat[:, i - 1]).reshape(b, c, 1, 1)
        with torch.no_grad():
            torch_conds.append(model.forward_recurrent(x, start_pos=i, incremental_state=state)[:, 0].numpy())
    assert np.abs(np.stack(torch_conds) - np.stack(jax_conds)).max() <= 1e-5
    assert state[0]["key"].shape == (b, n, 2, 16)  # per-layer caches [B, S, n_kv, d_head]


def test_cfg_sampling_from_the_same_noise_gives_the_same_latents(gqa):
    params, model = gqa
    b, n, c = 4, 16, 4
    noise = np.random.default_rng(2).standard_normal((n, b, c)).astype(np.float32)
    labels = np.array([0, 3, 6, 9])
    settings = SamplerSettings(num_steps=5, cfg_scale=3.0, prediction_type="v_prediction")
    z_jax = jax.jit(lambda p, y, e: sample_latents(LatentLM(GQA_CFG), p, y[:, None], e, make_schedule("cosine"),
                                                   settings))(params, jnp.asarray(labels), jnp.asarray(noise))
    z_torch = torch_sampling.generate(model, torch.from_numpy(labels), cfg_scale=3.0, num_steps=5,
                                      prediction_type="v_prediction", noise=torch.from_numpy(noise))
    assert np.abs(np.asarray(z_jax)).max() > 0.1
    assert np.abs(_to_btc(z_torch) - np.asarray(z_jax)).max() <= 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_torch_dpm_solver_matches_the_jax_solver(prediction_type):
    """Same smooth model, same x_T: the PyTorch per-step solver equals the JAX precomputed-coefficient one."""
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    w = np.random.default_rng(4).standard_normal((4, 4)).astype(np.float32) * 0.3

    def jax_fn(x, t):
        return jnp.tanh(x @ w) + t[..., None] / 1000.0

    def torch_fn(x, t):
        return torch.tanh(x @ torch.from_numpy(w)) + t[:, None] / 1000.0

    k = 6  # first-order first and last steps, second-order midpoint steps between
    ref = np.asarray(dpm_solver_sample(jax_fn, jnp.asarray(x), make_schedule("cosine"), k, prediction_type))
    got = torch_sampling.dpm_solver_pp(torch_fn, torch.from_numpy(x), torch_sampling.alphas_cumprod(), k,
                                       prediction_type).numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(torch_sampling.alphas_cumprod().numpy(),
                                  np.asarray(make_schedule("cosine").alphas_cumprod))


def test_text_model_tokens_and_logits_match_jax(tmp_path):
    params = _lm_params(TEXT_CFG)
    out = _export_lm(tmp_path, TEXT_CFG, params)
    model, config = load_model(out)
    assert config["kwargs"]["text_vocab_size"] == 7 and config["kwargs"]["max_len"] == 12
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, TEXT_CFG.embed_rows, (2, 12)).astype(np.int32)
    is_latent = rng.random((2, 12)) < 0.4
    lat = rng.standard_normal((2, 12, 3)).astype(np.float32)
    m = LatentLM(TEXT_CFG)

    @jax.jit
    def forward(p, tokens, lat, is_latent):
        cond, hidden = m.apply(p, tokens, lat, is_latent)
        return cond, m.apply(p, hidden, method=LatentLM.lm_logits)

    cond, logits = forward(params, jnp.asarray(tokens), jnp.asarray(lat), jnp.asarray(is_latent))
    with torch.no_grad():
        t_cond, t_hidden = model.forward_tokens(torch.from_numpy(tokens).long(), torch.from_numpy(lat),
                                                torch.from_numpy(is_latent))
        t_logits = model.lm_logits(t_hidden)
    assert np.abs(t_cond.numpy() - np.asarray(cond)).max() <= 1e-5
    assert np.abs(t_logits.numpy() - np.asarray(logits)).max() <= 1e-5


def test_pytorch_side_needs_no_jax():
    code = ("import sys, latent_lm.convert.torch_sampling, latent_lm.convert.torch_files; "
            "print(sorted(m for m in ('jax', 'flax', 'orbax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _flat(params):
    return traverse_util.flatten_dict(params["params"], sep="/")


def test_round_trip_is_bit_exact_and_bf16_export_rounds(tmp_path):
    params = _lm_params(TEXT_CFG)
    out = _export_lm(tmp_path, TEXT_CFG, params)
    back, _ = from_torch.read_torch_params(out, TEXT_CFG)
    a, b = _flat(jax.device_get(params)), _flat(back)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), b[k]), k
    os.remove(os.path.join(out, "model.safetensors"))  # the .pt file round-trips too
    back_pt, _ = from_torch.read_torch_params(out, TEXT_CFG)
    assert all(np.array_equal(b[k], _flat(back_pt)[k]) for k in b)

    vae_params = _vae_params()
    vout = str(tmp_path / "vae")
    to_torch.export_sigma_vae(vae_params, VAE_SMALL, vout)
    vback, _ = from_torch.read_torch_params(vout, VAE_SMALL)
    a, b = _flat(jax.device_get(vae_params)), _flat(vback)
    assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), b[k]) for k in a)

    bf = _export_lm(tmp_path, TEXT_CFG, params, name="bf16", dtype="bfloat16")
    sd = load_file(os.path.join(bf, "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    want = np.asarray(jnp.asarray(params["params"]["condition_layer"]["linear"]["kernel"], jnp.bfloat16)
                      .astype(jnp.float32)).T
    assert np.array_equal(sd["condition_layer.linear.weight"].float().numpy(), want)


def test_sigma_vae_keys_and_outputs_match(tmp_path):
    params = _vae_params()
    out = str(tmp_path / "vae")
    to_torch.export_sigma_vae(params, VAE_SMALL, out)
    model, _ = load_model(out)
    sd = model.state_dict()
    assert len(sd) == 70  # SigmaVAE_small in official_state_dict_keys.md
    for key, shape in [("encoder.cls_token", (1, 1, 64)), ("encoder.pos_embed", (1, 17, 64)),
                       ("encoder.patch_embed.proj.weight", (64, 3, 8, 8)), ("encoder.blocks.1.attn.q_bias", (64,)),
                       ("encoder.blocks.0.attn.qkv.weight", (192, 64)),
                       ("encoder_post_processor.dense.weight", (4, 64)),
                       ("decoder.patch_embed.proj.weight", (64, 4, 1, 1)), ("decoder.pos_embed", (1, 17, 64)),
                       ("decoder_post_processor.fc2.weight", (192, 64)), ("decoder_post_processor.fc2.bias", (192,))]:
        assert tuple(sd[key].shape) == shape, key
    images = np.random.default_rng(6).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    mu, rec = jax.jit(lambda p, x: (lambda m: (m, VAE_SMALL.apply(p, m, method=SigmaVAE.decode)))(
        VAE_SMALL.apply(p, x, method=SigmaVAE.encode)))(params, jnp.asarray(images))
    with torch.no_grad():
        t_mu = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).mode()
        t_rec = model.decode(_to_nchw(np.asarray(mu), 4))
    assert np.abs(_to_btc(t_mu) - np.asarray(mu)).max() <= 1e-5
    assert np.abs(t_rec.permute(0, 2, 3, 1).numpy() - np.asarray(rec)).max() <= 1e-5


def test_bad_input_gives_one_clear_error_naming_the_key(tmp_path):
    params = _lm_params(TEXT_CFG)
    out = _export_lm(tmp_path, TEXT_CFG, params)
    vout = str(tmp_path / "vae")
    to_torch.export_sigma_vae(_vae_params(), VAE_SMALL, vout)
    with pytest.raises(ConversionError, match="'SigmaVAE' is not a LatentLM"):  # another architecture
        from_torch.read_torch_params(vout, TEXT_CFG)
    with pytest.raises(ConversionError, match="the checkpoint has no parameter 'backbone/blocks/attn/key/kernel'"):
        to_torch.export_latent_lm(_vae_params(), TEXT_CFG, str(tmp_path / "x"))
    with pytest.raises(ConversionError, match="hidden_size=64 but the experiment config has model.width=96"):
        from_torch.read_torch_params(out, dataclasses.replace(TEXT_CFG, width=96))

    st = os.path.join(out, "model.safetensors")
    sd = load_file(st)
    missing = dict(sd)
    del missing["blocks.1.mlp.gate.weight"]
    save_file(missing, st)
    with pytest.raises(ConversionError, match="missing key 'blocks.1.mlp.gate.weight'"):
        from_torch.read_torch_params(out, TEXT_CFG)
    with pytest.raises(ConversionError, match="missing key 'blocks.1.mlp.gate.weight'"):
        load_model(out)
    wrong = dict(sd, **{"final_layer.linear.weight": torch.zeros(5, 64)})
    save_file(wrong, st)
    with pytest.raises(ConversionError, match=r"key 'final_layer.linear.weight' has shape \[5, 64\] but the model "
                                              r"expects \[3, 64\]"):
        from_torch.read_torch_params(out, TEXT_CFG)
    extra = dict(sd, **{"pos_embed": torch.zeros(1, 12, 32)})
    save_file(extra, st)
    with pytest.raises(ConversionError, match="unexpected key 'pos_embed'"):
        from_torch.read_torch_params(out, TEXT_CFG)


def _resume_config(steps):
    c = default.get_config()
    c.model.update(dict(width=32, depth=1, num_heads=4, max_len=16, latent_dim=4))
    c.vae.latent_dim = 4
    c.head.depth = 1
    c.diffusion.batch_mul = 2
    c.train.update(dict(steps=steps, batch_size=32, log_every=1, seed=0))
    c.optim.update(dict(lr=3e-3, warmup_steps=5, ema_decay=0.9))
    c.checkpoint.update(dict(every=1000, async_save=False))
    return c


def _write_latents(workdir):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 256).astype(np.int32)
    latents = ((labels[:, None, None] - 4.5) / 3 + 0.2 * rng.standard_normal((256, 16, 4))).astype(np.float32)
    write_latent_cache(f"{workdir}/latents/train", latents, labels, {"latent_norm": {"scale": 1.0, "bias": 0.0}})


def _one_device_mesh():
    return make_mesh(ml_collections.ConfigDict(dict(shape=(1, 1, 1))), jax.devices()[:1])


def _train_lm(config, workdir):
    task = make_generator_task(config, LatentNormalization(1.0, 0.0))
    data = iter(make_latent_dataset(f"{workdir}/latents/train", config.train.batch_size, seed=config.train.seed,
                                    expected_shape=(16, 4)))
    return task, train(task, data, optim_config=config.optim, train_config=config.train, mesh=_one_device_mesh(),
                       rules=logical_rules(config.mesh), workdir=f"{workdir}/lm",
                       meta={"config": config.to_json(), "latent_norm": task.norm.to_dict()},
                       checkpoint_config=config.checkpoint, log=lambda s: None)


@pytest.mark.slow
def test_imported_checkpoint_resumes_and_continues_the_loss_curve(tmp_path):
    """Train 40 steps, export (the CLI; restored onto the 8-device mesh), import at step 40, train 20 more.

    Slow (two training runs, each its own compile). Fast sibling without training:
    test_from_torch_cli_imports_an_export_into_a_workdir."""
    a, b, out = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "export")
    _write_latents(a)
    _write_latents(b)
    task, res_a = _train_lm(_resume_config(40), a)
    to_torch.main(["--workdir", a, "--out", out, "--what", "lm", "--params", "raw"])
    assert read_config(out)["source"]["step"] == 40
    config_b = _resume_config(60)
    from_torch.import_workdir(out, b, config=config_b, what="lm", step=40, mesh=_one_device_mesh())
    state = load_state(task, optim_config=config_b.optim, train_config=config_b.train, mesh=_one_device_mesh(),
                       rules=logical_rules(config_b.mesh), workdir=f"{b}/lm")
    a_params = jax.device_get(res_a.state.params)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                    jax.tree.leaves(a_params)))  # bit-exact through PyTorch
    assert int(state.step) == 40 and _schedule_and_adam_counts(state) == {"ScaleByAdamState": 0,
                                                                           "ScaleByScheduleState": 40}
    del state
    _train_lm(config_b, b)

    rows_a, rows_b = read_metrics(f"{a}/lm"), read_metrics(f"{b}/lm")
    assert [r["step"] for r in rows_b] == list(range(41, 61))  # resumed at 40, not from scratch
    first = np.mean([r["loss"] for r in rows_a[:5]])
    last = np.mean([r["loss"] for r in rows_a[-10:]])
    resumed = np.mean([r["loss"] for r in rows_b[:10]])
    # The resumed run starts where the first one ended, not at the untrained level.
    assert last < first - 0.2 and resumed - last < 0.25 * (first - last), (first, last, resumed)


# ---- the DiT twin (official `DiT`) ----

@pytest.fixture(scope="module")
def dit_gqa(tmp_path_factory):
    """A random GQA DiT twin, its export, and the PyTorch model loaded from the export."""
    params = _dit_params(DIT_GQA)
    out = str(tmp_path_factory.mktemp("dit") / "dit")
    to_torch.export_dit(params, DIT_GQA, out)
    model, _ = load_model(out)
    return params, model


def test_dit_keys_shapes_and_order_are_the_official_ones(tmp_path):
    out = str(tmp_path / "dit")
    to_torch.export_dit(_dit_params(DIT_CFG), DIT_CFG, out)
    pt = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in pt.items()] == DIT_KEYS  # pos_embed first, as in the official class
    assert {k: tuple(v.shape) for k, v in load_file(os.path.join(out, "model.safetensors")).items()} == dict(DIT_KEYS)
    config = read_config(out)
    assert config["architecture"] == "DiT" and config["kwargs"]["input_size"] == 4
    assert config["kwargs"]["mlp_ratio"] == 4.0 and "diffusion_depth" not in config["kwargs"]
    assert set(torch.load(os.path.join(out, "other_state.pth"), weights_only=True)) == {
        "scaling_factor", "bias_factor", "steps", "ema"}
    model, _ = load_model(out)
    assert sum(p.numel() for p in model.parameters()) == 162_048  # official_state_dict_keys.md "## DiT"
    fresh = torch_modules.DiT(**config["kwargs"])  # the twin's own table equals the exported constant
    assert torch.equal(fresh.pos_embed, pt["pos_embed"])


def test_dit_forward_matches_jax(dit_gqa):
    params, model = dit_gqa
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 16, 4)).astype(np.float32)
    t, y = np.array([0, 517, 999]), np.array([2, 9, 10])  # 10 = the null class
    out = jax.jit(DiT(DIT_GQA).apply)(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
    with torch.no_grad():
        t_out = model(_to_nchw(x, 4), torch.from_numpy(t).float(), torch.from_numpy(y))
    assert np.abs(np.asarray(out)).max() > 0.1
    assert np.abs(_to_btc(t_out) - np.asarray(out)).max() <= 1e-5


@pytest.mark.parametrize("prediction_type,x0_clip", [("v_prediction", None), ("epsilon", 1.5)])
def test_dit_cfg_sampling_from_the_same_noise_gives_the_same_latents(dit_gqa, prediction_type, x0_clip):
    """JAX whole-image sampler vs the PyTorch twin's `sample_with_cfg` through `torch_sampling.generate`."""
    params, model = dit_gqa
    b = 4
    noise = np.random.default_rng(8).standard_normal((b, 16, 4)).astype(np.float32)
    labels = np.array([0, 3, 6, 9])
    settings = SamplerSettings(num_steps=5, cfg_scale=3.0, prediction_type=prediction_type, x0_clip=x0_clip)
    z_jax = jax.jit(lambda p, y, e: sample_dit_latents(DiT(DIT_GQA), p, y, e, make_schedule("cosine"), settings))(
        params, jnp.asarray(labels), jnp.asarray(noise))
    z_torch = torch_sampling.generate(model, torch.from_numpy(labels), cfg_scale=3.0, num_steps=5,
                                      prediction_type=prediction_type, x0_clip=x0_clip,
                                      noise=torch.from_numpy(noise.transpose(1, 0, 2)))  # (N, B, C) layout
    assert np.abs(np.asarray(z_jax)).max() > 0.1
    assert np.abs(_to_btc(z_torch) - np.asarray(z_jax)).max() <= 1e-4


def test_dit_round_trip_is_bit_exact_and_bad_input_is_one_clear_error(tmp_path):
    params = _dit_params(DIT_GQA)
    out = str(tmp_path / "dit")
    to_torch.export_dit(params, DIT_GQA, out)
    back, _ = from_torch.read_torch_params(out, DIT_GQA)
    a, b = _flat(jax.device_get(params)), _flat(back)
    assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), b[k]) for k in a)

    lm_out = _export_lm(tmp_path, OFFICIAL_CFG, _lm_params(OFFICIAL_CFG))
    with pytest.raises(ConversionError, match="'Transformer' is not a 'DiT' checkpoint"):
        from_torch.read_torch_params(lm_out, DIT_CFG)
    with pytest.raises(ConversionError, match="'DiT' is not a LatentLM"):
        from_torch.read_torch_params(out, OFFICIAL_CFG)
    with pytest.raises(ConversionError, match="num_kv_heads=2 but the experiment config has model.num_kv_heads=4"):
        from_torch.read_torch_params(out, DIT_CFG)
    with pytest.raises(ConversionError, match="the checkpoint has no parameter 'blocks/adaLN_modulation/kernel'"):
        to_torch.export_dit(_lm_params(OFFICIAL_CFG), DIT_CFG, str(tmp_path / "x"))

    st = os.path.join(out, "model.safetensors")
    sd = load_file(st)
    save_file(dict(sd, pos_embed=sd["pos_embed"] * 2), st)  # e.g. a checkpoint with the h/w halves swapped
    with pytest.raises(ConversionError, match="pos_embed differs from the fixed 2-D sin-cos table of width 64"):
        from_torch.read_torch_params(out, DIT_GQA)


# ---- the CLIs on a workdir: tests/conftest.py writes a tiny run's checkpoints (random weights, EMA ≠ raw) ----

def _assert_same_params(got, want):
    a, b = _flat(jax.device_get(want)), _flat(got)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def _schedule_and_adam_counts(state):
    return {type(s).__name__: int(s.count) for s in jax.tree.leaves(
        state.opt_state, is_leaf=lambda s: isinstance(s, (optax.ScaleByAdamState, optax.ScaleByScheduleState)))
        if hasattr(s, "count")}


@pytest.fixture(scope="module")
def tiny_export(tiny_run_workdir, tmp_path_factory):
    """The tiny LatentLM run exported by `python -m latent_lm.convert.to_torch` with its defaults."""
    out = str(tmp_path_factory.mktemp("tiny_export") / "export")
    assert cli.run(to_torch.main, ["--workdir", tiny_run_workdir["workdir"], "--out", out]) == 0
    return out


def test_to_torch_exports_the_ema_weights_by_default(tiny_run_workdir, tiny_export):
    """Without --params the generator's export is the checkpoint's EMA weights, not its raw ones (the σ-VAE's is
    its raw weights, which the pipeline decodes with); the step and the latent normalisation go with it."""
    run = tiny_run_workdir
    config = read_config(tiny_export)
    assert config["architecture"] == "Transformer" and config["source"]["params"] == "ema"
    assert config["source"]["step"] == 7 and config["latent_norm"] == {"scale": 0.8, "bias": 0.1}
    back, _ = from_torch.read_torch_params(tiny_export, LatentLMConfig.from_config(run["config"]))
    _assert_same_params(back, run["lm_ema"])
    raw = _flat(run["lm_raw"])
    assert not any(np.array_equal(raw[k], v) for k, v in _flat(back).items())  # no tensor is the raw one
    vback, vconfig = from_torch.read_torch_params(os.path.join(tiny_export, "vae"),
                                                  VAETask.from_config(run["config"]).model)
    _assert_same_params(vback, run["vae_raw"])
    assert vconfig["source"]["params"] == "raw"


def test_torch_sampling_cli_samples_an_export_with_pytorch_alone(tiny_export, tmp_path, capsys):
    """`python -m latent_lm.convert.torch_sampling`: --per_class labels of every class, uint8 images decoded by the
    exported σ-VAE, drawn from --seed's noise with config.json's CFG scale and solver steps."""
    out = str(tmp_path / "samples.npz")
    assert cli.run(torch_sampling.main, ["--export_dir", tiny_export, "--per_class", "2", "--out", out]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 20 images (28, 28, 1) to {out}"
    with np.load(out) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (20, 28, 28, 1) and images.std() > 0
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(images, torch_sampling.generate_images(tiny_export, labels, seed=0))
    assert not np.array_equal(images, torch_sampling.generate_images(tiny_export, labels, seed=1))


def test_from_torch_cli_imports_an_export_into_a_workdir(tiny_run_workdir, tiny_export, tmp_path, monkeypatch, capsys):
    """`python -m latent_lm.convert.from_torch` with the experiment config embedded in the export: lm/ and vae/
    checkpoints at --step that the train loop's own restore reads, bit-exact through PyTorch, the imported weights as
    params and EMA, fresh Adam moments and the learning-rate schedule positioned at the step. (Fast sibling of
    test_imported_checkpoint_resumes_and_continues_the_loss_curve, which also trains on from the import.)"""
    run, new = tiny_run_workdir, str(tmp_path / "imported")
    # The config's mesh would span the 8 fake devices, where orbax saves replicated arrays by eager per-replica
    # slices, one compile each (188 for this import, ~15 s of CPU); one device writes the same checkpoint.
    monkeypatch.setattr(from_torch, "make_mesh", lambda mesh_config: _one_device_mesh())
    assert cli.run(from_torch.main, ["--torch_dir", tiny_export, "--workdir", new, "--step", "7"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"imported vae into {new}/vae/checkpoints/7",
                                                    f"imported lm into {new}/lm/checkpoints/7"]
    config, mesh = run["config"], _one_device_mesh()
    task = make_generator_task(config, LatentNormalization(0.8, 0.1))
    state = load_state(task, optim_config=config.optim, train_config=config.train, mesh=mesh,
                       rules=logical_rules(config.mesh), workdir=f"{new}/lm")
    assert int(state.step) == 7 and _schedule_and_adam_counts(state) == {"ScaleByAdamState": 0,
                                                                          "ScaleByScheduleState": 7}
    _assert_same_params(jax.device_get(state.params), run["lm_ema"])  # the export held the EMA weights
    _assert_same_params(jax.device_get(state.ema_params), run["lm_ema"])
    adam = next(s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    assert all(not np.asarray(m).any() for m in jax.tree.leaves((adam.mu, adam.nu)))
    _, meta = to_torch.read_meta(f"{new}/lm")
    assert meta["latent_norm"] == {"scale": 0.8, "bias": 0.1} and meta["imported_from"] == tiny_export
    vtask = VAETask.from_config(config)
    vstate = to_torch.restore_state(vtask, config.vae_optim, config.vae_train, f"{new}/vae", 7, mesh,
                                    logical_rules(config.mesh))
    _assert_same_params(jax.device_get(vstate.params), run["vae_raw"])


def test_dit_workdir_exports_and_imports_through_the_clis(tiny_dit_workdir, tmp_path):
    """A `model.arch="dit"` run: to_torch exports official `DiT` keys (--params raw here), and the import (the CLI's
    `import_workdir`, --what lm) writes a checkpoint the loop restores as a DiT task, bit-exactly."""
    run, out, new = tiny_dit_workdir, str(tmp_path / "export"), str(tmp_path / "imported")
    assert cli.run(to_torch.main, ["--workdir", run["workdir"], "--out", out, "--what", "lm", "--params", "raw"]) == 0
    exported = read_config(out)
    assert exported["architecture"] == "DiT" and exported["source"]["step"] == 7
    assert exported["source"]["params"] == "raw" and not os.path.exists(os.path.join(out, "vae"))
    config = run["config"]
    from_torch.import_workdir(out, new, what="lm", step=7, mesh=_one_device_mesh())  # the config in config.json
    task = make_generator_task(config, LatentNormalization(0.8, 0.1))
    assert isinstance(task, DiTTask)
    state = load_state(task, optim_config=config.optim, train_config=config.train, mesh=_one_device_mesh(),
                       rules=logical_rules(config.mesh), workdir=f"{new}/lm")
    assert int(state.step) == 7
    _assert_same_params(jax.device_get(state.params), run["lm_raw"])
    assert not os.path.exists(f"{new}/vae")


# Library fix these two wait for: latent_lm/convert/torch_files.py `class ConversionError(UserError, ValueError)`
# (today a plain ValueError, so cli.run lets it through as a traceback), and to_torch.read_meta raising
# MissingInputError for a missing checkpoint directory before it builds a Checkpointer (today: FileNotFoundError, a
# traceback, after orbax has created <workdir>/lm/checkpoints). strict: they fail once the fix lands; drop the mark.
def test_bad_export_dir_is_one_error_line_and_status_2(tmp_path, capsys):
    missing = str(tmp_path / "no_export")
    assert cli.run(torch_sampling.main, ["--export_dir", missing]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {missing}/config.json not found: an export directory "
                                                    f"holds config.json (the constructor arguments under 'kwargs' "
                                                    f"and the 'architecture'); write one for an official checkpoint"]
    assert cli.run(from_torch.main, ["--torch_dir", missing, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {missing}/config.json not found")
    assert not os.path.exists(tmp_path / "w")


def test_missing_workdir_to_export_is_one_error_line_and_status_2(tmp_path, capsys):
    missing = str(tmp_path / "no_run")
    assert cli.run(to_torch.main, ["--workdir", missing]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{missing}/lm/checkpoints" in err[0]
    assert not os.path.exists(missing)  # nothing is created for a run that is not there
