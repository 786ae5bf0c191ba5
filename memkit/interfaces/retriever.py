"""The :class:`Retriever` interface: bringing long-term memory back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from memkit.config import MemkitConfig
from memkit.interfaces.store import LongTermStore

__all__ = ["Retriever"]


class Retriever(nn.Module, ABC):
    """Maps hidden states to query and key vectors and picks long-term entries for a prompt.

    Contract:

    * :meth:`keys` maps one layer's memory vectors ``[m, d]`` to keys ``[m, key_size]``; the store
      keeps these keys beside the vectors.
    * :meth:`select` receives one layer's (normalised) input hidden states of the prompt ``[n, d]``,
      scores the store's entries for that layer, and returns at most ``k`` entry ids ``[k']``,
      **ordered oldest first** (largest age first), ready to be placed before the pool's vectors.
      It must raise :class:`~memkit.errors.InputError` if ``k`` exceeds what the store holds and the
      retriever cannot pad, and it must never return an id the store does not hold.
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
            return torch.arange(max(n - k, 0), n)
    ```

    Class attributes:
        name: the name recipes use for this retriever.
        Config: the pydantic config class.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MemkitConfig]]

    def __init__(self, config: MemkitConfig, *, num_layers: int, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size

    @property
    @abstractmethod
    def key_size(self) -> int:
        """Width of the keys :meth:`keys` returns."""

    @abstractmethod
    def keys(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """Keys ``[m, key_size]`` for one layer's memory vectors ``[m, d]``."""

    @abstractmethod
    def select(self, layer: int, hidden: torch.Tensor, store: LongTermStore, k: int) -> torch.Tensor:
        """Ids ``[k']`` (``k' <= k``) of the entries of ``layer`` to bring back, oldest first."""
