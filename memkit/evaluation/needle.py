"""Pass keys and needles in a haystack, over a grid of length by depth, read back from memory.

Two tasks:

* ``passkey`` (Landmark attention's test): the filler "The grass is green. ..." repeated to the
  length, with "The pass key of Alpha is 12345. Remember it. ..." at the depth; the prompt asks
  "What is the pass key of Alpha? The pass key of Alpha is" and an answer scores when it holds the key.
* ``niah`` (Kamradt's needle in a haystack): Paul Graham's essays cut to the length, with "The best
  thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day." at the depth
  (moved back to the end of a sentence); the prompt asks for the best thing to do in San Francisco and
  an answer scores when it names the sandwich or Dolores Park (a substring match in place of the
  original's GPT judge).

The whole haystack goes into memory (no part of it is in the prompt). With ``baseline`` on, the plain
model answers too, given the last ``window`` tokens of the haystack and the question in its prompt.
"""

from __future__ import annotations

import random
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from memkit.evaluation.asking import generate_answer, plain_model
from memkit.evaluation.datasets import essays
from memkit.evaluation.metrics import normalize
from memkit.testing.passkey import haystack, question

__all__ = ["NEEDLE", "NeedleConfig", "niah_haystack", "run_needle"]

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco? The best thing to do in San Francisco is"
NEEDLE_ANSWERS = ("sandwich", "dolores park")


class NeedleConfig(BaseModel):
    """Settings of the pass-key and needle-in-a-haystack grid."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    task: Literal["passkey", "niah"] = Field("passkey", description="'passkey' (repeated filler) or 'niah' (essays)")
    lengths: list[int] = Field(
        [2048, 4096, 8192, 16384], min_length=1, description="haystack lengths in tokens, one grid column each"
    )
    depths: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1, description="needle depths, 0 = start and 1 = end; one grid row each"
    )
    samples: int = Field(1, ge=1, description="haystacks per cell (different keys or essay offsets)")
    max_new_tokens: int = Field(12, ge=1, description="greedy tokens decoded per answer")
    baseline: bool = Field(True, description="also ask the plain model, given the last `window` tokens in its prompt")
    window: int | None = Field(
        None, ge=64, description="the plain model's window for the baseline; default: its max_position_embeddings"
    )
    seed: int = Field(0, description="seed for keys and essay offsets")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, value: list[int]) -> list[int]:
        if any(n < 64 for n in value):
            raise ValueError(f"haystack lengths must be at least 64 tokens, got {value}")
        return sorted(set(value))

    @field_validator("depths")
    @classmethod
    def _depths(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= d <= 1.0 for d in value):
            raise ValueError(f"depths must lie in [0, 1], got {value}")
        return sorted(set(value))


def niah_haystack(tokenizer: Any, text: str, length: int, depth: float, offset: int) -> list[int]:
    """Token ids ``[length]`` of ``text`` from character ``offset``, with :data:`NEEDLE` at ``depth``.

    The needle goes after the last sentence that ends before ``depth`` of the filler (or at the start).
    """
    needle = tokenizer(" " + NEEDLE, add_special_tokens=False)["input_ids"]
    room = length - len(needle)
    piece = text[offset : offset + room * 8]
    filler = tokenizer(piece, add_special_tokens=False)["input_ids"][:room]
    cut = int(len(filler) * depth)
    while cut > 0 and not tokenizer.decode(filler[cut - 1 : cut]).rstrip().endswith((".", "?", "!")):
        cut -= 1
    return filler[:cut] + needle + filler[cut:]


def _cell(
    task: str, tokenizer: Any, length: int, depth: float, rng: random.Random
) -> tuple[list[int], str, tuple[str, ...]]:
    """One haystack: its ids, the question prompt, and the answers that score."""
    if task == "passkey":
        text, needles = haystack(tokenizer, length, [depth], rng.randrange(1 << 30))
        name, key = needles[0]
        return tokenizer(text, add_special_tokens=False)["input_ids"], question(name), (key,)
    text = essays()
    offset = rng.randrange(max(1, len(text) - length * 8))
    offset = text.find(" ", offset) + 1  # start at a word
    return niah_haystack(tokenizer, text, length, depth, offset), NEEDLE_QUESTION, NEEDLE_ANSWERS


def _scores(answer: str, answers: tuple[str, ...]) -> bool:
    said = normalize(answer)
    return any(normalize(a) in said for a in answers)


def run_needle(mem: Any, tokenizer: Any, config: NeedleConfig, progress: bool = True) -> dict[str, Any]:
    """Run the grid on a wrapped model; returns ``{"results": ..., "samples": [...]}``.

    ``results["grid"]`` is ``[depths][lengths]`` accuracies from memory (``baseline_grid`` the plain
    model's on its window), with the ``lengths`` and ``depths`` as the axes.
    """
    start = time.perf_counter()
    rng = random.Random(config.seed)
    window = config.window or int(getattr(mem.base_model.config, "max_position_embeddings", 0) or 2048)
    rows = []
    cells = [(d, n) for d in config.depths for n in config.lengths for _ in range(config.samples)]
    for depth, length in tqdm(cells, desc=config.task, unit="haystack", disable=not progress):
        ids, ask, answers = _cell(config.task, tokenizer, length, depth, rng)
        mem.reset_memory()
        began = time.perf_counter()
        mem.inject(ids)
        inject_s = time.perf_counter() - began
        said = generate_answer(mem, tokenizer, ask, config.max_new_tokens)
        row: dict[str, Any] = {
            "length": length,
            "tokens": len(ids),
            "depth": depth,
            "expected": list(answers),
            "from_memory": {"answer": said, "hit": _scores(said, answers)},
            "inject_seconds": round(inject_s, 2),
        }
        if config.baseline:
            ask_ids = tokenizer(ask, add_special_tokens=False)["input_ids"]
            budget = max(window - len(ask_ids) - config.max_new_tokens, 0)
            with plain_model(mem) as model:
                plain = generate_answer(
                    model, tokenizer, ids[max(len(ids) - budget, 0) :] + ask_ids, config.max_new_tokens
                )
            row["plain_window"] = {
                "answer": plain,
                "hit": _scores(plain, answers),
                "tokens_seen": min(budget, len(ids)),
            }
        rows.append(row)

    def grid(key: str) -> list[list[float]]:
        out = []
        for d in config.depths:
            line = []
            for n in config.lengths:
                cell = [r[key]["hit"] for r in rows if r["depth"] == d and r["length"] == n]
                line.append(sum(cell) / len(cell))
            out.append(line)
        return out

    results: dict[str, Any] = {
        "task": config.task,
        "lengths": config.lengths,
        "depths": config.depths,
        "grid": grid("from_memory"),
        "accuracy": sum(r["from_memory"]["hit"] for r in rows) / len(rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if config.baseline:
        results["window"] = window
        results["baseline_grid"] = grid("plain_window")
        results["baseline_accuracy"] = sum(r["plain_window"]["hit"] for r in rows) / len(rows)
    return {"results": results, "samples": rows}
