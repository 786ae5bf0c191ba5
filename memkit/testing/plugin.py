"""pytest fixtures for memkit and its plugins (registered through the ``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from memkit import plugins
from memkit.registry import Registry
from memkit.testing.models import tiny_model

__all__ = ["fresh_registry", "tiny_llama"]


@pytest.fixture
def fresh_registry() -> Iterator[Registry]:
    """A registry rebuilt from scratch for this test, and forgotten after it."""
    plugins.reset()
    try:
        yield plugins.get_registry()
    finally:
        plugins.reset()


@pytest.fixture
def tiny_llama():  # type: ignore[no-untyped-def]
    """A tiny random Llama (2 layers, d = 32, vocabulary 128)."""
    return tiny_model("llama")
