"""Memory as a ``transformers`` cache.

Memory vectors only ever supply keys and values, so a forward pass that reads memory is a standard
forward pass over a cache that already holds the memory's keys and values. :class:`MemoryCache` is a
:class:`~transformers.DynamicCache` pre-filled with them; it remembers how many of its positions are
memory so that the wrapper can widen attention masks to match.

Shapes (ein notation): ``b`` batch, ``h`` key/value heads, ``p`` memory (prefix) positions,
``e`` head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig

__all__ = ["LayerKV", "MemoryCache", "build_memory_cache"]

#: One layer's memory keys and values, each ``[1, h, p, e]``.
LayerKV = tuple[torch.Tensor, torch.Tensor]


class MemoryCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` whose first ``memory_length`` positions are memory.

    It behaves exactly like a ``DynamicCache`` (``generate`` appends to it, beam search reorders it);
    the only addition is :attr:`memory_length`, the number of leading positions that hold memory.
    """

    def __init__(self, config: PretrainedConfig, memory_length: int) -> None:
        super().__init__(config=config)
        self.memory_length = memory_length


def build_memory_cache(
    config: PretrainedConfig, layer_kv: Sequence[LayerKV], batch_size: int, writable: bool = False
) -> MemoryCache:
    """Build a fresh :class:`MemoryCache` holding ``layer_kv`` for ``batch_size`` rows.

    Args:
        config: the model's config; it decides the layer types (full or sliding window).
        layer_kv: per decoder layer, keys and values ``[1, h, p, e]``, as computed by the layer itself.
        batch_size: number of rows the cache must have (batch x beams for beam search).
        writable: give every row its own copy, so that rows can be filled in place (retrieval);
            otherwise rows share the given tensors.

    The stored tensors are never modified: ``DynamicCache`` concatenates into new tensors, so memory
    keys and values computed once can seed any number of caches.
    """
    memory_length = int(layer_kv[0][0].shape[-2]) if layer_kv else 0
    cache = MemoryCache(config, memory_length)
    if memory_length == 0:
        return cache
    for layer_idx, (keys, values) in enumerate(layer_kv):
        if batch_size != keys.shape[0]:
            keys = keys.expand(batch_size, *keys.shape[1:])
            values = values.expand(batch_size, *values.shape[1:])
        if writable:
            keys, values = keys.clone(), values.clone()
        cache.update(keys, values, layer_idx)
    return cache


class KVCaptured(Exception):
    """Raised by :class:`KVCapture` to stop a decoder layer once its keys and values are known."""


class KVCapture(DynamicCache):
    """A cache that records the keys and values a layer hands it, then stops that layer.

    Used to let each decoder layer compute memory keys and values with its own norm, projections,
    k-norm and rotary embedding, without running attention or the MLP.
    """

    def __init__(self) -> None:
        super().__init__()
        self.captured: dict[int, LayerKV] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.captured[layer_idx] = (key_states, value_states)
        raise KVCaptured
