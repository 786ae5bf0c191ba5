"""The M+ retriever: per-layer query and key projectors, scored by mean sigmoid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from torch import nn

from memkit.config import MemkitConfig
from memkit.errors import InputError
from memkit.hookspecs import hookimpl
from memkit.interfaces.retriever import Retriever
from memkit.interfaces.store import LongTermStore
from memkit.registry import Registry
from memkit.scoring import mean_sigmoid_scores, oldest_first

if TYPE_CHECKING:
    from memkit.backbone import Backbone

__all__ = ["ProjectorRetriever", "projector"]


def projector(width: int, hidden: int, key_size: int) -> nn.Sequential:
    """``Linear(width -> hidden) -> SiLU -> Linear(hidden -> key_size)``, no biases (M+'s projector).

    The indices ``0`` and ``2`` of the ``Sequential`` match the official checkpoints' tensor names
    (``query_proj.0.weight``, ``query_proj.2.weight``).
    """
    return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, key_size, bias=False))


class ProjectorRetriever(Retriever):
    """M+'s co-trained retriever (spec §4).

    Per memory layer ``i``, a query projector ``f_q`` and a key projector ``f_k`` map normalised hidden
    states ``[*, d]`` to ``[*, key_size]`` (``d -> 2 * key_size -> key_size``, SiLU, no bias). A stored
    entry ``j`` is scored for a prompt by ``s_j = mean_t sigmoid(f_q(h_t) . k_j)`` over the prompt's
    tokens ``t``; the top ``k`` are returned oldest first.

    Untrained, the projectors are random (PyTorch's default init); the training stage of M+ fits them
    with a balanced binary cross-entropy on detached hidden states.
    """

    name = "projector"

    class Config(MemkitConfig):
        key_size: int = Field(256, gt=0, description="width of queries and keys (M+: 256, about d/16 for Llama-3.1-8B)")
        hidden_size: int | None = Field(
            None, gt=0, description="width of the projectors' hidden layer; None means 2 * key_size (M+)"
        )

    config: Config

    def __init__(self, config: Config, *, backbone: Backbone) -> None:
        super().__init__(config, backbone=backbone)
        d, dk = backbone.hidden_size, config.key_size
        hidden = config.hidden_size or 2 * dk
        self.query_proj = nn.ModuleList(projector(d, hidden, dk) for _ in range(backbone.num_layers))
        self.key_proj = nn.ModuleList(projector(d, hidden, dk) for _ in range(backbone.num_layers))
        self.to(device=backbone.device, dtype=backbone.dtype)
        self.requires_grad_(False)

    @property
    def key_size(self) -> int:
        return self.config.key_size

    def queries(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``f_q`` of layer ``layer``: ``[n, d] -> [n, key_size]``."""
        proj: Any = self.query_proj[layer]
        weight = proj[0].weight
        return proj(hidden.to(device=weight.device, dtype=weight.dtype))

    def keys(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        proj: Any = self.key_proj[layer]
        weight = proj[0].weight
        return proj(vectors.to(device=weight.device, dtype=weight.dtype))

    def select(self, layer: int, hidden: torch.Tensor, store: LongTermStore, k: int) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise InputError(f"retrieval needs [n >= 1, d] prompt states, got {list(hidden.shape)}")
        queries = self.queries(layer, hidden).detach().float().cpu()
        want = min(k, store.size(layer))
        if want == 0:
            return torch.zeros(0, dtype=torch.long)
        ids = store.candidates(layer, queries, want)
        scores = mean_sigmoid_scores(queries, store.keys(layer, ids))
        chosen = ids[scores.topk(min(want, len(ids))).indices]
        return oldest_first(chosen, store.ages(layer, chosen))


@hookimpl
def register_retrievers(registry: Registry) -> None:
    registry.add_retriever(ProjectorRetriever)
