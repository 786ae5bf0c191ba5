"""Training stages: the settings of one stage, as a recipe's ``[training.<stage>]`` section holds them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from memkit.config import MemkitConfig

__all__ = ["StageConfig"]


class StageConfig(MemkitConfig):
    """One training stage (M+ has three: MemoryLLM continual training, long documents, long-term memory).

    Defaults are M+'s stage-1 settings on Llama-3.1-8B (spec §3 and §5) where the spec gives them; a
    recipe's ``[training.<stage>]`` section overrides what differs. Each step takes one document:
    its first chunks are injected and the next piece of it (the target) is scored with memory.
    """

    description: str = Field("", description="one line on what the stage trains")
    steps: int = Field(1_200_000, gt=0, description="optimiser steps (M+ stage 1: 1.2M steps, about 4 weeks)")
    learning_rate: float = Field(
        4.6e-5,
        gt=0,
        description="peak learning rate of the adapters and learned embeddings (M+ stage 1: 4.6e-5; the official "
        "code multiplies its base rate by GPUs x batch x accumulation, memkit takes the rate as given)",
    )
    final_lr_factor: float = Field(
        0.1, gt=0, le=1, description="the learning rate falls linearly to this factor of its peak (M+: 1 -> 0.1)"
    )
    decay_steps: int | None = Field(
        100_000, gt=0, description="steps over which it falls (M+: 100k), then stays; None: over all steps"
    )
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 before the decay (M+: none)")
    retriever_learning_rate: float = Field(1e-4, gt=0, description="learning rate of the retriever (M+: 1e-4)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this; None: no clipping")
    gradient_accumulation_steps: int = Field(1, gt=0, description="documents whose gradients add up per step")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate's mixed precision (M+: bf16-mixed on GPUs); 'no' on CPU"
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description=(
            "how several processes train together: 'ddp' keeps a whole copy of the model in each (accelerate's "
            "DistributedDataParallel); 'fsdp' shards every parameter across them with torch's fully_shard "
            "(one group per decoder layer plus one for the rest); one process trains alone either way"
        ),
    )
    multi_chunk_prob: float = Field(
        0.8,
        ge=0,
        le=1,
        description="probability of the multi-chunk path (chunks injected without gradient, the target reads the "
        "whole pool); otherwise the two-chunk path backpropagates through one injection (M+: 0.8; stage 2: 0.9)",
    )
    min_chunk_tokens: int = Field(16, gt=0, description="shortest injected chunk (M+: 16)")
    max_chunk_tokens: int = Field(512, gt=0, description="longest injected chunk (M+: 512)")
    min_target_tokens: int = Field(
        16, ge=2, description="shortest target scored with memory (M+: as short as its shortest chunk, 16)"
    )
    max_target_tokens: int = Field(2048, gt=0, description="longest target scored with memory (M+: 2,048)")
    max_contexts: int = Field(50, gt=0, description="most chunks injected before one target (M+: 50, rising later)")
    context_schedule: dict[str, int] = Field(
        default_factory=lambda: {"100000": 100, "200000": 200},
        description="from the step given as key on, max_contexts becomes the value (M+: 100 at 100k, 200 at 200k)",
    )
    revisit_prob: float = Field(
        0.2,
        ge=0,
        le=1,
        description="probability that a step re-scores an earlier document's target after the injections since "
        "(the revisit task; official pass_ratio = 0.8 is read as the share of steps that do not revisit)",
    )
    revisit_cache: int = Field(64, gt=0, description="earlier targets kept for revisits (oldest dropped first)")
    plain_lm_prob: float = Field(
        0.05,
        ge=0,
        le=1,
        description="probability of a plain language-modelling step on context and target with no memory "
        "(M+: 5-10%), so the read adapter keeps the model's ordinary behaviour",
    )
    empty_memory_prob: float = Field(
        0.0, ge=0, le=1, description="probability of emptying memory before a step (M+ stage 3: 0.2)"
    )
    train_retriever: bool = Field(
        False, description="train the retriever with M+'s balanced BCE on detached hidden states (stages 2 and 3)"
    )
    retriever_loss_weight: float = Field(1.0, ge=0, description="weight of the retriever loss added to the LM loss")
    negative_loss_weight: float = Field(
        1.0, ge=0, description="lambda: weight of the negatives in the balanced BCE, divided by 1 + lambda (M+: 1)"
    )
    log_every: int = Field(10, gt=0, description="steps between log records (loss, retention probe, tokens/s)")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints; None: only at the end")
    seed: int = Field(0, ge=0, description="seed of every random choice; the same seed repeats a run exactly")

    @model_validator(mode="after")
    def _consistent(self) -> StageConfig:
        if self.min_chunk_tokens > self.max_chunk_tokens:
            raise ValueError(
                f"min_chunk_tokens ({self.min_chunk_tokens}) exceeds max_chunk_tokens ({self.max_chunk_tokens})"
            )
        if self.min_target_tokens > self.max_target_tokens:
            raise ValueError(
                f"min_target_tokens ({self.min_target_tokens}) exceeds max_target_tokens ({self.max_target_tokens})"
            )
        for step, cap in self.context_schedule.items():
            if not step.isdigit() or cap <= 0:
                raise ValueError(f"context_schedule maps step numbers to positive caps, got {step!r} = {cap!r}")
        return self

    def contexts_at(self, step: int) -> int:
        """``max_contexts`` in force at ``step`` (0-based), after the schedule."""
        cap = self.max_contexts
        for start, value in sorted((int(k), v) for k, v in self.context_schedule.items()):
            if step >= start:
                cap = value
        return cap
