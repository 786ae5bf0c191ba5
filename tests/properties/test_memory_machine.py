"""A Hypothesis state machine over a whole M+ memory: pool, long-term store and their bookkeeping together.

A tiny llama is wrapped once per store backend (``exact`` and ``hnsw``) with the ``mplus`` recipe at
small sizes, so that a run of a few dozen steps fills the pool, evicts into the store, merges the
store's staging buffer and evicts from the store. Each run starts from the freshly wrapped memory,
put back through the pool's and the store's own ``load_state_dict`` (so that a bug in ``reset_memory``
or ``load_memory`` fails the run that shows it and cannot leak into later runs). The rules drive the
public API in random order:

* ``inject`` random token ids (any length, so chunks that do not fill ``chunk_size`` or ``K`` occur),
  as a list or a tensor, with or without a label;
* ``inject`` with a fault (a pool write, a store update, the retriever or a decoder layer raising on
  its n-th call): if the fault fires, the memory must be bit-exactly as before;
* ``save_memory`` to a file (which must leave the memory unchanged), ``load_memory`` of any file saved
  earlier in the run (the memory must then be bit-exactly what it was when saved);
* ``reset_memory`` (back to the freshly wrapped state, the store empty);
* ``generate`` a few tokens greedily: the memory must be bit-exactly unchanged, and a cached read
  prefix must give the same tokens and logits as one recomputed from the memory.

A spy on the pool's ``write`` records every write: the vectors written, their source, what the pool
reported evicting and what it held right after. From these the machine keeps a model of the memory,
written from the contracts and not from the code. Pool: the first write tiles it; ages grow by ``k``
per write of ``k`` vectors and a write's vectors are appended with ages ``k-1 .. 0``; the evicted
vectors are as many as overflow it, and the survivors are what it held minus what it reported
evicting, in their order (which of identical tiled copies a random drop takes is the pool's choice).
Store: every vector the pool evicts enters it with its age, in the store's dtype; ages grow with each
update; the staging buffer merges every ``merge_every`` updates; past capacity the oldest entries go,
the earlier among equal ages. After every step the invariants compare the real memory with that
model bit for bit, and check what holds without it: fixed pool size, finite values, non-negative
ages, capacity, later-written vectors being younger across both tiers, conservation (everything the
pool evicted is in the store or counted as evicted from it), provenance, and the footprint bounding
what is held.
"""

from __future__ import annotations

import functools
import itertools
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import memkit
from memkit.builtin.hnsw_store import HnswStore
from memkit.testing import tiny_model
from tests.helpers import assert_same_state, full_state

SETTINGS = settings(max_examples=15, stateful_step_count=30, deadline=None)

VOCAB = 128  # memkit.testing.tiny_model's vocabulary
LAYERS = 2
CHUNK = 6  # tokens per chunk: not a multiple of K, and injections of any length leave short chunks
K = 4  # vectors written per layer by one chunk
N = 8  # pool capacity per layer: after the first (tiled) write every chunk evicts into the store
STORE_CAPACITY = 8  # two chunks of evictions fill it
MERGE_EVERY = 3
RETRIEVE = 3

STORES = {
    "exact": {"name": "exact", "capacity": STORE_CAPACITY, "merge_every": MERGE_EVERY, "dtype": "bfloat16"},
    "hnsw": {
        "name": "hnsw",
        "capacity": STORE_CAPACITY,
        "merge_every": MERGE_EVERY,
        "dtype": "bfloat16",
        "num_threads": 1,
        "M": 4,
        "ef_construction": 16,
    },
}

Bits = tuple[int, ...]  # a vector's bit pattern, exact for any value
PoolRecord = tuple[Bits, int, int]  # (vector in the pool's dtype, age, source)
StoreRecord = tuple[Bits, int, int, bool]  # (vector in the store's dtype, age, source, staged)


@functools.cache
def wrapped(store: str) -> tuple[memkit.MemkitModel, dict[str, Any]]:
    """The tiny M+ model for ``store`` (built once per module run) and its memory when freshly wrapped."""
    mem = memkit.wrap(
        tiny_model("llama"),
        "mplus",
        chunk_size=CHUNK,
        retrieve=RETRIEVE,
        pool={"capacity": N, "write_size": K, "seed": 0},
        store=STORES[store],
        retriever={"key_size": 8},
    )
    assert mem.pool.config.init == "tile" and mem.pool.config.eviction == "random"
    assert mem.backbone.num_layers == LAYERS and mem.backbone.vocab_size == VOCAB
    return mem, full_state(mem)


def put_back(mem: memkit.MemkitModel, state: dict[str, Any]) -> None:
    """Restore a :func:`~tests.helpers.full_state` through the parts themselves, not through
    ``reset_memory`` or ``load_memory`` (rules under test): a bug in those then fails the run that shows
    it, and cannot leak into the runs after it."""
    assert mem.store is not None
    mem.pool.load_state_dict({k.removeprefix("pool."): v.clone() for k, v in state.items() if k.startswith("pool.")})
    mem.store.load_state_dict({k.removeprefix("store."): v.clone() for k, v in state.items() if k.startswith("store.")})
    mem.source_labels, mem._next_source = dict(state["source_labels"]), state["next_source"]
    mem._invalidate()


def count(what: str) -> None:
    """Count ``what`` in pytest --hypothesis-show-statistics (how often runs get this far)."""
    if currently_in_test_context():
        event(what)


def bits(rows: torch.Tensor) -> list[Bits]:
    """The bit pattern of each row of ``rows`` ``[m, d]``."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    return [tuple(row) for row in rows.contiguous().view(ints).tolist()]


# ---------------------------------------------------------------------------------------------------
# what the machine records and models
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One pool write as the spy saw it, per layer: the new vectors, what the pool said it evicted and
    what it held right after."""

    k: int
    source: int
    new: list[list[Bits]]  # in the pool's dtype
    evicted: list[list[PoolRecord]]  # in the pool's dtype, with the ages and sources the pool reported
    evicted_store_bits: list[list[Bits]]  # the same vectors in the store's dtype
    after: list[list[PoolRecord]]


def pool_records(pool: Any) -> list[list[PoolRecord]]:
    vectors, ages, sources = pool.read(), pool.ages().tolist(), pool.sources().tolist()
    return [list(zip(bits(vectors[i]), ages[i], sources[i], strict=True)) for i in range(LAYERS)]


def is_subsequence(part: list[PoolRecord], whole: list[PoolRecord]) -> bool:
    it = iter(whole)
    return all(any(item == other for other in it) for item in part)


class PoolSpy:
    """Stands in for ``pool.write``: calls the real one and records the write in :attr:`log`."""

    def __init__(self, pool: Any, store_dtype: torch.dtype) -> None:
        self.pool, self.write, self.store_dtype = pool, pool.write, store_dtype
        self.log: list[Write] = []

    def __call__(self, vectors: torch.Tensor, source: int) -> Any:
        evicted = self.write(vectors, source)
        new = vectors.detach().to(self.pool.dtype)
        self.log.append(
            Write(
                k=int(vectors.shape[1]),
                source=int(source),
                new=[bits(new[layer]) for layer in range(LAYERS)],
                evicted=[
                    list(
                        zip(
                            bits(evicted.vectors[layer]),
                            evicted.ages[layer].tolist(),
                            evicted.sources[layer].tolist(),
                            strict=True,
                        )
                    )
                    for layer in range(LAYERS)
                ],
                evicted_store_bits=[bits(evicted.vectors[layer].to(self.store_dtype)) for layer in range(LAYERS)],
                after=pool_records(self.pool),
            )
        )
        return evicted


@dataclass
class MemoryModel:
    """The machine's model of the memory since the last reset (or of the state a file was saved with)."""

    pool: list[list[PoolRecord]] = field(default_factory=lambda: [[] for _ in range(LAYERS)])
    store: list[list[StoreRecord]] = field(default_factory=lambda: [[] for _ in range(LAYERS)])
    store_evicted: list[int] = field(default_factory=lambda: [0] * LAYERS)
    pool_evicted: list[int] = field(default_factory=lambda: [0] * LAYERS)  # vectors the pool evicted
    updates: int = 0
    next_source: int = 0
    labels: dict[int, str] = field(default_factory=dict)

    def copy(self) -> MemoryModel:
        return MemoryModel(
            [list(row) for row in self.pool],
            [list(row) for row in self.store],
            list(self.store_evicted),
            list(self.pool_evicted),
            self.updates,
            self.next_source,
            dict(self.labels),
        )

    def apply(self, write: Write, tile: bool) -> None:
        """One pool write, then the store update it causes (age by ``k``, add what the pool evicted)."""
        k, source = write.k, write.source
        for layer in range(LAYERS):
            held, evicted, after = self.pool[layer], write.evicted[layer], write.after[layer]
            new = [(b, k - 1 - i, source) for i, b in enumerate(write.new[layer])]
            if not held and tile:
                assert not evicted, "the tiling first write evicted something"
                assert after == (new * -(-N // k))[-N:], "the first write did not tile the pool"
            else:
                # Which of several identical vectors (a tiled write's copies) a random drop takes cannot be
                # predicted, and it decides the survivors' order: check the pool's choice instead.
                advanced = [(b, age + k, src) for b, age, src in held]
                assert len(evicted) == max(len(held) + k - N, 0), "the pool evicted other than its overflow"
                survivors = after[: len(after) - k]
                assert after[len(after) - k :] == new, "a write's vectors are appended with ages k-1 .. 0"
                assert Counter(survivors) + Counter(evicted) == Counter(advanced), (
                    "the pool's survivors and what it reported evicting are not what it held, aged by k"
                )
                assert is_subsequence(survivors, advanced), "the survivors changed order"
                self.pool_evicted[layer] += len(evicted)
            self.pool[layer] = list(after)

        self.updates += 1
        merged = self.updates % MERGE_EVERY == 0
        for layer in range(LAYERS):
            rows = [(b, age + k, src, staged and not merged) for b, age, src, staged in self.store[layer]]
            rows += [
                (b, age, src, not merged)
                for b, (_, age, src) in zip(write.evicted_store_bits[layer], write.evicted[layer], strict=True)
            ]
            excess = max(0, len(rows) - STORE_CAPACITY)
            gone = set(sorted(range(len(rows)), key=lambda i: (-rows[i][1], i))[:excess])
            self.store[layer] = [row for i, row in enumerate(rows) if i not in gone]
            self.store_evicted[layer] += excess


# ---------------------------------------------------------------------------------------------------
# faults for the failing injection
# ---------------------------------------------------------------------------------------------------


class InjectedFault(Exception):
    """What a patched part raises."""


class Failing:
    """Wraps a callable; its ``fail_on``-th call (counting from 1) raises :class:`InjectedFault`."""

    def __init__(self, function: Callable[..., Any], fail_on: int) -> None:
        self.function, self.fail_on, self.calls = function, fail_on, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_on:
            raise InjectedFault(f"call {self.calls}")
        return self.function(*args, **kwargs)


def fault_target(mem: memkit.MemkitModel, fault: str) -> tuple[Any, str]:
    """The object and attribute a fault replaces."""
    if fault == "pool-write":
        return mem.pool, "write"
    if fault == "store-add":
        return mem.store, "add"
    if fault == "store-advance":
        return mem.store, "advance"
    if fault == "retriever-keys":
        return mem.retriever, "keys"
    return mem.backbone.layers[LAYERS - 1], "forward"


FAULTS = ["pool-write", "store-add", "store-advance", "retriever-keys", "layer-forward"]
PATCHED = [("pool", "write"), ("store", "add"), ("store", "advance"), ("retriever", "keys")]


def remove_patches(mem: memkit.MemkitModel) -> None:
    """Drop every instance attribute this module may have put over a method."""
    for owner, name in PATCHED:
        vars(getattr(mem, owner)).pop(name, None)
    vars(mem.backbone.layers[LAYERS - 1]).pop("forward", None)


# ---------------------------------------------------------------------------------------------------
# the state machine
# ---------------------------------------------------------------------------------------------------

TOKENS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3 * CHUNK + 2)
LABELS = st.none() | st.text(max_size=6)


class MemoryMachine(RuleBasedStateMachine):
    """Inject, failing inject, save, load, reset and generate on a wrapped model, checked against a model."""

    backend = "exact"

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory(prefix="memkit-machine-")
        self.saved: list[tuple[Path, dict[str, Any], MemoryModel]] = []
        self.mem: memkit.MemkitModel | None = None

    @initialize()
    def start_from_the_freshly_wrapped_memory(self) -> None:
        mem, self.initial = wrapped(self.backend)
        remove_patches(mem)
        put_back(mem, self.initial)
        assert_same_state(self.initial, full_state(mem))
        assert mem.store is not None
        self.spy = PoolSpy(mem.pool, mem.store.dtype)
        mem.pool.write = self.spy  # type: ignore[method-assign]
        self.mem, self.model = mem, MemoryModel()
        self.tile = mem.pool.config.init == "tile"

    def teardown(self) -> None:
        if self.mem is not None:
            remove_patches(self.mem)
        self.folder.cleanup()

    def _memory(self) -> memkit.MemkitModel:
        assert self.mem is not None
        return self.mem

    def _commit(self, report: memkit.Injection, tokens: int, label: str | None) -> None:
        """Check a successful injection's report and bring the model up to date with its writes."""
        assert report.source == self.model.next_source
        assert report.num_tokens == tokens and report.num_chunks == math.ceil(tokens / CHUNK)
        assert len(self.spy.log) == report.num_chunks, "one pool write per chunk"
        for write in self.spy.log:
            assert write.source == report.source and 1 <= write.k <= K
            self.model.apply(write, self.tile)
        self.spy.log.clear()
        self.model.next_source += 1
        if label is not None:
            self.model.labels[report.source] = label
        if self.model.store_evicted[0]:
            count("an injection found the store evicting")
        if any(not staged for *_, staged in self.model.store[0]):
            count("an injection found merged store entries")

    # -- rules --------------------------------------------------------------------------------------

    @rule(tokens=TOKENS, label=LABELS, form=st.sampled_from(["list", "tensor", "row"]))
    def inject(self, tokens: list[int], label: str | None, form: str) -> None:
        mem = self._memory()
        data: list[int] | torch.Tensor = tokens
        if form != "list":
            data = torch.tensor(tokens).reshape(-1 if form == "tensor" else (1, -1))
        self.spy.log.clear()
        with torch.no_grad():
            report = mem.inject(data, label=label)
        self._commit(report, len(tokens), label)

    @rule(
        tokens=st.lists(st.integers(0, VOCAB - 1), min_size=CHUNK + 1, max_size=3 * CHUNK),
        fault=st.sampled_from(FAULTS),
        fail_on=st.integers(1, 3),
    )
    def inject_that_fails_midway(self, tokens: list[int], fault: str, fail_on: int) -> None:
        mem = self._memory()
        before = full_state(mem)
        owner, name = fault_target(mem, fault)
        had_own = name in vars(owner)  # the pool's write is the spy, an instance attribute
        original = getattr(owner, name)
        failing = Failing(original, fail_on)
        setattr(owner, name, failing)
        self.spy.log.clear()
        report = None
        try:
            with torch.no_grad():
                report = mem.inject(tokens, label="never")
        except InjectedFault:
            pass
        finally:
            if had_own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        count(f"a fault fired: {report is None}")
        if report is None:
            assert failing.calls == failing.fail_on
            assert_same_state(before, full_state(mem))
            self.spy.log.clear()
        else:  # the part was called fewer than fail_on times: an ordinary injection
            assert failing.calls < failing.fail_on
            self._commit(report, len(tokens), "never")

    @rule()
    def save(self) -> None:
        mem = self._memory()
        path = Path(self.folder.name) / f"memory-{len(self.saved)}.memkit"
        before = full_state(mem)
        mem.save_memory(path)
        assert_same_state(before, full_state(mem))
        self.saved.append((path, before, self.model.copy()))

    @precondition(lambda self: bool(self.saved))
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        mem = self._memory()
        path, state, model = data.draw(st.sampled_from(self.saved), label="saved")
        mem.load_memory(path)
        assert_same_state(state, full_state(mem))
        self.model = model.copy()

    @rule()
    def reset(self) -> None:
        mem = self._memory()
        mem.reset_memory()
        assert_same_state(self.initial, full_state(mem))
        store = mem.store
        assert store is not None and store.updates == 0
        assert all(store.size(i) == 0 and store.evicted(i) == 0 for i in range(LAYERS))
        self.model = MemoryModel()

    @rule(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), new_tokens=st.integers(1, 3))
    def generate(self, prompt: list[int], new_tokens: int) -> None:
        mem = self._memory()
        ids = torch.tensor([prompt])
        before = full_state(mem)

        def run() -> Any:
            return mem.generate(
                ids,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                output_logits=True,
                return_dict_in_generate=True,
            )

        out = run()  # reads the cached prefix, if any
        assert_same_state(before, full_state(mem))
        assert out.sequences.shape == (1, len(prompt) + new_tokens)
        assert torch.equal(out.sequences[:, : len(prompt)], ids)
        mem._invalidate()
        again = run()  # recomputes the prefix from the memory
        assert torch.equal(again.sequences, out.sequences), "a cached read prefix went stale"
        assert all(torch.equal(a, b) for a, b in zip(again.logits, out.logits, strict=True))
        assert_same_state(before, full_state(mem))

    # -- invariants ---------------------------------------------------------------------------------

    @invariant()
    def pool_holds_its_fixed_size_of_finite_vectors(self) -> None:
        mem = self.mem
        if mem is None:
            return
        vectors, ages, sources = mem.pool.read(), mem.pool.ages(), mem.pool.sources()
        size = N if self.model.updates else 0  # tiling: full from the first write on
        assert tuple(vectors.shape) == (LAYERS, size, mem.backbone.hidden_size) and mem.memory_size == size
        assert tuple(ages.shape) == tuple(sources.shape) == (LAYERS, size)
        assert bool(torch.isfinite(vectors).all())
        if size:
            assert int(ages.min()) >= 0 and bool((ages[:, -1] == 0).all()), "the newest vector has age 0"
            assert bool((sources[:, 1:] >= sources[:, :-1]).all()), "survivors keep their order, new ones at the end"
            assert int(sources.min()) >= 0 and int(sources.max()) < self.model.next_source

    @invariant()
    def pool_matches_the_model(self) -> None:
        mem = self.mem
        if mem is None:
            return
        for layer, held in enumerate(pool_records(mem.pool)):
            assert held == self.model.pool[layer], f"layer {layer}'s pool differs from its model"

    @invariant()
    def store_stays_within_capacity_with_valid_entries(self) -> None:
        mem = self.mem
        if mem is None:
            return
        store = mem.store
        assert store is not None and store.capacity == STORE_CAPACITY
        sizes = [store.size(layer) for layer in range(LAYERS)]
        assert len(set(sizes)) == 1, "every layer's store holds the same number of entries"
        for layer in range(LAYERS):
            entries = store.entries(layer)
            m = sizes[layer]
            assert m <= STORE_CAPACITY and 0 <= store.staged(layer) <= m
            assert entries.vectors.shape == (m, mem.backbone.hidden_size) and entries.keys.shape == (m, 8)
            assert entries.vectors.dtype == entries.keys.dtype == store.dtype
            assert bool(torch.isfinite(entries.vectors.float()).all() and torch.isfinite(entries.keys.float()).all())
            assert m == 0 or int(entries.ages.min()) >= 0
            if store.evicted(layer):
                assert m == STORE_CAPACITY, "a store that evicted is full"
            if isinstance(store, HnswStore):
                assert store.index_nodes(layer) <= STORE_CAPACITY

    @invariant()
    def store_matches_the_model_so_it_evicts_oldest_first(self) -> None:
        mem = self.mem
        if mem is None:
            return
        store = mem.store
        assert store is not None and store.updates == self.model.updates
        for layer in range(LAYERS):
            entries = store.entries(layer)
            rows = list(zip(bits(entries.vectors), entries.ages.tolist(), entries.sources.tolist(), strict=True))
            model = self.model.store[layer]
            assert rows == [(b, age, src) for b, age, src, _ in model], f"layer {layer}'s store differs from its model"
            assert store.staged(layer) == sum(staged for *_, staged in model)
            assert store.evicted(layer) == self.model.store_evicted[layer]

    @invariant()
    def every_vector_the_pool_evicted_is_in_the_store_or_counted_as_evicted_from_it(self) -> None:
        mem = self.mem
        if mem is None:
            return
        store = mem.store
        assert store is not None
        for layer in range(LAYERS):
            assert store.size(layer) + store.evicted(layer) == self.model.pool_evicted[layer]

    @invariant()
    def later_written_vectors_are_younger_across_pool_and_store(self) -> None:
        mem = self.mem
        if mem is None:
            return
        store = mem.store
        assert store is not None
        for layer in range(LAYERS):
            entries = store.entries(layer)
            sources = torch.cat([entries.sources, mem.pool.sources()[layer]]).tolist()
            ages = torch.cat([entries.ages, mem.pool.ages()[layer]]).tolist()
            by_source: dict[int, list[int]] = {}
            for src, age in zip(sources, ages, strict=True):
                by_source.setdefault(src, []).append(age)
            ordered = [by_source[src] for src in sorted(by_source)]
            for earlier, later in itertools.pairwise(ordered):
                assert min(earlier) > max(later), f"layer {layer}: an earlier source is not older than a later one"

    @invariant()
    def provenance_and_footprint_follow_the_memory(self) -> None:
        mem = self.mem
        if mem is None:
            return
        store = mem.store
        assert store is not None
        assert mem._next_source == self.model.next_source and mem.source_labels == self.model.labels
        footprint = mem.memory_footprint()
        held_pool = mem.pool.read().nbytes
        held_store = sum(store.entries(i).vectors.nbytes + store.entries(i).keys.nbytes for i in range(LAYERS))
        assert held_pool <= footprint["pool"] and held_store <= footprint["store"]
        if mem.pool.size == N:
            assert held_pool == footprint["pool"]
        if store.size(0) == STORE_CAPACITY:
            assert held_store == footprint["store"]


class HnswMemoryMachine(MemoryMachine):
    """The same machine with the hnswlib store."""

    backend = "hnsw"


TestMemoryStateStaysConsistentWithAnExactStore = MemoryMachine.TestCase
TestMemoryStateStaysConsistentWithAnExactStore.settings = SETTINGS
TestMemoryStateStaysConsistentWithAnHnswStore = HnswMemoryMachine.TestCase
TestMemoryStateStaysConsistentWithAnHnswStore.settings = SETTINGS


# ---------------------------------------------------------------------------------------------------
# a scripted run: the sizes above do reach store merging and store eviction
# ---------------------------------------------------------------------------------------------------


class _Draw:
    """A stand-in for Hypothesis' ``st.data()`` that always draws ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.value


def test_a_scripted_run_reaches_store_merges_and_evictions_with_every_invariant_holding() -> None:
    machine = MemoryMachine()
    invariants = [
        machine.pool_holds_its_fixed_size_of_finite_vectors,
        machine.pool_matches_the_model,
        machine.store_stays_within_capacity_with_valid_entries,
        machine.store_matches_the_model_so_it_evicts_oldest_first,
        machine.every_vector_the_pool_evicted_is_in_the_store_or_counted_as_evicted_from_it,
        machine.later_written_vectors_are_younger_across_pool_and_store,
        machine.provenance_and_footprint_follow_the_memory,
    ]
    try:
        machine.start_from_the_freshly_wrapped_memory()
        steps: list[Callable[[], None]] = [
            lambda: machine.inject(tokens=list(range(3, 8)), label=None, form="list"),
            lambda: machine.inject(tokens=list(range(10, 30)), label="doc", form="tensor"),
            machine.save,
            lambda: machine.inject_that_fails_midway(tokens=list(range(40, 55)), fault="store-add", fail_on=2),
            lambda: machine.inject(tokens=list(range(60, 79)), label=None, form="row"),
            lambda: machine.generate(prompt=[5, 6, 7], new_tokens=2),
        ]
        for step in steps:
            step()
            for check in invariants:
                check()
        mem = machine._memory()
        assert mem.store is not None
        assert machine.model.next_source == 3, "the fault did not fire"
        assert mem.store.evicted(0) > 0 and mem.store.size(0) == STORE_CAPACITY
        assert mem.store.staged(0) < mem.store.size(0), "nothing was ever merged"
        assert machine.model.pool_evicted[0] > STORE_CAPACITY
        _, state, _ = machine.saved[0]
        machine.load(_Draw(machine.saved[0]))
        assert_same_state(state, full_state(mem))
        for check in invariants:
            check()
        machine.reset()
        for check in invariants:
            check()
    finally:
        machine.teardown()
