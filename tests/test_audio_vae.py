"""Audio σ-VAE (docs/method.md §12): shapes and strides (embedded and paper configs), encoder and decoder causality,
streaming decode equal to the full decode, the resampling layers against their PyTorch equivalents."""

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from latent_lm.errors import ConfigError, DataError
from latent_lm.models import audio_vae as av

TINY = dict(sample_rate=16_000, strides=(2, 3, 4), channels=4, latent_dim=3, res_dilations=(3,), weight_norm=True)


def numpy_variables(model, example, seed=0):
    """Random variables without JAX's RNG (its per-shape compiles dominate on a busy 2-core machine): the init's
    shapes, filled with U(±1/√fan_in) draws from numpy."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, rng=jax.random.PRNGKey(0)), example)
    rng = np.random.default_rng(seed)

    def fill(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 4
        return jnp.asarray(rng.uniform(-1, 1, s.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree.map(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = av.AudioVAE(**TINY)
    frames = 21
    variables = numpy_variables(model, jax.ShapeDtypeStruct((2, frames * model.hop), jnp.float32))
    decode = jax.jit(lambda v, z: model.apply(v, z, method=av.AudioVAE.decode))
    encode = jax.jit(lambda v, x: model.apply(v, x, method=av.AudioVAE.encode))
    return model, variables, decode, encode, frames


def test_hop_and_frame_rates():
    assert av.hop_length((4, 4, 5, 5, 8)) == 3200 and av.frame_rate(24_000, (4, 4, 5, 5, 8)) == 7.5
    assert av.frame_rate(16_000, (4, 4, 5, 8)) == 25.0
    for name, (strides, rate) in av.STRIDE_PRESETS.items():
        assert f"{av.frame_rate(rate, strides):g}hz" in name


@pytest.mark.parametrize("preset,channels,latent_dim,max_channels", [
    ("embedded_25hz", 16, 16, None),
    ("paper_7.5hz", 32, 64, 1024),
])
def test_init_shapes(preset, channels, latent_dim, max_channels):
    strides, rate = av.STRIDE_PRESETS[preset]
    model = av.AudioVAE(sample_rate=rate, strides=strides, channels=channels, latent_dim=latent_dim,
                        max_channels=max_channels)
    t = 2 * model.hop
    x = jax.ShapeDtypeStruct((3, t), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.PRNGKey(0), a, rng=jax.random.PRNGKey(1)), x)
    out = jax.eval_shape(lambda v, a: model.apply(v, a, rng=jax.random.PRNGKey(1)), variables, x)
    assert out["mu"].shape == out["z"].shape == (3, 2, latent_dim)
    assert out["recon"].shape == (3, t)
    widths = av.stage_channels(channels, len(strides), max_channels)
    assert variables["params"]["encoder"]["conv_out"]["kernel"].shape == (3, widths[-1], latent_dim)
    assert variables["params"]["decoder"]["conv_in"]["kernel"].shape == (7, latent_dim, widths[-1])
    last = len(strides) - 1
    assert variables["params"]["encoder"][f"stage{last}_down"]["conv"]["kernel"].shape == (
        2, strides[-1] * widths[-2], widths[-1])


def test_streaming_decode_equals_full_decode(tiny):
    """Chunks of 1, 3 and 7 latent frames, the state carried through a `lax.scan` (one compile for all three)."""
    model, variables, decode, _, frames = tiny
    dim = model.latent_dim
    z = jnp.asarray(np.random.default_rng(1).standard_normal((2, frames, dim)), jnp.float32)
    full = np.asarray(decode(variables, z))
    assert full.shape == (2, frames * model.hop)

    @jax.jit
    def streamed(v, z):
        outs = []
        for chunk in (1, 3, 7):
            chunks = einops.rearrange(z, "b (n c) d -> n b c d", c=chunk)
            step = lambda state, zc: av.decode_stream(model, v, zc, state)[::-1]  # noqa: E731
            _, audio = jax.lax.scan(step, av.init_stream_state(model, v, 2), chunks)
            outs.append(einops.rearrange(audio, "n b t -> b (n t)"))
        return outs

    for audio in streamed(variables, z):
        np.testing.assert_allclose(np.asarray(audio), full, atol=1e-5, rtol=0)


def test_decoder_is_causal(tiny):
    model, variables, decode, _, frames = tiny
    z = np.random.default_rng(2).standard_normal((2, frames, model.latent_dim)).astype(np.float32)
    t0 = 8
    z2 = z.copy()
    z2[:, t0:] += 1.0
    a, b = np.asarray(decode(variables, z)), np.asarray(decode(variables, z2))
    np.testing.assert_array_equal(a[:, :t0 * model.hop], b[:, :t0 * model.hop])
    assert np.abs(a[:, t0 * model.hop:(t0 + 1) * model.hop] - b[:, t0 * model.hop:(t0 + 1) * model.hop]).max() > 1e-4


def test_encoder_is_causal(tiny):
    model, variables, _, encode, frames = tiny
    x = (0.3 * np.random.default_rng(3).standard_normal((2, frames * model.hop))).astype(np.float32)
    k = 9
    s0 = k * model.hop + model.hop // 2  # perturb from the middle of latent frame k on
    x2 = x.copy()
    x2[:, s0:] += 0.5
    a, b = np.asarray(encode(variables, x)), np.asarray(encode(variables, x2))
    np.testing.assert_array_equal(a[:, :k], b[:, :k])
    assert np.abs(a[:, k] - b[:, k]).max() > 1e-5


def test_length_not_multiple_of_hop_is_a_data_error(tiny):
    model, variables, _, _, _ = tiny
    with pytest.raises(DataError, match="multiple of the audio σ-VAE's hop 24"):
        model.apply(variables, jnp.zeros((1, 25)), method=av.AudioVAE.encode)


def test_make_audio_vae_from_config_and_bad_values():
    cfg = ml_collections.ConfigDict({"audio_vae": {"sample_rate": 16_000, "strides": [4, 4, 5, 8], "channels": 8,
                                                   "latent_dim": 16, "std": 0.5, "activation": "silu"}})
    model = av.make_audio_vae(cfg)
    assert (model.strides, model.hop, model.std, model.activation) == ((4, 4, 5, 8), 640, 0.5, "silu")
    assert av.make_audio_vae(cfg.audio_vae) == model
    bad = av.AudioVAE(**dict(TINY, output="sigmoid"))
    with pytest.raises(ConfigError, match="audio_vae.output"):
        jax.eval_shape(lambda x: bad.init(jax.random.PRNGKey(0), x, rng=jax.random.PRNGKey(0)),
                       jax.ShapeDtypeStruct((1, 24), jnp.float32))


def test_weight_norm_leaves_the_init_function_unchanged():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5, 3)), jnp.float32)
    outs = []
    for wn in (False, True):
        conv = av.CausalConv1d(4, 3, dilation=2, weight_norm=wn)
        v = conv.init(jax.random.PRNGKey(0), x)
        assert ("weight_g" in v["params"]) == wn
        outs.append(np.asarray(conv.apply(v, x)))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)


def test_resampling_layers_equal_their_pytorch_convs():
    """Down(s) = Conv1d(kernel 2s, stride s, left pad s); Up(s) = ConvTranspose1d(kernel 2s, stride s), last s
    outputs trimmed: the mappings in the module doc (what a PyTorch exporter writes)."""
    rng = np.random.default_rng(5)
    s, c, f, frames = 3, 2, 4, 5
    x = rng.standard_normal((2, frames * s, c)).astype(np.float32)
    down = av.Downsample(s, f)
    v = jax.eval_shape(lambda a: down.init(jax.random.PRNGKey(0), a), x)
    v = jax.tree.map(lambda t: jnp.asarray(rng.standard_normal(t.shape), jnp.float32), v)
    k, b = np.asarray(v["params"]["conv"]["kernel"]), np.asarray(v["params"]["conv"]["bias"])  # [2, s·c, f]
    w = np.transpose(k.reshape(2, s, c, f), (3, 2, 0, 1)).reshape(f, c, 2 * s)  # [f, c, j·s + i]
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(torch.tensor(x).transpose(1, 2), (s, 0)),
                                     torch.tensor(w), torch.tensor(b), stride=s).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(down.apply(v, x)), ref, atol=1e-5)

    y = rng.standard_normal((2, frames, c)).astype(np.float32)
    up = av.Upsample(s, f)
    v = jax.eval_shape(lambda a: up.init(jax.random.PRNGKey(0), a), y)
    v = jax.tree.map(lambda t: jnp.asarray(rng.standard_normal(t.shape), jnp.float32), v)
    k, b = np.asarray(v["params"]["conv"]["kernel"]).reshape(2, c, s, f), np.asarray(v["params"]["bias"])
    w = np.concatenate([np.transpose(k[1], (0, 2, 1)), np.transpose(k[0], (0, 2, 1))], axis=2)  # [c, f, 2s]
    ref = torch.nn.functional.conv_transpose1d(torch.tensor(y).transpose(1, 2), torch.tensor(w), torch.tensor(b),
                                               stride=s)[..., :-s].transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(up.apply(v, y)), ref, atol=1e-5)
