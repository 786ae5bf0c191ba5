"""The :class:`Retriever` interface: bringing long-term memory back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from memkit.config import MemkitConfig
from memkit.interfaces.store import LongTermStore

if TYPE_CHECKING:
    from memkit.backbone import Backbone

__all__ = ["Retriever"]


class Retriever(nn.Module, ABC):
    """Maps hidden states to query and key vectors and picks long-term entries for a prompt.

    Contract:

    * :meth:`keys` maps one layer's memory vectors, already passed through that layer's input norm
      (``[m, d]``), to keys ``[m, key_size]``; the store keeps these keys beside the vectors.
    * :meth:`select` receives one layer's input hidden states of the prompt, passed through that
      layer's input norm (``[n, d]``), scores the store's entries for that layer (proposals from
      :meth:`LongTermStore.candidates`, scored exactly), and returns exactly ``min(k, store.size(layer))``
      distinct entry ids, **ordered oldest first** (largest age first), ready to be placed before the
      pool's vectors. It must never return an id the store does not hold.
    * A retriever is an ``nn.Module``: trainable parameters (projectors) live on it and are saved
      with the recipe's weights, not with the memory state.

    Example:

    ```python
    import memkit
    from memkit import Retriever, MemkitConfig
    from pydantic import Field

    class Newest(Retriever):
        name = "newest"

        class Config(MemkitConfig):
            key_size: int = Field(8, description="width of the stored keys")

        def keys(self, layer, vectors):
            return vectors.new_zeros(vectors.shape[0], self.config.key_size)

        def select(self, layer, hidden, store, k):
            n = store.size(layer)
            return torch.arange(max(n - k, 0), n)  # the newest k rows, oldest of them first
    ```

    Class attributes:
        name: the name recipes use for this retriever.
        Config: the pydantic config class.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MemkitConfig]]
    #: The model view (for layer norms and attention projections); not a submodule.
    backbone: Backbone

    def __init__(self, config: MemkitConfig, *, backbone: Backbone) -> None:
        super().__init__()
        self.config = config
        self.num_layers = backbone.num_layers
        self.hidden_size = backbone.hidden_size
        # Not a submodule: the retriever must not own the user's model.
        object.__setattr__(self, "backbone", backbone)

    @property
    @abstractmethod
    def key_size(self) -> int:
        """Width of the keys :meth:`keys` returns."""

    @abstractmethod
    def keys(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """Keys ``[m, key_size]`` for one layer's memory vectors ``[m, d]``."""

    @abstractmethod
    def select(self, layer: int, hidden: torch.Tensor, store: LongTermStore, k: int) -> torch.Tensor:
        """Exactly ``min(k, store.size(layer))`` distinct entry ids of ``layer`` to bring back, oldest first."""
