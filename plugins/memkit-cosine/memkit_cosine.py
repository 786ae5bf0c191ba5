"""memkit-cosine: a training-free memkit retriever that ranks long-term memory by cosine similarity.

Installing this distribution is all it takes: its ``memkit`` entry point (``cosine = "memkit_cosine"``)
makes memkit call :func:`register_retrievers` below when it builds its registry, and recipes can then
name the retriever ``"cosine"``::

    mem = memkit.wrap(model, "mplus", retriever={"name": "cosine"})

Keys and queries live in a ``key_size``-dimensional space reached through one fixed random orthogonal
projection, the same for every layer and identical for a given seed; nothing is trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

import memkit
from memkit import InputError, LongTermStore, MemkitConfig, Registry, Retriever
from memkit.scoring import oldest_first

if TYPE_CHECKING:
    from memkit.backbone import Backbone

__all__ = ["CosineRetriever", "orthogonal_projection", "register_retrievers"]
__version__ = "0.1.0"


# --8<-- [start:projection]
def orthogonal_projection(width: int, key_size: int, seed: int) -> torch.Tensor:
    """A fixed random orthogonal projection ``[width, key_size]`` (float32, on the CPU).

    The QR factorisation of a Gaussian matrix drawn from ``torch.Generator().manual_seed(seed)``, with
    the signs fixed so that the result is unique (and Haar-distributed): the same arguments always give
    the same matrix. When ``key_size <= width`` its columns are orthonormal (a random projection onto a
    ``key_size``-dimensional subspace); when ``key_size > width`` its rows are, so ``x @ P`` keeps
    lengths and angles exactly.

    Args:
        width: input width ``d`` (the model's hidden size).
        key_size: output width.
        seed: seed of the Gaussian draw.

    Returns:
        ``[width, key_size]`` float32 matrix ``P``; ``P.T @ P = I`` or ``P @ P.T = I``.
    """
    generator = torch.Generator().manual_seed(seed)
    tall, narrow = max(width, key_size), min(width, key_size)
    gaussian = torch.randn(tall, narrow, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # q: [tall, narrow], orthonormal columns
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # make the factorisation unique
    projection: torch.Tensor = q if width >= key_size else q.T
    return projection.to(torch.float32).contiguous()


# --8<-- [end:projection]


# --8<-- [start:class]
class CosineRetriever(Retriever):
    """Ranks stored entries by cosine similarity to the prompt, with no trained parts.

    With ``P`` the fixed ``[d, key_size]`` projection of :func:`orthogonal_projection` and
    ``unit(x) = x / |x|``:

    * an entry's key is ``unit(v) @ P`` for its (normalised) memory vector ``v`` ``[d]``;
    * the prompt's query is ``q = unit(mean_t(unit(h_t) @ P))`` over its (normalised) hidden states
      ``h_t`` ``[n, d]``;
    * an entry's score is ``cos(key_j, q)``; the ``k`` best (ties: the earlier candidate) are returned
      oldest first.

    The store proposes candidates for ``q`` (an exact store proposes every entry); they are scored
    exactly. If a store proposes fewer than ``k``, every entry is scored instead, so :meth:`select`
    always returns exactly ``min(k, store.size(layer))`` ids.
    """

    name = "cosine"

    class Config(MemkitConfig):
        """Options of the ``"cosine"`` retriever (a recipe's ``[retriever]`` section)."""

        key_size: int = Field(
            64, gt=0, description="width of keys and queries: the output width of the random orthogonal projection"
        )
        seed: int = Field(
            0, ge=0, description="seed of the random orthogonal projection; the same seed gives the same projection"
        )

    config: Config
    #: ``[d, key_size]`` float32, the fixed projection (a buffer: it follows ``.to(device)``).
    projection: torch.Tensor

    def __init__(self, config: Config, *, backbone: Backbone) -> None:
        super().__init__(config, backbone=backbone)
        projection = orthogonal_projection(backbone.hidden_size, config.key_size, config.seed)
        self.register_buffer("projection", projection.to(backbone.device))

    # --8<-- [end:class]

    # --8<-- [start:keys]
    @property
    def key_size(self) -> int:
        return self.config.key_size

    def keys(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """Keys ``[m, key_size]`` (float32) of one layer's normalised memory vectors ``[m, d]``."""
        self._check_layer(layer)
        self._check_states(vectors, "memory vectors", allow_empty=True)
        return self._project(vectors)

    def query(self, hidden: torch.Tensor) -> torch.Tensor:
        """The unit query ``[key_size]`` (float32, on the CPU) of a prompt's normalised states ``[n, d]``."""
        self._check_states(hidden, "prompt states", allow_empty=False)
        return F.normalize(self._project(hidden).mean(dim=0), dim=0).cpu()

    def _project(self, states: torch.Tensor) -> torch.Tensor:
        """``[m, d] -> [m, key_size]``: each row L2-normalised, then projected (float32)."""
        projection = self.projection.float()
        unit = F.normalize(states.detach().to(device=projection.device, dtype=torch.float32), dim=-1)
        return unit @ projection

    # --8<-- [end:keys]

    # --8<-- [start:select]
    def select(self, layer: int, hidden: torch.Tensor, store: LongTermStore, k: int) -> torch.Tensor:
        """Ids ``[min(k, store.size(layer))]`` (int64) of the entries most similar to the prompt, oldest first.

        Args:
            layer: the memory layer.
            hidden: ``[n >= 1, d]`` the prompt's hidden states at that layer, after its input norm.
            store: the long-term store.
            k: how many entries to bring back (``>= 0``).
        """
        self._check_layer(layer)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"k must be an int >= 0, got {k!r}")
        query = self.query(hidden)  # [key_size]
        want = min(k, store.size(layer))
        if want == 0:
            return torch.zeros(0, dtype=torch.long)
        ids = torch.unique(store.candidates(layer, query.unsqueeze(0), want))
        if len(ids) < want:  # a store that proposes too few: score everything
            ids = torch.arange(store.size(layer))
        entries = store.get(layer, ids)
        keys = F.normalize(entries.keys.float(), dim=-1)  # [c, key_size]
        scores = keys @ query  # [c] cosines
        top = torch.sort(scores, descending=True, stable=True).indices[:want]
        return oldest_first(ids[top], entries.ages[top])

    # --8<-- [end:select]

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise InputError(f"layer {layer} is out of range; the model has {self.num_layers} memory layers")

    def _check_states(self, states: torch.Tensor, what: str, *, allow_empty: bool) -> None:
        if states.dim() != 2 or states.shape[1] != self.hidden_size or (states.shape[0] == 0 and not allow_empty):
            least = 0 if allow_empty else 1
            raise InputError(
                f"the cosine retriever needs {what} of shape [n >= {least}, d={self.hidden_size}], "
                f"got {list(states.shape)}"
            )


# --8<-- [start:hook]
@memkit.hookimpl
def register_retrievers(registry: Registry) -> None:
    """memkit's ``register_retrievers`` hook: registers :class:`CosineRetriever` as ``"cosine"``."""
    registry.add_retriever(CosineRetriever)


# --8<-- [end:hook]
