"""Perplexity integrity: perplexity on held-out text stays where it started as injections go on.

Held-out text (the last ``held_out_tokens`` tokens of the source, never injected and at least one
injection away from what is) is scored by the
wrapped model, reading memory, on empty memory, then after ``warmup`` injections (by default as many
as fill the short-term pool: the *start*), and again after every ``every`` of the ``injections``
that follow; each injection is the next ``inject_tokens`` tokens of the source. Memory that holds
related text lowers perplexity (it is context), so drift is measured from the start, once memory is
full, as ``ppl_n / ppl_start - 1``; the plain model's perplexity on the same text is reported beside
it. The source is Paul Graham's essays, or a UTF-8 text file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from memkit.errors import DataError
from memkit.evaluation.asking import plain_model
from memkit.evaluation.datasets import essays

__all__ = ["PerplexityConfig", "perplexity", "run_perplexity"]


class PerplexityConfig(BaseModel):
    """Settings of the perplexity-integrity evaluation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    injections: int = Field(64, ge=1, description="number N of injections after the warm-up")
    warmup: int | None = Field(
        None, ge=0, description="injections before the start; default: as many as fill the short-term pool"
    )
    every: int = Field(8, ge=1, description="measure perplexity after every this many injections")
    inject_tokens: int = Field(512, ge=1, description="tokens per injection")
    held_out_tokens: int = Field(1024, ge=2, description="tokens of held-out text scored each time")
    text: str | None = Field(None, description="a UTF-8 text file as the source; default: Paul Graham's essays")

    @model_validator(mode="after")
    def _every(self) -> PerplexityConfig:
        if self.every > self.injections:
            raise ValueError(f"every ({self.every}) is larger than injections ({self.injections})")
        return self


@torch.no_grad()
def perplexity(model: Any, ids: list[int]) -> float:
    """``exp`` of the mean next-token loss of ``model`` (wrapped: reading memory; or plain) on ``ids``."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
    return float(math.exp(float(loss)))


def _source(config: PerplexityConfig) -> str:
    if config.text is None:
        return essays()
    path = Path(config.text)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from None


def run_perplexity(mem: Any, tokenizer: Any, config: PerplexityConfig, progress: bool = True) -> dict[str, Any]:
    """Run the evaluation on a wrapped model; returns ``{"results": ..., "samples": [...]}``.

    ``samples`` has one row per measurement (``phase`` ``"empty"``, ``"warmup"`` or ``"run"``).
    Memory is emptied first and left holding the injections.

    Raises:
        DataError: the source holds fewer tokens than the injections and the held-out text need.
    """
    start = time.perf_counter()
    size = config.inject_tokens
    warmup = config.warmup if config.warmup is not None else math.ceil(mem.pool.capacity / size)
    total = warmup + config.injections
    # The held-out text is the end of the source, at least one injection away from the injected text:
    # text right after what memory holds would be read as its continuation, not as held-out text.
    need = (total + 1) * size + config.held_out_tokens
    ids = tokenizer(_source(config), add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise DataError(
            f"the source holds {len(ids)} tokens; {warmup} warm-up and {config.injections} injections of {size}, "
            f"a gap of {size} and {config.held_out_tokens} held-out tokens need {need}"
        )
    held_out = ids[len(ids) - config.held_out_tokens :]
    with plain_model(mem) as model:
        plain = perplexity(model, held_out)
    mem.reset_memory()
    rows: list[dict[str, Any]] = [
        {"phase": "empty", "injections": 0, "tokens_injected": 0, "perplexity": perplexity(mem, held_out)}
    ]
    for n in tqdm(range(1, total + 1), desc="perplexity", unit="injection", disable=not progress):
        mem.inject(ids[(n - 1) * size : n * size])
        run = n - warmup
        if n == warmup or (run > 0 and (run % config.every == 0 or n == total)):
            phase = "warmup" if run <= 0 else "run"
            rows.append(
                {"phase": phase, "injections": n, "tokens_injected": n * size, "perplexity": perplexity(mem, held_out)}
            )
    first = rows[1]["perplexity"] if warmup else rows[0]["perplexity"]
    for row in rows:
        row["drift"] = row["perplexity"] / first - 1.0
    measured = [r for r in rows if r["phase"] != "empty" or not warmup]
    results = {
        "plain_perplexity": plain,
        "empty_memory_perplexity": rows[0]["perplexity"],
        "warmup_injections": warmup,
        "start_perplexity": first,
        "end_perplexity": rows[-1]["perplexity"],
        "end_drift": rows[-1]["drift"],
        "max_abs_drift": max(abs(r["drift"]) for r in measured),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return {"results": results, "samples": rows}
