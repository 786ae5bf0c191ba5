"""The rule that scales the M+ reference numbers (Llama-3.1-8B) to another backbone.

M+ on Llama-3.1-8B (d = 4,096, a window of 131,072 positions) uses K = 256 vectors per write, a
short-term pool of 40 K = 10,240 vectors per layer, 10 K = 2,560 retrieved vectors, chunks of 2 K = 512
tokens, a long-term store of 600 K = 153,600 entries per layer (M+'s lifetime of 600 updates), and
retriever keys of d / 16 = 256. The rule keeps every ratio and shrinks K to fit the window:

* ``K = min(256, the largest power of two <= W / 64)`` (at least 16), where ``W`` is the model's window
  (``max_position_embeddings``); then BOS + retrieved + pool + one chunk take ``52 K + 1 <= 0.82 W``
  positions, leaving room for the prompt;
* pool ``40 K``, retrieved ``10 K``, chunk ``2 K``, store ``600 K`` entries per layer;
* key size ``d / 16`` rounded up to a multiple of 8 (at least 16).

On Llama-3.1-8B the rule gives back exactly the ``mplus`` recipe's numbers.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from memkit.errors import IncompatibleModelError

__all__ = ["scale_recipe"]


def scale_recipe(model: PreTrainedModel, recipe: str = "mplus") -> dict[str, Any]:
    """Overrides that give ``recipe`` (``mplus`` or ``memoryllm``) M+'s proportions on ``model``.

    Use them with :func:`memkit.wrap`: ``memkit.wrap(model, "mplus", **memkit.scale_recipe(model))``.

    Raises:
        IncompatibleModelError: the model's config has no ``max_position_embeddings`` or ``hidden_size``,
            or a window too short for K = 16.
    """
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "max_position_embeddings", None)
    width = getattr(config, "hidden_size", None)
    if not window or not width:
        raise IncompatibleModelError(
            f"{type(model).__name__}'s config lacks max_position_embeddings or hidden_size, so memkit cannot scale "
            f"the {recipe!r} recipe to it; give the pool, store and retriever sizes as overrides"
        )
    k = 256
    while k > 16 and k * 64 > int(window):
        k //= 2
    if k * 64 > int(window):
        raise IncompatibleModelError(f"a window of {window} positions is too short for M+'s layout (needs >= 1,024)")
    key_size = max(16, -(-int(width) // 16 // 8) * 8)
    overrides: dict[str, Any] = {
        "chunk_size": 2 * k,
        "pool": {"capacity": 40 * k, "write_size": k},
    }
    if recipe == "mplus":
        overrides["retrieve"] = 10 * k
        overrides["store"] = {"capacity": 600 * k}
        overrides["retriever"] = {"key_size": key_size}
    elif recipe == "memoryllm":
        overrides["pool"] = {"capacity": 50 * k, "write_size": k}  # MemoryLLM-8B: 50 blocks of K
    else:
        raise IncompatibleModelError(f"scale_recipe knows the 'mplus' and 'memoryllm' recipes, not {recipe!r}")
    return overrides
