"""Property tests of the built-in long-term stores (exact and hnsw) against the LongTermStore contract.

Every added entry carries an identity: the entry ``u`` added to memory layer ``L`` has the vector
components ``4 * u + L + j / 8`` (``j`` = component index), exact in float32 for the sizes used here,
and a key drawn from a generator seeded by ``u`` (distinct keys, so nearest-neighbour searches have
no ties). Decoding a store's rows therefore tells which add each row came from, so a model of the
store can follow every entry with its age, source and whether it is staged.

A record is ``(u, age, source, staged)``; the model keeps one list of records per layer, in
:meth:`entries` order (merged rows first, then staged rows).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import memkit
from memkit.builtin.hnsw_store import HnswStore
from memkit.builtin.store import ExactStore, StagedStore
from memkit.interfaces import StoreEntries
from memkit.scoring import mean_sigmoid_scores, oldest_first

SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None)
Record = tuple[int, int, int, bool]  # (identity u, age, source, staged)


# ---------------------------------------------------------------------------------------------------
# shapes, stores and identities
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    kind: str
    layers: int
    d: int
    key_size: int
    capacity: int
    merge_every: int
    space: str

    def store(self) -> StagedStore:
        if self.kind == "exact":
            return ExactStore(
                ExactStore.Config(capacity=self.capacity, merge_every=self.merge_every),
                num_layers=self.layers,
                hidden_size=self.d,
                key_size=self.key_size,
            )
        # min_fetch=0 and overfetch=1 so that small stores search the index instead of proposing all;
        # "hnsw-prefilter" fetches 2k and keeps the k of best estimate
        prefilter = self.kind == "hnsw-prefilter"
        config = HnswStore.Config(
            capacity=self.capacity,
            merge_every=self.merge_every,
            M=4,
            ef_construction=32,
            min_fetch=0,
            overfetch=2.0 if prefilter else 1.0,
            num_threads=1,
            space=self.space,
            key_copy=self.kind != "hnsw-no-key-copy",
            index_dims=max(1, self.key_size - 1) if prefilter else None,
            prefilter=1.0 if prefilter else None,
        )
        return HnswStore(config, num_layers=self.layers, hidden_size=self.d, key_size=self.key_size)


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    return Setup(
        kind=draw(st.sampled_from(["exact", "hnsw", "hnsw-no-key-copy", "hnsw-prefilter"])),
        layers=draw(st.integers(1, 2)),
        d=draw(st.integers(1, 3)),
        key_size=draw(st.integers(1, 4)),
        capacity=draw(st.integers(1, 12)),
        merge_every=draw(st.integers(1, 4)),
        space=draw(st.sampled_from(["mips-l2", "ip"])),
    )


def key_of(u: int, key_size: int) -> torch.Tensor:
    return torch.randn(key_size, generator=torch.Generator().manual_seed(1_000_003 * u + 17))


def encode(us: list[int], layer: int, d: int, key_size: int, ages: list[int], source: int) -> StoreEntries:
    m = len(us)
    ids = torch.tensor(us, dtype=torch.float64).reshape(m, 1)
    vectors = (4 * ids + layer + torch.arange(d, dtype=torch.float64) / 8).float()
    keys = torch.stack([key_of(u, key_size) for u in us]) if us else torch.zeros(0, key_size)
    return StoreEntries(
        vectors, keys, torch.tensor(ages, dtype=torch.int64), torch.full((m,), source, dtype=torch.int64)
    )


def decode(entries: StoreEntries, layer: int, d: int, key_size: int) -> list[tuple[int, int, int]]:
    """``(u, age, source)`` of each row; checks every vector and key is intact and in its layer."""
    v = entries.vectors
    assert v.dtype == torch.float32 and v.dim() == 2 and v.shape[1] == d
    assert entries.ages.dtype == torch.int64 and entries.sources.dtype == torch.int64
    m = v.shape[0]
    assert entries.keys.shape == (m, key_size) and entries.ages.shape == (m,) and entries.sources.shape == (m,)
    codes = v[:, 0].double().round().long()
    assert torch.all(codes % 4 == layer), "an entry moved to another layer"
    us = (codes // 4).tolist()
    expected = encode(us, layer, d, key_size, [0] * m, 0)
    assert torch.equal(v, expected.vectors), "a vector's components were mixed"
    assert torch.equal(entries.keys, expected.keys), "a key does not belong to its vector"
    return list(zip(us, entries.ages.tolist(), entries.sources.tolist(), strict=True))


def state_copy(store: StagedStore) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in store.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


def queries_for(seed: int, key_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1 + seed % 3, key_size, generator=gen)


# ---------------------------------------------------------------------------------------------------
# the state machine
# ---------------------------------------------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """Adds, advances, resets, saves, restores and malformed calls on a store, checked against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.store: StagedStore | None = None
        self.saved: list[tuple[dict[str, torch.Tensor], list[list[Record]], list[int], list[int], int]] = []

    @initialize(setup=setups())
    def build(self, setup: Setup) -> None:
        self.setup = setup
        self.store = setup.store()
        self.model: list[list[Record]] = [[] for _ in range(setup.layers)]
        self.evicted = [0] * setup.layers
        self.added = [0] * setup.layers
        self.updates = 0
        self.next_u = 0

    # -- updates ------------------------------------------------------------------------------------

    @rule(data=st.data(), source=st.integers(-(2**40), 2**40))
    def add(self, data: st.DataObject, source: int) -> None:
        s, store = self.setup, self.store
        assert store is not None
        layer = data.draw(st.integers(0, s.layers - 1), label="layer")
        m = data.draw(st.integers(0, s.capacity + 2), label="m")
        ages = data.draw(st.lists(st.integers(0, 12), min_size=m, max_size=m), label="ages")
        us = list(range(self.next_u, self.next_u + m))
        self.next_u += m
        before = [(u, a, src) for u, a, src, _ in self.model[layer]]
        other = [list(row) for i, row in enumerate(self.model) if i != layer]
        store.add(layer, encode(us, layer, s.d, s.key_size, ages, source))

        # Added during an update that merged: merged at once (the update count says so).
        staged = not (self.updates and self.updates % s.merge_every == 0)
        rows = [*self.model[layer], *[(u, a, source, staged) for u, a in zip(us, ages, strict=True)]]
        excess = max(0, len(rows) - s.capacity)
        # The contract: the oldest go first (largest age), the earlier row among equal ages.
        order = sorted(range(len(rows)), key=lambda i: (-rows[i][1], i))
        gone = set(order[:excess])
        self.model[layer] = [r for i, r in enumerate(rows) if i not in gone]
        self.evicted[layer] += excess
        self.added[layer] += m
        if excess:
            kept_ages = [r[1] for r in self.model[layer]]
            assert all(rows[i][1] >= max(kept_ages, default=-1) for i in gone), "a younger entry was evicted"
        held = [(u, a, src) for u, a, src, _ in self.model[layer]]
        assert Counter(held) <= Counter(before) + Counter((u, a, source) for u, a in zip(us, ages, strict=True))
        assert [list(row) for i, row in enumerate(self.model) if i != layer] == other

    @rule(amount=st.integers(0, 7))
    def advance(self, amount: int) -> None:
        store = self.store
        assert store is not None
        store.advance(amount)
        self.updates += 1
        merge = self.updates % self.setup.merge_every == 0
        self.model = [[(u, a + amount, src, staged and not merge) for u, a, src, staged in row] for row in self.model]

    @rule()
    def reset(self) -> None:
        assert self.store is not None
        self.store.reset()
        self.model = [[] for _ in range(self.setup.layers)]
        self.evicted = [0] * self.setup.layers
        self.added = [0] * self.setup.layers
        self.updates = 0

    # -- reading ------------------------------------------------------------------------------------

    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def read(self, data: st.DataObject, seed: int) -> None:
        s, store = self.setup, self.store
        assert store is not None
        layer = data.draw(st.integers(0, s.layers - 1), label="layer")
        n = store.size(layer)
        whole = store.entries(layer)
        k = data.draw(st.integers(0, s.capacity + 1), label="k")
        queries = queries_for(seed, s.key_size)
        cands = store.candidates(layer, queries, k)
        assert cands.dtype == torch.int64 and cands.dim() == 1
        assert torch.equal(cands, torch.unique(cands)), "candidates are sorted and distinct"
        assert len(cands) >= min(k, n), "a store proposes at least k entries when it holds k"
        if len(cands):
            assert int(cands.min()) >= 0 and int(cands.max()) < n
        if isinstance(store, ExactStore) or n <= store.fetch_size(k):
            assert torch.equal(cands, torch.arange(n))
        else:
            # Small graphs are searched exhaustively: the neighbours fetched are the exact fetch_size(k)
            # best inner products with the mean query (k, or 2k with the prefilter; min_fetch=0).
            dots = whole.keys.double() @ queries.double().mean(0)
            fetched = dots.topk(store.fetch_size(k)).indices
            if store.config.prefilter is None:
                assert set(cands.tolist()) == set(fetched.tolist())
            else:  # the prefilter keeps the k of best probit estimate on the projected keys
                assert set(cands.tolist()) <= set(fetched.tolist()) and len(cands) == store.prefilter_size(k) == k
                basis = store._layers[layer].aux.basis
                projected = whole.keys.float() if basis is None else whole.keys.float() @ basis
                q = queries.float() if basis is None else queries.float() @ basis
                x = projected[fetched] @ q.T  # [fetch, queries]
                estimate = x.mean(1) / torch.sqrt(1 + math.pi / 8 * x.var(1, unbiased=False))
                kept = torch.isin(fetched, cands)
                if bool((~kept).any()):
                    assert float(estimate[kept].min()) >= float(estimate[~kept].max()) - 1e-4
        ids = torch.tensor(data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=6 if n else 0)), dtype=torch.long)
        got = store.get(layer, ids)
        for a, b in zip((got.vectors, got.keys, got.ages, got.sources), whole_rows(whole, ids), strict=True):
            assert torch.equal(a, b), "get disagrees with entries"
        assert torch.equal(store.keys(layer, ids), whole.keys[ids])
        assert torch.equal(store.keys(layer), whole.keys)
        picked = store.get(layer, cands)
        assert torch.equal(picked.keys, whole.keys[cands])
        order = oldest_first(cands, picked.ages)
        assert sorted(order.tolist()) == cands.tolist()

    @rule(data=st.data())
    def bad_ids_are_refused(self, data: st.DataObject) -> None:
        s, store = self.setup, self.store
        assert store is not None
        layer = data.draw(st.integers(0, s.layers - 1), label="layer")
        n = store.size(layer)
        bad = data.draw(st.sampled_from([n, n + 3, -1]), label="id")
        before = state_copy(store)
        with pytest.raises(memkit.InputError):
            store.get(layer, torch.tensor([0, bad][int(n == 0) :], dtype=torch.long))
        with pytest.raises(memkit.InputError):
            store.get(layer, torch.zeros(1, dtype=torch.int32))
        assert same_state(before, store.state_dict())

    @rule(data=st.data())
    def malformed_add_is_refused(self, data: st.DataObject) -> None:
        s, store = self.setup, self.store
        assert store is not None
        good = encode([10**6, 10**6 + 1], 0, s.d, s.key_size, [0, 1], 0)
        v, k, a, src = good.vectors, good.keys, good.ages, good.sources
        kind = data.draw(st.sampled_from(["width", "keys", "ages", "dtype", "nan", "inf", "negative", "layer"]))
        layer = 0
        if kind == "width":
            bad = StoreEntries(torch.zeros(2, s.d + 1), k, a, src)
        elif kind == "keys":
            bad = StoreEntries(v, torch.zeros(2, s.key_size + 1), a, src)
        elif kind == "ages":
            bad = StoreEntries(v, k, a[:1], src)
        elif kind == "dtype":
            bad = StoreEntries(v, k, a.int(), src)
        elif kind in ("nan", "inf"):
            v = v.clone()
            v[1, 0] = float("nan") if kind == "nan" else float("inf")
            bad = StoreEntries(v, k, a, src)
        elif kind == "negative":
            bad = StoreEntries(v, k, torch.tensor([0, -3]), src)
        else:
            bad, layer = good, s.layers
        before = state_copy(store)
        with pytest.raises(memkit.InputError):
            store.add(layer, bad)
        assert same_state(before, store.state_dict()), f"a refused add ({kind}) changed the store"

    # -- persistence --------------------------------------------------------------------------------

    @rule()
    def save(self) -> None:
        assert self.store is not None
        self.saved.append(
            (
                state_copy(self.store),
                [list(row) for row in self.model],
                list(self.evicted),
                list(self.added),
                self.updates,
            )
        )

    @precondition(lambda self: bool(self.saved))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        assert self.store is not None
        state, model, evicted, added, updates = data.draw(st.sampled_from(self.saved), label="saved")
        self.store.load_state_dict(state)
        self.model = [list(row) for row in model]
        self.evicted, self.added, self.updates = list(evicted), list(added), updates
        assert same_state(self.store.state_dict(), state)

    @rule(seed=st.integers(0, 2**16))
    def round_trip_into_a_fresh_store(self, seed: int) -> None:
        store = self.store
        assert store is not None
        fresh = self.setup.store()
        fresh.load_state_dict(state_copy(store))
        assert same_state(fresh.state_dict(), store.state_dict()), "state must round-trip exactly"
        queries = queries_for(seed, self.setup.key_size)
        reference = store
        if self.setup.kind == "hnsw-prefilter":
            # A load refits index_dims's directions on the loaded keys, and the prefilter's estimate is
            # taken in them: proposals may differ from the grown store's, not between loads.
            reference = self.setup.store()
            reference.load_state_dict(state_copy(store))
        for layer in range(self.setup.layers):
            assert fresh.size(layer) == store.size(layer) and fresh.staged(layer) == store.staged(layer)
            assert fresh.evicted(layer) == store.evicted(layer)
            for k in (1, 3):
                assert torch.equal(fresh.candidates(layer, queries, k), reference.candidates(layer, queries, k))
        assert fresh.updates == store.updates
        self.store = fresh  # from now on the loaded copy must behave like the original

    @rule(data=st.data())
    def malformed_state_is_refused(self, data: st.DataObject) -> None:
        s, store = self.setup, self.store
        assert store is not None
        state = state_copy(store)
        m = state["layers.0.merged.ages"].shape[0]
        kind = data.draw(
            st.sampled_from(["missing", "extra", "width", "keys", "rows", "over", "float_ages", "nan", "evicted"])
        )
        if kind == "missing":
            del state[data.draw(st.sampled_from(sorted(state)), label="name")]
        elif kind == "extra":
            state[f"layers.{s.layers}.merged.ages"] = torch.zeros(0, dtype=torch.long)
        elif kind == "width":
            state["layers.0.merged.vectors"] = torch.zeros(m, s.d + 1)
        elif kind == "keys":
            state["layers.0.staged.keys"] = torch.zeros(state["layers.0.staged.ages"].shape[0], s.key_size + 1)
        elif kind == "rows":
            state["layers.0.merged.sources"] = torch.zeros(m + 1, dtype=torch.long)
        elif kind == "over":
            n = s.capacity + 1
            state["layers.0.merged.vectors"] = torch.zeros(n, s.d)
            state["layers.0.merged.keys"] = torch.zeros(n, s.key_size)
            state["layers.0.merged.ages"] = torch.zeros(n, dtype=torch.long)
            state["layers.0.merged.sources"] = torch.zeros(n, dtype=torch.long)
        elif kind == "float_ages":
            state["layers.0.merged.ages"] = state["layers.0.merged.ages"].double()
        elif kind == "nan":
            state["layers.0.merged.keys"] = torch.full((m, s.key_size), float("nan"))
            if m == 0:
                state["layers.0.merged.keys"] = torch.full((1, s.key_size), float("nan"))
                state["layers.0.merged.vectors"] = torch.zeros(1, s.d)
                state["layers.0.merged.ages"] = torch.zeros(1, dtype=torch.long)
                state["layers.0.merged.sources"] = torch.zeros(1, dtype=torch.long)
        else:
            state["evicted"] = torch.zeros(s.layers + 1, dtype=torch.long)
        before = state_copy(store)
        with pytest.raises(memkit.MemoryStateError):
            store.load_state_dict(state)
        assert same_state(before, store.state_dict()), f"a refused load ({kind}) changed the store"

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def store_matches_its_model(self) -> None:
        s, store = self.setup, self.store
        if store is None:
            return
        assert store.capacity == s.capacity and store.updates == self.updates
        for layer in range(s.layers):
            rows = decode(store.entries(layer), layer, s.d, s.key_size)
            assert rows == [(u, a, src) for u, a, src, _ in self.model[layer]]
            n = len(rows)
            assert store.size(layer) == n <= s.capacity, "capacity exceeded"
            staged = [st_ for _, _, _, st_ in self.model[layer]]
            assert store.staged(layer) == sum(staged)
            assert staged == sorted(staged), "merged rows come first, then staged rows"
            assert store.evicted(layer) == self.evicted[layer]
            assert n + store.evicted(layer) == self.added[layer], "every entry is held or counted as evicted"
            if isinstance(store, HnswStore):
                assert store.index_nodes(layer) <= s.capacity


def whole_rows(whole: StoreEntries, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return whole.vectors[ids], whole.keys[ids], whole.ages[ids], whole.sources[ids]


TestStoresKeepTheLongTermStoreContract = StoreMachine.TestCase
TestStoresKeepTheLongTermStoreContract.settings = SETTINGS


# ---------------------------------------------------------------------------------------------------
# single properties
# ---------------------------------------------------------------------------------------------------

KINDS = [ExactStore, HnswStore]


@pytest.mark.parametrize("cls", KINDS)
@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(-6e4, 6e4, allow_nan=False, width=32), min_size=6, max_size=6),
    dtype=st.sampled_from(["float16", "bfloat16"]),
)
def test_half_precision_storage_is_exact_to_its_precision(
    cls: type[StagedStore], values: list[float], dtype: str
) -> None:
    store = cls(cls.Config(capacity=4, merge_every=2, dtype=dtype), num_layers=1, hidden_size=3, key_size=3)
    x = torch.tensor(values, dtype=torch.float32).reshape(2, 3)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if not torch.isfinite(x.to(torch_dtype)).all():
        with pytest.raises(memkit.InputError):
            store.add(0, StoreEntries(x, x.flip(0), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)))
        return
    store.add(0, StoreEntries(x, x.flip(0), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)))
    got = store.entries(0)
    assert torch.equal(got.vectors, x.to(torch_dtype)) and torch.equal(got.keys, x.flip(0).to(torch_dtype))
    eps = torch.finfo(torch_dtype).eps
    tiny = torch.finfo(torch_dtype).tiny
    assert torch.all((got.vectors.float() - x).abs() <= eps * x.abs() + tiny)


@settings(max_examples=50, deadline=None)
@given(
    q=st.integers(1, 5),
    m=st.integers(0, 40),
    width=st.integers(1, 6),
    block=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_mean_sigmoid_scores_does_not_depend_on_blocks(q: int, m: int, width: int, block: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    queries, keys = 3 * torch.randn(q, width, generator=gen), torch.randn(m, width, generator=gen)
    got = mean_sigmoid_scores(queries, keys, block_rows=block)
    expected = torch.sigmoid(keys.double() @ queries.double().T).mean(dim=1) if m else torch.zeros(0)
    assert got.shape == (m,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected.double(), atol=1e-6)
    assert torch.allclose(got, mean_sigmoid_scores(queries, keys, block_rows=m + 1), atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(ages=st.lists(st.integers(0, 5), max_size=30))
def test_oldest_first_is_a_stable_sort_by_age_descending(ages: list[int]) -> None:
    ids = torch.arange(100, 100 + len(ages))
    expected = [100 + i for i in sorted(range(len(ages)), key=lambda i: (-ages[i], i))]
    assert oldest_first(ids, torch.tensor(ages, dtype=torch.long)).tolist() == expected
