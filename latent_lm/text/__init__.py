"""Text for the multimodal LatentLM: the byte-level BPE tokenizer and its special tokens (docs/method.md §7.3)."""

from latent_lm.text.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_tokenizer

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "train_tokenizer"]
