"""Property tests of :class:`memkit.builtin.pool.RandomDropPool` against the MemoryPool contract.

Every written vector carries an identity: the vector written as item ``u`` into memory layer ``L`` has
the components ``4 * u + L + j / 8`` (``j`` = component index), which float32 and float64 hold
exactly for the sizes used here. Decoding a pool's contents therefore tells which write (and which
layer) each slot came from, so a model of the pool can follow every vector with its age and source.

A record is ``(u, age, source)``; the model keeps one list of records per memory layer, oldest first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import memkit
from memkit.builtin.pool import RandomDropPool
from memkit.interfaces import Evicted

SETTINGS = settings(max_examples=60, stateful_step_count=30, deadline=None)
Record = tuple[int, int, int]  # (identity u, age, source)
SOURCES = st.integers(-(2**40), 2**40)
RNG_SEEDS = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------------
# shapes, pools and identities
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    layers: int
    d: int
    n: int
    k: int
    eviction: str
    per_layer: bool
    init: str
    seed: int | None
    model_dtype: torch.dtype
    config_dtype: str

    @property
    def store_dtype(self) -> torch.dtype:
        return self.model_dtype if self.config_dtype == "model" else torch.float32

    def pool(self) -> RandomDropPool:
        config = RandomDropPool.Config(
            capacity=self.n,
            write_size=self.k,
            eviction=self.eviction,
            per_layer=self.per_layer,
            init=self.init,
            seed=self.seed,
            dtype=self.config_dtype,
        )
        cpu, dtype = torch.device("cpu"), self.model_dtype
        return RandomDropPool(config, num_layers=self.layers, hidden_size=self.d, device=cpu, dtype=dtype)


@st.composite
def setups(draw: st.DrawFn, seed: st.SearchStrategy[int | None] | None = None) -> Setup:
    n = draw(st.integers(1, 12))
    return Setup(
        layers=draw(st.integers(1, 3)),
        d=draw(st.integers(1, 4)),
        n=n,
        k=draw(st.integers(1, n)),
        eviction=draw(st.sampled_from(["random", "fifo"])),
        per_layer=draw(st.booleans()),
        init=draw(st.sampled_from(["empty", "tile"])),
        seed=draw(seed if seed is not None else st.none() | st.integers(0, 2**31 - 1)),
        model_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        config_dtype=draw(st.sampled_from(["model", "float32"])),
    )


def encode(ids: list[list[int]], d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[l, s, d]`` vectors for per-layer lists of identities ``u``."""
    layers, s = len(ids), len(ids[0]) if ids else 0
    out = torch.empty(layers, s, d, dtype=torch.float64)
    for layer, row in enumerate(ids):
        for slot, u in enumerate(row):
            out[layer, slot] = torch.arange(d, dtype=torch.float64) / 8 + (4 * u + layer)
    return out.to(dtype)


def new_vectors(us: list[int], layers: int, d: int) -> torch.Tensor:
    """The ``[l, k, d]`` write of items ``us`` (the same items in every layer, each layer tagged)."""
    return encode([list(us) for _ in range(layers)], d)


def decode(vectors: torch.Tensor, ages: torch.Tensor, sources: torch.Tensor) -> list[list[Record]]:
    """Per-layer records of ``vectors`` ``[l, s, d]``; checks that each vector is intact and in its layer."""
    layers, s, d = vectors.shape
    assert tuple(ages.shape) == (layers, s) and tuple(sources.shape) == (layers, s)
    assert ages.dtype == torch.int64 and sources.dtype == torch.int64
    codes = vectors[..., 0].double().round().long()
    assert torch.all(codes % 4 == torch.arange(layers).unsqueeze(1)), "a vector moved to another layer"
    ids = (codes // 4).tolist()
    assert torch.equal(vectors, encode(ids, d, vectors.dtype)), "a vector's components were mixed"
    ages_, sources_ = ages.tolist(), sources.tolist()
    return [list(zip(ids[i], ages_[i], sources_[i], strict=True)) for i in range(layers)]


def contents(pool: RandomDropPool) -> list[list[Record]]:
    return decode(pool.read(), pool.ages(), pool.sources())


def evicted_records(evicted: Evicted) -> list[list[Record]]:
    return decode(evicted.vectors, evicted.ages, evicted.sources)


def is_subsequence(part: list[Record], whole: list[Record]) -> bool:
    it = iter(whole)
    return all(any(item == other for other in it) for item in part)


def same_state(a: RandomDropPool, b: RandomDropPool) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]) for key in sa
    )


def frozen_state(pool: RandomDropPool) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in pool.state_dict().items()}


def unchanged(pool: RandomDropPool, before: dict[str, torch.Tensor], version: int) -> bool:
    after = pool.state_dict()
    return (
        pool.version == version
        and after.keys() == before.keys()
        and all(torch.equal(after[key], before[key]) for key in before)
    )


# ---------------------------------------------------------------------------------------------------
# the state machine
# ---------------------------------------------------------------------------------------------------


class RandomDropPoolMachine(RuleBasedStateMachine):
    """Writes, resets, saves, restores and malformed calls on a pool, checked against a model of it.

    A twin pool with the same config receives the same calls. For ``seed=None`` both draw from torch's
    global generator after the same ``torch.manual_seed``; for a seeded pool the global generator is
    seeded differently for the twin, so the twin staying identical shows that the pool's own
    generator (and nothing else) decides its drops.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool: RandomDropPool | None = None
        self.saved: list[tuple[dict[str, torch.Tensor], list[list[Record]], int, bool]] = []

    @initialize(setup=setups())
    def build(self, setup: Setup) -> None:
        self.setup = setup
        self.pool = setup.pool()
        self.twin = setup.pool()
        self.model: list[list[Record]] = [[] for _ in range(setup.layers)]
        self.next_u = 0
        self.written = 0  # vectors written per layer since the last reset
        self.was_full = False

    # -- writes -------------------------------------------------------------------------------------

    @rule(data=st.data(), source=SOURCES, rng_seed=RNG_SEEDS)
    def write(self, data: st.DataObject, source: int, rng_seed: int) -> None:
        s, pool = self.setup, self.pool
        assert pool is not None
        k = data.draw(st.integers(1, s.k), label="k")
        us = list(range(self.next_u, self.next_u + k))
        self.next_u += k
        vectors = new_vectors(us, s.layers, s.d)
        old_size, old_version = pool.size, pool.version
        held_vectors, held_ages, held_sources = pool.read(), pool.ages(), pool.sources()
        held_copies = held_vectors.clone(), held_ages.clone(), held_sources.clone()
        advanced = [[(u, age + k, src) for u, age, src in row] for row in self.model]
        new = [(u, k - 1 - i, source) for i, u in enumerate(us)]

        with torch.random.fork_rng():
            torch.manual_seed(rng_seed)
            evicted = pool.write(vectors, source)
            torch.manual_seed(rng_seed if s.seed is None else rng_seed ^ 0x5DEECE66D)
            twin_evicted = self.twin.write(vectors.clone(), source)

        assert pool.version != old_version, "a write must change the version"
        for held, copy in zip((held_vectors, held_ages, held_sources), held_copies, strict=True):
            assert torch.equal(held, copy), "a write modified a tensor returned by read()/ages()/sources()"
        for a, b in zip(
            (evicted.vectors, evicted.ages, evicted.sources),
            (twin_evicted.vectors, twin_evicted.ages, twin_evicted.sources),
            strict=True,
        ):
            assert torch.equal(a, b), "two pools with the same seed evicted differently"

        after = contents(pool)
        gone = evicted_records(evicted)
        assert evicted.vectors.dtype == s.store_dtype
        assert evicted.vectors.shape[0] == s.layers and evicted.vectors.shape[2] == s.d

        if old_size == 0 and s.init == "tile":
            reps = -(-s.n // k)
            expected = (new * reps)[-s.n :]
            assert pool.size == s.n, "a tiled pool is full after its first write"
            assert evicted.count == 0
            for layer in range(s.layers):
                assert after[layer] == expected
        else:
            excess = max(0, old_size + k - s.n)
            assert evicted.count == excess
            if old_size == s.n:
                assert evicted.count == k, "a write into a full pool evicts exactly k per layer"
            assert pool.size == min(s.n, old_size + k)
            for layer in range(s.layers):
                kept = after[layer][: len(after[layer]) - k]
                assert after[layer][-k:] == new, "the new vectors sit at the end, in order, ages k-1..0"
                assert is_subsequence(kept, advanced[layer]), "survivors keep their order, ages grow by k"
                assert is_subsequence(gone[layer], advanced[layer]), "evicted vectors come in pool order"
                out_now = Counter(after[layer]) + Counter(gone[layer])
                in_now = Counter(advanced[layer]) + Counter(new)
                assert out_now == in_now, "kept + evicted must equal old + new: nothing duplicated or lost"
                if s.eviction == "fifo":
                    assert gone[layer] == advanced[layer][:excess], "fifo evicts the oldest"
            if s.eviction == "random" and not s.per_layer:
                for rows in (after, gone):
                    first = [u for u, _, _ in rows[0]]
                    assert all([u for u, _, _ in row] == first for row in rows), (
                        "per_layer=False evicts the same slots in every layer"
                    )

        self.model = after
        self.written += k
        self.was_full = self.was_full or pool.size == s.n

    @rule(data=st.data())
    def malformed_write_is_refused(self, data: st.DataObject) -> None:
        s, pool = self.setup, self.pool
        assert pool is not None
        kind = data.draw(st.sampled_from(["layers", "width", "rank2", "rank4", "k0", "k_over", "nan", "inf"]))
        k = data.draw(st.integers(1, s.k), label="k")
        shapes = {
            "layers": (s.layers + 1, k, s.d),
            "width": (s.layers, k, s.d + 1),
            "rank2": (k, s.d),
            "rank4": (1, s.layers, k, s.d),
            "k0": (s.layers, 0, s.d),
            "k_over": (s.layers, s.k + 1, s.d),
        }
        if kind in shapes:
            bad = torch.zeros(shapes[kind])
        else:
            bad = new_vectors(list(range(10_000, 10_000 + k)), s.layers, s.d)
            layer = data.draw(st.integers(0, s.layers - 1), label="layer")
            slot = data.draw(st.integers(0, k - 1), label="slot")
            bad[layer, slot, data.draw(st.integers(0, s.d - 1), label="component")] = (
                float("nan") if kind == "nan" else float("-inf")
            )
        before, version = frozen_state(pool), pool.version
        with pytest.raises(memkit.InputError):
            pool.write(bad, 1)
        assert unchanged(pool, before, version), f"a refused write ({kind}) changed the pool"

    # -- reset, save, restore -----------------------------------------------------------------------

    @rule()
    def reset(self) -> None:
        pool = self.pool
        assert pool is not None
        version = pool.version
        pool.reset()
        self.twin.reset()
        assert pool.version != version, "reset must change the version"
        assert pool.size == 0
        self.model = [[] for _ in range(self.setup.layers)]
        self.written = 0
        self.was_full = False

    @rule()
    def save(self) -> None:
        assert self.pool is not None
        state = frozen_state(self.pool)
        assert all(isinstance(value, torch.Tensor) for value in state.values())
        self.saved.append((state, [list(row) for row in self.model], self.written, self.was_full))

    @precondition(lambda self: bool(self.saved))
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        pool = self.pool
        assert pool is not None
        state, model, written, was_full = data.draw(st.sampled_from(self.saved), label="saved")
        version = pool.version
        pool.load_state_dict(state)
        self.twin.load_state_dict(state)
        assert pool.version != version, "load_state_dict must change the version"
        self.model = [list(row) for row in model]
        self.written, self.was_full = written, was_full
        assert contents(pool) == self.model

    @rule()
    def round_trip_into_a_fresh_pool(self) -> None:
        pool = self.pool
        assert pool is not None
        fresh = self.setup.pool()
        fresh.load_state_dict(frozen_state(pool))
        assert same_state(fresh, pool), "state_dict/load_state_dict must round-trip exactly"
        assert fresh.read().dtype == pool.read().dtype and fresh.size == pool.size
        version = pool.version
        pool.load_state_dict(pool.state_dict())
        assert pool.version != version
        assert contents(pool) == self.model
        # From now on the loaded copy must behave exactly like the original, generator included.
        self.twin = fresh

    @rule(data=st.data())
    def malformed_state_is_refused(self, data: st.DataObject) -> None:
        s, pool = self.setup, self.pool
        assert pool is not None
        lyr, d, size = s.layers, s.d, pool.size
        state = frozen_state(pool)
        kinds = ["layers", "width", "too_many", "rank", "ages", "sources", "missing", "nan"]
        kind = data.draw(st.sampled_from(kinds))
        if kind == "layers":
            state["vectors"] = torch.zeros(lyr + 1, size, d)
        elif kind == "width":
            state["vectors"] = torch.zeros(lyr, size, d + 1)
        elif kind == "too_many":
            state["vectors"] = torch.zeros(lyr, s.n + 1, d)
            state["ages"] = torch.zeros(lyr, s.n + 1, dtype=torch.long)
            state["sources"] = torch.zeros(lyr, s.n + 1, dtype=torch.long)
        elif kind == "rank":
            state["vectors"] = torch.zeros(size, d)
        elif kind == "ages":
            state["ages"] = torch.zeros(lyr, size + 1, dtype=torch.long)
        elif kind == "sources":
            state["sources"] = torch.zeros(lyr + 1, size, dtype=torch.long)
        elif kind == "missing":
            del state[data.draw(st.sampled_from(["vectors", "ages", "sources"]))]
        else:
            state["vectors"] = torch.full((lyr, max(size, 1), d), float("nan"))
            state["ages"] = torch.zeros(lyr, max(size, 1), dtype=torch.long)
            state["sources"] = torch.zeros(lyr, max(size, 1), dtype=torch.long)
        before, version = frozen_state(pool), pool.version
        with pytest.raises(memkit.MemoryStateError):
            pool.load_state_dict(state)
        assert unchanged(pool, before, version), f"a refused load ({kind}) changed the pool"

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def pool_matches_its_model(self) -> None:
        s, pool = self.setup, self.pool
        if pool is None:
            return
        assert pool.capacity == s.n and pool.write_size == s.k
        assert 0 <= pool.size <= s.n
        assert tuple(pool.read().shape) == (s.layers, pool.size, s.d)
        assert pool.read().dtype == s.store_dtype
        assert contents(pool) == self.model
        if s.init == "empty":
            assert pool.size == min(s.n, self.written)
        else:
            assert pool.size == (s.n if self.written else 0)
        if self.was_full:
            assert pool.size == s.n, "once full, a pool stays full"
        assert same_state(pool, self.twin), "the twin pool diverged"
        if s.init == "empty":
            for row in self.model:
                ages = [age for _, age, _ in row]
                assert ages == sorted(ages, reverse=True) and len(set(ages)) == len(ages)
                assert not ages or ages[-1] == 0


TestRandomDropPoolKeepsTheMemoryPoolContract = RandomDropPoolMachine.TestCase
TestRandomDropPoolKeepsTheMemoryPoolContract.settings = SETTINGS


# ---------------------------------------------------------------------------------------------------
# single properties
# ---------------------------------------------------------------------------------------------------


writes_plan = st.lists(st.tuples(st.integers(1, 12), SOURCES), min_size=1, max_size=12)


def apply(pool: RandomDropPool, setup: Setup, plan: list[tuple[int, int]], first_u: int = 0) -> list[Evicted]:
    out, u = [], first_u
    for k_raw, source in plan:
        k = (k_raw - 1) % setup.k + 1
        out.append(pool.write(new_vectors(list(range(u, u + k)), setup.layers, setup.d), source))
        u += k
    return out


@SETTINGS
@given(setup=setups(seed=st.integers(0, 2**31 - 1)), plan=writes_plan, noise=st.lists(st.integers(0, 50)))
def test_pools_with_the_same_seed_and_writes_hold_identical_state(setup: Setup, plan, noise) -> None:
    a, b = setup.pool(), setup.pool()
    with torch.random.fork_rng():
        apply(a, setup, plan)
        for i, step in enumerate(plan):
            torch.rand(noise[i] if i < len(noise) else 3)  # disturb torch's global generator
            apply(b, setup, [step], first_u=sum((k - 1) % setup.k + 1 for k, _ in plan[:i]))
    assert same_state(a, b)


@SETTINGS
@given(setup=setups(seed=st.none()), plan=writes_plan, last=writes_plan.map(lambda p: p[0]), rng=RNG_SEEDS)
def test_unseeded_pool_write_is_repeatable_after_torch_manual_seed(setup: Setup, plan, last, rng) -> None:
    pool = setup.pool()
    with torch.random.fork_rng():
        apply(pool, setup, plan)
        snapshot = frozen_state(pool)
        torch.manual_seed(rng)
        first = apply(pool, setup, [last], first_u=1000)[0]
        after_first = frozen_state(pool)
        pool.load_state_dict(snapshot)
        torch.rand(7)
        torch.manual_seed(rng)
        second = apply(pool, setup, [last], first_u=1000)[0]
    assert torch.equal(first.vectors, second.vectors) and torch.equal(first.ages, second.ages)
    assert unchanged(pool, after_first, pool.version)


@SETTINGS
@given(setup=setups(), plan=writes_plan)
def test_reset_seeded_or_not_returns_an_equal_pool_to_a_fresh_one(setup: Setup, plan) -> None:
    used, fresh = setup.pool(), setup.pool()
    with torch.random.fork_rng():
        apply(used, setup, plan)
        used.reset()
        assert same_state(used, fresh)
        if setup.seed is not None:  # the pool's own generator starts over too
            apply(used, setup, plan)
            apply(fresh, setup, plan)
            assert same_state(used, fresh)


@SETTINGS
@given(setup=setups(), plan=writes_plan)
def test_fifo_pool_holds_the_most_recent_n_written_vectors(setup: Setup, plan) -> None:
    setup = replace(setup, eviction="fifo", init="empty")
    pool = setup.pool()
    apply(pool, setup, plan)
    total = sum((k - 1) % setup.k + 1 for k, _ in plan)
    recent = list(range(total))[-setup.n :]
    assert [[u for u, _, _ in row] for row in contents(pool)] == [recent] * setup.layers
    assert pool.ages().tolist() == [list(range(len(recent) - 1, -1, -1))] * setup.layers


@SETTINGS
@given(n=st.integers(1, 12), extra=st.integers(1, 4))
def test_config_refuses_write_size_larger_than_capacity(n: int, extra: int) -> None:
    with pytest.raises(ValueError, match="K must be <= N"):
        RandomDropPool.Config(capacity=n, write_size=n + extra)


@pytest.mark.parametrize(
    ("config_dtype", "model_dtype", "expected"),
    [
        ("model", torch.float64, torch.float64),
        ("model", torch.bfloat16, torch.bfloat16),
        ("float32", torch.float64, torch.float32),
        ("float16", torch.float32, torch.float16),
        ("bfloat16", torch.float32, torch.bfloat16),
    ],
)
def test_pool_stores_vectors_in_the_configured_dtype(config_dtype, model_dtype, expected) -> None:
    pool = RandomDropPool(
        RandomDropPool.Config(capacity=4, write_size=2, dtype=config_dtype),
        num_layers=2,
        hidden_size=3,
        device=torch.device("cpu"),
        dtype=model_dtype,
    )
    assert pool.read().dtype == expected
    pool.write(torch.ones(2, 2, 3, dtype=torch.float64), source=5)
    assert pool.read().dtype == expected and pool.read().shape == (2, 2, 3)


def test_per_layer_random_drop_draws_a_different_permutation_for_each_layer() -> None:
    setup = Setup(3, 1, 12, 6, "random", True, "empty", 0, torch.float32, "model")
    pool = setup.pool()
    evictions = apply(pool, setup, [(6, 0)] * 12)
    ids = [e.vectors[..., 0] // 4 for e in evictions[2:]]
    assert all(e.count == 6 for e in evictions[2:])
    differs = [not (torch.equal(u[0], u[1]) and torch.equal(u[0], u[2])) for u in ids]
    assert any(differs), "with per_layer=True, 10 full writes all dropped the same slots in every layer"


@pytest.mark.parametrize("seed", [0, None])
def test_shared_random_drop_evicts_the_same_slots_in_every_layer(seed: int | None) -> None:
    setup = Setup(3, 2, 12, 6, "random", False, "empty", seed, torch.float32, "model")
    pool = setup.pool()
    evictions = apply(pool, setup, [(6, 0)] * 12)
    assert all(e.count == 6 for e in evictions[2:])
    for e in evictions[2:]:
        ids = e.vectors[..., 0] // 4
        assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])
    held = pool.read()[..., 0] // 4
    assert torch.equal(held[0], held[1]) and torch.equal(held[0], held[2])


def test_load_state_dict_with_a_malformed_generator_raises_memory_state_error_and_changes_nothing() -> None:
    setup = Setup(1, 2, 4, 2, "random", True, "empty", 1, torch.float32, "model")
    pool = setup.pool()
    apply(pool, setup, [(2, 0)])
    before, version = frozen_state(pool), pool.version
    state = frozen_state(pool)
    state["vectors"] = torch.zeros(1, 3, 2)
    state["ages"] = state["sources"] = torch.zeros(1, 3, dtype=torch.long)
    state["generator"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(memkit.MemoryStateError, match="generator"):
        pool.load_state_dict(state)
    assert unchanged(pool, before, version)


def test_write_of_a_non_tensor_raises_input_error() -> None:
    pool = Setup(1, 2, 4, 2, "fifo", True, "empty", None, torch.float32, "model").pool()
    before, version = frozen_state(pool), pool.version
    with pytest.raises(memkit.InputError, match="tensor"):
        pool.write([[[1.0, 2.0]]], 0)  # type: ignore[arg-type]
    assert unchanged(pool, before, version)
