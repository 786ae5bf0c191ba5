"""The strict pydantic base class for every memkit configuration."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["MemkitConfig"]


class MemkitConfig(BaseModel):
    """Base of every component and recipe configuration.

    Unknown keys are refused (``extra="forbid"``), values of the wrong type too (``strict``: nothing is
    converted, except an int where a float is wanted), values are validated on assignment, and a
    subclass must give every field a ``description``: the class refuses to be defined otherwise, so
    the documentation of each setting cannot go missing.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        missing = [name for name, field in cls.model_fields.items() if not field.description]
        if missing:
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__}: every config field needs a description; "
                f"add Field(description=...) to {', '.join(missing)}"
            )
