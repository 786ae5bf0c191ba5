"""The long-term store's cost as it grows: add time, bytes and retrieval latency per entry count.

:func:`run_store_cost` builds, for every size and backend in turn, one memory layer of a store
through its public class (looked up in memkit's registry, so plugin stores work too), fed the way
memkit feeds it: ``write`` entries per pool update (:meth:`~memkit.interfaces.LongTermStore.advance`
then :meth:`~memkit.interfaces.LongTermStore.add`), merged every ``merge_every`` updates, up to
exactly ``size`` entries (the capacity; nothing is evicted), then the last merge interval is finished.
It measures:

* **add**: seconds per entry of the whole build (adds, merges, index insertions);
* **bytes** per entry: the growth of the process's resident memory over the build (after freeing
  what the allocator holds), and an *accounted* figure: the bytes of the tensors
  :meth:`~memkit.interfaces.LongTermStore.entries` returns, plus for an hnsw store 8 bytes of label
  per entry and hnswlib's index size (``index_file_size``); both against the *raw* bytes of an entry
  (vector and key in the storage dtype, int64 age and source);
* **retrieval** latency of one layer for one prompt (median over ``prompts`` prompts, after one
  warm-up): what the built-in retrievers do, ``candidates`` + ``keys`` of the candidates + M+'s
  mean-sigmoid scores + top-``k`` + ``get`` of the chosen entries; and for every backend but
  ``exact``, recall of the exact top-``k`` (the exact store is built first on the same entries);
* the **growth exponent** of the latency: the least-squares slope of log latency against log size
  (latency ~ size^slope); sublinear means slope < 1. The exact store scores every entry, so it is
  linear by design; an index should be sublinear.

Data (synthetic, deterministic given the seed; low rank so that the scores have a real top-k): keys
``U z + 0.1 e`` with ``U`` an orthonormal ``[key_size, 16]`` basis, ``z, e ~ N(0, I)``; a prompt's
queries ``0.5 (U w + 0.1 e)`` with ``w`` drawn around two random sub-topics; vectors ``N(0, I)``;
ages uniform over a 2,048-slot pool. ``hidden`` (the vector width) only changes the bytes copied per
entry, not the retrieval, so a small one keeps a million entries within a few GB.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from memkit.benchmark.meter import machine_info, release_memory, rss_bytes
from memkit.errors import InputError
from memkit.interfaces import LongTermStore, StoreEntries
from memkit.plugins import get_registry
from memkit.scoring import mean_sigmoid_scores

__all__ = ["DEFAULT_SIZES", "QUICK_SIZES", "growth_exponent", "run_store_cost"]

#: Entries per layer, evenly spaced on a log scale from 10k to 1M.
DEFAULT_SIZES = (10_000, 31_623, 100_000, 316_228, 1_000_000)
QUICK_SIZES = (2_000, 8_000, 32_000)

_RANK, _NOISE, _QUERY_SCALE, _SPREAD, _TOPICS, _POOL_AGES = 16, 0.1, 0.5, 0.7, 2, 2048
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def growth_exponent(sizes: Sequence[float], latencies: Sequence[float]) -> float | None:
    """Least-squares slope of ``log(latency)`` against ``log(size)``; ``None`` for fewer than two sizes."""
    if len(sizes) != len(latencies):
        raise InputError(f"sizes and latencies must pair up, got {len(sizes)} and {len(latencies)}")
    points = [(math.log(s), math.log(t)) for s, t in zip(sizes, latencies, strict=True) if s > 0 and t > 0]
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx


class _Data:
    """Deterministic synthetic entries and prompts (see the module docstring)."""

    def __init__(self, key_size: int, hidden: int, queries: int, seed: int) -> None:
        self.key_size, self.hidden, self.queries, self.seed = key_size, hidden, queries, seed
        gen = torch.Generator().manual_seed(seed)
        self.basis = torch.linalg.qr(torch.randn(key_size, min(_RANK, key_size), generator=gen)).Q

    def entries(self, start: int, stop: int) -> StoreEntries:
        """Entries ``start..stop-1`` (the same whatever else was generated), float32."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        m = stop - start
        z = torch.randn(m, self.basis.shape[1], generator=gen)
        keys = z @ self.basis.T + _NOISE * torch.randn(m, self.key_size, generator=gen)
        vectors = torch.randn(m, self.hidden, generator=gen)
        ages = torch.randint(0, _POOL_AGES, (m,), generator=gen)
        return StoreEntries(vectors, keys, ages, torch.full((m,), start, dtype=torch.int64))

    def prompt(self, index: int) -> torch.Tensor:
        """``[queries, key_size]`` float32 queries of prompt ``index``."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + 1 + index)
        rank = self.basis.shape[1]
        topics = torch.randn(_TOPICS, rank, generator=gen)
        w = topics[torch.arange(self.queries) % _TOPICS] + _SPREAD * torch.randn(self.queries, rank, generator=gen)
        return _QUERY_SCALE * (w @ self.basis.T + _NOISE * torch.randn(self.queries, self.key_size, generator=gen))


def _new_store(backend: str, size: int, data: _Data, dtype: str, merge_every: int, options: dict[str, Any]) -> Any:
    cls = get_registry().get("store", backend)  # UnknownComponentError names the registered stores
    fields = cls.Config.model_fields
    settings: dict[str, Any] = {"capacity": size, "merge_every": merge_every}
    if "dtype" in fields:
        settings["dtype"] = dtype
    settings.update({name: value for name, value in options.items() if name in fields})
    return cls(cls.Config(**settings), num_layers=1, hidden_size=data.hidden, key_size=data.key_size)


def _build(
    store: LongTermStore, data: _Data, size: int, write: int, merge_every: int, progress: str | None = None
) -> float:
    """Feed ``size`` entries, ``write`` per update, then finish the merge interval; returns the seconds spent
    inside the store (generating the entries is not counted). ``progress`` names a progress bar to show."""
    spent = 0.0
    updates = 0
    starts = range(0, size, write)
    for start in tqdm(starts, desc=progress, unit="update", disable=progress is None, leave=False):
        entries = data.entries(start, min(start + write, size))
        t = time.perf_counter()
        store.advance(len(entries))
        store.add(0, entries)
        spent += time.perf_counter() - t
        updates += 1
    t = time.perf_counter()
    while updates % merge_every:
        store.advance(0)
        updates += 1
    return spent + time.perf_counter() - t


def _retrieve(store: LongTermStore, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """One layer's retrieval for one prompt: candidates, their keys, M+ scores, top-k, the chosen entries."""
    ids = store.candidates(0, queries, k)
    scores = mean_sigmoid_scores(queries, store.keys(0, ids))
    top = ids[scores.topk(min(k, int(ids.numel()))).indices]
    store.get(0, top)
    return top, int(ids.numel())


def _accounted_bytes(store: Any) -> int:
    entries = store.entries(0)
    total = sum(t.numel() * t.element_size() for t in (entries.vectors, entries.keys, entries.ages, entries.sources))
    index_of = getattr(store, "index", None)
    if callable(index_of):
        index = index_of(0)
        if index is not None:
            total += 8 * store.size(0) + int(index.index_file_size())
    return total


def _available_bytes() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``, or ``None`` where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _estimated_bytes(size: int, raw: int, key_size: int, indexed: bool) -> int:
    """A generous estimate of one store's peak memory: its entries twice (a merge copies them), plus an
    hnsw index (float32 keys and about 200 bytes of links and bookkeeping per entry)."""
    return size * (2 * raw + (4 * (key_size + 1) + 200 if indexed else 0))


def _check(
    sizes: Sequence[int], backends: Sequence[str], dtype: str, counts: dict[str, int]
) -> tuple[list[int], list[str]]:
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{name.replace('_', '-')} must be a whole number > 0, got {value!r}")
    if not sizes:
        raise InputError("give at least one store size")
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InputError(f"store sizes must be whole numbers > 0, got {size!r}")
    if dtype not in _ITEMSIZE:
        raise InputError(f"dtype must be one of {', '.join(_ITEMSIZE)}, got {dtype!r}")
    if not backends:
        raise InputError("give at least one store backend (e.g. exact,hnsw)")
    known = get_registry().names("store")
    unknown = [b for b in backends if b not in known]
    if unknown:
        raise InputError(f"unknown store backend {unknown[0]!r}; registered stores: {', '.join(known)}")
    ordered = sorted(dict.fromkeys(backends), key=lambda b: b != "exact")  # exact first: the recall reference
    return sorted(set(sizes)), ordered


def run_store_cost(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    key_size: int = 256,
    hidden: int = 64,
    backends: Sequence[str] = ("exact", "hnsw"),
    k: int = 2560,
    queries: int = 64,
    dtype: str = "float16",
    seed: int = 0,
    prompts: int = 5,
    write: int = 512,
    merge_every: int = 64,
    store_options: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure one layer's long-term store at each size and backend (see the module docstring).

    Args:
        sizes: entries per layer (each store's capacity; all are filled).
        key_size: width of the retriever keys (M+: 256).
        hidden: width of the stored vectors (M+ on Llama-3.1-8B: 4096; smaller keeps 1M entries in memory).
        backends: registered store names; ``exact`` (if present) is built first and is the recall reference.
        k: entries retrieved per prompt (M+: 2560); capped at the size.
        queries: query vectors per prompt (prompt tokens).
        dtype: storage dtype: ``float32``, ``float16`` or ``bfloat16``.
        prompts: timed prompts per store (one more is a warm-up).
        write: entries per pool update (the pool's write size K).
        merge_every: the store's ``merge_every`` (updates between merges).
        store_options: more store settings (e.g. ``{"ef_construction": 100}``), used where a store has them.
        log: called with a line of progress after each store.
        progress: show a progress bar while each store is built.

    Returns:
        the report: ``results[backend]`` lists one row per size; ``growth[backend]`` has the slope.

    Raises:
        InputError: a size or count that is not a whole number > 0, an unknown dtype or backend.
    """
    counts = {"key_size": key_size, "hidden": hidden, "k": k, "queries": queries, "prompts": prompts}
    counts.update(write=write, merge_every=merge_every)
    size_list, backend_list = _check(sizes, backends, dtype, counts)
    options = dict(store_options or {})
    data = _Data(key_size, hidden, queries, seed)
    item = _ITEMSIZE[dtype]
    raw = (hidden + key_size) * item + 16
    available = _available_bytes()
    need = _estimated_bytes(size_list[-1], raw, key_size, any(b != "exact" for b in backend_list))
    if available is not None and need > 0.9 * available:
        raise InputError(
            f"a store of {size_list[-1]:,} entries needs about {need / 2**30:.1f} GiB, more than the "
            f"{available / 2**30:.1f} GiB available; give smaller sizes, a smaller hidden or key size, or float16"
        )
    machine = machine_info()  # the load average before the run, beside the one after it
    prompt_queries = [data.prompt(p) for p in range(prompts + 1)]
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in backend_list}
    for size in size_list:
        exact_tops: list[set[int]] | None = None
        want = min(k, size)
        for backend in backend_list:
            release_memory()
            before = rss_bytes()
            store = _new_store(backend, size, data, dtype, merge_every, options)
            build_s = _build(store, data, size, write, merge_every, f"{backend} {size:,}" if progress else None)
            release_memory()
            grown = rss_bytes() - before
            accounted = _accounted_bytes(store)
            latencies: list[float] = []
            candidates: list[int] = []
            tops: list[set[int]] = []
            for p, q in enumerate(prompt_queries):
                t = time.perf_counter()
                top, count = _retrieve(store, q, want)
                elapsed = time.perf_counter() - t
                if p == 0:
                    continue  # warm-up
                latencies.append(elapsed)
                candidates.append(count)
                tops.append(set(top.tolist()))
            row: dict[str, Any] = {
                "size": size,
                "held": store.size(0),
                "build_s": build_s,
                "add_us_per_entry": 1e6 * build_s / size,
                "process_bytes_per_entry": grown / size,
                "process_vs_raw": grown / size / raw,
                "accounted_bytes_per_entry": accounted / size,
                "accounted_vs_raw": accounted / size / raw,
                "latency_ms_median": 1e3 * statistics.median(latencies),
                "latency_ms_min": 1e3 * min(latencies),
                "latency_ms_samples": [1e3 * s for s in latencies],
                "candidates_mean": statistics.fmean(candidates),
                "k": want,
            }
            if backend == "exact":
                exact_tops = tops
            elif exact_tops is not None:
                row["recall"] = statistics.fmean(len(a & b) / want for a, b in zip(tops, exact_tops, strict=True))
            results[backend].append(row)
            if log is not None:
                log(
                    f"{backend:>8} {size:>9,} entries: build {build_s:7.1f} s "
                    f"({row['add_us_per_entry']:.1f} us/entry), "
                    f"{row['process_vs_raw']:.2f}x raw bytes, retrieval {row['latency_ms_median']:.2f} ms"
                    + (f", recall {row['recall']:.3f}" if "recall" in row else "")
                )
            del store
            release_memory()
    growth = {}
    for backend, rows in results.items():
        sizes_done = [r["size"] for r in rows]
        latency = [r["latency_ms_median"] for r in rows]
        slope = growth_exponent(sizes_done, latency)
        local = [growth_exponent(sizes_done[i : i + 2], latency[i : i + 2]) for i in range(max(len(rows) - 1, 0))]
        growth[backend] = {"slope": slope, "sublinear": None if slope is None else slope < 1, "local_slopes": local}
    sublinear = [b for b, g in growth.items() if g["sublinear"]]
    return {
        "benchmark": "store",
        "setup": {
            "sizes": size_list,
            "backends": backend_list,
            "key_size": key_size,
            "key_size_choice": "M+'s retriever key width (256) unless given; the training-free recipe's "
            "attention keys are kv_heads * head_dim wide (192 on SmolLM2-135M)",
            "hidden": hidden,
            "hidden_choice": "vector width; only the bytes copied per entry depend on it, not the retrieval",
            "k": k,
            "queries": queries,
            "dtype": dtype,
            "prompts": prompts,
            "write": write,
            "merge_every": merge_every,
            "store_options": options,
            "seed": seed,
            "raw_bytes_per_entry": raw,
        },
        "machine": {**machine, "load_average_after": machine_info().get("load_average_1_5_15_min")},
        "results": results,
        "growth": growth,
        "aim": {
            "what": "retrieval latency growing sublinearly with the store's size (log-log slope < 1)",
            "met": bool(sublinear),
            "met_by": sublinear,
        },
        "definitions": {
            "latency": "one layer, one prompt: candidates + keys of the candidates + mean_sigmoid_scores + "
            "top-k + get of the chosen entries; median over prompts",
            "add_us_per_entry": "seconds inside advance/add (merges, index insertions) over the build / size",
            "process_bytes_per_entry": "growth of the resident set over the build (after gc and malloc_trim) / size",
            "accounted_bytes_per_entry": "tensors of entries(0), plus for an indexed store 8 B of label per entry "
            "and hnswlib's index_file_size",
            "recall": "share of the exact store's top-k that the backend returns, mean over prompts",
            "slope": "least-squares slope of log latency on log size over every size; local_slopes: between "
            "neighbouring sizes (fixed costs flatten the slope at small sizes)",
        },
    }
