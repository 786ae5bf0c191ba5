"""The built-in approximate :class:`~memkit.interfaces.LongTermStore`: staged store plus an hnswlib index.

:class:`HnswStore` behaves exactly like :class:`~memkit.builtin.store.ExactStore` (same staging,
merging, capacity, eviction, ages and persistence: both derive from
:class:`~memkit.builtin.store.StagedStore`), and indexes each layer's retriever keys in an hnswlib
graph, from which it proposes candidates.

Memory per entry: its vector, 16 bytes of age and source, an 8-byte label, its key (with
``key_copy``, the default), its projected key (with ``prefilter``) and its index node: hnswlib keeps
every indexed vector as float32 (``4 * key_size`` bytes, 4 more in the ``"mips-l2"`` space), about
``8 * M`` bytes of links and some bookkeeping. Without ``key_copy`` the keys are read back from the
index (exactly: float32 holds every storage dtype's values), which removes the tensor copy but is
slow, because hnswlib 0.8's ``get_items`` goes through Python lists (about 25 us per key of width
256): fine for :meth:`~HnswStore.state_dict` or :meth:`~HnswStore.entries`, too slow for scoring
thousands of candidates per prompt. ``benchmarks/store_scaling.py`` measures both against the entry's raw bytes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import hnswlib
import numpy as np
import torch
from pydantic import Field

from memkit.builtin.store import StagedStore, _Layer
from memkit.errors import RecipeError
from memkit.hookspecs import hookimpl
from memkit.registry import Registry

__all__ = ["FIT_ROWS", "HnswStore"]

#: With ``index_dims``, a layer's projection is refitted each time the layer doubles, until it has been
#: fitted on this many keys (and fitted on at most this many, evenly spaced, after a load).
FIT_ROWS = 16_384


class _LayerIndex:
    """One layer's hnswlib index, created on the first insertion, grown up to the store's capacity.

    Labels are given out in increasing order and never reused, so the live rows of a layer (kept in
    insertion order) carry increasing labels, and a label's row is found by binary search.
    """

    __slots__ = ("basis", "bound", "deleted", "fitted_on", "index", "labels", "next_label")

    def __init__(self) -> None:
        self.index: Any = None
        self.next_label = 0
        self.deleted = 0  # marked deleted and not yet replaced
        self.bound = 0.0  # "mips-l2": the norm every indexed key is padded to
        self.basis: torch.Tensor | None = None  # index_dims: [key_size, index_dims] float32, orthonormal columns
        self.fitted_on = 0  # index_dims: how many keys the basis was fitted on
        self.labels: np.ndarray | None = None  # the live rows' labels in row order; None after a change


class HnswStore(StagedStore):
    """:class:`~memkit.builtin.store.StagedStore` with one hnswlib index per layer over its keys.

    **Candidates.** For a prompt's queries ``[q, k]`` the store asks the index for the
    ``fetch = max(ceil(overfetch * k), min_fetch)`` entries of largest inner product with the mean
    query, and, if ``per_query > 0``, for the ``per_query`` best of each query; it proposes the union,
    as sorted ids. Why the mean query: for dot products of moderate size ``sigmoid(x) ~ 1/2 + x/4``,
    so M+'s score ``mean_i sigmoid(q_i . k_j)`` ranks entries nearly as ``mean(q) . k_j`` does; the
    over-fetch covers where the sigmoid bends. With ``fetch >= size`` the store proposes every entry,
    as it does when hnswlib cannot complete a search.

    **Space.** ``space="ip"`` indexes the keys in hnswlib's inner-product space. The default,
    ``"mips-l2"``, uses the standard reduction of inner-product search to Euclidean search (Bachrach
    et al. 2014): each key ``k`` is indexed as ``[k, sqrt(B^2 - |k|^2)]`` and each query ``q`` searched
    as ``[q, 0]``, so ``|q' - k'|^2 = |q|^2 + B^2 - 2 q . k`` ranks keys exactly by ``q . k``, while the
    graph is built in a true metric space. hnswlib's ``"ip"`` graphs search markedly worse on such
    keys: in ``benchmarks/store_scaling.py`` (150k low-rank keys of width 256, 64 queries), recall of
    M+'s top-2560 is 0.80 with ``"ip"`` and 0.999 with ``"mips-l2"``, of the top-64 0.946 and 0.994,
    at similar search time. ``B`` is ``norm_headroom`` times the largest key norm seen; a key longer
    than ``B`` makes the layer's index be rebuilt with a new ``B`` (rare: ``B`` grows geometrically).

    **Projection.** With ``index_dims = r``, the index holds each key's coordinates on the layer's
    ``r`` principal directions (the top right singular vectors of its keys, not centred, so that inner
    products are what is kept) instead of the whole key, and the mean query is projected the same
    way; the candidates are then scored exactly on the full keys as always. The index shrinks from
    ``4 * (key_size + 1)`` to ``4 * (r + 1)`` bytes of vector per entry, and each graph step costs
    less; the price is that the candidates are ranked by the projected inner product, which misses
    what the dropped directions carry. The directions are fitted on the layer's first keys and refitted
    (the index rebuilt) each time the layer doubles, until they were fitted on :data:`FIT_ROWS` keys;
    after a load they are fitted on the loaded keys. Needs ``key_copy``.

    **Prefilter.** With ``prefilter = f`` (needs ``index_dims``), the store also keeps each key's
    projected coordinates (a ``projected`` column of ``r`` values in the storage dtype, ``2r`` or
    ``4r`` bytes per entry) and cuts the neighbours fetched down to the ``ceil(f * k)`` that an
    estimate of M+'s score ranks best (the same share, ``f / overfetch``, of a fetch that ``min_fetch``
    raises), so that fewer are scored exactly. The estimate treats
    ``x = q . k`` over the prompt's (projected) queries as a normal variable of mean
    ``mu = mean(q) . k`` and variance ``v = k^T C k`` (``C`` the queries' covariance), for which
    ``E[sigmoid(x)] ~ sigmoid(mu / sqrt(1 + pi v / 8))`` (the probit approximation of the logistic-normal
    integral), and ranks by that argument. Unlike the mean query's ranking it sees how far the prompt's
    queries spread along each key, which is where the sigmoid bends; so the fetch can be larger for the
    same exact-scoring work. It is specific to M+'s mean-sigmoid score: with another score leave it unset.

    **Keys.** With ``key_copy`` (the default) the keys are also kept as a tensor in the storage dtype,
    which :meth:`get`, :meth:`keys` and :meth:`entries` read. Without it they are read back from the
    index with ``get_items`` (exact, but about 25 us per key, see the module docstring): 1.09x
    instead of 1.15x an entry's raw bytes at M+'s sizes, but slower than exact retrieval.

    **Eviction.** An evicted entry is removed from the index at once with ``mark_deleted``; the
    index is built with ``allow_replace_deleted=True`` and new entries are inserted with
    ``replace_deleted=True``, so they reuse the slots of deleted ones and the index never holds more
    than ``capacity`` nodes. (No rebuild at merge: merging changes no row or key, only where a row is
    counted, so the index is untouched.)

    **Persistence.** :meth:`state_dict` saves the keys (read back from the index), not the index:
    :meth:`load_state_dict` rebuilds the index from them, inserting rows in order. The rebuilt graph
    can differ from the one that grew through adds and evictions, so proposals after a round trip
    can differ where the search is not exhaustive (with ``index_dims`` the directions are refitted on
    the loaded keys, so with ``prefilter`` even an exhaustive search's cut can differ); with
    ``num_threads=1`` the rebuild is deterministic, so two loads of the same state propose the same
    candidates. The ``projected`` column is not saved either: a load computes it.
    """

    name = "hnsw"

    class Config(StagedStore.Config):
        M: int = Field(
            16,
            description=(
                "hnswlib M: links per node (2M on the bottom layer); more raises recall and memory "
                "(about 8*M bytes per entry)"
            ),
            ge=2,
        )
        ef_construction: int = Field(
            200,
            description="hnswlib ef_construction: candidate list size while inserting; more: better graph, slower",
            gt=0,
        )
        ef_search: int = Field(
            128,
            description="least hnswlib ef at query time: a search for n neighbours uses ef = max(ef_search, n)",
            gt=0,
        )
        overfetch: float = Field(
            4.0,
            description="for top-k retrieval the mean query fetches ceil(overfetch * k) neighbours, at least min_fetch",
            ge=1.0,
        )
        min_fetch: int = Field(
            1024,
            description="the fewest neighbours the mean query fetches, however small k is (small k needs more slack)",
            ge=0,
        )
        per_query: int = Field(
            0,
            description="also fetch this many neighbours of every query and propose their union; 0 turns it off",
            ge=0,
        )
        num_threads: int | None = Field(
            None,
            description="threads hnswlib uses to insert and search; None uses torch.get_num_threads()",
            gt=0,
        )
        seed: int = Field(100, description="hnswlib's random seed (node levels)", ge=0)
        space: Literal["mips-l2", "ip"] = Field(
            "mips-l2",
            description=(
                "'mips-l2': index keys padded to one norm in hnswlib's l2 space (exact inner-product "
                "ranking, better graphs); 'ip': hnswlib's inner-product space on the raw keys"
            ),
        )
        norm_headroom: float = Field(
            1.25,
            description="'mips-l2': keys are padded to this many times the largest key norm seen",
            ge=1.0,
        )
        index_dims: int | None = Field(
            None,
            description=(
                "index the keys' coordinates on this many principal directions of the layer's keys instead of "
                "the whole keys (smaller, faster index; candidates still scored exactly); None indexes the "
                "whole keys; needs key_copy"
            ),
            gt=0,
        )
        prefilter: float | None = Field(
            None,
            description=(
                "with index_dims: rank the neighbours fetched by an estimate of M+'s mean-sigmoid score from their "
                "projected keys and propose only the best ceil(prefilter * k) (the same share of the fetch when "
                "min_fetch raises it); cuts exact scoring; None proposes every neighbour fetched"
            ),
            ge=1.0,
        )
        key_copy: bool = Field(
            True,
            description=(
                "also keep the keys as a tensor (storage dtype) beside the index; without it keys are read "
                "back from the index, which saves 2-4 bytes per key component but costs ~25 us per key"
            ),
        )

    config: Config

    def __init__(self, config: Config, *, num_layers: int, hidden_size: int, key_size: int) -> None:
        if config.index_dims is not None and not config.key_copy:
            raise RecipeError(
                "hnsw store: index_dims needs key_copy=True (the index then holds projected keys, from which "
                "the full keys cannot be read back); set key_copy: true or drop index_dims"
            )
        if config.prefilter is not None and config.index_dims is None:
            raise RecipeError(
                "hnsw store: prefilter ranks candidates by their projected keys, which only index_dims keeps; "
                "set index_dims (e.g. 32) or drop prefilter"
            )
        columns = ("labels", "keys") if config.key_copy else ("labels",)
        self.extra_columns = (*columns, "projected") if config.prefilter is not None else columns
        super().__init__(config, num_layers=num_layers, hidden_size=hidden_size, key_size=key_size)

    # -- hooks --------------------------------------------------------------------------------------

    def _new_aux(self, layer: int) -> _LayerIndex:
        return _LayerIndex()

    def _empty_extra(self) -> dict[str, torch.Tensor]:
        extra = {"labels": torch.zeros(0, dtype=torch.int64)}
        if self.config.key_copy:
            extra["keys"] = torch.zeros(0, self.key_size, dtype=self.dtype)
        if self.config.prefilter is not None:
            extra["projected"] = torch.zeros(0, self._index_width(), dtype=self.dtype)
        return extra

    def _threads(self) -> int:
        return self.config.num_threads or max(1, torch.get_num_threads())

    def _admit(self, layer: _Layer, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        aux: _LayerIndex = layer.aux
        aux.labels = None
        m = int(keys.shape[0])
        keys32 = keys.to(torch.float32)
        refit = self._refit_due(layer, m)
        if refit:
            live = layer.column("keys").float()
            aux.basis = self._principal_directions(torch.cat([live, keys32]))
            aux.fitted_on = int(live.shape[0]) + m
            if self.config.prefilter is not None:  # every stored row (dead ones too) in the new coordinates
                for block in layer.blocks:
                    stored = block.columns["keys"].float()
                    block.columns = {**block.columns, "projected": (stored @ aux.basis).to(self.dtype)}
        points32 = self._project(aux, keys32)
        longest = float(torch.linalg.vector_norm(points32, dim=1).max()) if self.config.space == "mips-l2" else 0.0
        if refit and aux.index is not None:  # new coordinates: re-index the live entries
            live_points = self._project(aux, live)
            if live_points.numel():
                longest = max(longest, float(torch.linalg.vector_norm(live_points, dim=1).max()))
            self._rebuild(layer, self.config.norm_headroom * longest)
        elif self.config.space == "mips-l2":
            if aux.index is None:
                aux.bound = self.config.norm_headroom * longest
            elif longest > aux.bound:
                self._rebuild(layer, self.config.norm_headroom * longest)
        if aux.index is None:
            aux.index = self._new_index(min(self.capacity, max(m, 1024)))
        index = aux.index
        # Replacement reuses deleted slots first; only the rest need new ones.
        needed = int(index.element_count) + max(0, m - aux.deleted)
        if needed > index.max_elements:
            index.resize_index(min(self.capacity, max(needed, 2 * int(index.max_elements))))
        labels = torch.arange(aux.next_label, aux.next_label + m, dtype=torch.int64)
        points = self._points(points32, aux.bound)
        index.add_items(points, labels.numpy(), num_threads=self._threads(), replace_deleted=True)
        aux.next_label += m
        aux.deleted -= min(m, aux.deleted)
        extra = {"labels": labels, "keys": keys} if self.config.key_copy else {"labels": labels}
        if self.config.prefilter is not None:
            extra["projected"] = points32.to(self.dtype)
        return extra

    def _refit_due(self, layer: _Layer, m: int) -> bool:
        """Whether ``index_dims``'s directions are (re)fitted before ``m`` more keys enter ``layer``."""
        if self._index_width() == self.key_size:  # no index_dims, or as many as the keys have: no projection
            return False
        aux: _LayerIndex = layer.aux
        if aux.basis is None:
            return True
        return aux.fitted_on < FIT_ROWS and layer.size + m >= 2 * aux.fitted_on

    def _principal_directions(self, keys32: torch.Tensor) -> torch.Tensor:
        """The top ``index_dims`` right singular vectors of ``keys32`` ``[n, k]``: ``[k, index_dims]`` float32.

        At most :data:`FIT_ROWS` evenly spaced rows are used. Not centred: the projection keeps the
        part of each key that inner products with queries see most.
        """
        dims = self._index_width()
        n = int(keys32.shape[0])
        rows = keys32 if n <= FIT_ROWS else keys32[torch.linspace(0, n - 1, FIT_ROWS).long()]
        # full_matrices: k directions even when fewer than k keys were seen (the rest complete the basis)
        vh = torch.linalg.svd(rows.double(), full_matrices=True).Vh
        return vh[:dims].T.to(torch.float32).contiguous()

    def _project(self, aux: _LayerIndex, keys32: torch.Tensor) -> torch.Tensor:
        """What the index holds for float32 keys (or queries) ``[m, k]``: ``[m, index width]``."""
        return keys32 if aux.basis is None else keys32 @ aux.basis

    def _index_width(self) -> int:
        dims = self.config.index_dims
        return self.key_size if dims is None else min(dims, self.key_size)

    def _new_index(self, max_elements: int) -> Any:
        dim = self._index_width() + (1 if self.config.space == "mips-l2" else 0)
        index = hnswlib.Index(space="l2" if self.config.space == "mips-l2" else "ip", dim=dim)
        index.init_index(
            max_elements=max_elements,
            M=self.config.M,
            ef_construction=self.config.ef_construction,
            random_seed=self.config.seed,
            allow_replace_deleted=True,
        )
        return index

    def _points(self, keys32: torch.Tensor, bound: float) -> np.ndarray:
        """What the index stores for float32 (projected) keys ``[m, w]``: the keys, padded in ``"mips-l2"``."""
        if self.config.space == "ip":
            return keys32.numpy()
        squared = torch.linalg.vector_norm(keys32.double(), dim=1) ** 2
        pad = (bound * bound - squared).clamp(min=0).sqrt().to(torch.float32)
        return torch.cat([keys32, pad[:, None]], dim=1).numpy()

    def _rebuild(self, layer: _Layer, bound: float) -> None:
        """Re-index ``layer``'s live entries (same labels) with a new padding norm ``bound`` (and the
        current projection)."""
        aux: _LayerIndex = layer.aux
        labels = layer.column("labels")
        keys32 = layer.column("keys").float() if self.config.key_copy else self._raw_keys(aux, labels)
        keys32 = self._project(aux, keys32)
        aux.index = self._new_index(min(self.capacity, max(int(labels.numel()), 1024)))
        aux.bound, aux.deleted = bound, 0
        if labels.numel():
            aux.index.add_items(self._points(keys32, bound), labels.numpy(), num_threads=self._threads())

    def _forget(self, layer: _Layer, extra: dict[str, torch.Tensor]) -> None:
        aux: _LayerIndex = layer.aux
        aux.labels = None
        for label in extra["labels"].tolist():
            aux.index.mark_deleted(label)
        aux.deleted += int(extra["labels"].numel())

    def _keys(self, layer: _Layer, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        if "keys" in extra:
            return extra["keys"]
        return self._raw_keys(layer.aux, extra["labels"]).to(self.dtype)

    def _raw_keys(self, aux: _LayerIndex, labels: torch.Tensor) -> torch.Tensor:
        """The float32 keys ``[m, k]`` the index holds for ``labels`` (exact copies of the stored keys).

        hnswlib 0.8's ``get_items`` builds a Python list of floats per item before making an array, so
        this costs about 25 us per key of width 256 (0.26 s for 10,240 keys on one core).
        """
        if labels.numel() == 0:
            return torch.zeros(0, self.key_size)
        found = np.asarray(aux.index.get_items(labels.numpy(), return_type="numpy"), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(found[:, : self.key_size]))

    # -- candidates ---------------------------------------------------------------------------------

    def fetch_size(self, k: int) -> int:
        """How many neighbours of the mean query :meth:`candidates` asks for, for top-``k`` retrieval."""
        return max(math.ceil(self.config.overfetch * k), self.config.min_fetch, k)

    def prefilter_size(self, k: int) -> int:
        """How many of the :meth:`fetch_size` neighbours ``prefilter`` keeps for top-``k`` retrieval:
        ``ceil(prefilter * k)``, or the same share of the fetch when ``min_fetch`` raises it above
        ``overfetch * k``; at least ``k``. Without ``prefilter``: the whole fetch."""
        fetch = self.fetch_size(k)
        if self.config.prefilter is None:
            return fetch
        prefilter, overfetch = self.config.prefilter, self.config.overfetch
        if fetch <= math.ceil(overfetch * k):
            keep = math.ceil(prefilter * k)
        else:  # min_fetch raised the fetch
            keep = math.ceil(prefilter * fetch / overfetch)
        return min(fetch, max(k, keep))

    def candidates(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Sorted ids ``[c]`` proposed for top-``k`` retrieval with ``queries`` ``[q, key_size]``.

        Every id when the layer holds at most :meth:`fetch_size` entries; else the neighbours of the
        mean query (and of each query, with ``per_query``), see the class docstring. When the layer holds
        no more entries than a search would visit anyway (``ef``), they are scored exactly instead of
        through the graph: as cheap, and exact even where deletions have cut the graph apart. With
        ``prefilter``, the neighbours are then cut to the :meth:`prefilter_size` of best estimated score.
        """
        lyr = self._layer(layer)
        self._check_queries(queries, k)
        n = lyr.size
        fetch = self.fetch_size(k)
        per_query = min(self.config.per_query, n)
        if fetch >= n:
            return torch.arange(n)
        aux: _LayerIndex = lyr.aux
        q = self._project(aux, queries.detach().to(device="cpu", dtype=torch.float32))
        if self.config.space == "mips-l2":
            q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
        searches = [(data, count) for data, count in ((q.mean(dim=0, keepdim=True), fetch), (q, per_query)) if count]
        if not searches:  # k = 0 with min_fetch = 0 and no per-query search: nothing is asked for
            return torch.zeros(0, dtype=torch.int64)
        if n <= max(self.config.ef_search, fetch):
            exact = self._exact_neighbours(layer, queries, [(True, fetch), (False, per_query)])
            return self._prefiltered(lyr, exact, q[:, : self._index_width()], k)
        threads = self._threads()
        found = []
        try:
            for data, count in searches:
                aux.index.set_ef(max(self.config.ef_search, count))
                labels, _ = aux.index.knn_query(data.numpy(), k=count, num_threads=threads)
                found.append(labels.reshape(-1).astype(np.int64))
        except RuntimeError:  # hnswlib found fewer than `count` live nodes: fall back to every entry
            return torch.arange(n)
        # One search returns distinct labels: sorting them is enough (cheaper than unique). numpy's sort
        # and binary search are about twice as fast as torch's at these sizes (thousands of labels).
        wanted = np.sort(found[0]) if len(found) == 1 else np.unique(np.concatenate(found))
        if aux.labels is None:  # kept until rows enter or leave (a merge moves none): no copy per search
            aux.labels = lyr.column("labels").numpy()
        all_labels = aux.labels
        rows = np.searchsorted(all_labels, wanted)  # sorted, as `wanted` and `all_labels` are
        if rows.size and (int(rows[-1]) >= n or not np.array_equal(all_labels[rows], wanted)):
            raise RuntimeError("hnsw store: the index proposed a label the store does not hold; this is a bug")
        return self._prefiltered(lyr, torch.from_numpy(rows), q[:, : self._index_width()], k)

    def _prefiltered(self, lyr: _Layer, ids: torch.Tensor, projected_queries: torch.Tensor, k: int) -> torch.Tensor:
        """With ``prefilter``: the best :meth:`prefilter_size` of the sorted ``ids`` ``[c]`` by the estimate
        of M+'s score described in the class docstring, still sorted; else (or if no more than that) ``ids``.

        ``projected_queries`` ``[q, r]`` float32 are the queries in the index's coordinates.
        """
        if self.config.prefilter is None:
            return ids
        keep = self.prefilter_size(k)
        if ids.numel() <= keep:
            return ids
        keys = self._gather(lyr, ids, ("projected",))["projected"].float()  # [c, r]
        mean = projected_queries.mean(dim=0, keepdim=True)  # [1, r]
        centred = projected_queries - mean
        covariance = centred.T @ centred / projected_queries.shape[0]  # [r, r]
        both = keys @ torch.cat([mean.T, covariance], dim=1)  # [c, 1 + r]
        mu = both[:, 0]  # [c]: the mean of q . k over the prompt's queries
        var = (both[:, 1:] * keys).sum(dim=1)  # [c]: its variance, k^T C k
        estimate = mu * torch.rsqrt(var.mul_(math.pi / 8).add_(1))
        return torch.sort(ids[estimate.topk(keep, sorted=False).indices]).values

    def _exact_neighbours(self, layer: int, queries: torch.Tensor, searches: list[tuple[bool, int]]) -> torch.Tensor:
        """Sorted ids of the exact top inner products: per ``(use_mean_query, count)`` search, unioned."""
        keys = self.keys(layer).double()
        q = queries.detach().double().cpu()
        found = []
        for mean, count in searches:
            if count:
                dots = keys @ (q.mean(dim=0, keepdim=True) if mean else q).T  # [n, 1] or [n, q]
                found.append(dots.topk(count, dim=0).indices.reshape(-1))
        return torch.unique(torch.cat(found)) if found else torch.zeros(0, dtype=torch.int64)

    # -- sizes --------------------------------------------------------------------------------------

    def index_nodes(self, layer: int) -> int:
        """Nodes in ``layer``'s index, including deleted ones not yet reused (at most ``capacity``)."""
        aux: _LayerIndex = self._layer(layer).aux
        return 0 if aux.index is None else int(aux.index.element_count)

    def index(self, layer: int) -> Any:
        """``layer``'s ``hnswlib.Index`` (``None`` before the first insertion); read-only use, please."""
        return self._layer(layer).aux.index


@hookimpl
def register_stores(registry: Registry) -> None:
    registry.add_store(HnswStore)
