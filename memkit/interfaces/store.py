"""The :class:`LongTermStore` interface: where evicted memory goes (M+)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from memkit.config import MemkitConfig

__all__ = ["LongTermStore", "StoreEntries"]


@dataclass(frozen=True)
class StoreEntries:
    """Entries of one memory layer, as added to or read from a store.

    Attributes:
        vectors: ``[m, d]`` latent vectors.
        keys: ``[m, k]`` retriever keys (``k`` is the retriever's key width).
        ages: ``[m]`` int64 ages, in the same units as the pool's.
        sources: ``[m]`` int64 provenance ids.
    """

    vectors: torch.Tensor
    keys: torch.Tensor
    ages: torch.Tensor
    sources: torch.Tensor

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


class LongTermStore(ABC):
    """Long-term memory: per memory layer, what the pool evicted, with a capacity.

    Contract:

    * :meth:`add` takes one layer's entries; they may sit in a staging buffer until the store merges
      them (M+ merges every ``F`` updates), but :meth:`candidates` and :meth:`get` see them at once.
    * The store never holds more than its capacity per layer; past it, it evicts the oldest entries
      (largest age) first, and counts what it evicted.
    * :meth:`advance` adds to the age of every entry, staged or merged, on every pool update.
    * :meth:`candidates` returns up to ``k`` entry ids of one layer for ``queries`` ``[q, k_dim]``,
      best first; :meth:`get` returns those entries. Ids stay valid until the next :meth:`add` or
      :meth:`advance`. Asking for ids that are out of range raises
      :class:`~memkit.errors.InputError`.
    * :meth:`state_dict` / :meth:`load_state_dict` round-trip everything, staged entries included.

    Class attributes:
        name: the name recipes use for this store.
        Config: the pydantic config class.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MemkitConfig]]

    def __init__(self, config: MemkitConfig, *, num_layers: int, hidden_size: int, key_size: int) -> None:
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.key_size = key_size

    @abstractmethod
    def add(self, layer: int, entries: StoreEntries) -> None:
        """Add one layer's entries (staged or merged, as the store's policy says)."""

    @abstractmethod
    def advance(self, amount: int) -> None:
        """Add ``amount`` to the age of every entry of every layer."""

    @abstractmethod
    def size(self, layer: int) -> int:
        """Number of entries (merged plus staged) held for ``layer``."""

    @abstractmethod
    def candidates(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Up to ``k`` entry ids ``[k']`` of ``layer`` for ``queries`` ``[q, key_size]``, best first."""

    @abstractmethod
    def get(self, layer: int, ids: torch.Tensor) -> StoreEntries:
        """The entries with these ids (``[m]`` int64) of ``layer``."""

    @abstractmethod
    def reset(self) -> None:
        """Remove every entry."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore the store exactly, as named tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
