"""The text tokenizer (latent_lm/text): lossless, deterministic, special tokens at fixed ids, a standard
tokenizer.json, and the embedded English corpus's held-out split."""

from __future__ import annotations

import json

import pytest
import tokenizers

from data_pipelines.text_corpus import python_docs_paragraphs
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.text import SPECIAL_TOKENS, TextTokenizer, train_tokenizer

VOCAB = 1000


@pytest.fixture(scope="module")
def corpus():
    return python_docs_paragraphs("train"), python_docs_paragraphs("test")


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus[0], VOCAB)


def test_splits_are_disjoint_deterministic_and_about_five_percent(corpus):
    train, test = corpus
    assert train and test and not set(train) & set(test)
    assert 0.02 < len(test) / (len(train) + len(test)) < 0.08
    assert python_docs_paragraphs("test") == test
    with pytest.raises(ValueError, match="split"):
        python_docs_paragraphs("validation")


def test_round_trip_is_lossless_on_any_text(tok, corpus):
    samples = corpus[1][:50] + ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n",
                                "Grüße, 東京, emoji 🚀, combining é", "<boi> is plain text here", "\x00\x7f"]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text, text
    assert [tok.decode(ids) for ids in tok.encode_batch(samples)] == samples


def test_special_tokens_have_fixed_ids_and_are_not_produced_by_text(tok):
    assert [tok.special[s] for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id, tok.null_id) == (0, 1, 2, 3, 4, 7)
    assert not set(tok.encode("<boi> <eoi> <null> <pad>")) & set(range(len(SPECIAL_TOKENS)))
    ids = [tok.bos_id, *tok.encode("a caption"), tok.boi_id, tok.eoi_id, tok.eos_id]
    assert tok.decode(ids) == "<bos>a caption<boi><eoi><eos>"
    assert tok.decode(ids, skip_special=True) == "a caption"


def test_training_is_deterministic_and_compresses(tok, corpus):
    assert train_tokenizer(corpus[0], VOCAB).to_json() == tok.to_json()
    assert tok.vocab_size <= VOCAB
    held_out = "\n\n".join(corpus[1])
    assert len(tok.encode(held_out)) < 0.45 * len(held_out.encode("utf-8"))  # BPE merges learned, not bytes


def test_tokenizer_json_saves_atomically_and_loads_as_a_standard_file(tok, corpus, tmp_path):
    tok.save(str(tmp_path / "run"))
    path = tmp_path / "run" / "tokenizer.json"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tokenizer.json"]
    again = TextTokenizer.load(str(tmp_path / "run"))
    plain = tokenizers.Tokenizer.from_file(str(path))  # what transformers.PreTrainedTokenizerFast wraps
    for text in corpus[1][:20]:
        assert again.encode(text) == tok.encode(text) == plain.encode(text, add_special_tokens=False).ids
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_bad_inputs_are_one_clear_error(corpus, tmp_path):
    with pytest.raises(MissingInputError, match="--mode=train_tokenizer"):
        TextTokenizer.load(str(tmp_path / "absent"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer.json"):
        TextTokenizer.load(str(tmp_path / "bad.json"))
    foreign = tokenizers.Tokenizer(tokenizers.models.BPE())
    (tmp_path / "foreign.json").write_text(foreign.to_str())
    with pytest.raises(DataError, match="no <pad> token"):
        TextTokenizer.load(str(tmp_path / "foreign.json"))
    with pytest.raises(ConfigError, match="vocab_size=100 must be ≥ 264"):
        train_tokenizer(corpus[0][:10], 100)


def test_character_split_gives_one_token_per_character_and_round_trips(tmp_path):
    phonemes = ["zoʊi peɪntᵻd ðə bɹoʊkən kaɪt", "ðiːz ɹɛpɹɪzɛnt ɐ pɑːk", "ɪn fɛbɹuːəɹi ðə kaɪt"] * 4
    tok = train_tokenizer(phonemes, VOCAB, split="characters")
    chars = sorted(set("".join(phonemes)))
    # Merges only join a character's UTF-8 bytes (n − 1 for n bytes): the vocabulary stops at the characters seen.
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 256 + sum(len(c.encode()) - 1 for c in chars)
    for text in phonemes[:3]:
        ids = tok.encode(text)
        assert [tok.decode([i]) for i in ids] == list(text)
    for text in ["unseen ʒ and 東京\n\ttabs", "", "<eod> stays text"]:  # unseen characters fall back to bytes
        assert tok.decode(tok.encode(text)) == text
    tok.save(str(tmp_path))
    assert TextTokenizer.load(str(tmp_path)).encode(phonemes[0]) == tok.encode(phonemes[0])
    words = train_tokenizer(phonemes, VOCAB)
    assert len(words.encode(phonemes[0])) < len(tok.encode(phonemes[0]))  # word merges span characters
    assert (tok.split, words.split, TextTokenizer.load(str(tmp_path)).split) == ("characters", "words", "characters")
    with pytest.raises(ConfigError, match="split='syllables'"):
        train_tokenizer(phonemes, VOCAB, split="syllables")
