"""Reading long-term memory during a forward pass (M+).

A layer's retrieval needs that layer's own input for the prompt, which exists only once the forward
pass reaches the layer. The read cache therefore leaves a gap of ``k`` positions (after any BOS, before
the short-term memory) in every layer; a temporary pre-hook on each decoder layer, on the first
(prefill) call only, asks the retriever for that layer's entries, has the injector compute their keys
and values with the layer itself, and writes them into the gap. Decoding steps reuse the cache.

Each row of a batch retrieves for itself (padding excluded), so rows may bring back different entries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from memkit.backbone import Backbone
from memkit.cache import MemoryCache
from memkit.errors import PluginError
from memkit.interfaces import Injector, LongTermStore, Retriever

__all__ = ["retrieval_hooks"]


@contextlib.contextmanager
def retrieval_hooks(
    backbone: Backbone,
    injector: Injector,
    retriever: Retriever,
    store: LongTermStore,
    cache: MemoryCache,
    token_mask: torch.Tensor,
    k: int,
) -> Iterator[list[torch.Tensor]]:
    """Fill each layer's gap of ``k`` positions with retrieved entries while the block runs.

    Args:
        cache: the read cache, ``[rows, h, p, e]`` per layer, with a zero gap at ``injector.gap_start``.
        token_mask: ``[rows, n]``, 1 for the real prompt tokens of each row (0 for padding).
        k: gap width; every layer's store must hold at least ``k`` entries.

    Yields:
        a list that receives, per layer, the ids retrieved for each row (``[rows, k]``), for inspection.
    """
    start = injector.gap_start
    positions = torch.arange(start, start + k)
    done = [False] * backbone.num_layers
    chosen: list[torch.Tensor] = []

    def fill(layer: int, hidden: torch.Tensor) -> None:
        if done[layer]:
            return
        done[layer] = True
        cached: Any = cache.layers[layer]
        keys, values = cached.keys, cached.values
        rows: list[torch.Tensor] = []
        # Rows repeated by beam search or num_return_sequences retrieve once.
        previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for row in range(hidden.shape[0]):
            states = hidden[row][token_mask[row].to(torch.bool)]
            if previous is not None and torch.equal(previous[0], states):
                _, ids, k_new, v_new = previous
            else:
                normed = backbone.input_norm(layer, states)
                ids = retriever.select(layer, normed.detach(), store, k)
                if ids.shape != (k,) or len(set(ids.tolist())) != k:
                    raise PluginError(
                        f"retriever {retriever.name!r} returned {list(ids.shape)} ids for layer {layer}; it must "
                        f"return exactly {k} distinct entry ids"
                    )
                vectors = store.get(layer, ids).vectors
                k_new, v_new = injector.layer_kv(layer, vectors, positions)
                previous = (states, ids, k_new, v_new)
            keys[row : row + 1, :, start : start + k] = k_new.to(keys.dtype)
            values[row : row + 1, :, start : start + k] = v_new.to(values.dtype)
            rows.append(ids)
        chosen.append(torch.stack(rows))

    handles = []
    try:
        for index, layer in enumerate(backbone.layers):

            def pre(module: object, args: tuple, kwargs: dict, index: int = index) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                fill(index, hidden)

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        yield chosen
    finally:
        for handle in handles:
            handle.remove()
