"""memkit's exceptions.

Every error memkit raises on bad input is a :class:`MemkitError`. The subclasses also inherit the
built-in exception a caller would expect (``ValueError``, ``TypeError``, ``LookupError``), so code that
catches those keeps working. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "EmptyInputError",
    "IncompatibleModelError",
    "InputError",
    "MemkitError",
    "MemoryStateError",
    "MissingTokenizerError",
    "PluginError",
    "RecipeError",
    "RegistrationError",
    "TrainingError",
    "UnknownComponentError",
    "UnwrappedError",
]


class MemkitError(Exception):
    """Root of every error memkit raises on purpose."""


class PluginError(MemkitError):
    """A plugin could not be loaded or misbehaved."""


class RegistrationError(PluginError, ValueError):
    """A duplicate or malformed registration; the message names every registrant involved."""


class UnknownComponentError(MemkitError, LookupError):
    """A recipe, pool, store, retriever or injector name that nothing registered."""

    def __str__(self) -> str:  # LookupError would otherwise show the repr of the message
        return str(self.args[0]) if self.args else ""


class RecipeError(MemkitError, ValueError):
    """A recipe that is malformed, or that contradicts the model it is applied to."""


class IncompatibleModelError(MemkitError, ValueError):
    """A model whose layers cannot carry memory, or whose shape does not match."""


class InputError(MemkitError, ValueError):
    """Bad input to a call: wrong type, wrong shape, wrong device or dtype, ids out of range."""


class EmptyInputError(InputError):
    """Input with nothing in it (an empty string, zero tokens)."""


class MissingTokenizerError(InputError):
    """Text was given but the wrapper has no tokenizer to turn it into token ids."""


class MemoryStateError(MemkitError, ValueError):
    """A memory state file that is missing, corrupted, or made for another model or recipe."""


class CheckpointError(MemkitError, ValueError):
    """A checkpoint that cannot be read: an official MemoryLLM or M+ folder (not a local folder, a
    config.json without the fields it needs, tensors missing, unknown or of the wrong shape, all listed)
    or a memkit ``save_pretrained`` folder (incomplete, another format version, another base model)."""


class UnwrappedError(MemkitError, RuntimeError):
    """A wrapper used after :meth:`memkit.MemkitModel.unwrap`."""


class DataError(InputError):
    """Training data that cannot be used: none at all, unreadable files, documents too short to train on."""


class TrainingError(MemkitError, ValueError):
    """A training run that cannot start or resume: a stage the recipe lacks, nothing to train, or a
    checkpoint made for another recipe or model."""
