"""Evaluation reports: the settings, the model and recipe, the results and per-sample rows, as JSON."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from memkit.permissions import default_file_mode

__all__ = ["header", "write_json"]


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def header(name: str, mem: Any, model_source: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The part of every report that says what ran: eval name, model, recipe, settings, versions, date."""
    return {
        "eval": name,
        "model": {"source": model_source, "class": type(mem.base_model).__name__, "dtype": str(mem.backbone.dtype)},
        "recipe": json.loads(mem.recipe.model_dump_json()),
        "settings": settings,
        "versions": {p: _version(p) for p in ("memkit", "torch", "transformers")},
        "machine": {"python": platform.python_version(), "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes the file private; a report is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
