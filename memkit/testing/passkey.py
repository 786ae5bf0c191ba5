"""Pass-key haystacks (Landmark-attention style) for long-document tests and benchmarks."""

from __future__ import annotations

import random
from typing import Any

__all__ = ["FILLER", "NAMES", "haystack", "question"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NAMES = ("Alpha", "Bravo", "Charlie", "Delta", "Echo")


def haystack(tokenizer: Any, length: int, depths: list[float], seed: int) -> tuple[str, list[tuple[str, str]]]:
    """Filler of about ``length`` tokens with one named pass key per depth (0 = start, 1 = end).

    Returns the text and the ``(name, key)`` pairs, in the order of ``depths``.
    """
    rng = random.Random(seed)
    per = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    reps = max(length // per, 1)
    needles = [(NAMES[i], str(rng.randint(10000, 99999))) for i in range(len(depths))]
    slots = {int(reps * d): i for i, d in enumerate(depths)}
    parts = ["There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "]
    for r in range(reps + 1):  # slot ``reps`` (depth 1) puts the key after the last filler
        if r in slots:
            name, key = needles[slots[r]]
            parts.append(f"The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}. ")
        if r < reps:
            parts.append(FILLER)
    return "".join(parts), needles


def question(name: str) -> str:
    """The prompt that asks for ``name``'s pass key; the answer should follow it."""
    return f"What is the pass key of {name}? The pass key of {name} is"
