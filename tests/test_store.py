"""Tests of the built-in long-term stores (:mod:`memkit.builtin.store`, :mod:`memkit.builtin.hnsw_store`)
and of the shared scores (:mod:`memkit.scoring`)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import Field, ValidationError
from safetensors.torch import load_file, save_file

import memkit
from memkit import plugins
from memkit.builtin.hnsw_store import HnswStore
from memkit.builtin.store import ExactStore, StagedStore
from memkit.errors import RecipeError
from memkit.interfaces import LongTermStore, StoreEntries
from memkit.registry import Registry
from memkit.scoring import mean_sigmoid_scores, oldest_first


class HnswNoCopy(HnswStore):
    """The hnsw store reading keys back from its index (``key_copy=False``)."""

    class Config(HnswStore.Config):
        key_copy: bool = Field(False, description="keys are read back from the index")


class HnswProjected(HnswStore):
    """The hnsw store indexing keys projected on 2 principal directions (``index_dims=2``)."""

    class Config(HnswStore.Config):
        index_dims: int | None = Field(2, description="index 2 principal coordinates of each key")


class HnswPrefiltered(HnswProjected):
    """:class:`HnswProjected` with ``prefilter=1.5`` (a projected-key column)."""

    class Config(HnswProjected.Config):
        prefilter: float | None = Field(1.5, description="keep the best 1.5 k of the fetched neighbours")


STORES = [ExactStore, HnswStore, HnswNoCopy, HnswProjected, HnswPrefiltered]
D, KEY = 6, 4


def make(cls: type[StagedStore], capacity: int = 10, merge_every: int = 2, layers: int = 2, **extra: object):
    config = cls.Config(capacity=capacity, merge_every=merge_every, **extra)
    return cls(config, num_layers=layers, hidden_size=D, key_size=KEY)


def batch(
    first: int, m: int, ages: list[int] | None = None, source: int = 0, layer: int = 0, key_size: int = KEY
) -> StoreEntries:
    """``m`` entries with identities ``first..first+m-1``: vector components ``u + layer/8 + j/64``;
    keys drawn from a generator seeded by ``u`` (distinct, reproducible)."""
    us = torch.arange(first, first + m, dtype=torch.float64)
    vectors = us[:, None] + layer / 8 + torch.arange(D, dtype=torch.float64) / 64
    keys = torch.stack([torch.randn(key_size, generator=torch.Generator().manual_seed(int(u))) for u in us])
    keys = keys.reshape(m, key_size)
    age = torch.tensor(ages if ages is not None else list(range(m - 1, -1, -1)), dtype=torch.int64)
    return StoreEntries(vectors.float(), keys.float(), age, torch.full((m,), source, dtype=torch.int64))


def ids_of(entries: StoreEntries) -> list[int]:
    return entries.vectors[:, 0].floor().long().tolist()


def snapshot(store: LongTermStore) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in store.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------------------------------------
# registration and config
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls", "module"), [("exact", ExactStore, "store"), ("hnsw", HnswStore, "hnsw_store")])
def test_builtin_stores_are_registered(fresh_registry: Registry, name: str, cls: type, module: str) -> None:
    assert f"memkit.builtin.{module}" in plugins.DEFAULT_PLUGINS
    assert fresh_registry.get("store", name) is cls
    assert fresh_registry.registrant("store", name) == f"memkit.builtin.{module}"


@pytest.mark.parametrize("cls", STORES)
def test_config_is_strict_and_documented(cls: type[StagedStore]) -> None:
    assert all(field.description for field in cls.Config.model_fields.values())
    for bad in ({"capacity": 0, "merge_every": 1}, {"capacity": 4, "merge_every": 0}):
        with pytest.raises(ValidationError):
            cls.Config(**bad)
    with pytest.raises(ValidationError):
        cls.Config(capacity=4, merge_every=1, dtype="float64")
    with pytest.raises(ValidationError):
        cls.Config(capacity=4, merge_every=1, unknown=1)
    assert cls.Config(capacity=153_600, merge_every=60).dtype == "float32"


@pytest.mark.parametrize("cls", STORES)
def test_bad_construction_is_refused(cls: type[StagedStore]) -> None:
    config = cls.Config(capacity=4, merge_every=1)
    for kwargs in (
        {"num_layers": 0, "hidden_size": 2, "key_size": 2},
        {"num_layers": 1, "hidden_size": 2, "key_size": 0},
    ):
        with pytest.raises(memkit.InputError):
            cls(config, **kwargs)


# ---------------------------------------------------------------------------------------------------
# staging, merging, ages, eviction
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", STORES)
def test_staged_entries_are_visible_and_merge_after_exactly_merge_every_updates(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=100, merge_every=3)
    store.add(0, batch(0, 4))
    assert (store.size(0), store.staged(0), store.size(1)) == (4, 4, 0)
    assert ids_of(store.entries(0)) == [0, 1, 2, 3]
    store.advance(4)
    store.add(0, batch(4, 2))
    store.advance(2)
    assert store.staged(0) == 6 and store.updates == 2
    before = store.entries(0)
    store.advance(1)  # the third update merges
    assert store.staged(0) == 0 and store.size(0) == 6
    after = store.entries(0)
    assert torch.equal(after.vectors, before.vectors) and torch.equal(after.keys, before.keys)
    assert torch.equal(after.ages, before.ages + 1) and torch.equal(after.sources, before.sources)
    store.add(0, batch(6, 1))  # added during the update that merged: merged with it
    assert ids_of(store.entries(0)) == [0, 1, 2, 3, 4, 5, 6] and store.staged(0) == 0
    store.advance(0)
    store.add(0, batch(7, 1))
    assert ids_of(store.entries(0)) == [0, 1, 2, 3, 4, 5, 6, 7] and store.staged(0) == 1
    store.advance(0)
    assert store.staged(0) == 1
    store.advance(0)  # the sixth update merges
    assert store.staged(0) == 0


@pytest.mark.parametrize("cls", STORES)
def test_ages_advance_for_merged_and_staged_alike(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=100, merge_every=2)
    store.add(0, batch(0, 3, ages=[5, 3, 1]))
    store.advance(3)
    store.advance(0)  # merged now
    store.advance(0)
    store.add(0, batch(3, 2, ages=[1, 0]))
    store.add(1, batch(10, 1, ages=[7], layer=1))
    store.advance(5)
    assert store.entries(0).ages.tolist() == [13, 11, 9, 6, 5]
    assert store.entries(1).ages.tolist() == [12]
    assert store.staged(0) == 0 and store.updates == 4
    with pytest.raises(memkit.InputError):
        store.advance(-1)
    for bad in (1.0, True, None):
        with pytest.raises(memkit.InputError):
            store.advance(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", STORES)
def test_eviction_takes_the_oldest_with_ties_going_to_the_earlier_row(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=5, merge_every=100)
    store.add(0, batch(0, 5, ages=[3, 9, 4, 9, 1]))
    store.add(0, batch(5, 3, ages=[9, 0, 2]))
    # 8 entries for 5 places: the three of age 9 go (ids 1 and 3 held, id 5 just added)
    assert store.evicted(0) == 3 and store.size(0) == 5
    assert ids_of(store.entries(0)) == [0, 2, 4, 6, 7]
    assert store.entries(0).ages.tolist() == [3, 4, 1, 0, 2]
    # ages [3, 4, 1, 0, 2] + [4, 4]: two of the three of age 4 go, the earlier rows (ids 2 and 8)
    store.add(0, batch(8, 2, ages=[4, 4]))
    assert store.evicted(0) == 5
    assert ids_of(store.entries(0)) == [0, 4, 6, 7, 9]


@pytest.mark.parametrize("cls", STORES)
def test_an_add_larger_than_capacity_keeps_the_youngest(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=3, merge_every=1)
    store.add(0, batch(0, 7))  # ages 6..0
    assert ids_of(store.entries(0)) == [4, 5, 6] and store.evicted(0) == 4
    store.add(0, batch(7, 1, ages=[100]))  # older than everything held: it is evicted at once
    assert ids_of(store.entries(0)) == [4, 5, 6] and store.evicted(0) == 5


@pytest.mark.parametrize("cls", STORES)
def test_evictions_do_not_copy_the_layer_but_stay_bounded(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=64, merge_every=1000, layers=1)
    gen = torch.Generator().manual_seed(0)
    added = 0
    for _ in range(40):
        m = int(torch.randint(1, 9, (1,), generator=gen))
        ages = torch.randint(0, 50, (m,), generator=gen).tolist()
        store.add(0, batch(added, m, ages=ages))
        added += m
        store.advance(m)
        lyr = store._layers[0]
        physical = sum(block.rows for block in lyr.blocks)
        assert store.size(0) <= 64 and physical <= math.ceil(store.size(0) * 8 / 7)
        assert store.size(0) + store.evicted(0) == added
    if isinstance(store, HnswStore):
        assert store.index_nodes(0) <= 64


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", STORES)
def test_get_keys_and_candidates_agree_with_entries(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=20, merge_every=2)
    for step in range(5):
        store.add(0, batch(10 * step, 6, source=step))
        store.advance(6)
    whole = store.entries(0)
    ids = torch.tensor([5, 0, 19, 7, 7], dtype=torch.int64)
    got = store.get(0, ids)
    assert torch.equal(got.vectors, whole.vectors[ids]) and torch.equal(got.keys, whole.keys[ids])
    assert torch.equal(got.ages, whole.ages[ids]) and torch.equal(got.sources, whole.sources[ids])
    assert torch.equal(store.keys(0, ids), whole.keys[ids]) and torch.equal(store.keys(0), whole.keys)
    assert torch.equal(store.ages(0, ids), whole.ages[ids]) and torch.equal(store.ages(0), whole.ages)
    empty = store.get(0, torch.zeros(0, dtype=torch.int64))
    assert len(empty) == 0 and empty.keys.shape == (0, KEY) and empty.vectors.shape == (0, D)
    cands = store.candidates(0, torch.randn(3, KEY), 4)
    assert cands.dtype == torch.int64 and cands.dim() == 1 and len(cands) >= 4
    assert torch.equal(cands, torch.unique(cands)) and int(cands.max()) < store.size(0)
    empty_layer = store.entries(1)
    assert empty_layer.vectors.shape == (0, D) and empty_layer.keys.shape == (0, KEY)
    assert store.candidates(1, torch.randn(2, KEY), 3).numel() == 0


@pytest.mark.parametrize("cls", STORES)
def test_returned_tensors_are_not_modified_by_later_calls(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=6, merge_every=2)
    store.add(0, batch(0, 6))
    whole, state = store.entries(0), store.state_dict()
    copies = [whole.vectors.clone(), whole.keys.clone(), whole.ages.clone(), whole.sources.clone()]
    state_copy = {name: t.clone() for name, t in state.items()}
    for step in range(4):
        store.add(0, batch(10 + step, 3, ages=[9, 0, 9]))
        store.advance(3)
    assert all(
        torch.equal(a, b) for a, b in zip((whole.vectors, whole.keys, whole.ages, whole.sources), copies, strict=True)
    )
    assert same(state, state_copy)


@pytest.mark.parametrize("cls", STORES)
def test_the_caller_keeps_its_tensors(cls: type[StagedStore]) -> None:
    store = make(cls, capacity=6, merge_every=2)
    entries = batch(0, 3)
    store.add(0, entries)
    entries.vectors.zero_()
    entries.ages.fill_(100)
    assert ids_of(store.entries(0)) == [0, 1, 2] and store.entries(0).ages.tolist() == [2, 1, 0]


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


def _bad_entries() -> dict[str, StoreEntries]:
    good = batch(0, 3)
    v, k, a, s = good.vectors, good.keys, good.ages, good.sources
    nan_v, inf_k = v.clone(), k.clone()
    nan_v[1, 2] = float("nan")
    inf_k[0, 0] = float("-inf")
    return {
        "vectors_width": StoreEntries(torch.zeros(3, D + 1), k, a, s),
        "vectors_rank": StoreEntries(torch.zeros(3, 1, D), k, a, s),
        "keys_width": StoreEntries(v, torch.zeros(3, KEY + 1), a, s),
        "keys_rows": StoreEntries(v, torch.zeros(2, KEY), a, s),
        "ages_rows": StoreEntries(v, k, a[:2], s),
        "sources_rank": StoreEntries(v, k, a, s[:, None]),
        "ages_dtype": StoreEntries(v, k, a.int(), s),
        "ages_float": StoreEntries(v, k, a.float(), s),
        "sources_dtype": StoreEntries(v, k, a, s.int()),
        "vectors_int": StoreEntries(v.long(), k, a, s),
        "nan": StoreEntries(nan_v, k, a, s),
        "inf": StoreEntries(v, inf_k, a, s),
        "negative_age": StoreEntries(v, k, torch.tensor([0, -1, 2]), s),
        "not_a_tensor": StoreEntries(v.tolist(), k, a, s),  # type: ignore[arg-type]
    }


@pytest.mark.parametrize("cls", STORES)
@pytest.mark.parametrize("kind", sorted(_bad_entries()))
def test_bad_adds_raise_input_error_and_change_nothing(cls: type[StagedStore], kind: str) -> None:
    store = make(cls)
    store.add(0, batch(100, 4))
    before = snapshot(store)
    with pytest.raises(memkit.InputError):
        store.add(0, _bad_entries()[kind])
    assert same(before, store.state_dict())


@pytest.mark.parametrize("cls", STORES)
def test_bad_layers_ids_and_queries_raise_input_error(cls: type[StagedStore]) -> None:
    store = make(cls)
    store.add(0, batch(0, 4))
    for layer in (-1, 2, 1.0, True, "0"):
        with pytest.raises(memkit.InputError):
            store.add(layer, batch(0, 1))  # type: ignore[arg-type]
        with pytest.raises(memkit.InputError):
            store.size(layer)  # type: ignore[arg-type]
    with pytest.raises(memkit.InputError):
        store.add(0, (torch.zeros(1, D),))  # type: ignore[arg-type]
    for ids in (
        torch.tensor([4]),
        torch.tensor([-1]),
        torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([[0]]),
        torch.tensor([0.0]),
        [0, 1],
    ):
        with pytest.raises(memkit.InputError):
            store.get(0, ids)  # type: ignore[arg-type]
        with pytest.raises(memkit.InputError):
            store.keys(0, ids)  # type: ignore[arg-type]
    with pytest.raises(memkit.InputError):
        store.get(1, torch.tensor([0]))  # layer 1 is empty
    nan_q = torch.randn(2, KEY)
    nan_q[0, 0] = float("nan")
    for queries, k in (
        (torch.randn(2, KEY + 1), 3),
        (torch.randn(KEY), 3),
        (torch.zeros(0, KEY), 3),
        (nan_q, 3),
        (torch.ones(2, KEY, dtype=torch.long), 3),
        (torch.randn(2, KEY), -1),
        (torch.randn(2, KEY), 2.0),
    ):
        with pytest.raises(memkit.InputError):
            store.candidates(0, queries, k)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", STORES)
def test_an_add_that_overflows_half_precision_is_refused(cls: type[StagedStore]) -> None:
    store = make(cls, dtype="float16")
    entries = batch(0, 2)
    big = StoreEntries(entries.vectors * 1e5, entries.keys, entries.ages, entries.sources)
    with pytest.raises(memkit.InputError, match="overflow"):
        store.add(0, big)
    assert store.size(0) == 0


# ---------------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", STORES)
@pytest.mark.parametrize(("dtype", "torch_dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_storage_rounds_once_and_halves_the_bytes(
    cls: type[StagedStore], dtype: str, torch_dtype: torch.dtype
) -> None:
    store = make(cls, dtype=dtype, capacity=50)
    gen = torch.Generator().manual_seed(1)
    vectors, keys = torch.randn(40, D, generator=gen), torch.randn(40, KEY, generator=gen)
    ages = torch.arange(40)
    store.add(0, StoreEntries(vectors, keys, ages, ages))
    got = store.entries(0)
    assert got.vectors.dtype == torch_dtype and got.keys.dtype == torch_dtype
    assert torch.equal(got.vectors, vectors.to(torch_dtype)) and torch.equal(got.keys, keys.to(torch_dtype))
    rel = torch.finfo(torch_dtype).eps
    assert torch.allclose(got.vectors.float(), vectors, rtol=rel, atol=0)
    assert got.vectors.element_size() == 2
    fresh = make(cls, dtype=dtype, capacity=50)
    fresh.load_state_dict(store.state_dict())
    assert same(fresh.state_dict(), store.state_dict())


# ---------------------------------------------------------------------------------------------------
# persistence
# ---------------------------------------------------------------------------------------------------


def _filled(cls: type[StagedStore], **extra: object) -> StagedStore:
    store = make(cls, capacity=12, merge_every=3, **extra)
    for step in range(8):  # the last add comes after the sixth update merged: it stays staged
        store.add(step % 2, batch(10 * step, 5, ages=[4, 9, 0, 2, 2], source=step, layer=step % 2))
        store.advance(5)
    return store


@pytest.mark.parametrize("cls", STORES)
def test_state_round_trips_exactly_through_safetensors(cls: type[StagedStore], tmp_path) -> None:
    store = _filled(cls)
    assert store.staged(0) + store.staged(1) > 0 and store.evicted(0) > 0
    path = tmp_path / "store.safetensors"
    save_file(store.state_dict(), str(path))
    fresh = make(cls, capacity=12, merge_every=3)
    fresh.load_state_dict(load_file(str(path)))
    assert same(fresh.state_dict(), store.state_dict())
    for layer in (0, 1):
        assert (fresh.size(layer), fresh.staged(layer), fresh.evicted(layer)) == (
            store.size(layer),
            store.staged(layer),
            store.evicted(layer),
        )
    assert fresh.updates == store.updates
    # Both continue identically: same merges, same evictions.
    for target in (store, fresh):
        target.add(0, batch(500, 4, ages=[50, 0, 50, 1]))
        target.advance(4)
        target.advance(1)
    assert same(fresh.state_dict(), store.state_dict())


def _malformed(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    m = state["layers.0.merged.ages"].shape[0]
    if kind == "missing":
        del state["layers.1.staged.keys"]
    elif kind == "unexpected":
        state["layers.2.merged.ages"] = torch.zeros(0, dtype=torch.int64)
    elif kind == "vectors_width":
        state["layers.0.merged.vectors"] = torch.zeros(m, D + 1)
    elif kind == "keys_rows":
        state["layers.0.merged.keys"] = torch.zeros(m + 1, KEY)
    elif kind == "ages_rank":
        state["layers.0.merged.ages"] = state["layers.0.merged.ages"][:, None]
    elif kind == "sources_rows":
        state["layers.0.staged.sources"] = torch.zeros(99, dtype=torch.int64)
    elif kind == "float_ages":
        state["layers.0.merged.ages"] = state["layers.0.merged.ages"].float()
    elif kind == "negative_ages":
        state["layers.0.merged.ages"] = state["layers.0.merged.ages"] - 1000
    elif kind == "nan":
        state["layers.0.merged.vectors"] = torch.full((m, D), float("nan"))
    elif kind == "over_capacity":
        n = 13
        for part in ("vectors", "keys", "ages", "sources"):
            del state[f"layers.0.staged.{part}"]
        state["layers.0.merged.vectors"] = torch.zeros(n, D)
        state["layers.0.merged.keys"] = torch.zeros(n, KEY)
        state["layers.0.merged.ages"] = torch.zeros(n, dtype=torch.int64)
        state["layers.0.merged.sources"] = torch.zeros(n, dtype=torch.int64)
        for part in ("vectors", "keys", "ages", "sources"):
            state[f"layers.0.staged.{part}"] = state[f"layers.0.merged.{part}"][:0].clone()
    elif kind == "evicted_shape":
        state["evicted"] = torch.zeros(3, dtype=torch.int64)
    elif kind == "updates_float":
        state["updates"] = torch.tensor(1.5)
    elif kind == "not_a_tensor":
        state["updates"] = 3  # type: ignore[assignment]
    return state


MALFORMED = [
    "missing",
    "unexpected",
    "vectors_width",
    "keys_rows",
    "ages_rank",
    "sources_rows",
    "float_ages",
    "negative_ages",
    "nan",
    "over_capacity",
    "evicted_shape",
    "updates_float",
    "not_a_tensor",
]


@pytest.mark.parametrize("cls", STORES)
@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_state_raises_memory_state_error_and_changes_nothing(cls: type[StagedStore], kind: str) -> None:
    store = _filled(cls)
    donor = _filled(cls)
    donor.add(0, batch(900, 3))
    before = snapshot(store)
    queries = torch.randn(2, KEY)
    cands = store.candidates(0, queries, 3)
    with pytest.raises(memkit.MemoryStateError):
        store.load_state_dict(_malformed(donor.state_dict(), kind))
    assert same(before, store.state_dict())
    assert torch.equal(store.candidates(0, queries, 3), cands)
    with pytest.raises(memkit.MemoryStateError):
        store.load_state_dict([1, 2])  # type: ignore[arg-type]


def test_a_state_of_another_store_kind_loads_into_the_other() -> None:
    exact = _filled(ExactStore)
    hnsw = make(HnswStore, capacity=12, merge_every=3)
    hnsw.load_state_dict(exact.state_dict())
    assert same(hnsw.state_dict(), exact.state_dict())


@pytest.mark.parametrize("cls", STORES)
def test_reset_empties_the_store_and_zeroes_the_counters(cls: type[StagedStore]) -> None:
    store = _filled(cls)
    store.reset()
    assert all(store.size(i) == store.evicted(i) == store.staged(i) == 0 for i in (0, 1))
    assert store.updates == 0
    assert same(store.state_dict(), make(cls, capacity=12, merge_every=3).state_dict())


# ---------------------------------------------------------------------------------------------------
# the hnsw index
# ---------------------------------------------------------------------------------------------------


def _low_rank(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[n, dim]`` and 16 prompt queries from a rank-8-plus-noise model, dot products of spread ~2."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, 8, generator=gen)).Q
    keys = torch.randn(n, 8, generator=gen) @ basis.T + 0.1 * torch.randn(n, dim, generator=gen)
    topic = torch.randn(8, generator=gen)
    queries = (topic + 0.7 * torch.randn(16, 8, generator=gen)) @ basis.T * 0.5
    return keys, queries


def _recall(store: StagedStore, queries: torch.Tensor, k: int, exact_top: torch.Tensor) -> float:
    cands = store.candidates(0, queries, k)
    scores = mean_sigmoid_scores(queries, store.keys(0, cands))
    got = cands[scores.topk(k).indices]
    return len(set(got.tolist()) & set(exact_top.tolist())) / k


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_hnsw_candidates_contain_the_exact_top_k(seed: int) -> None:
    """A few thousand entries; the proposals (6% of them) hold at least 95% of the exact top-64."""
    n, dim, k = 4000, 32, 64
    keys, queries = _low_rank(n, dim, seed=seed)
    store = HnswStore(
        HnswStore.Config(capacity=n, merge_every=3, min_fetch=256, num_threads=1),
        num_layers=1,
        hidden_size=2,
        key_size=dim,
    )
    zeros = torch.zeros(500, dtype=torch.long)
    for start in range(0, n, 500):  # staged and merged entries alike
        store.add(0, StoreEntries(torch.zeros(500, 2), keys[start : start + 500], zeros, zeros))
        store.advance(1)
    assert store.staged(0) > 0
    exact_top = mean_sigmoid_scores(queries, keys).topk(k).indices
    assert len(store.candidates(0, queries, k)) == 4 * k
    assert _recall(store, queries, k, exact_top) >= 0.95


def test_hnsw_evicted_entries_leave_the_index_and_slots_are_reused() -> None:
    dim, cap = 16, 300
    keys, queries = _low_rank(2000, dim, seed=5)
    store = HnswStore(
        HnswStore.Config(capacity=cap, merge_every=5, min_fetch=0, overfetch=2.0, num_threads=1),
        num_layers=1,
        hidden_size=2,
        key_size=dim,
    )
    gen = torch.Generator().manual_seed(0)
    for start in range(0, 2000, 100):
        ages = torch.randint(0, 1000, (100,), generator=gen)
        store.add(0, StoreEntries(keys[start : start + 100, :2].clone(), keys[start : start + 100], ages, ages))
        store.advance(100)
        assert store.index_nodes(0) <= cap
        assert set(store._layers[0].column("labels").tolist()) <= set(store.index(0).get_ids_list())
        cands = store.candidates(0, queries, 40)
        held = store.keys(0, cands)
        assert torch.equal(held, store.entries(0).keys[cands])
    assert store.evicted(0) == 2000 - cap


def test_hnsw_candidates_after_a_round_trip() -> None:
    n, dim, k = 3000, 24, 64
    keys, queries = _low_rank(n, dim, seed=7)
    config = HnswStore.Config(capacity=2500, merge_every=4, min_fetch=128, num_threads=1)

    def fresh() -> HnswStore:
        return HnswStore(config, num_layers=1, hidden_size=2, key_size=dim)

    grown = fresh()
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n, 300):
        ages = torch.randint(0, 5000, (300,), generator=gen)
        grown.add(0, StoreEntries(keys[start : start + 300, :2].clone(), keys[start : start + 300], ages, ages))
        grown.advance(300)
    assert grown.evicted(0) == 500 and grown.staged(0) > 0
    state = grown.state_dict()
    loaded, again = fresh(), fresh()
    loaded.load_state_dict(state)
    again.load_state_dict(state)
    assert torch.equal(loaded.candidates(0, queries, k), again.candidates(0, queries, k))
    reloaded = fresh()
    reloaded.load_state_dict(loaded.state_dict())
    assert torch.equal(reloaded.candidates(0, queries, k), loaded.candidates(0, queries, k))
    # The grown graph differs from the rebuilt one, but both find the exact top-k.
    held = grown.keys(0)
    exact_top = mean_sigmoid_scores(queries, held).topk(k).indices
    assert _recall(grown, queries, k, exact_top) >= 0.95
    assert _recall(loaded, queries, k, exact_top) >= 0.95


def test_hnsw_proposes_everything_when_it_holds_less_than_it_would_fetch() -> None:
    store = make(HnswStore, capacity=50, min_fetch=0, overfetch=2.0)
    store.add(0, batch(0, 10))
    assert torch.equal(store.candidates(0, torch.randn(2, KEY), 5), torch.arange(10))
    store.add(0, batch(10, 30))
    cands = store.candidates(0, torch.randn(2, KEY), 5)
    assert len(cands) >= 10 and len(cands) < 40


def test_hnsw_keeps_keys_beside_the_index_only_with_key_copy() -> None:
    for cls, columns in ((HnswStore, {"keys", "labels"}), (HnswNoCopy, {"labels"})):
        store = make(cls)
        store.add(0, batch(0, 5))
        assert all(set(block.columns) == {"vectors", "ages", "sources", *columns} for block in store._layers[0].blocks)
        assert torch.equal(store.keys(0), batch(0, 5).keys)


def test_hnsw_rebuilds_its_index_when_a_key_outgrows_the_padding_norm() -> None:
    store = make(HnswNoCopy, capacity=40, min_fetch=0, overfetch=1.0, num_threads=1)
    entries = batch(0, 20)
    store.add(0, entries)
    bound = store._layers[0].aux.bound
    longer = StoreEntries(entries.vectors[:3] + 100, entries.keys[:3] * 10, entries.ages[:3], entries.sources[:3])
    store.add(0, longer)
    assert store._layers[0].aux.bound > bound
    keys = torch.cat([entries.keys, longer.keys])
    assert torch.equal(store.keys(0), keys)
    queries = torch.randn(3, KEY)
    best = set((keys @ queries.mean(0)).topk(5).indices.tolist())
    assert set(store.candidates(0, queries, 5).tolist()) == best


def _fill_low_rank(n: int, dim: int, seed: int, **config: object) -> tuple[HnswStore, torch.Tensor]:
    keys, queries = _low_rank(n, dim, seed=seed)
    store = HnswStore(
        HnswStore.Config(capacity=n, merge_every=3, min_fetch=256, num_threads=1, **config),
        num_layers=1,
        hidden_size=2,
        key_size=dim,
    )
    zeros = torch.zeros(250, dtype=torch.long)
    for start in range(0, n, 250):
        store.add(0, StoreEntries(torch.zeros(250, 2), keys[start : start + 250], zeros, zeros))
        store.advance(1)
    return store, queries


def test_hnsw_with_index_dims_indexes_principal_coordinates_and_still_finds_the_top_k() -> None:
    """Keys of rank 8 (plus noise) in width 32: 8 principal coordinates keep the top-k, 2 do not."""
    n, dim, k = 4000, 32, 64
    store, queries = _fill_low_rank(n, dim, seed=0, index_dims=8)
    aux = store._layers[0].aux
    assert store.index(0).dim == 8 + 1  # 8 coordinates + the mips-l2 padding
    assert aux.basis.shape == (dim, 8)
    assert torch.allclose(aux.basis.T @ aux.basis, torch.eye(8), atol=1e-5)
    # fitted on the first add (250 keys), refitted each time the layer doubled: 500, 1,000, 2,000, 4,000
    assert aux.fitted_on == 4000
    assert store.index_nodes(0) == n
    exact_top = mean_sigmoid_scores(queries, store.keys(0)).topk(k).indices
    assert _recall(store, queries, k, exact_top) >= 0.95
    too_few, _ = _fill_low_rank(n, dim, seed=0, index_dims=2)
    assert _recall(too_few, queries, k, exact_top) < 0.8


def test_hnsw_with_index_dims_refits_after_a_load_and_finds_the_top_k() -> None:
    n, dim, k = 3000, 24, 64
    store, queries = _fill_low_rank(n, dim, seed=7, index_dims=8)
    state = store.state_dict()
    loaded, again = (HnswStore(store.config, num_layers=1, hidden_size=2, key_size=dim) for _ in range(2))
    loaded.load_state_dict(state)
    again.load_state_dict(state)
    assert loaded._layers[0].aux.fitted_on == n  # fitted on every loaded key at once
    assert torch.equal(loaded._layers[0].aux.basis, again._layers[0].aux.basis)
    assert torch.equal(loaded.candidates(0, queries, k), again.candidates(0, queries, k))
    exact_top = mean_sigmoid_scores(queries, store.keys(0)).topk(k).indices
    assert _recall(loaded, queries, k, exact_top) >= 0.95


def test_hnsw_index_dims_without_key_copy_is_refused() -> None:
    with pytest.raises(RecipeError, match="index_dims needs key_copy"):
        make(HnswNoCopy, index_dims=2)


def test_hnsw_prefilter_without_index_dims_is_refused() -> None:
    with pytest.raises(RecipeError, match="prefilter .* index_dims"):
        make(HnswStore, prefilter=1.5)
    with pytest.raises(ValidationError):
        make(HnswProjected, prefilter=0.5)


def _probit_estimate(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``mean(q) . k / sqrt(1 + pi/8 * var_q(q . k))`` for keys ``[c, r]`` and queries ``[q, r]``."""
    dots = keys @ queries.T  # [c, q]
    return dots.mean(dim=1) / torch.sqrt(1 + math.pi / 8 * dots.var(dim=1, unbiased=False))


def test_hnsw_prefilter_keeps_the_fetched_neighbours_of_best_estimated_score() -> None:
    """Same data and graph with and without ``prefilter``: the prefiltered proposals are exactly the
    best ``ceil(prefilter * k)`` of the full proposals by the probit estimate on the projected keys,
    and they still hold the exact top-k."""
    n, dim, k = 4000, 32, 64
    plain, queries = _fill_low_rank(n, dim, seed=3, index_dims=8, overfetch=4.0)
    pre, _ = _fill_low_rank(n, dim, seed=3, index_dims=8, overfetch=4.0, prefilter=1.5)
    every = plain.candidates(0, queries, k)
    kept = pre.candidates(0, queries, k)
    assert len(every) == 256 and len(kept) == math.ceil(1.5 * k)
    assert torch.equal(kept, torch.sort(kept).values) and len(set(kept.tolist())) == len(kept)
    basis = pre._layers[0].aux.basis
    estimate = _probit_estimate(pre.keys(0, every).float() @ basis, queries @ basis)
    assert set(kept.tolist()) == set(every[estimate.topk(len(kept)).indices].tolist())
    exact_top = mean_sigmoid_scores(queries, pre.keys(0)).topk(k).indices
    assert _recall(pre, queries, k, exact_top) >= 0.95
    # a small k fetches min_fetch (256 > 4 * 8): the prefilter keeps the same share of it, 1.5 / 4
    assert pre.fetch_size(8) == 256 and pre.prefilter_size(8) == 96 == len(pre.candidates(0, queries, 8))
    assert plain.prefilter_size(8) == 256


def test_hnsw_prefilter_finds_more_of_the_top_k_than_the_mean_query_at_equal_scoring_work() -> None:
    """Queries from two sub-topics: the mean query's top 2k misses part of the exact top-k; fetching 6k
    and keeping the 2k of best estimate misses less."""
    n, dim, k = 6000, 32, 128
    keys, _ = _low_rank(n, dim, seed=11)
    gen = torch.Generator().manual_seed(2)
    basis = torch.linalg.svd(keys, full_matrices=False).Vh[:8].T
    topics = torch.randn(2, 8, generator=gen)
    queries = (topics[torch.arange(16) % 2] + 0.5 * torch.randn(16, 8, generator=gen)) @ basis.T
    recalls = {}
    for name, config in (("mean", {"overfetch": 2.0}), ("prefilter", {"overfetch": 6.0, "prefilter": 2.0})):
        store = HnswStore(
            HnswStore.Config(capacity=n, merge_every=3, min_fetch=0, num_threads=1, index_dims=8, **config),
            num_layers=1,
            hidden_size=2,
            key_size=dim,
        )
        zeros = torch.zeros(n, dtype=torch.long)
        store.add(0, StoreEntries(torch.zeros(n, 2), keys, zeros, zeros))
        assert len(store.candidates(0, queries, k)) == 2 * k
        exact_top = mean_sigmoid_scores(queries, keys).topk(k).indices
        recalls[name] = _recall(store, queries, k, exact_top)
    assert recalls["mean"] < 0.9
    assert recalls["prefilter"] >= 0.95


def test_hnsw_prefilter_projected_keys_follow_refits_and_loads() -> None:
    """The projected-key column always holds the keys' coordinates on the current principal directions:
    after each refit (the layer doubling), after evictions, and after a load."""
    n, dim = 3000, 24
    keys, _ = _low_rank(n, dim, seed=2)
    config = HnswStore.Config(capacity=2000, merge_every=4, num_threads=1, index_dims=6, prefilter=1.2)
    store = HnswStore(config, num_layers=1, hidden_size=2, key_size=dim)
    gen = torch.Generator().manual_seed(0)
    bases = []
    for start in range(0, n, 200):
        ages = torch.randint(0, 5000, (200,), generator=gen)
        store.add(0, StoreEntries(keys[start : start + 200, :2].clone(), keys[start : start + 200], ages, ages))
        store.advance(200)
        aux = store._layers[0].aux
        if not bases or not torch.equal(bases[-1], aux.basis):
            bases.append(aux.basis.clone())
        lyr = store._layers[0]
        expected = lyr.column("keys").float() @ aux.basis
        assert torch.allclose(lyr.column("projected").float(), expected, atol=1e-5)
    assert len(bases) >= 3 and store.evicted(0) == n - 2000
    loaded = HnswStore(config, num_layers=1, hidden_size=2, key_size=dim)
    loaded.load_state_dict(store.state_dict())
    lyr = loaded._layers[0]
    assert torch.allclose(lyr.column("projected").float(), lyr.column("keys").float() @ lyr.aux.basis, atol=1e-5)
    assert "layers.0.merged.projected" not in store.state_dict()  # derived, not saved


# ---------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_rows", [1, 3, 16_384])
def test_mean_sigmoid_scores_is_the_m_plus_score(block_rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(5, 8, generator=gen), torch.randn(11, 8, generator=gen)
    expected = torch.sigmoid(keys.double() @ queries.double().T).mean(dim=1)
    got = mean_sigmoid_scores(queries, keys, block_rows=block_rows)
    assert got.dtype == torch.float32 and got.shape == (11,)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    half = mean_sigmoid_scores(queries.half(), keys.half(), block_rows=block_rows)
    assert half.dtype == torch.float32 and torch.allclose(half.double(), expected, atol=1e-2)
    assert mean_sigmoid_scores(queries, keys[:0]).shape == (0,)
    for bad in ((queries[:0], keys), (queries[:, :7], keys), (queries[0], keys)):
        with pytest.raises(memkit.InputError):
            mean_sigmoid_scores(*bad)
    with pytest.raises(memkit.InputError):
        mean_sigmoid_scores(queries, keys, block_rows=0)


def test_oldest_first_sorts_by_age_descending_and_keeps_ties_in_order() -> None:
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    ages = torch.tensor([3, 7, 3, 0, 7, 5])
    assert oldest_first(ids, ages).tolist() == [11, 14, 15, 10, 12, 13]
    assert oldest_first(ids[:0], ages[:0]).numel() == 0
    with pytest.raises(memkit.InputError):
        oldest_first(ids, ages[:3])
