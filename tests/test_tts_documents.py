"""TTS documents (docs/method.md §12.2): layout of single and pair documents, pairs from one speaker, `<null>` text,
determinism, the two zero-shot prompts, and packing into rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_pipelines.packing import make_packed_dataset
from data_pipelines.tts_documents import (BOD, BOS, EOD, EOS, NULL, SpeechDocuments, StackedFrames,
                                          TTSDocumentSource, continuation_prompt, document_length, reference_prompt,
                                          stack_frames, tts_document, unstack_frames)
from latent_lm.errors import ConfigError

C = 3


class _Latents(list):
    """A list of μ with the `frames` and `latent_dim` an `AudioLatentSequence` carries."""

    def __init__(self, mu, frames, latent_dim):
        super().__init__(mu)
        self.frames, self.latent_dim = frames, latent_dim


def _data(n=12, seq_len=64, seed=0) -> SpeechDocuments:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(300, 400, rng.integers(3, 8)).astype(np.int32) for _ in range(n)]
    mu = [rng.normal(size=(int(rng.integers(4, 12)), C)).astype(np.float32) for _ in range(n)]
    return SpeechDocuments(ids, mu, np.arange(n, dtype=np.int32) % 3, [f"sentence {u}" for u in range(n)], seq_len)


def test_single_and_pair_documents_are_laid_out_as_specified():
    data = _data()
    doc = tts_document(data, [4])
    n, k = len(data.mu[4]), len(data.ids[4])
    np.testing.assert_array_equal(doc["tokens"][:k + 2], [BOS, *data.ids[4], BOD])
    np.testing.assert_array_equal(doc["tokens"][-2:], [EOD, EOS])
    np.testing.assert_array_equal(np.flatnonzero(doc["is_latent"]), np.arange(k + 2, k + 2 + n))
    np.testing.assert_array_equal(doc["latents"][doc["is_latent"]], data.mu[4])
    assert not doc["latents"][~doc["is_latent"]].any() and len(doc["tokens"]) == document_length(data, [4])
    pair = tts_document(data, [1, 4], null=True)
    np.testing.assert_array_equal(pair["tokens"][:3], [BOS, NULL, BOD])  # the text dropped, both voices kept
    np.testing.assert_array_equal(pair["latents"][pair["is_latent"]], np.concatenate([data.mu[1], data.mu[4]]))


def test_stacked_frames_put_k_consecutive_frames_side_by_side_and_unstack_exactly():
    mu = np.arange(7 * C, dtype=np.float32).reshape(7, C)
    z = stack_frames(mu, 2)
    assert z.shape == (3, 2 * C)
    np.testing.assert_array_equal(z[1], np.r_[mu[2], mu[3]])  # position 1: frames 2 and 3, in order
    np.testing.assert_array_equal(unstack_frames(z, 2), mu[:6])  # the odd last frame is dropped
    np.testing.assert_array_equal(stack_frames(mu, 1), mu)
    data = _data()
    stacked = StackedFrames(_Latents(data.mu, frames=data.frames, latent_dim=C), 2)
    assert stacked.latent_dim == 2 * C and len(stacked) == len(data)
    np.testing.assert_array_equal(stacked.frames, data.frames // 2)
    docs = SpeechDocuments(data.ids, stacked, data.speaker, data.text, data.seq_len)
    assert docs.latent_dim == 2 * C and list(docs.frames) == [len(m) for m in stacked[:]]
    doc = tts_document(docs, [0])
    np.testing.assert_array_equal(unstack_frames(doc["latents"][doc["is_latent"]], 2),
                                  data.mu[0][:len(data.mu[0]) // 2 * 2])


def test_source_pairs_one_speaker_drops_text_and_is_deterministic():
    data = _data(n=30, seq_len=64)
    src = TTSDocumentSource(data, seed=3, pair_rate=0.5, null_prompt_rate=0.2)
    docs = [src.document(i) for i in range(300)]
    for i, d in enumerate(docs[:50]):  # a function of (seed, index) alone
        again = src.document(i)
        np.testing.assert_array_equal(d["tokens"], again["tokens"])
        np.testing.assert_array_equal(d["latents"], again["latents"])
    kinds = [d["kind"] for d in docs]
    assert 0.35 < kinds.count("pair") / len(kinds) < 0.65
    assert 0.1 < np.mean([d["tokens"][1] == NULL for d in docs]) < 0.3
    for i, d in enumerate(docs):
        u = i % len(data)
        speech = d["latents"][d["is_latent"]]
        np.testing.assert_array_equal(speech[-len(data.mu[u]):], data.mu[u])  # utterance i mod n comes last
        if d["kind"] == "pair":
            first = speech[:-len(data.mu[u])]
            a = [v for v in range(len(data)) if len(data.mu[v]) == len(first) and np.array_equal(data.mu[v], first)]
            assert a and a[0] != u and data.speaker[a[0]] == data.speaker[u]
    with pytest.raises(ConfigError, match="pair_rate"):
        TTSDocumentSource(data, 0, pair_rate=1.5)


def test_zero_shot_prompts_end_inside_the_speech_span():
    data = _data()
    cont = continuation_prompt(data, 2, prompt_frames=3)
    assert cont["tokens"][len(data.ids[2]) + 1] == BOD and cont["is_latent"].sum() == 3
    np.testing.assert_array_equal(cont["latents"][cont["is_latent"]], data.mu[2][:3])
    ref = reference_prompt(data, 5, 8)
    np.testing.assert_array_equal(ref["tokens"][:len(data.ids[5]) + len(data.ids[8]) + 2],
                                  [BOS, *data.ids[5], *data.ids[8], BOD])
    np.testing.assert_array_equal(ref["latents"][ref["is_latent"]], data.mu[5])  # the reference's voice only
    null = reference_prompt(data, 5, 8, null=True)
    np.testing.assert_array_equal(null["tokens"][:3], [BOS, NULL, BOD])
    np.testing.assert_array_equal(null["latents"][null["is_latent"]], data.mu[5])


def test_packed_rows_keep_documents_whole():
    data = _data(n=20, seq_len=48)
    ds = make_packed_dataset(TTSDocumentSource(data, 0), 48, 4, seed=0, latent_capacity=40)
    for batch in itertools.islice(iter(ds), 3):
        assert batch["tokens"].shape == (4, 48) and batch["latents"].shape == (4, 48, C)
        for row in range(4):
            seg = batch["segment_ids"][row]
            for s in set(seg[seg > 0].tolist()):
                toks = batch["tokens"][row][seg == s]
                assert toks[0] == BOS and toks[-1] == EOS and (toks == BOD).sum() == 1 == (toks == EOD).sum()
            assert batch["is_latent"][row].sum() <= 40


def test_tts_task_trains_the_stop_on_packed_rows():
    """The task's batch marks every latent but each span's last as `continue_mask` (the last predicts `<eod>` by
    CE), and its loss carries the LM head's stop term (`stop_accuracy`) beside CE and the diffusion term."""
    import jax

    from configs.tts import get_config
    from latent_lm.latents import LatentNormalization
    from latent_lm.training.tasks import make_generator_task

    config = get_config("tiny=1")
    config.audio_vae.latent_dim = config.model.latent_dim = C
    config.tts.frames_per_step = 1  # the documents here hold C-channel latents as they are
    task = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    data = _data(n=20, seq_len=task.seq_len)
    batch = next(iter(make_packed_dataset(TTSDocumentSource(data, 0), task.seq_len, 2, seed=0,
                                          latent_capacity=task.head_capacity)))
    made = task.make_batch(batch, jax.random.PRNGKey(0))
    spans = int(np.sum(batch["tokens"] == EOD))
    assert int(made["continue_mask"].sum()) == int(batch["is_latent"].sum()) - spans
    assert int(np.sum(np.asarray(made["text_targets"])[np.asarray(made["text_mask"])] == EOD)) == spans
    params = task.init_params(jax.random.PRNGKey(1))
    loss, metrics = jax.jit(task.loss)(params, batch, jax.random.PRNGKey(2))
    assert np.isfinite(loss) and {"ce_loss", "diffusion_loss", "stop_accuracy"} <= set(metrics)


def test_latent_input_dropout_hides_inputs_in_training_only():
    """`tts.latent_input_dropout` (docs/method.md §12.2): training zeroes that share of the input latents and keeps
    every target; evaluation (`train=False`) sees the inputs whole."""
    import jax

    from configs.tts import get_config
    from latent_lm.latents import LatentNormalization
    from latent_lm.training.tasks import make_generator_task

    config = get_config("tiny=1")
    config.audio_vae.latent_dim = config.model.latent_dim = C
    config.tts.update(frames_per_step=1, latent_input_dropout=0.5)
    task = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    data = _data(n=40, seq_len=task.seq_len)
    batch = next(iter(make_packed_dataset(TTSDocumentSource(data, 0), task.seq_len, 4, seed=0,
                                          latent_capacity=task.head_capacity)))
    rng = jax.random.PRNGKey(0)
    kept, trained = task.make_batch(batch, rng), task.make_batch(batch, rng, train=True)
    is_latent = np.asarray(batch["is_latent"])
    full, seen = np.asarray(kept["latents"])[is_latent], np.asarray(trained["latents"])[is_latent]
    hidden = np.all(seen == 0, axis=-1)
    assert np.all(np.any(full != 0, axis=-1))  # σ-noised latents: none is 0 before the dropout
    assert 0.35 < hidden.mean() < 0.65, hidden.mean()
    # The dropout has its own key: the latents it keeps are the evaluation batch's, and so are the targets.
    np.testing.assert_array_equal(seen[~hidden], full[~hidden])
    for key in ("latent_targets", "latent_mask", "text_targets", "continue_mask"):
        np.testing.assert_array_equal(np.asarray(trained[key]), np.asarray(kept[key]))


def test_restarted_positions_count_speech_from_bod():
    """`tts.positions="restart"` (docs/method.md §12.2): in every packed document the text keeps positions 0, 1, …
    and `<bod>`, the speech and `<eod> <eos>` count again from 0 (times `tts.position_scale` from there); "continue"
    keeps the packer's positions."""
    import jax

    from configs.tts import get_config
    from latent_lm.latents import LatentNormalization
    from latent_lm.training.tasks import make_generator_task

    config = get_config("tiny=1")
    config.audio_vae.latent_dim = config.model.latent_dim = C
    config.tts.update(frames_per_step=1, positions="restart", position_scale=1.0)
    task = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    data = _data(n=40, seq_len=task.seq_len)
    batch = next(iter(make_packed_dataset(TTSDocumentSource(data, 0), task.seq_len, 4, seed=0,
                                          latent_capacity=task.head_capacity)))
    got = np.asarray(task.make_batch(batch, jax.random.PRNGKey(0))["positions"])
    docs = 0
    for row in range(4):
        seg, tokens = batch["segment_ids"][row], batch["tokens"][row]
        for s in set(seg[seg > 0].tolist()):
            where = np.flatnonzero(seg == s)
            bod = int(np.flatnonzero(tokens[where] == BOD)[0])
            np.testing.assert_array_equal(got[row, where], [*range(bod), *range(len(where) - bod)])
            docs += 1
    assert docs > 4
    config.tts.position_scale = 1.5
    scaled = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    got_scaled = np.asarray(scaled.make_batch(batch, jax.random.PRNGKey(0))["positions"])
    speech = np.asarray(batch["segment_ids"] > 0) & (got_scaled != got)
    np.testing.assert_allclose(got_scaled[speech], 1.5 * got[speech])
    np.testing.assert_array_equal(got_scaled[~speech], got[~speech])  # the text's, `<bod>` and padding
    assert speech.sum() > 20
    config.tts.positions = "continue"
    plain = make_generator_task(config, LatentNormalization(scale=1.0, bias=0.0))
    np.testing.assert_array_equal(plain.make_batch(batch, jax.random.PRNGKey(0))["positions"], batch["positions"])
