"""``memkit bench``: the speed and store benchmarks on the command line.

::

    memkit bench speed --model smollm2 --recipe training-free     # memory vs the plain model
    memkit bench store                                              # store cost, 10k..1M entries per layer
    memkit bench store --quick --backends exact,hnsw

Each run writes ``<out>/bench-speed.json`` and ``bench-speed.png`` (or ``bench-store.*``) and prints a
short table. :func:`register` adds the sub-command to the ``memkit`` parser; :func:`run` runs it and
raises :class:`~memkit.errors.MemkitError` subclasses (the caller prints them as one line) for bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from memkit.errors import InputError

__all__ = ["register", "run"]

DEFAULT_OUT = Path("bench-results")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` (with ``speed`` and ``store``) to the ``memkit`` command's sub-parsers."""
    bench = commands.add_parser(
        "bench",
        help="measure memkit against the plain model (speed) and the long-term store's cost (store)",
        description="Benchmarks; each writes a JSON report and a PNG plot into --out and prints a table.",
    )
    benchmarks = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    benchmarks.required = True

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--out", type=Path, default=DEFAULT_OUT, help=f"folder for the report and plot (default {DEFAULT_OUT})"
        )
        sub.add_argument("--quick", action="store_true", help="a short run with smaller settings")
        sub.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
        sub.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
        sub.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    speed = benchmarks.add_parser(
        "speed",
        help="inject and decode tokens/s, peak memory and retrieval latency, beside the plain model",
        description=(
            "Inject and decode tokens per second, peak memory and retrieval latency per layer, each beside the "
            "plain model run in the same process on the same tokens. Aims (CPU): decoding >= 0.9x the plain "
            "model over an equally long KV cache; injection >= 0.8x a plain forward over the same chunk."
        ),
    )
    speed.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf file, or a local model folder")
    speed.add_argument("--recipe", default="training-free", help="recipe name or .toml file (default training-free)")
    speed.add_argument(
        "--memory-tokens",
        type=int,
        help="tokens injected before decoding (default: the pool's capacity plus twice the recipe's retrieve count)",
    )
    speed.add_argument("--decode-tokens", type=int, help="new tokens per generate call (default 32; quick 8)")
    speed.add_argument("--chunk-tokens", type=int, help="tokens of the timed injection (default: the recipe's chunk)")
    speed.add_argument("--repeats", type=int, help="timed runs per measurement, median reported (default 3; quick 1)")
    common(speed)

    store = benchmarks.add_parser(
        "store",
        help="long-term store cost from 10k to 1M entries per layer: add time, bytes, retrieval latency",
        description=(
            "Builds one layer of each store backend at each size and measures add time and bytes per entry and "
            "retrieval latency; fits latency ~ size^slope (aim: sublinear, slope < 1)."
        ),
    )
    store.add_argument(
        "--sizes",
        help="entries per layer, comma-separated, k and M allowed (default 10k,31623,100k,316228,1M; quick 2k,8k,32k)",
    )
    store.add_argument("--backends", default="exact,hnsw", help="store names, comma-separated (default exact,hnsw)")
    store.add_argument("--k", type=int, help="entries retrieved per prompt (default 2560, M+'s; quick 64)")
    store.add_argument("--queries", type=int, default=64, help="query vectors per prompt (default 64)")
    store.add_argument("--key-size", type=int, default=256, help="retriever key width (default 256, M+'s)")
    store.add_argument("--hidden", type=int, default=64, help="stored vector width (default 64)")
    store.add_argument("--dtype", default="float16", help="storage dtype: float32, float16, bfloat16 (default float16)")
    store.add_argument("--prompts", type=int, help="timed prompts per store (default 5; quick 3)")
    store.add_argument("--write", type=int, default=512, help="entries per pool update (default 512)")
    store.add_argument("--merge-every", type=int, default=64, help="updates between merges (default 64)")
    store.add_argument(
        "--ef-construction", type=int, help="hnsw stores: hnswlib ef_construction (default: the store's)"
    )
    common(store)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.bench_command`` names; write its report and plot; print a table; return 0."""
    import torch

    if args.threads is not None:
        if args.threads <= 0:
            raise InputError(f"--threads must be a whole number > 0, got {args.threads}")
        torch.set_num_threads(args.threads)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)  # before a long run, not after it
    except OSError as exc:
        raise InputError(f"cannot create the folder --out {out}: {exc}") from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' cache-argument renames
        if args.bench_command == "speed":
            report, name, table = _speed(args), "bench-speed", _speed_table
        elif args.bench_command == "store":
            report, name, table = _store(args), "bench-store", _store_table
        else:
            raise InputError(f"unknown benchmark {args.bench_command!r}; choose speed or store")
    from memkit.benchmark.plot import plot_speed, plot_store

    try:
        json_path, png_path = out / f"{name}.json", out / f"{name}.png"
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        (plot_speed if name == "bench-speed" else plot_store)(report, png_path)
    except OSError as exc:
        raise InputError(f"cannot write the report into {out}: {exc}") from None
    print(table(report))
    print(f"report: {json_path}  plot: {png_path}")
    return 0


# -- speed ----------------------------------------------------------------------------------------------


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    import memkit
    from memkit.benchmark.speed import run_speed
    from memkit.local_models import load_local_model

    for option in ("memory_tokens", "decode_tokens", "chunk_tokens", "repeats"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            raise InputError(f"--{option.replace('_', '-')} must be a whole number > 0, got {value}")
    recipe = memkit.load_recipe(args.recipe)  # refuse a bad recipe before loading a model
    if args.model != "smollm2" and not Path(args.model).expanduser().exists():
        raise InputError(
            f"--model {args.model}: no such file or folder; give 'smollm2', a .gguf file or a local model folder"
        )
    model, tokenizer = load_local_model(args.model)
    mem = memkit.wrap(model, recipe, tokenizer=tokenizer)
    retrieve = mem.recipe.retrieve if mem.store is not None else 0
    memory_tokens = args.memory_tokens or mem.pool.capacity + (1 if args.quick else 2) * retrieve
    report = run_speed(
        mem,
        tokenizer,
        chunk_tokens=args.chunk_tokens,
        decode_tokens=args.decode_tokens or (8 if args.quick else 32),
        memory_tokens=memory_tokens,
        repeats=args.repeats or (1 if args.quick else 3),
        seed=args.seed,
        progress=not args.no_progress,
    )
    report["model"]["source"] = args.model
    report["setup"]["quick"] = bool(args.quick)
    return report


def _fmt_bytes(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def _speed_table(report: dict[str, Any]) -> str:
    setup, figs = report["setup"], report["figures"]
    lines = [
        f"memkit bench speed: {report['model']['model_type']} ({report['model']['parameters'] / 1e6:.0f}M parameters), "
        f"recipe {report['recipe']['name']}, {setup['memory_tokens']} tokens injected, read cache "
        f"{setup['memory_read_positions']} positions, {report['machine']['torch_threads']} threads",
        f"{'figure':<30}{'memory':>14}{'plain':>14}{'ratio':>8}{'aim':>8}  met",
    ]
    for key, fig in figs.items():
        if fig["unit"] == "bytes":
            memory, plain = _fmt_bytes(fig["memory"]), _fmt_bytes(fig["plain"])
        else:
            memory, plain = f"{fig['memory']:.2f}", f"{fig['plain']:.2f}"
        ratio = "-" if fig["ratio"] is None else f"{fig['ratio']:.3f}"
        aim = "-" if fig["aim"] is None else f">={fig['aim']:g}"
        met = "-" if fig["aim_met"] is None else ("yes" if fig["aim_met"] else "NO")
        lines.append(f"{key + ' (' + fig['unit'] + ')':<30}{memory:>14}{plain:>14}{ratio:>8}{aim:>8}  {met}")
    retrieval = report.get("retrieval")
    if retrieval and "ms_per_layer_median" in retrieval:
        lines.append(
            f"retrieval: {retrieval['ms_per_layer_median']:.2f} ms per layer (median), "
            f"{retrieval['ms_per_read']:.1f} ms per read over {retrieval['layers']} layers; "
            f"{retrieval['k']} of {retrieval['entries_per_layer']} entries per layer"
        )
    elif retrieval:
        lines.append(f"retrieval: {retrieval['note']}")
    return "\n".join(lines)


# -- store ----------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """``"10k,31623,1M"`` -> ``[10000, 31623, 1000000]``; :class:`InputError` for anything else or a size <= 0."""
    sizes = []
    for part in text.replace("_", "").split(","):
        match = _SIZE.match(part.strip())
        if not match:
            raise InputError(f"--sizes: {part.strip()!r} is not a size; give whole numbers such as 10k,100k,1M")
        value = round(float(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()])
        if value <= 0:
            raise InputError(f"--sizes: every size must be > 0, got {part.strip()!r}")
        sizes.append(value)
    return sizes


def _store(args: argparse.Namespace) -> dict[str, Any]:
    from memkit.benchmark.store_cost import DEFAULT_SIZES, QUICK_SIZES, run_store_cost

    sizes = parse_sizes(args.sizes) if args.sizes else list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    options = {} if args.ef_construction is None else {"ef_construction": args.ef_construction}
    if args.ef_construction is not None and args.ef_construction <= 0:
        raise InputError(f"--ef-construction must be a whole number > 0, got {args.ef_construction}")
    report = run_store_cost(
        sizes,
        key_size=args.key_size,
        hidden=args.hidden,
        backends=backends,
        k=args.k if args.k is not None else (64 if args.quick else 2560),
        queries=args.queries,
        dtype=args.dtype,
        seed=args.seed,
        prompts=args.prompts if args.prompts is not None else (3 if args.quick else 5),
        write=args.write,
        merge_every=args.merge_every,
        store_options=options,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        progress=not args.no_progress,
    )
    report["setup"]["quick"] = bool(args.quick)
    return report


def _store_table(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        f"memkit bench store: keys {setup['key_size']}, vectors {setup['hidden']}, {setup['dtype']}, k={setup['k']}, "
        f"{setup['queries']} queries; raw {setup['raw_bytes_per_entry']} bytes per entry",
        f"{'backend':<8}{'entries':>11}{'add us/entry':>14}{'bytes/raw':>11}{'latency ms':>12}{'recall':>8}",
    ]
    for backend, rows in report["results"].items():
        for r in rows:
            recall = f"{r['recall']:.3f}" if "recall" in r else "-"
            lines.append(
                f"{backend:<8}{r['size']:>11,}{r['add_us_per_entry']:>14.1f}{r['process_vs_raw']:>11.2f}"
                f"{r['latency_ms_median']:>12.2f}{recall:>8}"
            )
    for backend, growth in report["growth"].items():
        slope = growth["slope"]
        verdict = "-" if slope is None else ("sublinear" if growth["sublinear"] else "NOT sublinear")
        shown = "-" if slope is None else f"{slope:.2f}"
        lines.append(f"growth {backend}: latency ~ size^{shown} ({verdict})")
    aim = report["aim"]
    lines.append(f"aim (sublinear retrieval): {'met by ' + ', '.join(aim['met_by']) if aim['met'] else 'NOT met'}")
    return "\n".join(lines)
