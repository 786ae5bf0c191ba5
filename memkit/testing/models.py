"""Tiny random decoder models built from configs in code (no download), one per family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
)

__all__ = ["TINY_FAMILIES", "tiny_model"]

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

#: model_type -> extra config fields on top of a shared tiny shape (2 layers, d = 32, 4 heads, 2 KV heads).
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma3_text": {
        "head_dim": 8,
        "sliding_window": 256,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {},
    "olmo2": {},
    "granite": {},
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` (a key of :data:`TINY_FAMILIES`), in eval mode, float32."""
    if family not in TINY_FAMILIES:
        raise KeyError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    fields = {**_COMMON, **TINY_FAMILIES[family], **overrides}
    config = AutoConfig.for_model(family, **fields)
    torch.manual_seed(seed)
    builder: Callable[..., PreTrainedModel] = AutoModelForCausalLM.from_config
    model = builder(config, dtype=torch.float32)
    return model.eval()
