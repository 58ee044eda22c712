"""Text scores of the multimodal study (docs/method.md §10.5): perplexity from a summed negative log-likelihood, and
a caption similarity that does not depend on which template a model chose."""

from __future__ import annotations

import collections
import math
import re
from typing import Iterable, Sequence

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (punctuation and spacing do not count)."""
    return _WORD.findall(text.lower())


def unigram_f1(candidate: str, reference: str) -> float:
    """F1 of the word multisets of two strings (SQuAD's token F1): 1 for the same words in any order."""
    c, r = collections.Counter(words(candidate)), collections.Counter(words(reference))
    common = sum((c & r).values())
    if not common:
        return 0.0
    precision, recall = common / sum(c.values()), common / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def caption_similarity(candidate: str, references: Iterable[str]) -> float:
    """The best unigram F1 of `candidate` against any reference (every template's caption of the true image)."""
    return max((unigram_f1(candidate, r) for r in references), default=0.0)


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token), in nats."""
    if num_tokens <= 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(total_nll / num_tokens)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
