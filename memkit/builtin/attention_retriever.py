"""A training-free retriever: scores long-term memory with the layer's own attention projections."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import einops
import torch
from pydantic import Field

from memkit.config import MemkitConfig
from memkit.errors import InputError
from memkit.hookspecs import hookimpl
from memkit.interfaces.retriever import Retriever
from memkit.interfaces.store import LongTermStore
from memkit.registry import Registry
from memkit.scoring import oldest_first

if TYPE_CHECKING:
    from memkit.backbone import Backbone

__all__ = ["AttentionRetriever"]


class AttentionRetriever(Retriever):
    """Scores stored entries by the attention the prompt would pay them, with no trained parts.

    Keys are the layer's own key projection of the (normalised) memory vector, without positions
    (``[m, kv_heads * e]``, k-norm included). Queries are the layer's own query projection of the
    prompt's normalised hidden states, per head. An entry's score is the attention mass the prompt
    would give it if it attended to the proposals alone:
    ``s_j = mean over tokens t and heads h of softmax_j(q_th . k_j,g(h) / sqrt(e))``, where ``g(h)`` is
    the key head that head ``h`` reads (grouped-query attention). The top ``k`` are returned oldest first.

    With ``block = B > 1`` it returns passages instead of single entries: the store's entries, in the
    order they were stored, are cut into runs of ``B`` (``ids // B``), a run's score is the sum of its
    scored entries' scores, and the best runs come back whole (the last one cut short to make ``k``).
    Consecutive stored entries are consecutive tokens of the injected text, so the model reads
    coherent passages rather than tokens picked one by one from everywhere.
    """

    name = "attention"

    class Config(MemkitConfig):
        token_block: int = Field(16, gt=0, description="prompt tokens scored at once (bounds memory use)")
        block: int = Field(
            1,
            gt=0,
            description=(
                "retrieve runs of this many consecutive stored entries (passages of the injected text), "
                "scored by their summed attention mass; 1 retrieves single entries"
            ),
        )

    config: Config

    def __init__(self, config: Config, *, backbone: Backbone) -> None:
        super().__init__(config, backbone=backbone)
        cfg = backbone.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or backbone.hidden_size // self.heads)
        self._projections = [backbone.attention_projections(i) for i in range(backbone.num_layers)]

    @property
    def key_size(self) -> int:
        return self.kv_heads * self.head_dim

    def keys(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        _, key = self._projections[layer]
        return key(vectors.to(device=self.backbone.device, dtype=self.backbone.dtype)).flatten(-2)

    def _queries(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        query, _ = self._projections[layer]
        return query(hidden.to(device=self.backbone.device, dtype=self.backbone.dtype)).float().cpu()

    def _in_key_space(self, queries: torch.Tensor) -> torch.Tensor:
        """``[n, heads, e] -> [n * heads, kv_heads * e]``: each head's query in its key head's block, so that
        an inner product with a stored key is that head's attention logit (times sqrt(e))."""
        n = queries.shape[0]
        group = self.heads // self.kv_heads
        placed = queries.new_zeros(n, self.heads, self.kv_heads, self.head_dim)
        for h in range(self.heads):
            placed[:, h, h // group] = queries[:, h]
        return placed.reshape(n * self.heads, self.key_size)

    def select(self, layer: int, hidden: torch.Tensor, store: LongTermStore, k: int) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[0] == 0:
            raise InputError(f"retrieval needs [n >= 1, d] prompt states, got {list(hidden.shape)}")
        want = min(k, store.size(layer))
        if want == 0:
            return torch.zeros(0, dtype=torch.long)
        queries = self._queries(layer, hidden)  # [n, H, e]
        ids = store.candidates(layer, self._in_key_space(queries), want)
        mass = self._mass(queries, store.keys(layer, ids))
        if self.config.block == 1:
            chosen = ids[mass.topk(min(want, len(ids))).indices]
        else:
            chosen = self._best_runs(ids, mass, store.size(layer), want)
        return oldest_first(chosen, store.ages(layer, chosen))

    def _mass(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attention mass ``[c]`` of keys ``[c, kv_heads * e]`` for queries ``[n, H, e]``, summed over
        tokens and heads (a softmax over the ``c`` keys per token and head)."""
        # b tokens, g key heads, r query heads per key head, c keys, e head dim
        keys = einops.rearrange(keys.float(), "c (g e) -> g e c", g=self.kv_heads)
        scale = 1.0 / math.sqrt(self.head_dim)
        mass = torch.zeros(keys.shape[-1])
        for start in range(0, queries.shape[0], self.config.token_block):
            q = einops.rearrange(
                queries[start : start + self.config.token_block], "b (g r) e -> g (b r) e", g=self.kv_heads
            )
            logits = torch.bmm(q, keys) * scale  # [g, b * r, c]
            mass += logits.softmax(dim=-1).sum(dim=(0, 1))
        return mass

    def _best_runs(self, ids: torch.Tensor, mass: torch.Tensor, size: int, want: int) -> torch.Tensor:
        """The ``want`` ids of the best-scored runs of ``block`` consecutive ids (``ids // block``), the
        last run cut short; a run's score is the summed ``mass`` of its scored ``ids``."""
        block = self.config.block
        runs = torch.zeros((size + block - 1) // block).index_add_(0, ids // block, mass)
        # best first; one run more than want needs, as the last run of the store may be short
        order = runs.topk(min(len(runs), -(-want // block) + 1)).indices
        members = (order[:, None] * block + torch.arange(block)).reshape(-1)
        return members[members < size][:want]


@hookimpl
def register_retrievers(registry: Registry) -> None:
    registry.add_retriever(AttentionRetriever)
