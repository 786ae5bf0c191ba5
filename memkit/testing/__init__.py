"""Helpers for testing memkit and memkit plugins: tiny models built from configs, pytest fixtures."""

from memkit.testing.models import TINY_FAMILIES, tiny_model

__all__ = ["TINY_FAMILIES", "tiny_model"]
