"""Recipes: which parts a memory is built from, and their settings.

A recipe is a TOML file (``recipes/*.toml`` ships the built-in ones) or a :class:`Recipe` object.
Each part section names a registered part and gives its config::

    name = "memoryllm"
    description = "MemoryLLM: a fixed latent pool per layer, rewritten on every injection"
    chunk_size = 512

    [pool]
    name = "random_drop"        # a registered MemoryPool
    capacity = 12800            # the rest is that pool's Config
    write_size = 256

    [injector]
    name = "kv"

Parts are looked up and their configs validated when the recipe is applied to a model
(:func:`memkit.wrap`), so a recipe file may name parts from plugins that are installed later.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from memkit.adapters import AdapterSpec
from memkit.config import MemkitConfig
from memkit.errors import RecipeError
from memkit.training.config import StageConfig

__all__ = ["PartSpec", "Recipe", "load_recipe"]


class PartSpec(BaseModel):
    """One part of a recipe: the registered ``name`` and the options of that part's ``Config``.

    The options are kept as given and validated against the part's ``Config`` when the recipe is
    applied; unknown options are refused then, with the part's valid options listed.
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="registered name of the part (see memkit.plugins)")

    @property
    def options(self) -> dict[str, Any]:
        """The part's config options (everything but ``name``)."""
        return dict(self.model_extra or {})


class Recipe(MemkitConfig):
    """A memory recipe: parts, their configs, and how text is cut into chunks."""

    name: str = Field(description="the recipe's name, as memkit.list_recipes() shows it")
    description: str = Field("", description="one line on what the recipe is for")
    chunk_size: int = Field(description="tokens per injected chunk; inject() cuts text into chunks this long", gt=0)
    pool: PartSpec = Field(description="the MemoryPool: short-term memory")
    injector: PartSpec = Field(description="the Injector: how memory reaches attention and how it is written")
    rope_scaling: dict[str, Any] | None = Field(
        None,
        description="RoPE settings applied during memkit calls on top of the model's own, in transformers' "
        "rope_parameters form (MemoryLLM-8B: {rope_type = 'linear', factor = 1.8125}); none by default",
    )
    store: PartSpec | None = Field(None, description="the LongTermStore for evicted memory (M+); none by default")
    adapters: AdapterSpec | None = Field(
        None, description="LoRA adapters for writing and reading memory (M+: two of rank 16); none by default"
    )
    retrieve: int = Field(
        0, ge=0, description="long-term entries brought back per layer for each read (M+: 2,560); needs a store"
    )
    retriever: PartSpec | None = Field(None, description="the Retriever for the long-term store; none by default")
    training: dict[str, StageConfig] = Field(
        default_factory=dict,
        description="training stages by name ([training.stage1] ...; M+: stage1, stage2, stage3), each a "
        "memkit.training.StageConfig; none by default",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not value or not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"recipe name {value!r} must be letters, digits, '-', '_' or '.'")
        return value

    def with_overrides(self, overrides: Mapping[str, Any]) -> Recipe:
        """A copy with ``overrides`` applied; part sections merge (``pool={"capacity": 64}``).

        Raises:
            RecipeError: an override names no field of the recipe, or gives it an invalid value.
        """
        if not isinstance(overrides, Mapping):
            raise RecipeError(
                f"recipe overrides must be a mapping of recipe fields to values, got {type(overrides).__name__}"
            )
        data = self.model_dump(exclude_none=True)
        for key, value in overrides.items():
            if key not in Recipe.model_fields:
                raise RecipeError(
                    f"unknown recipe override {key!r}; recipe fields are: {', '.join(Recipe.model_fields)}. "
                    "Part options go inside their section, e.g. wrap(model, recipe, pool={'capacity': 64})"
                )
            if key == "training" and isinstance(value, Mapping):
                stages = copy.deepcopy(dict(data.get(key) or {}))
                for stage, options in value.items():
                    stages[stage] = (
                        {**stages.get(stage, {}), **dict(options)} if isinstance(options, Mapping) else options
                    )
                data[key] = stages
            elif key in _PART_FIELDS and isinstance(value, Mapping):
                merged = dict(data.get(key) or {})
                if "name" in value and value["name"] != merged.get("name"):
                    merged = {}  # a different part: its old options no longer apply
                merged.update(copy.deepcopy(dict(value)))
                data[key] = merged
            else:
                data[key] = value
        return _validate(data, f"recipe {self.name!r} with overrides {dict(overrides)!r}")

    def to_toml(self) -> str:
        """The recipe as TOML text (readable by :func:`load_recipe`)."""
        data = self.model_dump(exclude_none=True)
        lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
        for key, value in data.items():
            if isinstance(value, dict):
                lines.extend(_toml_table(key, value))
        return "\n".join(lines) + "\n"


_PART_FIELDS = ("pool", "injector", "store", "retriever", "rope_scaling", "adapters")


def _toml_table(name: str, table: dict[str, Any]) -> list[str]:
    """``[name]`` with its plain values, then its sub-tables as ``[name.key]`` (an empty table is skipped)."""
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines = [f"\n[{name}]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items())] if plain else []
    for key, value in nested.items():
        if value and all(not isinstance(v, dict) for v in value.values()):
            lines.append(f"\n[{name}.{_toml_key(key)}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        else:
            lines.extend(_toml_table(f"{name}.{_toml_key(key)}", value))
    return lines


def _toml_key(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _validate(data: Mapping[str, Any], where: str) -> Recipe:
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<recipe>'}: {err['msg']}" for err in exc.errors()
        )
        raise RecipeError(f"{where} is not a valid recipe: {problems}") from None


def load_recipe(source: str | Path | Recipe) -> Recipe:
    """Resolve a recipe name, a TOML file path, or a :class:`Recipe` to a :class:`Recipe`.

    Raises:
        UnknownComponentError: ``source`` is a name nothing registered (the message lists known ones).
        RecipeError: the file is missing, not TOML, or not a valid recipe.
    """
    if isinstance(source, Recipe):
        return source
    if not isinstance(source, (str, Path)):
        raise RecipeError(
            f"a recipe is a registered name, a path to a .toml file or a memkit.Recipe, got {type(source).__name__}"
        )
    path = Path(source)
    if isinstance(source, str) and path.suffix != ".toml" and not path.exists():
        from memkit.plugins import get_registry

        registered = get_registry().recipe_source(source)
        if isinstance(registered, Recipe):
            return registered
        path = registered
    return _read_file(path)


def _read_file(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file {path} is not UTF-8 text ({exc}); save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe file {path} is not valid TOML: {exc}") from None
    return _validate(data, f"recipe file {path}")
