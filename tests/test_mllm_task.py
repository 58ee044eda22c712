"""The multimodal task's batch side (docs/method.md §7.3): next-position targets of packed interleaved documents, one
σ-VAE σ per image of a packed row, and the config rules of `model.arch="mllm"`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.mllm import get_config
from latent_lm.config_validation import validate
from latent_lm.errors import ConfigError
from latent_lm.experiment import STAGES
from latent_lm.latents import SIGMA_DIVISOR, LatentNormalization, sample_latent
from latent_lm.text.tokenizer import SPECIAL_TOKENS
from latent_lm.training.batches import document_targets, gather_positions, image_span_ids
from latent_lm.training.tasks import MultimodalTask

BOD, EOD = SPECIAL_TOKENS.index("<bod>"), SPECIAL_TOKENS.index("<eod>")
PAD, BOS, EOS, BOI, EOI, NULL = (SPECIAL_TOKENS.index(t) for t in ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>",
                                                                   "<null>"))
L = -1  # a latent position in the layouts below


def _row(*docs, length):
    """Packs documents (lists of token ids, L for a latent) into one row: tokens, is_latent, segment ids."""
    items = [(x, s + 1) for s, doc in enumerate(docs) for x in doc]
    items += [(PAD, 0)] * (length - len(items))
    tokens = np.array([0 if x == L else x for x, _ in items], np.int32)
    return tokens, np.array([x == L for x, _ in items]), np.array([s for _, s in items], np.int32)


def test_document_targets_follow_the_next_position_of_the_same_document():
    """Two packed documents, text-to-image then image-to-text, and padding: <boi> and z_1..z_{N-1} have latent targets,
    z_N predicts <eoi> by CE, <null> and padding are never CE targets, the last position of a document predicts
    nothing (not the next document's <bos>)."""
    t2i = [BOS, NULL, BOI, L, L, L, EOI, EOS]
    i2t = [BOS, BOI, L, L, L, EOI, 20, 21, EOS]
    tokens, is_latent, seg = _row(t2i, i2t, length=20)
    latents = np.where(is_latent[:, None], np.arange(20)[:, None] + np.zeros((20, 2)), 0).astype(np.float32)
    got = {k: np.asarray(v)[0] for k, v in document_targets(
        jnp.asarray(tokens)[None], jnp.asarray(is_latent)[None], jnp.asarray(latents)[None],
        jnp.asarray(seg)[None], (PAD, NULL)).items()}
    latent_at = [2, 3, 4, 9, 10, 11]  # <boi>, z_1, z_2 of each image
    np.testing.assert_array_equal(np.flatnonzero(got["latent_mask"]), latent_at)
    np.testing.assert_array_equal(got["latent_targets"][latent_at, 0], [3, 4, 5, 10, 11, 12])
    # CE: <bos>→<null> is ignored, <null>→<boi>, z_N→<eoi>, <eoi>→<eos>; then <bos>→<boi>, z_N→<eoi>, <eoi>→20,
    # 20→21, 21→<eos>.
    text_at = [1, 5, 6, 8, 12, 13, 14, 15]
    np.testing.assert_array_equal(np.flatnonzero(got["text_mask"]), text_at)
    np.testing.assert_array_equal(got["text_targets"][text_at], [BOI, EOI, EOS, BOI, EOI, 20, 21, EOS])
    assert not got["text_mask"][7] and not got["latent_mask"][7]  # the first document's <eos> predicts nothing


def test_variable_spans_mark_latents_that_another_latent_follows():
    """Speech (docs/method.md §12.3): `continue_mask` holds at z_1..z_{N-1} of each span, where the LM head learns that
    the span goes on; z_N keeps its CE target (<eod> here), and nothing crosses into the next document."""
    tts = [BOS, 20, BOD, L, L, L, EOD, EOS]
    tokens, is_latent, seg = _row(tts, [BOS, BOD, L, L, EOD], length=16)
    got = {k: np.asarray(v)[0] for k, v in document_targets(
        jnp.asarray(tokens)[None], jnp.asarray(is_latent)[None], jnp.zeros((1, 16, 2)), jnp.asarray(seg)[None],
        (PAD, NULL), variable_spans=True).items()}
    np.testing.assert_array_equal(np.flatnonzero(got["continue_mask"]), [3, 4, 10])
    assert got["text_mask"][5] and got["text_targets"][5] == EOD and got["text_targets"][11] == EOD
    assert "continue_mask" not in document_targets(jnp.asarray(tokens)[None], jnp.asarray(is_latent)[None],
                                                   jnp.zeros((1, 16, 2)), jnp.asarray(seg)[None], (PAD, NULL))


def test_image_span_ids_number_each_image_of_a_row():
    is_latent = jnp.array([[0, 1, 1, 0, 0, 1, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(image_span_ids(is_latent), [[0, 1, 1, 0, 0, 2, 2, 2, 0, 3],
                                                              [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])


def test_each_image_of_a_packed_row_gets_its_own_sigma():
    """z = μ + σ_i·ε with one σ_i per image span (the draw recomputed from sample_latent's own keys)."""
    rng, std = jax.random.PRNGKey(0), 0.5
    is_latent = jnp.array([[0, 1, 1, 1, 0, 1, 1, 1]], bool).repeat(64, 0)
    mu = jnp.zeros((64, 8, 3))
    z = sample_latent(rng, mu, std, example_ids=image_span_ids(is_latent))
    eps = jax.random.normal(jax.random.split(rng)[1], mu.shape)
    sigma = np.asarray(z / eps)[..., 0]  # [rows, positions]
    for span in ([1, 2, 3], [5, 6, 7]):
        np.testing.assert_allclose(sigma[:, span], sigma[:, span[:1]].repeat(3, 1), rtol=1e-5)
    assert not np.allclose(sigma[:, 1], sigma[:, 5])
    assert 0.8 < np.std(sigma[:, [1, 5]]) / (std / SIGMA_DIVISOR) < 1.2  # σ ~ N(0, (std/0.8)²)


def test_gather_positions_keeps_order_and_reports_real_slots():
    mask = jnp.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    idx, valid = gather_positions(mask, 3)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], [1, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(valid.sum(1), [3, 0, 3])


def test_make_batch_noises_and_normalises_latents_only():
    config = get_config("tiny=1")
    norm = LatentNormalization(scale=2.0, bias=-1.0)
    task = MultimodalTask.from_config(config, norm)
    tokens, is_latent, seg = _row([BOS, BOI, L, L, EOI, EOS], [BOS, 30, EOS], length=12)
    mu = np.where(is_latent[:, None], 1.0, 0.0)[None].repeat(4, 2).astype(np.float32)
    batch = dict(tokens=tokens[None], is_latent=is_latent[None], latents=mu, segment_ids=seg[None],
                 positions=np.array([[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 0, 0]], np.int32))
    out = task.make_batch({k: jnp.asarray(v) for k, v in batch.items()}, jax.random.PRNGKey(1))
    z = np.asarray(out["latents"])
    assert np.all(z[0, ~is_latent] == 0)
    assert np.all(z[0, is_latent] != 0) and np.all(np.abs(z[0, is_latent]) < 10)
    np.testing.assert_array_equal(np.flatnonzero(out["latent_mask"][0]), [1, 2])


def test_prompt_latents_at_the_mean_are_the_normalised_mu_whatever_the_key():
    """eval.prompt_latents="mean" (σ = 0): a prompt's image is the σ-VAE's μ, normalised; "sampled" draws σ."""
    norm = LatentNormalization(scale=2.0, bias=-1.0)
    task = MultimodalTask.from_config(get_config("tiny=1"), norm)
    _, is_latent, _ = _row([BOS, BOI, L, L, L, EOI], length=8)
    mu = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 4)), jnp.float32)
    mask = jnp.asarray(is_latent)[None]
    at_mean = [np.asarray(task.model_latents(jax.random.PRNGKey(k), mu, mask, 0.0)) for k in (0, 1)]
    np.testing.assert_array_equal(at_mean[0], at_mean[1])
    np.testing.assert_allclose(at_mean[0][0, is_latent], np.asarray(norm.normalize(mu))[0, is_latent], rtol=1e-6)
    drawn = [np.asarray(task.model_latents(jax.random.PRNGKey(k), mu, mask)) for k in (0, 1)]
    assert not np.allclose(drawn[0], drawn[1])


def test_mllm_config_validates_and_rejects_what_cannot_train():
    config = get_config("tiny=1")
    validate(config, STAGES)
    for key, value, words in [("num_classes", 10, "num_classes"), ("text_vocab_size", 100, "text_vocab_size"),
                              ("head_capacity", 10, "head_capacity"), ("max_len", 40, "max_len")]:
        bad = get_config("tiny=1")
        bad.model[key] = value
        with pytest.raises(ConfigError, match=words):
            validate(bad, STAGES)
    bad = get_config("tiny=1")
    bad.eval.prompt_latents = "median"
    with pytest.raises(ConfigError, match="prompt_latents"):
        validate(bad, STAGES)
    bad = get_config("tiny=1")
    bad.documents.positions = "restart"
    with pytest.raises(ConfigError, match="documents.positions: only 'continue'"):
        validate(bad, STAGES)
    with pytest.raises(ConfigError, match="arm"):
        get_config("arm=vqgan")
