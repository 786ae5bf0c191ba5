"""Knowledge retention on SQuAD v2 dev, with MemoryLLM's protocol.

For each sample: empty the memory, inject the question's paragraph (``"Context: ..."``), then
distractor chunks of ``chunk_tokens`` tokens one at a time (cut from articles no question comes from;
the same chunks for every sample), and after ``k`` of them ask the question and decode
``max_new_tokens`` greedy tokens. A sample scores when the gold answer appears in the answer (exact
hit). The report gives accuracy against ``k``, beside two baselines (paragraph in the prompt; nothing)
and the theoretical share of the paragraph's vectors left in a random-drop pool after ``t`` updates,
``(1 - K/N)^t`` (K written per update, N the pool's capacity).
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from memkit.evaluation.asking import Template, generate_answer, memory_text, plain_model, prompt_text
from memkit.evaluation.datasets import squad_split, token_chunks
from memkit.evaluation.metrics import exact_hit

__all__ = ["RetentionConfig", "run_retention", "theoretical_retention"]


class RetentionConfig(BaseModel):
    """Settings of the SQuAD retention evaluation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    samples: int = Field(100, ge=1, description="answerable SQuAD v2 dev questions, drawn with the seed")
    distances: list[int] = Field(
        [0, 1, 2, 4, 8, 16, 32], min_length=1, description="numbers k of distractor chunks after the paragraph"
    )
    chunk_tokens: int = Field(512, ge=1, description="tokens per distractor chunk (MemoryLLM: 512)")
    max_new_tokens: int = Field(10, ge=1, description="greedy tokens decoded per answer (MemoryLLM: 10)")
    distractor_articles: int = Field(5, ge=1, description="held-out articles that give the distractor chunks")
    template: Template = Field("raw", description="'raw' (the protocol's Context:/Question: text) or 'chat'")
    baselines: bool = Field(True, description="also answer with the paragraph in the prompt, and with nothing")
    seed: int = Field(0, description="seed for the choice of questions and distractor articles")

    @field_validator("distances")
    @classmethod
    def _distances(cls, value: list[int]) -> list[int]:
        if any(k < 0 for k in value):
            raise ValueError(f"distances must be >= 0, got {value}")
        return sorted(set(value))


def theoretical_retention(write_size: int, capacity: int, updates: int) -> float:
    """``(1 - K/N)^t``: the expected share of one update's vectors a random-drop pool still holds."""
    return (1.0 - write_size / capacity) ** updates


def run_retention(mem: Any, tokenizer: Any, config: RetentionConfig, progress: bool = True) -> dict[str, Any]:
    """Run the protocol on a wrapped model; returns ``{"results": ..., "samples": [...]}``.

    ``results`` holds, per distance ``k``: ``accuracy`` (from memory), the pool ``updates`` ``t`` since
    the paragraph was written, and ``theory`` ``(1 - K/N)^t``; and ``in_prompt``/``no_context``
    accuracies when ``baselines`` is on. Memory is emptied before each sample and left holding the last.
    """
    start = time.perf_counter()
    questions, paragraphs = squad_split(config.samples, config.distractor_articles, config.seed)
    far = max(config.distances)
    chunks = token_chunks(tokenizer, paragraphs, config.chunk_tokens, far) if far else []
    per_chunk = math.ceil(config.chunk_tokens / mem.recipe.chunk_size)  # pool updates per distractor chunk
    write_size, capacity = mem.pool.write_size, mem.pool.capacity
    rows = []
    for q in tqdm(questions, desc="retention", unit="sample", disable=not progress):
        mem.reset_memory()
        mem.inject(memory_text(tokenizer, q.context, config.template), label=q.id)
        ask = prompt_text(tokenizer, q.question, config.template)
        row: dict[str, Any] = {"id": q.id, "question": q.question, "answer": q.answer, "from_memory": {}}
        done = 0
        for k in config.distances:
            for chunk in chunks[done:k]:
                mem.inject(chunk)
            done = k
            said = generate_answer(mem, tokenizer, ask, config.max_new_tokens)
            row["from_memory"][str(k)] = {"answer": said, "hit": exact_hit(said, q.answer)}
        if config.baselines:
            with plain_model(mem) as plain:
                in_prompt = prompt_text(tokenizer, q.question, config.template, q.context)
                with_text = generate_answer(plain, tokenizer, in_prompt, config.max_new_tokens)
                without = generate_answer(plain, tokenizer, ask, config.max_new_tokens)
            row["in_prompt"] = {"answer": with_text, "hit": exact_hit(with_text, q.answer)}
            row["no_context"] = {"answer": without, "hit": exact_hit(without, q.answer)}
        rows.append(row)
    n = len(rows)
    by_distance = {}
    for k in config.distances:
        t = k * per_chunk
        by_distance[str(k)] = {
            "accuracy": sum(r["from_memory"][str(k)]["hit"] for r in rows) / n,
            "tokens_after": k * config.chunk_tokens,
            "updates": t,
            "theory": theoretical_retention(write_size, capacity, t),
        }
    results: dict[str, Any] = {
        "by_distance": by_distance,
        "pool": {"write_size": write_size, "capacity": capacity, "updates_per_chunk": per_chunk},
        "samples": n,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if config.baselines:
        results["in_prompt"] = sum(r["in_prompt"]["hit"] for r in rows) / n
        results["no_context"] = sum(r["no_context"]["hit"] for r in rows) / n
    return {"results": results, "samples": rows}
