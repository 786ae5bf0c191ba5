"""Training memkit recipes: the MemoryLLM and M+ stages (see docs/training.md).

:class:`StageConfig` is importable everywhere (recipes hold stages); the trainer itself is loaded
on first use, because it needs the model classes that recipes are imported by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memkit.training.config import StageConfig

if TYPE_CHECKING:
    from memkit.training.data import Documents
    from memkit.training.trainer import Trainer, TrainLog

__all__ = ["Documents", "StageConfig", "TrainLog", "Trainer"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "TrainLog"):
        from memkit.training import trainer

        return getattr(trainer, name)
    if name == "Documents":
        from memkit.training import data

        return data.Documents
    raise AttributeError(f"module 'memkit.training' has no attribute {name!r}")
