"""The :class:`Injector` interface: how memory reaches a model's attention, and how it is written."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from memkit.cache import LayerKV
from memkit.config import MemkitConfig

if TYPE_CHECKING:
    from memkit.backbone import Backbone

__all__ = ["Injector", "MemoryPrefix"]


@dataclass(frozen=True)
class MemoryPrefix:
    """Per-layer keys and values that a read (or a write) attends to before its tokens.

    Attributes:
        layer_kv: per decoder layer, ``(keys, values)``, each ``[1, h, p, e]``.
        length: ``p``, the number of prefix positions; tokens start at position ``p``.
    """

    layer_kv: list[LayerKV]
    length: int


class Injector(nn.Module, ABC):
    """Puts memory in front of a model's attention and reads new memory off a forward pass.

    Contract:

    * :meth:`prefix` turns per-layer memory vectors ``[l, m, d]`` into a :class:`MemoryPrefix`: the keys
      and values each decoder layer would compute for those vectors (plus anything the injector adds,
      such as a learned BOS), at the positions its position policy gives. It must compute them with the
      model's own layers and never edit the model. With ``gap=g`` it leaves ``g`` zero-filled positions
      starting at :attr:`gap_start` (after any BOS, before the memory) for long-term vectors that are
      retrieved per layer during the forward pass; :meth:`layer_kv` computes those.
    * :meth:`capture` runs one chunk of tokens ``[1, n]`` through the model after a prefix built from
      the pool's most recent vectors, and returns the ``K`` new vectors per layer ``[l, K, d]`` that the
      pool will store. It must remove every hook it adds, also on error, and must not change the pool.
    * Both run under the caller's grad mode: with gradients enabled they are differentiable (training),
      under ``torch.no_grad()`` they are not. There is one implementation for both.
    * Learned tensors (a BOS vector per layer, the new-memory positional embedding) are parameters of
      the injector; they belong to the recipe's weights, not to the memory state.

    The reference implementation is :class:`memkit.builtin.injector.KVInjector`.

    Class attributes:
        name: the name recipes use for this injector.
        Config: the pydantic config class.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MemkitConfig]]
    #: The model view to compute with (not a submodule: the injector must not own the user's model).
    backbone: Backbone

    def __init__(self, config: MemkitConfig, *, backbone: Backbone, write_size: int) -> None:
        super().__init__()
        self.config = config
        self.write_size = write_size
        # Not a submodule: the backbone wraps the user's model, which the injector must not own.
        object.__setattr__(self, "backbone", backbone)

    @property
    def gap_start(self) -> int:
        """First position of the gap that :meth:`prefix` leaves for retrieved long-term vectors."""
        return 0

    @abstractmethod
    def prefix(self, memory: torch.Tensor, gap: int = 0) -> MemoryPrefix:
        """Keys and values for reading ``memory`` ``[l, m, d]`` (``m`` may be 0), leaving ``gap`` positions."""

    @abstractmethod
    def layer_kv(self, layer: int, vectors: torch.Tensor, position_ids: torch.Tensor) -> LayerKV:
        """Keys and values ``([1, h, g, e], [1, h, g, e])`` of one layer for ``vectors`` ``[g, d]``."""

    @abstractmethod
    def capture(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """New memory ``[l, K, d]`` from a chunk ``[1, n]`` written after ``memory`` ``[l, m, d]``."""
