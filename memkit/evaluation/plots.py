"""PNG plots of evaluation reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memkit.errors import MemkitError

__all__ = ["plot_report"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MemkitError(
            "plots need matplotlib; run `pip install matplotlib` (or `pip install memkit[eval]`)"
        ) from None
    return plt


def _retention(ax: Any, results: dict[str, Any]) -> None:
    rows = results["by_distance"]
    ks = [int(k) for k in rows]
    acc = [rows[str(k)]["accuracy"] for k in ks]
    ax.plot(ks, acc, "o-", label="from memory")
    top = acc[0] if acc and acc[0] > 0 else 1.0
    pool = results["pool"]
    ax.plot(
        ks,
        [top * rows[str(k)]["theory"] for k in ks],
        "--",
        label=f"(1 - K/N)^t x accuracy at k=0 (K={pool['write_size']}, N={pool['capacity']})",
    )
    if "in_prompt" in results:
        ax.axhline(results["in_prompt"], color="green", linestyle=":", label="paragraph in the prompt")
        ax.axhline(results["no_context"], color="grey", linestyle=":", label="no paragraph")
    ax.set_xlabel("distractor chunks after the paragraph (k)")
    ax.set_ylabel("exact-hit accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"SQuAD v2 retention ({results['samples']} questions)")
    ax.legend(fontsize=7)


def _grid(fig: Any, results: dict[str, Any]) -> None:
    grids = [("from memory", results["grid"])]
    if "baseline_grid" in results:
        grids.append((f"plain model, last {results['window']} tokens", results["baseline_grid"]))
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for n, (ax, (title, grid)) in enumerate(zip(axes, grids, strict=True)):
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(results["lengths"])), [str(n) for n in results["lengths"]], rotation=45)
        ax.set_yticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("haystack length (tokens)")
        if n == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{results['task']}: {title}", fontsize=9)
    fig.colorbar(image, ax=list(axes), label="accuracy")


def _hotpotqa(ax: Any, results: dict[str, Any]) -> None:
    ways = [w for w in ("from_memory", "in_prompt", "no_context") if w in results]
    xs = range(len(ways))
    ax.bar([x - 0.2 for x in xs], [results[w]["exact_hit"] for w in ways], width=0.4, label="exact hit")
    ax.bar([x + 0.2 for x in xs], [results[w]["f1"] for w in ways], width=0.4, label="F1")
    ax.set_xticks(list(xs), [w.replace("_", " ") for w in ways])
    ax.set_ylim(0, 1)
    ax.set_title(f"HotpotQA ({results['samples']} questions)")
    ax.legend()


def _perplexity(ax: Any, results: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    xs = [r["injections"] for r in samples]
    ax.plot(xs, [r["perplexity"] for r in samples], "o-", label="with memory")
    if results.get("warmup_injections"):
        ax.axvline(results["warmup_injections"], color="black", linewidth=0.8, label="start (pool full)")
    ax.axhline(results["plain_perplexity"], color="grey", linestyle=":", label="plain model")
    start = results["start_perplexity"]
    ax.axhspan(start * 0.98, start * 1.02, color="green", alpha=0.15, label="start +/- 2%")
    ax.set_xlabel("injections")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_title("Perplexity integrity")
    ax.legend()


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Draw ``report`` (from one of the evaluations) to a PNG file at ``path``."""
    plt = _pyplot()
    name = report["eval"]
    grid = name in ("passkey", "niah")
    fig = plt.figure(figsize=(10, 4.5) if grid else (7, 4.5), layout="constrained" if grid else None)
    try:
        if grid:
            _grid(fig, report["results"])
        else:
            ax = fig.add_subplot(1, 1, 1)
            if name == "retention":
                _retention(ax, report["results"])
            elif name == "hotpotqa":
                _hotpotqa(ax, report["results"])
            elif name == "perplexity":
                _perplexity(ax, report["results"], report["samples"])
            else:
                raise MemkitError(f"no plot for an eval named {name!r}")
            fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
