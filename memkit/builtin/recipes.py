"""Registers the recipe files shipped in ``recipes/`` (installed as the ``memkit.recipes`` package)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from memkit.hookspecs import hookimpl
from memkit.registry import Registry

__all__ = ["builtin_recipe_files"]


def builtin_recipe_files() -> dict[str, Path]:
    """Name -> path of every ``*.toml`` file shipped in ``memkit.recipes``."""
    folder = resources.files("memkit.recipes")
    files = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".toml"):
            files[entry.name[: -len(".toml")]] = Path(str(entry))
    return dict(sorted(files.items()))


@hookimpl
def register_recipes(registry: Registry) -> None:
    for name, path in builtin_recipe_files().items():
        registry.add_recipe(name, path)
