"""Long-term store scaling at M+'s size: exact vs hnsw retrieval latency, recall, and bytes per entry.

Builds, in one process, an :class:`~memkit.builtin.store.ExactStore` and one
:class:`~memkit.builtin.hnsw_store.HnswStore` per variant (index space ``mips-l2`` or ``ip``; with or
without ``key_copy``), all fed the same entries the way M+ feeds its long-term memory (256 entries
per update, ages as dropped from the short-term pool, one merge every 60 updates, 10% more entries
than the capacity so that evictions and slot reuse happen), storage dtype float16,
then measures for M+'s retrieval size k = 2560 and for k = 64:

* retrieval latency of one layer for one prompt: ``candidates`` + gathering the candidates' keys +
  exact M+ scores (:func:`memkit.scoring.mean_sigmoid_scores`) + top-k. Gathering the top-k's vectors
  is the same for every store and is left out.
* recall@k of each hnsw store: the share of the exact top-k (from the exact store) it returns.
* bytes per stored entry, relative to the entry's raw bytes (vector + key in the storage dtype, plus
  int64 age and source), two ways: (1) *accounted*: the bytes of every tensor the store holds, plus
  for hnsw the index as hnswlib lays it out in memory (see ``hnsw_index_bytes``); (2) *process*: the
  growth of the process's resident memory while the store is built (after ``malloc_trim``).

Data model (synthetic, low rank plus noise, so that the scores have a real top-k): keys
``k_j = U z_j + 0.1 e_j`` with ``U`` a random orthonormal ``[256, 16]`` basis, ``z_j ~ N(0, I_16)``,
``e_j ~ N(0, I_256)``; a prompt's 64 queries ``q_i = 0.5 (U w_i + 0.1 e_i)`` with
``w_i = c_(i mod 2) + 0.7 xi_i``: two sub-topics ``c ~ N(0, I_16)`` per prompt, so the mean query is
not the best direction and the mean sigmoid differs from the mean dot product.

Run ``python benchmarks/store_scaling.py`` (full: 150,000 entries per layer; about 20 minutes and
7 GB on 2 cores, mostly building the hnsw indexes) or ``--quick``; the JSON report goes to ``--out``.
The default variants are hnswlib's defaults in both spaces, without ``key_copy``, and the settings that
come closest to M+'s scaling aims at ``k = 2560`` (``M`` 8, ``overfetch`` 2.2, ``index_dims`` 32,
``prefilter`` 1.2: 8.1x to 10.6x faster than exact over six runs, recall 0.960, 1.046x raw bytes; see
the recipes page).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hnswlib
import torch

from memkit.builtin.hnsw_store import HnswStore
from memkit.builtin.store import ExactStore, StagedStore
from memkit.interfaces import StoreEntries
from memkit.scoring import mean_sigmoid_scores

RANK, KEY_NOISE, QUERY_SCALE, QUERY_SPREAD = 16, 0.1, 0.5, 0.7


@dataclass(frozen=True)
class Plan:
    entries: int  # capacity per layer; the build adds 10% more
    hidden: int
    key_size: int
    queries: int
    ks: tuple[int, ...]
    prompts: int
    write: int  # entries per update (M+: K = 256)
    merge_every: int
    modes: int
    variants: tuple[str, ...]
    ef_construction: int
    seed: int


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


class Data:
    """The synthetic keys, vectors and prompts (deterministic given the seed)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        gen = torch.Generator().manual_seed(plan.seed)
        self.basis = torch.linalg.qr(torch.randn(plan.key_size, RANK, generator=gen)).Q
        total = self.total
        z = torch.randn(total, RANK, generator=gen)
        self.keys = (z @ self.basis.T + KEY_NOISE * torch.randn(total, plan.key_size, generator=gen)).half()
        # Ages as the pool drops them: anywhere in the short-term window (M+: 10,240 slots).
        self.ages = torch.randint(0, 10_240, (total,), generator=gen)

    @property
    def total(self) -> int:
        return self.plan.entries + self.plan.entries // 10

    def chunk(self, start: int, stop: int) -> StoreEntries:
        gen = torch.Generator().manual_seed(self.plan.seed * 1_000_003 + start)
        vectors = torch.randn(stop - start, self.plan.hidden, generator=gen, dtype=torch.float32).half()
        sources = torch.full((stop - start,), start // self.plan.write, dtype=torch.int64)
        return StoreEntries(vectors, self.keys[start:stop], self.ages[start:stop], sources)

    def prompt(self, index: int) -> torch.Tensor:
        p = self.plan
        gen = torch.Generator().manual_seed(p.seed * 7919 + 1 + index)
        centers = torch.randn(p.modes, RANK, generator=gen)
        w = centers[torch.arange(p.queries) % p.modes] + QUERY_SPREAD * torch.randn(p.queries, RANK, generator=gen)
        noise = KEY_NOISE * torch.randn(p.queries, p.key_size, generator=gen)
        return QUERY_SCALE * (w @ self.basis.T + noise)


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tensor_bytes(store: StagedStore, layer: int = 0) -> int:
    """Bytes of every tensor the store keeps for ``layer`` (columns and dead-row masks)."""
    total = 0
    for block in store._layers[layer].blocks:
        total += sum(t.numel() * t.element_size() for t in block.columns.values())
        if block.alive is not None:
            total += block.alive.numel()
    return total


def hnsw_index_bytes(index: Any, threads: int) -> dict[str, int]:
    """hnswlib's memory for ``index``, from its data layout (hnswalg.h, hnswlib 0.8):

    * ``data_level0_memory_``: ``max_elements * (links0 + data + label)`` with
      ``links0 = 4 + 4 * 2M`` bytes, ``data = 4 * dim`` bytes, ``label = 8`` bytes;
    * per element: its level (4 B, ``element_levels_``), a pointer to its upper-level links (8 B,
      ``linkLists_``), a ``std::mutex`` (40 B, ``link_list_locks_``), and a ``label_lookup_`` hash
      entry (about 32 B node + 8 B bucket);
    * upper levels: ``level * (4 + 4M)`` bytes for each node above level 0 (plus ~16 B malloc header);
    * visited lists: 2 B per max element per searching thread (kept in a pool);
    * fixed: 65,536 label mutexes (40 B each).

    ``file`` is :meth:`hnswlib.Index.index_file_size` (what ``save_index`` writes; checked by saving).
    """
    m, dim, cap = int(index.M), int(index.dim), int(index.max_elements)
    count = int(index.element_count)
    level0 = cap * ((4 + 4 * 2 * m) + 4 * dim + 8)
    # Expected share of nodes at level >= l is (1/M)^l (hnswlib draws levels with mult = 1/ln(M)).
    upper_links = sum(count * (1 / m) ** lvl * (4 + 4 * m + 16) for lvl in range(1, 12))
    per_element = cap * (4 + 8 + 40) + count * (32 + 8)
    visited = 2 * cap * threads
    fixed = 65_536 * 40
    return {
        "level0": level0,
        "upper_links": int(upper_links),
        "per_element_bookkeeping": per_element,
        "visited_lists": visited,
        "fixed": fixed,
        "total": int(level0 + upper_links + per_element + visited + fixed),
        "file": int(index.index_file_size()),
    }


def saved_index_size(index: Any) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.bin")
        index.save_index(path)
        return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------------
# stores
# ---------------------------------------------------------------------------------------------------


def build(store: StagedStore, data: Data, plan: Plan) -> dict[str, float]:
    """Feed ``store`` like M+: ``write`` entries then one update, for 110% of the capacity; then
    finish the current merge interval so the layer is one compact block."""
    start = time.perf_counter()
    add_time = 0.0
    for first in range(0, data.total, plan.write):
        chunk = data.chunk(first, min(first + plan.write, data.total))
        t = time.perf_counter()
        store.add(0, chunk)
        add_time += time.perf_counter() - t
        store.advance(plan.write)
    while store.updates % plan.merge_every:
        store.advance(0)
    return {
        "build_s": time.perf_counter() - start,
        "add_s_per_update": add_time / math.ceil(data.total / plan.write),
    }


def retrieve(store: StagedStore, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, dict[str, float], int]:
    """What a retriever does for one layer: candidates, their keys, exact scores, top-k."""
    t0 = time.perf_counter()
    ids = store.candidates(0, queries, k)
    t1 = time.perf_counter()
    keys = store.keys(0) if len(ids) == store.size(0) else store.keys(0, ids)
    t2 = time.perf_counter()
    scores = mean_sigmoid_scores(queries, keys)
    t3 = time.perf_counter()
    top = ids[scores.topk(min(k, len(ids))).indices]
    t4 = time.perf_counter()
    times = {"candidates": t1 - t0, "keys": t2 - t1, "score": t3 - t2, "topk": t4 - t3, "total": t4 - t0}
    return top, times, len(ids)


def measure(stores: dict[str, StagedStore], data: Data, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in plan.ks:
        per_store: dict[str, dict[str, list[float]]] = {name: {} for name in stores}
        recalls: dict[str, list[float]] = {name: [] for name in stores if name != "exact"}
        cands: dict[str, list[int]] = {name: [] for name in stores}
        for p in range(-2, plan.prompts):  # two warm-up prompts
            queries = data.prompt(p + 2)
            tops = {}
            for name, store in stores.items():
                top, times, count = retrieve(store, queries, k)
                tops[name] = set(top.tolist())
                if p < 0:
                    continue
                for part, value in times.items():
                    per_store[name].setdefault(part, []).append(value)
                cands[name].append(count)
            if p >= 0:
                for name in recalls:
                    recalls[name].append(len(tops[name] & tops["exact"]) / k)
        result: dict[str, Any] = {}
        for name, samples in per_store.items():
            result[name] = {
                "latency_ms": {
                    part: {
                        "median": 1e3 * statistics.median(v),
                        "p90": 1e3 * sorted(v)[int(0.9 * (len(v) - 1))],
                        "mean": 1e3 * statistics.fmean(v),
                    }
                    for part, v in samples.items()
                },
                "candidates": statistics.fmean(cands[name]),
            }
            if name in recalls:
                result[name]["recall_mean"] = statistics.fmean(recalls[name])
                result[name]["recall_min"] = min(recalls[name])
                result[name]["speedup_vs_exact"] = (
                    result["exact"]["latency_ms"]["total"]["median"] / result[name]["latency_ms"]["total"]["median"]
                )
        out[str(k)] = result
    return out


def score_profile(data: Data, plan: Plan, exact: StagedStore) -> dict[str, float]:
    """What the scores look like for prompt 0: the top-k is real, not a flat plateau."""
    queries = data.prompt(0)
    keys = exact.keys(0)
    scores = mean_sigmoid_scores(queries, keys)
    dots = queries.float() @ keys[:20_000].float().T
    sorted_scores = scores.sort(descending=True).values
    profile = {
        "dot_std": float(dots.std()),
        "score_top1": float(sorted_scores[0]),
        "score_median": float(scores.median()),
    }
    for k in plan.ks:
        profile[f"score_at_{k}"] = float(sorted_scores[k - 1])
        # how far down the mean-dot ranking the exact top-k reaches (1.0: mean dot = mean sigmoid)
        mean_dot = keys.float() @ queries.float().mean(0)
        rank = torch.empty_like(mean_dot, dtype=torch.long)
        rank[mean_dot.argsort(descending=True)] = torch.arange(len(mean_dot))
        profile[f"mean_dot_rank_needed_for_top_{k}_over_k"] = float(rank[scores.topk(k).indices].max() + 1) / k
    return profile


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (20,000 entries, 5 prompts)")
    parser.add_argument("--entries", type=int, help="entries per layer (default: 150,000; quick: 20,000)")
    parser.add_argument("--prompts", type=int, help="prompts timed per k (default: 20; quick: 5)")
    parser.add_argument(
        "--variants",
        default="mips-l2,mips-l2:M=8:overfetch=2.2:index_dims=32:prefilter=1.2,ip,mips-l2-nocopy",
        help=(
            "hnsw stores to build: index space ('mips-l2' or 'ip'), '-nocopy' for key_copy=False, then optional "
            "':FIELD=VALUE' HnswStore settings, e.g. 'mips-l2:M=8:overfetch=2.5'"
        ),
    )
    parser.add_argument("--ef-construction", type=int, default=200, help="hnswlib ef_construction")
    parser.add_argument("--threads", type=int, help="torch and hnswlib threads (default: torch's default)")
    parser.add_argument("--modes", type=int, default=2, help="sub-topics per prompt in the query model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "store_scaling.json", help="JSON report"
    )
    args = parser.parse_args(argv)
    plan = Plan(
        entries=args.entries or (20_000 if args.quick else 150_000),
        hidden=4096,
        key_size=256,
        queries=64,
        ks=(2560, 64),
        prompts=args.prompts or (5 if args.quick else 20),
        write=256,
        merge_every=60,
        modes=args.modes,
        variants=tuple(v for v in args.variants.split(",") if v),
        ef_construction=args.ef_construction,
        seed=args.seed,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    print(
        f"store_scaling: {plan.entries} entries/layer, vectors {plan.hidden} fp16, keys {plan.key_size} fp16, "
        f"{plan.queries} queries, k in {plan.ks}; {os.cpu_count()} CPUs, torch threads {threads}, "
        f"load average {load_before[0]:.1f}",
        flush=True,
    )
    data = Data(plan)
    raw = plan.hidden * 2 + plan.key_size * 2 + 8 + 8
    stores: dict[str, StagedStore] = {}
    memory: dict[str, Any] = {}
    builds: dict[str, Any] = {}
    for name in ["exact", *[f"hnsw-{variant}" for variant in plan.variants]]:
        trim()
        before = rss_bytes()
        if name == "exact":
            store: StagedStore = ExactStore(
                ExactStore.Config(capacity=plan.entries, merge_every=plan.merge_every, dtype="float16"),
                num_layers=1,
                hidden_size=plan.hidden,
                key_size=plan.key_size,
            )
        else:
            space, *settings = name[len("hnsw-") :].split(":")
            fields: dict[str, Any] = {"ef_construction": plan.ef_construction}
            for setting in settings:  # e.g. "M=8", "overfetch=2.5"
                field, _, value = setting.partition("=")
                fields[field] = float(value) if "." in value else int(value)
            store = HnswStore(
                HnswStore.Config(
                    capacity=plan.entries,
                    merge_every=plan.merge_every,
                    dtype="float16",
                    space=space.removesuffix("-nocopy"),
                    key_copy=not space.endswith("-nocopy"),
                    **fields,
                ),
                num_layers=1,
                hidden_size=plan.hidden,
                key_size=plan.key_size,
            )
        builds[name] = build(store, data, plan)
        trim()
        grown = rss_bytes() - before
        n = store.size(0)
        tensors = tensor_bytes(store)
        entry: dict[str, Any] = {"entries": n, "evicted": store.evicted(0), "tensor_bytes": tensors}
        accounted = tensors
        if isinstance(store, HnswStore):
            index = store.index(0)
            layout = hnsw_index_bytes(index, threads)
            layout["file_checked"] = saved_index_size(index)
            entry["index_bytes"] = layout
            entry["index_nodes"] = store.index_nodes(0)
            accounted += layout["total"]
        entry["accounted_bytes_per_entry"] = accounted / n
        entry["process_bytes_per_entry"] = grown / n
        entry["accounted_vs_raw"] = accounted / n / raw
        entry["process_vs_raw"] = grown / n / raw
        memory[name] = entry
        stores[name] = store
        print(
            f"  built {name:20s} in {builds[name]['build_s']:6.1f}s  "
            f"({1e3 * builds[name]['add_s_per_update']:.1f} ms per add of {plan.write}); "
            f"bytes/entry accounted {accounted / n:8.1f} ({accounted / n / raw:.3f}x raw), "
            f"process {grown / n:8.1f} ({grown / n / raw:.3f}x raw)",
            flush=True,
        )
    profile = score_profile(data, plan, stores["exact"])
    results = measure(stores, data, plan)

    aims: dict[str, Any] = {}
    print(f"\nraw bytes per entry: {raw} (vector {plan.hidden * 2} + key {plan.key_size * 2} + age 8 + source 8)")
    header = (
        f"{'k':>5} {'store':13s} {'cands':>8} {'median ms':>10} {'p90 ms':>8} {'speedup':>8} {'recall':>7} {'min':>6}"
    )
    print(header)
    for k, result in results.items():
        for name, r in result.items():
            lat = r["latency_ms"]["total"]
            speed = f"{r['speedup_vs_exact']:8.1f}" if "speedup_vs_exact" in r else f"{'':8s}"
            recall = f"{r['recall_mean']:7.4f} {r['recall_min']:6.3f}" if "recall_mean" in r else ""
            print(f"{k:>5} {name:20s} {r['candidates']:8.0f} {lat['median']:10.2f} {lat['p90']:8.2f} {speed} {recall}")
            if name != "exact":
                aims[f"{name}@k={k}"] = {
                    "recall>=0.95": r["recall_mean"] >= 0.95,
                    "speedup>=10x": r["speedup_vs_exact"] >= 10,
                    "bytes<=1.1x_raw(accounted)": memory[name]["accounted_vs_raw"] <= 1.1,
                    "bytes<=1.1x_raw(process)": memory[name]["process_vs_raw"] <= 1.1,
                }
    print("\naims (hnsw recall@k >= 0.95, >= 10x faster than exact, <= 1.1x raw bytes per entry):")
    for key, verdict in aims.items():
        print(f"  {key:28s} " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in verdict.items()))

    report = {
        "plan": plan.__dict__,
        "data_model": {
            "keys": f"U z + {KEY_NOISE} e; U orthonormal [{plan.key_size}, {RANK}], z ~ N(0, I), e ~ N(0, I); fp16",
            "queries": (
                f"{QUERY_SCALE} (U w_i + {KEY_NOISE} e_i), w_i = c_(i mod {plan.modes}) + {QUERY_SPREAD} xi_i, "
                f"c, xi ~ N(0, I); one set of {plan.modes} sub-topics per prompt"
            ),
            "ages": "uniform in [0, 10240) when added, +256 per update",
            "feeding": f"{plan.write} entries per update, merge every {plan.merge_every}, 110% of capacity added",
            "score_profile_prompt0": profile,
        },
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "load_average_1_5_15_min_before": load_before,
            "load_average_1_5_15_min_after": os.getloadavg(),
            "torch": torch.__version__,
            "hnswlib": getattr(hnswlib, "__version__", "0.8"),
        },
        "raw_bytes_per_entry": raw,
        "memory": memory,
        "build": builds,
        "retrieval": results,
        "aims": aims,
        "latency_definition": "candidates + keys of the candidates + mean_sigmoid_scores + topk, one layer, one prompt",
        "memory_definition": (
            "accounted = bytes of the store's tensors (+ hnswlib's in-memory layout, see hnsw_index_bytes); "
            "process = growth of VmRSS while building the store, after gc and malloc_trim"
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nreport written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
