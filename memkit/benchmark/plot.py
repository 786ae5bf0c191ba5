"""PNG plots of the benchmark reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["plot_speed", "plot_store"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_SPEED = (("inject", "inject"), ("decode", "decode"), ("first_token", "first token"))
_MEMORY = (("peak_memory_inject", "inject"), ("peak_memory_decode", "generate"))
_COLORS = {True: "#4c9f70", False: "#c8553d", None: "#7a8ca3"}


def _bars(figures: dict[str, Any], group: tuple[tuple[str, str], ...]) -> list[tuple[str, float, float | None, Any]]:
    """``(label, ratio, aim, met)`` per bar: each figure of ``group``, then its ``versus_prefill`` if any."""
    bars: list[tuple[str, float, float | None, Any]] = []
    for key, label in group:
        if key not in figures:
            continue
        fig = figures[key]
        bars.append((label, fig["ratio"] or 0.0, fig["aim"], fig["aim_met"]))
        extra = fig.get("versus_prefill")
        if extra is not None:
            bars.append((f"{label}\nvs prefill", extra["ratio"] or 0.0, None, None))
    return bars


def plot_speed(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Bar charts of a :func:`~memkit.benchmark.speed.run_speed` report's ratios, written to ``path``.

    Left: speed ratios (memory / plain tokens per second; higher is better), each aim drawn as a red
    line over its bar (green bar: met, red: not met, grey: no aim); a dotted line marks parity (1.0).
    Right: peak-memory ratios (memory / plain bytes). Injection also appears against the plain prefill.
    """
    plt = _pyplot()
    figures = report["figures"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [4, 3]})
    try:
        panels = (
            (left, _SPEED, "speed: memory / plain (higher is better)"),
            (right, _MEMORY, "peak memory: memory / plain (lower uses less)"),
        )
        for ax, group, title in panels:
            bars = _bars(figures, group)
            ratios = [ratio for _, ratio, _, _ in bars]
            drawn = ax.bar([b[0] for b in bars], ratios, color=[_COLORS[b[3]] for b in bars], width=0.6)
            for bar, (_, ratio, aim, _) in zip(drawn, bars, strict=True):
                x0, width = bar.get_x(), bar.get_width()
                ax.annotate(
                    f"{ratio:.2f}",
                    (x0 + width / 2, ratio),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
                if aim is not None:
                    ax.hlines(aim, x0 - 0.1 * width, x0 + 1.1 * width, colors="red", linewidth=2)
                    offset = {"xytext": (2, 2), "textcoords": "offset points"}
                    ax.annotate(f"aim {aim:g}", (x0 + width, aim), fontsize=8, color="red", **offset)
            ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
            ax.set_ylim(0, max([1.2, *[r * 1.15 for r in ratios]]))
            ax.set_title(title, fontsize=10)
            ax.tick_params(axis="x", labelsize=9)
        model = report.get("model", {}).get("model_type", "?")
        recipe = report.get("recipe", {}).get("name", "?")
        setup = report.get("setup", {})
        fig.suptitle(
            f"memkit bench speed: {model}, recipe {recipe}, {setup.get('memory_tokens', '?')} tokens in memory "
            f"({setup.get('memory_read_positions', '?')} read positions)",
            fontsize=11,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)  # also when drawing fails: pyplot keeps open figures


def plot_store(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Plots of a :func:`~memkit.benchmark.store_cost.run_store_cost` report, written to ``path``.

    Left: retrieval latency against entries per layer, log-log, one line per backend (the legend gives
    the fitted slope), with a dashed slope-1 line through the first point of the slowest backend.
    Right: bytes per entry relative to the raw bytes (process growth solid, accounted dashed).
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        growth = report.get("growth", {})
        reference: tuple[float, float] | None = None
        for backend, rows in report["results"].items():
            if not rows:
                continue
            sizes = [r["size"] for r in rows]
            latency = [r["latency_ms_median"] for r in rows]
            slope = growth.get(backend, {}).get("slope")
            label = backend if slope is None else f"{backend} (slope {slope:.2f})"
            left.loglog(sizes, latency, marker="o", label=label)
            if reference is None or latency[0] > reference[1]:
                reference = (sizes[0], latency[0])
            (line,) = right.semilogx(sizes, [r["process_vs_raw"] for r in rows], marker="o", label=f"{backend} process")
            right.semilogx(
                sizes,
                [r["accounted_vs_raw"] for r in rows],
                marker="x",
                linestyle="--",
                color=line.get_color(),
                label=f"{backend} accounted",
            )
        sizes_all = report["setup"]["sizes"]
        if reference is not None and len(sizes_all) > 1:
            x0, y0 = reference
            xs = [x0, sizes_all[-1]]
            left.loglog(xs, [y0, y0 * xs[1] / x0], linestyle="--", color="grey", label="linear (slope 1)")
        left.set_xlabel("entries per layer")
        left.set_ylabel("retrieval latency per layer and prompt (ms)")
        left.legend(fontsize=8)
        left.grid(True, which="both", alpha=0.3)
        right.axhline(1.0, color="black", linestyle=":", linewidth=1)
        right.set_xlabel("entries per layer")
        right.set_ylabel("bytes per entry / raw bytes")
        right.legend(fontsize=8)
        right.grid(True, which="both", alpha=0.3)
        setup = report["setup"]
        fig.suptitle(
            f"memkit bench store: k={setup['k']}, {setup['queries']} queries, keys {setup['key_size']}, "
            f"vectors {setup['hidden']}, {setup['dtype']}",
            fontsize=11,
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)  # also when drawing fails: pyplot keeps open figures
