"""HotpotQA (dev, distractor setting) with the supporting paragraphs in memory.

For each question: empty the memory, inject its supporting paragraphs (``"Title: sentences"``, in
one text; with ``distractors`` on, the setting's eight other paragraphs too, shuffled in), ask the
question and decode greedy tokens. Scored by exact hit (the gold answer within the answer) and
HotpotQA's token F1 on the answer's first line, beside the paragraphs in the prompt and no paragraphs.
"""

from __future__ import annotations

import random
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from memkit.evaluation.asking import Template, generate_answer, memory_text, plain_model, prompt_text
from memkit.evaluation.datasets import hotpotqa
from memkit.evaluation.metrics import exact_hit, token_f1

__all__ = ["HotpotConfig", "run_hotpotqa"]


class HotpotConfig(BaseModel):
    """Settings of the HotpotQA evaluation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    samples: int = Field(100, ge=1, description="dev questions, drawn with the seed")
    distractors: bool = Field(False, description="inject the eight distractor paragraphs too, shuffled in")
    max_new_tokens: int = Field(16, ge=1, description="greedy tokens decoded per answer")
    template: Template = Field("raw", description="'raw' (Context:/Question: text) or 'chat'")
    baselines: bool = Field(True, description="also answer with the paragraphs in the prompt, and with nothing")
    seed: int = Field(0, description="seed for the choice of questions and the paragraph order")


def _score(said: str, answer: str) -> dict[str, Any]:
    first = said.split("\n", 1)[0]
    return {"answer": said, "hit": exact_hit(said, answer), "f1": token_f1(first, answer)}


def run_hotpotqa(mem: Any, tokenizer: Any, config: HotpotConfig, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation on a wrapped model; returns ``{"results": ..., "samples": [...]}``.

    ``results`` holds ``exact_hit`` and ``f1`` (means over samples) from memory, and for the
    ``in_prompt`` and ``no_context`` baselines when they are on, overall and per question type.
    """
    start = time.perf_counter()
    rng = random.Random(config.seed)
    rows = []
    for q in tqdm(hotpotqa(config.samples, config.seed), desc="hotpotqa", unit="question", disable=not progress):
        paragraphs = list(q.supporting) + (list(q.distractors) if config.distractors else [])
        if config.distractors:
            rng.shuffle(paragraphs)
        context = "\n".join(paragraphs)
        mem.reset_memory()
        mem.inject(memory_text(tokenizer, context, config.template), label=q.id)
        ask = prompt_text(tokenizer, q.question, config.template)
        row: dict[str, Any] = {"id": q.id, "type": q.kind, "question": q.question, "answer": q.answer}
        row["from_memory"] = _score(generate_answer(mem, tokenizer, ask, config.max_new_tokens), q.answer)
        if config.baselines:
            in_prompt = prompt_text(tokenizer, q.question, config.template, context)
            with plain_model(mem) as plain:
                row["in_prompt"] = _score(generate_answer(plain, tokenizer, in_prompt, config.max_new_tokens), q.answer)
                row["no_context"] = _score(generate_answer(plain, tokenizer, ask, config.max_new_tokens), q.answer)
        rows.append(row)
    ways = ["from_memory"] + (["in_prompt", "no_context"] if config.baselines else [])

    def means(selected: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            way: {
                "exact_hit": sum(r[way]["hit"] for r in selected) / len(selected),
                "f1": sum(r[way]["f1"] for r in selected) / len(selected),
            }
            for way in ways
        }

    kinds = sorted({r["type"] for r in rows if r["type"]})
    results: dict[str, Any] = {
        **means(rows),
        "by_type": {
            k: {"samples": sum(r["type"] == k for r in rows), **means([r for r in rows if r["type"] == k])}
            for k in kinds
        },
        "samples": len(rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return {"results": results, "samples": rows}
