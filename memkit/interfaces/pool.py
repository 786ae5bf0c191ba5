"""The :class:`MemoryPool` interface: short-term latent memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from memkit.config import MemkitConfig

__all__ = ["Evicted", "MemoryPool"]


@dataclass(frozen=True)
class Evicted:
    """What one :meth:`MemoryPool.write` pushed out of the pool, per layer.

    Attributes:
        vectors: ``[l, e, d]``, the evicted vectors of each memory layer, in the order they sat in the pool.
        ages: ``[l, e]`` int64, their ages at eviction (already advanced by the write that evicted them).
        sources: ``[l, e]`` int64, the provenance id of each (which injected text it came from).
    """

    vectors: torch.Tensor
    ages: torch.Tensor
    sources: torch.Tensor

    @property
    def count(self) -> int:
        """Number of vectors evicted per layer (``e``)."""
        return int(self.vectors.shape[1])


class MemoryPool(ABC):
    """Short-term memory: per memory layer, at most ``N`` latent vectors of width ``d``.

    Contract (what every implementation must guarantee; the property tests check it):

    * :meth:`read` returns ``[l, s, d]`` with ``s = size <= capacity``, the same ``s`` for every layer,
      oldest write first. :meth:`ages` and :meth:`sources` return ``[l, s]`` aligned with it.
    * :meth:`write` takes ``k`` new vectors per layer (``[l, k, d]``, ``1 <= k <= K = write_size``; a
      full chunk writes exactly ``K``) and appends them at the end, in order. If the pool would then
      hold more than ``capacity``, it evicts exactly the excess per layer (so ``k`` per write once
      full) by the pool's eviction policy; the survivors keep their relative order. It returns what it
      evicted: kept + evicted = old + new, nothing duplicated or lost.
    * Ages count written vectors: every write adds ``k`` to the age of everything already held, and the
      ``k`` new vectors get ages ``k-1, ..., 0`` (the last one is the youngest). Ages and sources
      travel with their vectors.
    * :attr:`version` changes whenever the contents change (write, reset, load), so that callers can
      cache anything computed from the contents.
    * Writes do not modify tensors previously returned by :meth:`read` in place, so a caller can keep
      them to restore the pool after a failed operation (see :meth:`snapshot`).

    The reference implementation is :class:`memkit.builtin.pool.RandomDropPool`.

    Class attributes:
        name: the name recipes use for this pool.
        Config: the pydantic config class (``extra="forbid"``, every field described).
    """

    name: ClassVar[str]
    Config: ClassVar[type[MemkitConfig]]

    def __init__(
        self,
        config: MemkitConfig,
        *,
        num_layers: int,
        hidden_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    @abstractmethod
    def capacity(self) -> int:
        """``N``: the most vectors the pool holds per layer."""

    @property
    @abstractmethod
    def write_size(self) -> int:
        """``K``: the most vectors per layer that one write adds (a full chunk adds exactly ``K``)."""

    @property
    @abstractmethod
    def size(self) -> int:
        """``s``: the number of vectors held per layer now."""

    @property
    @abstractmethod
    def version(self) -> int:
        """A counter that changes whenever the contents change."""

    @abstractmethod
    def read(self) -> torch.Tensor:
        """The vectors held, ``[l, s, d]``, oldest first."""

    @abstractmethod
    def ages(self) -> torch.Tensor:
        """Ages of the vectors held, ``[l, s]`` int64."""

    @abstractmethod
    def sources(self) -> torch.Tensor:
        """Provenance ids of the vectors held, ``[l, s]`` int64."""

    @abstractmethod
    def write(self, vectors: torch.Tensor, source: int) -> Evicted:
        """Append ``k <= K`` new vectors per layer (``[l, k, d]``), evicting as the contract says."""

    @abstractmethod
    def reset(self) -> None:
        """Return to the initial state (empty, or as configured)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore the pool exactly, as named tensors (safetensors-ready)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`; raise :class:`~memkit.errors.MemoryStateError` on a mismatch."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A cheap snapshot to restore with :meth:`load_state_dict` if an operation fails midway."""
        return self.state_dict()
