"""The public entry points: :func:`wrap` and :func:`list_recipes`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from memkit.errors import IncompatibleModelError, InputError
from memkit.model import MemkitModel
from memkit.plugins import get_registry
from memkit.recipe import Recipe, load_recipe

__all__ = ["list_recipes", "wrap"]


def wrap(
    model: PreTrainedModel,
    recipe: str | Path | Recipe = "training-free",
    *,
    tokenizer: Any = None,
    **overrides: Any,
) -> MemkitModel:
    """Give a HuggingFace causal LM a memory built from ``recipe``.

    Args:
        model: a decoder-only ``PreTrainedModel`` (``AutoModelForCausalLM``). Its code and weights are not
            modified; a recipe with ``[adapters]`` adds peft LoRA layers to it until ``unwrap()``.
        recipe: a registered recipe name (see :func:`list_recipes`), a path to a recipe TOML file, or a
            :class:`~memkit.recipe.Recipe`.
        tokenizer: optional tokenizer; needed to inject text rather than token ids.
        **overrides: recipe fields to change, e.g. ``chunk_size=128`` or ``pool={"capacity": 1024}``
            (part sections merge with the recipe's).

    Returns:
        a :class:`~memkit.model.MemkitModel`; ``unwrap()`` gives the model back unchanged.

    Raises:
        UnknownComponentError: an unknown recipe or part name (the message lists the known ones).
        RecipeError: the recipe is invalid, or contradicts the model.
        IncompatibleModelError: the model's layers cannot carry memory.

    Example:
        ```python
        mem = memkit.wrap(model, "training-free", tokenizer=tok)
        mem.inject("Alice's passport number is 4417.")
        out = mem.generate(**tok("Alice's passport number is", return_tensors="pt"), max_new_tokens=5)
        ```
    """
    if isinstance(model, MemkitModel):
        raise IncompatibleModelError("this model is already wrapped; call .unwrap() first or use it as it is")
    if tokenizer is not None and not callable(tokenizer):
        raise InputError(
            f"tokenizer must be a callable tokenizer (e.g. from AutoTokenizer.from_pretrained), got "
            f"{type(tokenizer).__name__}; pass the tokenizer object, or leave it out and inject token ids"
        )
    resolved = load_recipe(recipe)
    if overrides:
        resolved = resolved.with_overrides(overrides)
    return MemkitModel(model, resolved, tokenizer=tokenizer)


def list_recipes() -> list[str]:
    """Names of every registered recipe (built-in and from plugins), sorted."""
    return get_registry().names("recipe")
