"""The built-in exact :class:`~memkit.interfaces.LongTermStore`, and the staging logic stores share.

:class:`StagedStore` implements the whole :class:`~memkit.interfaces.LongTermStore` contract (staging
buffer, merge every ``F`` updates, capacity with oldest-first eviction, ages, counters, validation,
persistence) on CPU tensors, and leaves to a subclass only how retriever keys are kept and how
candidates are proposed. :class:`ExactStore` keeps the keys as tensors and proposes every entry;
:class:`memkit.builtin.hnsw_store.HnswStore` keeps them in an hnswlib index.

Storage, per memory layer, is a list of *blocks*: block 0 holds the merged rows, the blocks after it
the staged rows, one block per :meth:`~StagedStore.add`, in order. Each block is a set of columns of
equal length (``vectors`` ``[p, d]``, ``ages`` ``[p]``, ``sources`` ``[p]`` and the subclass's own,
e.g. ``keys`` ``[p, key_size]``). A merge concatenates the blocks into one, so it keeps every row
and the row order. An eviction does not copy the layer (at M+'s scale that would be 1.2 GB per layer
per update): it marks the evicted rows dead in their block, and a block is compacted (its live rows
copied out) at the next merge, or as soon as dead rows make up more than 1/8 of it; so a layer's
tensors never hold more than 8/7 of its live rows. Stored tensors are never modified in place, so
tensors returned by :meth:`~StagedStore.entries`, :meth:`~StagedStore.get` or
:meth:`~StagedStore.state_dict` stay as they were; :meth:`~StagedStore.entries` and
:meth:`~StagedStore.state_dict` return the stored tensors themselves when a layer is one compact
block (right after a merge), and copies otherwise.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field

from memkit.config import MemkitConfig
from memkit.errors import InputError, MemoryStateError
from memkit.hookspecs import hookimpl
from memkit.interfaces.store import LongTermStore, StoreEntries
from memkit.registry import Registry

__all__ = ["ExactStore", "StagedStore"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CPU = torch.device("cpu")
#: A block is compacted once more than this fraction of its rows are dead.
_DEAD_FRACTION = 1 / 8
#: Staged blocks of one layer are concatenated once there are more than this many.
_MAX_STAGED_BLOCKS = 64
_BASE_COLUMNS = ("vectors", "ages", "sources")


def _owned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous CPU copy of ``x`` in ``dtype`` that shares memory with nothing."""
    out = torch.empty(tuple(x.shape), dtype=dtype, device=_CPU)
    out.copy_(x.detach())
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Block:
    """Rows of one layer kept together: columns of equal length, some rows possibly dead.

    ``alive`` is ``None`` while every row is alive, else a bool mask ``[p]``. Columns are replaced,
    never modified in place; only the private mask is.
    """

    __slots__ = ("_live_index", "alive", "columns", "live")

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns
        self.alive: torch.Tensor | None = None
        self.live = int(columns["ages"].shape[0])
        self._live_index: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Physical rows, dead ones included."""
        return int(self.columns["ages"].shape[0])

    @property
    def dead(self) -> int:
        return self.rows - self.live

    def live_index(self) -> torch.Tensor | None:
        """Physical positions ``[live]`` of the live rows, or ``None`` when every row is alive."""
        if self.alive is None:
            return None
        if self._live_index is None:
            self._live_index = torch.nonzero(self.alive).squeeze(1)
        return self._live_index

    def column(self, name: str) -> torch.Tensor:
        """The live rows of a column, in order."""
        index = self.live_index()
        col = self.columns[name]
        return col if index is None else col.index_select(0, index)

    def take(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """Rows ``local`` (positions among the live rows) of a column."""
        index = self.live_index()
        physical = local if index is None else index[local]
        return self.columns[name].index_select(0, physical)

    def kill(self, local: torch.Tensor) -> None:
        """Mark rows ``local`` (distinct positions among the live rows) dead."""
        if local.numel() == 0:
            return
        index = self.live_index()
        physical = local if index is None else index[local]
        if self.alive is None:
            self.alive = torch.ones(self.rows, dtype=torch.bool)
        self.alive[physical] = False
        self.live -= int(local.numel())
        self._live_index = None

    def compacted(self) -> _Block:
        return self if self.alive is None else _Block({name: self.column(name) for name in self.columns})

    def advanced(self, amount: int) -> None:
        self.columns = {**self.columns, "ages": self.columns["ages"] + amount}

    @staticmethod
    def concat(blocks: list[_Block]) -> _Block:
        """One block with the live rows of ``blocks``, in order (``blocks`` must not be empty)."""
        if len(blocks) == 1:
            return blocks[0].compacted()
        names = blocks[0].columns.keys()
        return _Block({name: torch.cat([block.column(name) for block in blocks]) for name in names})


class _Layer:
    """One memory layer of a store: block 0 merged, the rest staged; plus its eviction count and aux."""

    __slots__ = ("aux", "blocks", "evicted")

    def __init__(self, empty: _Block, aux: Any) -> None:
        self.blocks: list[_Block] = [empty]
        self.evicted = 0
        self.aux = aux

    @property
    def size(self) -> int:
        return sum(block.live for block in self.blocks)

    @property
    def staged(self) -> int:
        return sum(block.live for block in self.blocks[1:])

    def column(self, name: str, blocks: Iterable[_Block] | None = None) -> torch.Tensor:
        """The live rows of a column over ``blocks`` (default all), in logical order."""
        parts = [block.column(name) for block in (self.blocks if blocks is None else blocks)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def merge(self) -> None:
        if len(self.blocks) > 1 or self.blocks[0].alive is not None:
            self.blocks = [_Block.concat(self.blocks)]

    def locate(self, ids: torch.Tensor) -> list[tuple[_Block, torch.Tensor, torch.Tensor]]:
        """For logical row ``ids`` ``[m]``: ``(block, positions in ids, local rows)`` per block touched."""
        counts = torch.tensor([block.live for block in self.blocks], dtype=torch.long)
        ends = torch.cumsum(counts, 0)
        which = torch.searchsorted(ends, ids, right=True)
        out = []
        for b in torch.unique(which).tolist():
            where = torch.nonzero(which == b).squeeze(1)
            start = int(ends[b] - counts[b])
            out.append((self.blocks[b], where, ids.index_select(0, where) - start))
        return out


class StagedStore(LongTermStore):
    """Base of the built-in stores: staging buffer, merge every ``F`` updates, capacity, ages, persistence.

    Everything in :class:`~memkit.interfaces.LongTermStore`'s contract is done here, on CPU tensors
    (see the module docstring for the layout). A subclass decides how keys are kept, through four
    hooks: :meth:`_new_aux` (per-layer state such as an index), :meth:`_admit` (rows enter: return the
    subclass's columns for them), :meth:`_forget` (rows are evicted), :meth:`_keys` (keys of rows from
    the subclass's columns); and it implements :meth:`candidates`.

    Beyond the interface, :meth:`keys` returns stored keys without copying vectors (what a retriever
    needs to score candidates).

    Shapes: ``m`` entries, ``d`` hidden size, ``k`` key size; ids are ``int64`` row positions in
    :meth:`entries` order (merged rows, then staged rows).
    """

    class Config(MemkitConfig):
        capacity: int = Field(
            description=(
                "entries held per memory layer, merged plus staged; past it the oldest are evicted. "
                "M+ keeps 153,600 per layer (10 merges x 60 updates x 256 tokens, the paper's ~150k)"
            ),
            gt=0,
        )
        merge_every: int = Field(
            description="F: merge the staging buffer into the store every F updates (M+'s stage-3 value: 60)",
            gt=0,
        )
        dtype: Literal["float32", "float16", "bfloat16"] = Field(
            "float32",
            description=(
                "storage dtype of vectors and keys; half precision halves their memory, at half "
                "precision's rounding (float16: 11-bit mantissa; bfloat16: 8-bit)"
            ),
        )

    config: Config
    #: Names of the subclass's own columns (e.g. ``("keys",)``); a subclass may set it per instance.
    extra_columns: tuple[str, ...] = ()

    def __init__(self, config: Config, *, num_layers: int, hidden_size: int, key_size: int) -> None:
        if not (_is_int(num_layers) and num_layers > 0 and _is_int(hidden_size) and hidden_size > 0):
            raise InputError(f"a store needs num_layers > 0 and hidden_size > 0, got {num_layers} and {hidden_size}")
        if not (_is_int(key_size) and key_size > 0):
            raise InputError(f"a store needs key_size > 0, got {key_size}")
        super().__init__(config, num_layers=num_layers, hidden_size=hidden_size, key_size=key_size)
        self.dtype = _DTYPES[config.dtype]
        self._layers: list[_Layer] = []
        self._updates = 0
        self.reset()

    # -- subclass hooks -----------------------------------------------------------------------------

    @abstractmethod
    def _new_aux(self, layer: int) -> Any:
        """Fresh per-layer state of the subclass (for an empty layer)."""

    @abstractmethod
    def _empty_extra(self) -> dict[str, torch.Tensor]:
        """The subclass's columns for zero rows."""

    @abstractmethod
    def _admit(self, layer: _Layer, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows with these keys (``[m, k]``, storage dtype, ``m >= 1``) enter ``layer``: their extra columns."""

    @abstractmethod
    def _forget(self, layer: _Layer, extra: dict[str, torch.Tensor]) -> None:
        """Rows with these extra columns leave ``layer`` (evicted)."""

    @abstractmethod
    def _keys(self, layer: _Layer, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """Keys ``[m, k]`` (storage dtype) of the rows with these extra columns."""

    # -- sizes and counters -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.config.capacity

    @property
    def merge_every(self) -> int:
        """``F``: updates between merges."""
        return self.config.merge_every

    @property
    def updates(self) -> int:
        """Updates (calls of :meth:`advance`) since the last :meth:`reset`."""
        return self._updates

    def size(self, layer: int) -> int:
        return self._layer(layer).size

    def staged(self, layer: int) -> int:
        return self._layer(layer).staged

    def evicted(self, layer: int) -> int:
        return self._layer(layer).evicted

    def reset(self) -> None:
        self._layers = [self._empty_layer(i) for i in range(self.num_layers)]
        self._updates = 0

    # -- update -------------------------------------------------------------------------------------

    def add(self, layer: int, entries: StoreEntries) -> None:
        lyr = self._layer(layer)
        vectors, keys, ages, sources = self._checked_entries(entries)
        m = int(ages.shape[0])
        if m == 0:
            return
        n = lyr.size
        excess = n + m - self.capacity
        if excess > 0:
            all_ages = torch.cat([lyr.column("ages"), ages])
            gone = self._oldest(all_ages, excess)
            old, new = gone[gone < n], gone[gone >= n] - n
            self._remove(lyr, old)
            if new.numel():
                keep = torch.ones(m, dtype=torch.bool)
                keep[new] = False
                vectors, keys, ages, sources = vectors[keep], keys[keep], ages[keep], sources[keep]
            lyr.evicted += excess
        if ages.numel():
            extra = self._admit(lyr, keys)
            lyr.blocks.append(_Block({"vectors": vectors, "ages": ages, "sources": sources, **extra}))
            if self._updates and self._updates % self.merge_every == 0:
                lyr.merge()  # added during an update that merged: merged with it
            elif len(lyr.blocks) > 1 + _MAX_STAGED_BLOCKS:
                lyr.blocks = [lyr.blocks[0], _Block.concat(lyr.blocks[1:])]

    def advance(self, amount: int) -> None:
        if not _is_int(amount) or amount < 0:
            raise InputError(f"advance takes the number of age units to add, an int >= 0; got {amount!r}")
        for lyr in self._layers:
            for block in lyr.blocks:
                block.advanced(amount)
        self._updates += 1
        if self._updates % self.merge_every == 0:
            for lyr in self._layers:
                lyr.merge()

    @staticmethod
    def _oldest(ages: torch.Tensor, count: int) -> torch.Tensor:
        """Sorted row ids of the ``count`` oldest rows: largest age first, the earlier row among equals."""
        total = int(ages.shape[0])
        if count >= total:
            return torch.arange(total)
        if int(ages[:count].min()) >= int(ages[count:].max()):  # the usual case: the oldest come first
            return torch.arange(count)
        threshold = torch.kthvalue(ages, total - count + 1).values  # the count-th largest age
        above = torch.nonzero(ages > threshold).squeeze(1)
        ties = torch.nonzero(ages == threshold).squeeze(1)[: count - int(above.numel())]
        return torch.sort(torch.cat([above, ties])).values

    def _remove(self, lyr: _Layer, ids: torch.Tensor) -> None:
        """Evict logical rows ``ids`` of ``lyr``."""
        if ids.numel() == 0:
            return
        for block, _, local in lyr.locate(ids):
            if self.extra_columns:
                self._forget(lyr, {name: block.take(name, local) for name in self.extra_columns})
            block.kill(local)
        staged = [block for block in lyr.blocks[1:] if block.live > 0]
        lyr.blocks = [lyr.blocks[0], *staged]
        lyr.blocks = [block.compacted() if block.dead > _DEAD_FRACTION * block.rows else block for block in lyr.blocks]

    # -- reading ------------------------------------------------------------------------------------

    def entries(self, layer: int) -> StoreEntries:
        lyr = self._layer(layer)
        extra = {name: lyr.column(name) for name in self.extra_columns}
        return StoreEntries(
            vectors=lyr.column("vectors"),
            keys=self._keys_or_empty(lyr, extra),
            ages=lyr.column("ages"),
            sources=lyr.column("sources"),
        )

    def get(self, layer: int, ids: torch.Tensor) -> StoreEntries:
        lyr = self._layer(layer)
        ids = self._checked_ids(lyr, ids)
        cols = self._gather(lyr, ids, (*_BASE_COLUMNS, *self.extra_columns))
        extra = {name: cols[name] for name in self.extra_columns}
        return StoreEntries(
            vectors=cols["vectors"],
            keys=self._keys_or_empty(lyr, extra),
            ages=cols["ages"],
            sources=cols["sources"],
        )

    def keys(self, layer: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Keys ``[m, k]`` (storage dtype) of entries ``ids`` (``[m]`` int64; ``None``: every entry).

        The same as ``get(layer, ids).keys`` (or ``entries(layer).keys``) without gathering vectors.
        """
        lyr = self._layer(layer)
        if ids is None:
            extra = {name: lyr.column(name) for name in self.extra_columns}
        else:
            extra = self._gather(lyr, self._checked_ids(lyr, ids), self.extra_columns)
        return self._keys_or_empty(lyr, extra)

    def ages(self, layer: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Ages ``[m]`` int64 of entries ``ids`` (``None``: every entry), without gathering vectors."""
        lyr = self._layer(layer)
        if ids is None:
            return lyr.column("ages")
        return self._gather(lyr, self._checked_ids(lyr, ids), ("ages",))["ages"]

    def _gather(self, lyr: _Layer, ids: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Columns ``names`` at logical rows ``ids`` (already checked), in the order of ``ids``."""
        names = tuple(names)
        if len(lyr.blocks) == 1:
            block = lyr.blocks[0]
            return {name: block.take(name, ids) for name in names}
        out: dict[str, torch.Tensor] = {}
        for name in names:
            col = lyr.blocks[0].columns[name]
            out[name] = torch.empty((int(ids.shape[0]), *col.shape[1:]), dtype=col.dtype)
        for block, where, local in lyr.locate(ids):
            for name in names:
                out[name][where] = block.take(name, local)
        return out

    def _keys_or_empty(self, lyr: _Layer, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = int(next(iter(extra.values())).shape[0]) if extra else 0
        if rows == 0:
            return torch.zeros(0, self.key_size, dtype=self.dtype)
        return self._keys(lyr, extra)

    # -- validation ---------------------------------------------------------------------------------

    def _layer(self, layer: int) -> _Layer:
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise InputError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return self._layers[layer]

    def _check_queries(self, queries: torch.Tensor, k: int) -> None:
        """InputError unless ``queries`` is a finite ``[q >= 1, key_size]`` float tensor and ``k`` an int >= 0."""
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or queries.shape[1] != self.key_size:
            shape = list(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise InputError(f"queries must be a [q, key_size={self.key_size}] tensor, got {shape}")
        if queries.shape[0] == 0:
            raise InputError("candidates needs at least one query")
        if not queries.is_floating_point() or not bool(torch.isfinite(queries).all()):
            raise InputError("queries must be finite floating-point values")
        if not _is_int(k) or k < 0:
            raise InputError(f"k must be an int >= 0, got {k!r}")

    def _checked_ids(self, lyr: _Layer, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            what = (
                f"{ids.dtype} tensor of shape {list(ids.shape)}"
                if isinstance(ids, torch.Tensor)
                else type(ids).__name__
            )
            raise InputError(f"entry ids must be a 1-D int64 tensor, got a {what}")
        ids = ids.to(_CPU)
        size = lyr.size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            bad = ids[(ids < 0) | (ids >= size)][:5].tolist()
            raise InputError(f"entry ids {bad} are out of range: this layer holds {size} entries (ids 0..{size - 1})")
        return ids

    def _checked_entries(self, entries: StoreEntries) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Owned CPU copies of ``entries``' columns in storage dtypes; InputError if anything is off."""
        if not isinstance(entries, StoreEntries):
            raise InputError(f"a store adds StoreEntries, got {type(entries).__name__}")
        vectors, keys, ages, sources = entries.vectors, entries.keys, entries.ages, entries.sources
        for name, t in (("vectors", vectors), ("keys", keys), ("ages", ages), ("sources", sources)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"StoreEntries.{name} must be a tensor, got {type(t).__name__}")
        m = int(vectors.shape[0]) if vectors.dim() >= 1 else -1
        d, k = self.hidden_size, self.key_size
        if vectors.dim() != 2 or vectors.shape[1] != d:
            raise InputError(f"StoreEntries.vectors must be [m, d={d}], got {list(vectors.shape)}")
        if keys.dim() != 2 or tuple(keys.shape) != (m, k):
            raise InputError(f"StoreEntries.keys must be [m={m}, key_size={k}], got {list(keys.shape)}")
        if tuple(ages.shape) != (m,) or tuple(sources.shape) != (m,):
            raise InputError(
                f"StoreEntries.ages and .sources must be [m={m}], got {list(ages.shape)} and {list(sources.shape)}"
            )
        if not (vectors.is_floating_point() and keys.is_floating_point()):
            raise InputError(f"vectors and keys must be floating point, got {vectors.dtype} and {keys.dtype}")
        if ages.dtype != torch.int64 or sources.dtype != torch.int64:
            raise InputError(f"ages and sources must be int64, got {ages.dtype} and {sources.dtype}")
        v, kk = _owned(vectors, self.dtype), _owned(keys, self.dtype)
        if not (torch.isfinite(v).all() and torch.isfinite(kk).all()):
            raise InputError(
                f"refusing NaN or infinite vectors or keys (in {self.config.dtype} storage; values beyond its "
                "range overflow to inf); the store is unchanged"
            )
        a = _owned(ages, torch.int64)
        if a.numel() and int(a.min()) < 0:
            raise InputError("ages must be >= 0; the store is unchanged")
        return v, kk, a, _owned(sources, torch.int64)

    # -- persistence --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Named tensors: ``updates`` ``[]``, ``evicted`` ``[layers]``, and per layer ``l`` and part
        ``merged``/``staged``: ``layers.{l}.{part}.vectors`` ``[m, d]``, ``.keys`` ``[m, k]`` (storage
        dtype), ``.ages`` and ``.sources`` ``[m]`` int64. No subclass state (such as an index) is saved."""
        state: dict[str, torch.Tensor] = {
            "updates": torch.tensor(self._updates, dtype=torch.int64),
            "evicted": torch.tensor([lyr.evicted for lyr in self._layers], dtype=torch.int64),
        }
        for i, lyr in enumerate(self._layers):
            for part, blocks in (("merged", lyr.blocks[:1]), ("staged", lyr.blocks[1:])):
                if blocks:
                    cols = {name: lyr.column(name, blocks) for name in (*_BASE_COLUMNS, *self.extra_columns)}
                else:
                    cols = {name: torch.zeros_like(col[:0]) for name, col in lyr.blocks[0].columns.items()}
                extra = {name: cols[name] for name in self.extra_columns}
                state[f"layers.{i}.{part}.vectors"] = cols["vectors"]
                state[f"layers.{i}.{part}.keys"] = self._keys_or_empty(lyr, extra)
                state[f"layers.{i}.{part}.ages"] = cols["ages"]
                state[f"layers.{i}.{part}.sources"] = cols["sources"]
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`; :class:`~memkit.errors.MemoryStateError` (store unchanged) if
        ``state`` lacks a tensor, has one it should not, or has one of the wrong shape or dtype."""
        if not isinstance(state, dict):
            raise MemoryStateError(f"a store state is a dict of tensors, got {type(state).__name__}")
        expected = {"updates", "evicted"}
        parts = ("merged", "staged")
        columns = ("vectors", "keys", "ages", "sources")
        expected |= {f"layers.{i}.{p}.{c}" for i in range(self.num_layers) for p in parts for c in columns}
        missing, unknown = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unknown:
            raise MemoryStateError(
                f"store state does not fit this {self.name!r} store of {self.num_layers} layers: "
                f"missing {missing[:6]}, unexpected {unknown[:6]}; it was made for another model or recipe"
            )
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise MemoryStateError(f"store state entry {name!r} is a {type(t).__name__}, not a tensor")
        updates, evicted = state["updates"], state["evicted"]
        if updates.numel() != 1 or updates.dim() > 1 or updates.is_floating_point() or int(updates) < 0:
            raise MemoryStateError(f"store state 'updates' must be one int >= 0, got {updates!r}")
        if tuple(evicted.shape) != (self.num_layers,) or evicted.is_floating_point() or bool((evicted < 0).any()):
            raise MemoryStateError(
                f"store state 'evicted' must be [{self.num_layers}] ints >= 0, "
                f"got {evicted.dtype} {list(evicted.shape)}"
            )
        loaded: list[_Layer] = []
        for i in range(self.num_layers):
            lyr = self._empty_layer(i)
            checked = [self._checked_part(state, f"layers.{i}.{p}") for p in parts]
            total = sum(int(c[2].shape[0]) for c in checked)
            if total > self.capacity:
                raise MemoryStateError(
                    f"store state holds {total} entries for layer {i}, more than this store's capacity "
                    f"{self.capacity}; it was made with another recipe"
                )
            if total:  # the subclass takes every key at once (one index insertion); split its columns
                extra = self._admit(lyr, torch.cat([c[1] for c in checked]))
                first = int(checked[0][2].shape[0])
                for p, (vectors, _, ages, sources) in zip(parts, checked, strict=True):
                    if ages.numel() == 0:
                        continue
                    rows = slice(0, first) if p == "merged" else slice(first, total)
                    block = _Block({"vectors": vectors, "ages": ages, "sources": sources})
                    block.columns.update({name: col[rows].clone() for name, col in extra.items()})
                    if p == "merged":
                        lyr.blocks[0] = block
                    else:
                        lyr.blocks.append(block)
            lyr.evicted = int(evicted[i])
            loaded.append(lyr)
        self._layers = loaded
        self._updates = int(updates)

    def _checked_part(
        self, state: dict[str, torch.Tensor], prefix: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        vectors, keys = state[f"{prefix}.vectors"], state[f"{prefix}.keys"]
        ages, sources = state[f"{prefix}.ages"], state[f"{prefix}.sources"]
        m = int(ages.shape[0]) if ages.dim() == 1 else -1
        d, k = self.hidden_size, self.key_size
        if m < 0 or tuple(vectors.shape) != (m, d) or tuple(keys.shape) != (m, k) or tuple(sources.shape) != (m,):
            raise MemoryStateError(
                f"store state {prefix} has vectors {list(vectors.shape)}, keys {list(keys.shape)}, ages "
                f"{list(ages.shape)}, sources {list(sources.shape)}; expected [m, {d}], [m, {k}], [m], [m]"
            )
        if not (vectors.is_floating_point() and keys.is_floating_point()):
            raise MemoryStateError(f"store state {prefix} vectors and keys must be floating point")
        if ages.is_floating_point() or sources.is_floating_point() or ages.dtype == torch.bool:
            raise MemoryStateError(f"store state {prefix} ages and sources must be integers")
        v, kk = _owned(vectors, self.dtype), _owned(keys, self.dtype)
        if not (torch.isfinite(v).all() and torch.isfinite(kk).all()):
            raise MemoryStateError(f"store state {prefix} holds NaN or infinite vectors or keys; refusing to load it")
        a = _owned(ages, torch.int64)
        if a.numel() and int(a.min()) < 0:
            raise MemoryStateError(f"store state {prefix} holds negative ages")
        return v, kk, a, _owned(sources, torch.int64)

    def _empty_layer(self, layer: int) -> _Layer:
        d = self.hidden_size
        empty_long = torch.zeros(0, dtype=torch.int64)
        columns = {"vectors": torch.zeros(0, d, dtype=self.dtype), "ages": empty_long, "sources": empty_long.clone()}
        return _Layer(_Block({**columns, **self._empty_extra()}), self._new_aux(layer))


class ExactStore(StagedStore):
    """Keeps every entry's key as a tensor and proposes every entry; the retriever scores them all.

    This is M+'s own strategy (score all of the long-term memory at every retrieval). Memory per
    entry is the raw bytes of its vector and key in the storage dtype plus 16 bytes of age and source.
    """

    name = "exact"

    class Config(StagedStore.Config):
        pass

    config: Config
    extra_columns = ("keys",)

    def _new_aux(self, layer: int) -> None:
        return None

    def snapshot(self) -> Any:
        """Cheap: references to the column tensors (never modified in place) and copies of the small
        mutable parts (alive masks, counts); no entry is copied."""
        layers = [
            ([(b.columns, None if b.alive is None else b.alive.clone(), b.live) for b in lyr.blocks], lyr.evicted)
            for lyr in self._layers
        ]
        return (self._updates, layers)

    def restore(self, snapshot: Any) -> None:
        updates, layers = snapshot
        restored = []
        for blocks, evicted in layers:
            rebuilt = []
            for columns, alive, live in blocks:
                block = _Block(columns)
                block.alive = None if alive is None else alive.clone()
                block.live = live
                rebuilt.append(block)
            lyr = _Layer(rebuilt[0], None)  # an exact store keeps no per-layer index
            lyr.blocks = rebuilt
            lyr.evicted = evicted
            restored.append(lyr)
        self._layers = restored
        self._updates = updates

    def _empty_extra(self) -> dict[str, torch.Tensor]:
        return {"keys": torch.zeros(0, self.key_size, dtype=self.dtype)}

    def _admit(self, layer: _Layer, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"keys": keys}

    def _forget(self, layer: _Layer, extra: dict[str, torch.Tensor]) -> None:
        pass

    def _keys(self, layer: _Layer, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        return extra["keys"]

    def candidates(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Every entry id, ``arange(size)``: an exact store leaves nothing out."""
        lyr = self._layer(layer)
        self._check_queries(queries, k)
        return torch.arange(lyr.size)


@hookimpl
def register_stores(registry: Registry) -> None:
    registry.add_store(ExactStore)
