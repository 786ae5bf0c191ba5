"""The :class:`LongTermStore` interface: where evicted memory goes (M+)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

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

    Contract (the store property tests check it):

    * :meth:`add` takes one layer's entries (vectors, retriever keys, ages, provenance) and stages
      them; the store merges its staging buffer into the main store once every ``merge_every``
      updates (M+: ``F``). Staged entries are visible at once: :meth:`size`, :meth:`entries`,
      :meth:`candidates` and :meth:`get` cover merged and staged entries alike.
    * Entry ids are row positions in :meth:`entries` (merged rows first, then staged rows). They stay
      valid until the next :meth:`add`, :meth:`advance`, :meth:`reset` or :meth:`load_state_dict`.
    * :meth:`advance` is called once per pool update, before that update's :meth:`add` calls: it
      adds ``amount`` to the age of every entry, staged or merged, of every layer, counts the update,
      and merges when the count says so. Entries added during an update that merged (after its
      :meth:`advance`, before the next) are merged at once, so what the pool drops on every
      ``merge_every``-th update does not wait a whole period in staging (as in official M+).
    * The store never holds more than ``capacity`` entries per layer (merged plus staged). When an
      :meth:`add` would exceed it, it evicts the oldest entries first (largest age; among equal
      ages, the earlier row), and adds their number to :meth:`evicted`. So every vector ever added is
      either held or counted as evicted.
    * :meth:`candidates` proposes entry ids for ``queries`` ``[q, key_size]``: an exact store may
      propose every entry; an approximate index proposes the likeliest ones (at least ``k`` when the
      store holds that many). The retriever scores the proposals exactly.
    * :meth:`get` with an id outside ``[0, size)`` raises :class:`~memkit.errors.InputError`.
    * :meth:`state_dict` / :meth:`load_state_dict` round-trip everything, staged entries, counters
      and the update count included; a state of another shape raises
      :class:`~memkit.errors.MemoryStateError`.
    * :meth:`snapshot` / :meth:`restore` put the store back exactly as it was, whatever happened in
      between (``inject`` takes a snapshot before every store update, to undo a failure). The default
      copies :meth:`state_dict`; a store whose tensors are never modified in place can do it cheaply.

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

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Most entries held per layer."""

    @abstractmethod
    def add(self, layer: int, entries: StoreEntries) -> None:
        """Stage one layer's entries, evicting the oldest past capacity."""

    @abstractmethod
    def advance(self, amount: int) -> None:
        """One pool update: add ``amount`` to every age of every layer; merge every ``merge_every`` updates."""

    @abstractmethod
    def size(self, layer: int) -> int:
        """Number of entries (merged plus staged) held for ``layer``."""

    @abstractmethod
    def staged(self, layer: int) -> int:
        """Number of those entries still in the staging buffer."""

    @abstractmethod
    def evicted(self, layer: int) -> int:
        """Number of entries of ``layer`` evicted so far for lack of capacity."""

    @abstractmethod
    def entries(self, layer: int) -> StoreEntries:
        """Every entry of ``layer``, merged rows first, then staged rows."""

    @abstractmethod
    def candidates(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Entry ids ``[c]`` of ``layer`` worth scoring for ``queries`` ``[q, key_size]``."""

    @abstractmethod
    def get(self, layer: int, ids: torch.Tensor) -> StoreEntries:
        """The entries with these ids (``[m]`` int64) of ``layer``, in the order of ``ids``."""

    def keys(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Keys ``[m, key_size]`` of entries ``ids`` ``[m]``; a store may override this to avoid gathering vectors."""
        return self.get(layer, ids).keys

    def ages(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """Ages ``[m]`` of entries ``ids`` ``[m]``; a store may override this to avoid gathering vectors."""
        return self.get(layer, ids).ages

    @abstractmethod
    def reset(self) -> None:
        """Remove every entry and zero the counters."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore the store exactly, as named tensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""

    def snapshot(self) -> Any:
        """An opaque record of the store now, for :meth:`restore`. Default: a copy of :meth:`state_dict`."""
        return {name: t.clone() for name, t in self.state_dict().items()}

    def restore(self, snapshot: Any) -> None:
        """Put the store back as it was when :meth:`snapshot` returned ``snapshot``."""
        self.load_state_dict(snapshot)
