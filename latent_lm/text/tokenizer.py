"""The text tokenizer: byte-level BPE trained in the repo with HF `tokenizers` (docs/method.md §7.3).

Byte-level BPE is lossless (any string, any script, round-trips exactly: every byte has a token) and its training is
deterministic (the same texts give the same `tokenizer.json`). The file is the standard `tokenizers` JSON, so it loads
unchanged in `tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` with
identical ids; the PyTorch export ships it beside the weights.

Special tokens take the first ids, in `SPECIAL_TOKENS` order, so their ids do not depend on the training text:
`<pad>` 0, `<bos>`/`<eos>` begin and end a text document, `<boi>`/`<eoi>` bracket an image's latents, `<bod>`/`<eod>`
bracket speech latents, and `<null>` is the null prompt that classifier-free guidance drops a condition to.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from latent_lm import storage
from latent_lm.errors import ConfigError, DataError, MissingInputError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<bod>", "<eod>", "<null>")
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer:
    """A trained byte-level BPE tokenizer: `encode`/`decode` between text and ids, and the special tokens' ids
    (`tok.special["<boi>"]`, or the attributes `pad_id`, `bos_id`, `eos_id`, `boi_id`, `eoi_id`, `bod_id`, `eod_id`,
    `null_id`)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tok = tokenizer
        # Text that spells "<boi>" stays text: only the data pipeline and the sampler place special tokens, so a
        # caption can never switch modality. (transformers users: pass split_special_tokens=True for the same.)
        tokenizer.encode_special_tokens = True
        self.special = {}
        for name in SPECIAL_TOKENS:
            i = tokenizer.token_to_id(name)
            if i is None:
                raise DataError(f"the tokenizer has no {name} token: not one trained by latent_lm.text")
            self.special[name] = i
        for name, i in self.special.items():
            setattr(self, f"{name.strip('<>')}_id", i)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table the tokenizer needs (special tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def split(self) -> str:
        """The `train_tokenizer` split it was trained with, read back from its pre-tokenizer."""
        pre = json.loads(self.to_json()).get("pre_tokenizer") or {}
        return "characters" if pre.get("type") == "Sequence" else "words"

    def encode(self, text: str) -> list[int]:
        """Text → ids; no special token is added, and a special token's spelling inside the text is plain text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids → text; special tokens are spelled out unless `skip_special`."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str) -> None:
        """Writes `tokenizer.json` atomically (a directory path gets `TOKENIZER_FILE` appended)."""
        if not path.endswith(".json"):
            path = storage.join(path, TOKENIZER_FILE)
        storage.makedirs(storage.dirname(path) or ".")
        storage.write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "TextTokenizer":
        """From a `tokenizer.json` file or a directory holding one."""
        if not path.endswith(".json"):
            path = storage.join(path, TOKENIZER_FILE)
        if not storage.exists(path):
            raise MissingInputError(f"text tokenizer {path} not found; train one with --mode=train_tokenizer")
        try:
            tokenizer = tokenizers.Tokenizer.from_str(storage.read_text(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise DataError(f"{path} is not a tokenizer.json: {e}") from None
        return cls(tokenizer)


SPLITS = ("words", "characters")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    split: str = "words") -> TextTokenizer:
    """Trains byte-level BPE on `texts` with the special tokens first; `vocab_size` counts them and the 256 bytes.

    BPE never merges across a pre-tokenizer piece. `split="words"` is GPT-2's word split (merges build words);
    `"characters"` makes every character a piece, so merges only join a character's UTF-8 bytes and each phoneme
    symbol is one token (docs/method.md §12.2); the vocabulary then stops at the characters seen."""
    if split not in SPLITS:
        raise ConfigError(f"text split={split!r}; choose one of {list(SPLITS)}")
    floor = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < floor:
        raise ConfigError(f"text vocab_size={vocab_size} must be ≥ {floor} (the special tokens and the 256 bytes)")
    tok = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False and no regex tweaks: decode(encode(s)) == s for every string.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split == "words")
    tok.pre_tokenizer = byte_level if split == "words" else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)
