"""Answer scoring: exact hit (the papers' retention metric) and SQuAD-style token F1."""

from __future__ import annotations

import re
import string
from collections import Counter

__all__ = ["exact_hit", "normalize", "token_f1"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_hit(prediction: str, answer: str) -> bool:
    """MemoryLLM's "exact hit": the gold answer appears in the generated text (after normalisation)."""
    gold = normalize(answer)
    return bool(gold) and gold in normalize(prediction)


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD/HotpotQA token F1 between the normalised prediction and answer, in [0, 1]."""
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
