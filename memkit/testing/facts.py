"""A synthetic fact-recall task for tiny models: one key-value fact hidden in a chunk of filler.

Token ranges (for a vocabulary of 128, as :func:`~memkit.testing.tiny_model` builds): filler
``10..59``, keys ``60..89``, values ``90..127``, and the query marker :data:`QUERY` = 5. A *fact
chunk* is 16 filler tokens with one adjacent pair ``key value`` at a random place; the question is
``[QUERY, key]`` and the answer ``value``. *Distractor chunks* are 16 filler tokens.

A tiny random model cannot answer anything, so :func:`pretrain_in_context` first trains it (all its
weights, as pre-training would) to answer with the fact in its context window: ``fact chunk + [QUERY,
key] -> value``. After that the model stands in for a pretrained LM, and memkit's question is whether
the fact survives in *memory*, behind distractors, when it is no longer in the context.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from memkit.model import MemkitModel

__all__ = ["CHUNK", "QUERY", "distractor", "fact_chunk", "pretrain_in_context", "recall", "training_documents"]

QUERY = 5
CHUNK = 16


def fact_chunk(rng: random.Random) -> tuple[list[int], int, int]:
    """``(chunk, key, value)``: 16 filler tokens with ``key value`` adjacent at a random place."""
    chunk = [rng.randrange(10, 60) for _ in range(CHUNK)]
    key, value, at = rng.randrange(60, 90), rng.randrange(90, 128), rng.randrange(CHUNK - 1)
    chunk[at], chunk[at + 1] = key, value
    return chunk, key, value


def distractor(rng: random.Random) -> list[int]:
    """16 filler tokens."""
    return [rng.randrange(10, 60) for _ in range(CHUNK)]


def training_documents(count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` documents ``fact chunk + [QUERY, key, value]`` (19 tokens): a chunk and a 3-token target."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        chunk, key, value = fact_chunk(rng)
        docs.append(torch.tensor([*chunk, QUERY, key, value]))
    return docs


def pretrain_in_context(model: nn.Module, steps: int = 600, batch: int = 16, seed: int = 1, lr: float = 3e-3) -> float:
    """Train every weight of ``model`` to answer from its context; returns the last loss (on the answers)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            chunk, key, value = fact_chunk(rng)
            rows.append([*chunk, QUERY, key, value])
        ids = torch.tensor(rows)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def recall(mem: MemkitModel, distractors: int, trials: int = 100, seed: int = 123) -> float:
    """Share of facts answered from memory: per trial, empty memory, inject a fact chunk, then
    ``distractors`` distractor chunks, and ask ``[QUERY, key]`` (greedy next token == value)."""
    rng = random.Random(seed)
    was = mem.training
    mem.eval()
    hits = 0
    try:
        for _ in range(trials):
            chunk, key, value = fact_chunk(rng)
            mem.reset_memory()
            mem.write_vectors(mem.capture(torch.tensor(chunk)), mem.new_source())
            for _ in range(distractors):
                mem.write_vectors(mem.capture(torch.tensor(distractor(rng))), mem.new_source())
            logits = mem(input_ids=torch.tensor([[QUERY, key]], device=mem.device)).logits
            hits += int(int(logits[0, -1].argmax()) == value)
    finally:
        mem.train(was)
    return hits / trials
