"""Save and load a trained :class:`~memkit.model.MemkitModel` in memkit's own folder layout.

A wrapped model has trainable parts beyond its frozen base model: the recipe's LoRA adapters, the
injector's learned tensors and the retriever's projectors; and it has a memory. :func:`save_pretrained`
writes all of them into one folder, and :func:`load_pretrained` (or :func:`memkit.from_pretrained`,
which sends a folder holding ``memkit_config.json`` here) builds the same wrapped model from it:

* ``memkit_config.json``: format version, memkit version, the recipe as TOML text, the base model's
  type, name, shape and dtype, and the files present; written last;
* ``memkit_weights.safetensors``: every tensor memkit owns (``adapters.*``, ``injector.*``, ``retriever.*``);
* ``memory.safetensors`` (with ``save_memory``): the memory, pool and long-term store, as
  :meth:`~memkit.model.MemkitModel.save_memory` writes it;
* ``base_model/`` (with ``save_base_model``): the base model without adapters, as ``transformers``'
  ``save_pretrained`` writes it.

Every file is written atomically (a temporary file in the same folder, flushed to disk, renamed over
the target), and ``memkit_config.json`` is removed first and written last, so a folder whose save did
not finish is never taken for a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import ValidationError
from safetensors.torch import save_file
from transformers import PreTrainedModel

from memkit import __version__
from memkit.api import wrap
from memkit.backbone import Backbone
from memkit.errors import CheckpointError, IncompatibleModelError, InputError, MemoryStateError
from memkit.model import MemkitModel
from memkit.permissions import default_dir_mode, default_file_mode
from memkit.recipe import Recipe
from memkit.state import differences, read_safetensors, tensor_problems

__all__ = [
    "BASE_MODEL_DIR",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "MEMORY_FILE",
    "WEIGHTS_FILE",
    "load_pretrained",
    "save_pretrained",
]

#: The file that makes a folder a memkit checkpoint; written last.
CONFIG_FILE = "memkit_config.json"
#: memkit's own tensors (adapters, injector, retriever).
WEIGHTS_FILE = "memkit_weights.safetensors"
#: The memory state (pool and long-term store), as ``MemkitModel.save_memory`` writes it.
MEMORY_FILE = "memory.safetensors"
#: The base model without adapters, as ``transformers``' ``save_pretrained`` writes it.
BASE_MODEL_DIR = "base_model"

FORMAT = "memkit.pretrained"
FORMAT_VERSION = 1
_WEIGHTS_FORMAT = "memkit.weights"


# -- the tensors memkit owns --------------------------------------------------------------------------------


def _owned_tensors(mem: MemkitModel) -> dict[str, torch.Tensor]:
    """The live tensors memkit owns, by their name in the weights file (not copies: loading writes them).

    ``adapters.<name in the base model>`` for every LoRA parameter of every adapter (``lora_A`` ``[r, in]``,
    ``lora_B`` ``[out, r]``); ``injector.<name>`` for the injector's ``state_dict`` (parameters and
    persistent buffers, e.g. ``bos_embedding`` ``[l, 1, d]`` and ``new_memory_positional_emb`` ``[1, 1, d]``);
    ``retriever.<name>`` for the retriever's ``state_dict`` (e.g. ``query_proj.{i}.0.weight`` ``[2 * key_size,
    d]``).
    """
    out: dict[str, torch.Tensor] = {}
    if mem.adapters is not None:
        for name, parameter in mem.base_model.named_parameters():
            if "lora_" in name:
                out[f"adapters.{name}"] = parameter
    for name, tensor in mem.injector.state_dict(keep_vars=True).items():
        out[f"injector.{name}"] = tensor
    if mem.retriever is not None:
        for name, tensor in mem.retriever.state_dict(keep_vars=True).items():
            out[f"retriever.{name}"] = tensor
    return out


def _base_state_dict(mem: MemkitModel) -> dict[str, torch.Tensor] | None:
    """The base model's ``state_dict`` as it was before the adapters: LoRA tensors left out, and each
    wrapped layer's ``base_layer`` weights under the layer's own name. ``None`` without adapters."""
    if mem.adapters is None:
        return None
    wrapped = [name for name, module in mem.base_model.named_modules() if isinstance(module, BaseTunerLayer)]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mem.base_model.state_dict().items():
        owner = next((w for w in wrapped if name.startswith(f"{w}.")), None)
        if owner is None:
            out[name] = tensor
        elif name.startswith(f"{owner}.base_layer."):
            out[f"{owner}.{name[len(owner) + len('.base_layer.') :]}"] = tensor
        # anything else under a LoRA layer (lora_A, lora_B, ...) belongs to the adapters
    return out


def _part_classes(mem: MemkitModel) -> dict[str, str | None]:
    def qualname(part: object) -> str | None:
        return None if part is None else f"{type(part).__module__}.{type(part).__qualname__}"

    return {
        "pool": qualname(mem.pool),
        "injector": qualname(mem.injector),
        "store": qualname(mem.store),
        "retriever": qualname(mem.retriever),
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- atomic writes --------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make renames and removals in ``folder`` durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _atomic_file(target: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``target``, flush it to disk, and rename it over ``target``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())  # mkstemp and safetensors make it private; it is an ordinary file
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _atomic_dir(target: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary folder beside ``target``, flush its files, and put it in place of ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, default_dir_mode())  # mkdtemp's folder is private; a pretrained folder is not
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, default_file_mode())  # safetensors writes its files private
                _fsync_file(path)
        _fsync_dir(tmp)
        if target.exists():  # a folder cannot be renamed over a full one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


# -- save -------------------------------------------------------------------------------------------------------


def save_pretrained(
    mem: MemkitModel,
    folder: str | os.PathLike[str],
    *,
    save_memory: bool = True,
    save_base_model: bool = False,
) -> None:
    """Save a wrapped model's recipe, memkit's own weights and (optionally) its memory and base model.

    Writes into ``folder`` (created if needed):

    * ``memkit_config.json``: ``format`` (``"memkit.pretrained"``), ``format_version`` (1),
      ``memkit_version``, ``recipe`` (the recipe as TOML text, :meth:`~memkit.recipe.Recipe.to_toml`),
      ``model`` (the base model's ``model_type``, ``name_or_path``, ``num_layers``, ``hidden_size`` and
      ``dtype``), ``files`` (the files below that this save wrote) and ``parts`` (the class of each part).
    * ``memkit_weights.safetensors``: every tensor memkit owns, state-dict style: ``adapters.<name>``
      for each LoRA parameter of every adapter, named as in the wrapped base model (``lora_A``
      ``[r, in]``, ``lora_B`` ``[out, r]``); ``injector.<name>`` for the injector's parameters and
      buffers (the built-in ``kv`` injector: ``bos_embedding`` ``[l, 1, d]``, learned with ``bos =
      "learned"``, computed from the model with ``bos = "token"``; ``new_memory_positional_emb``
      ``[1, 1, d]``); ``retriever.<name>`` for the retriever's (the ``projector`` retriever:
      ``query_proj.{i}.0.weight`` and ``key_proj.{i}.0.weight`` ``[2 * key_size, d]``,
      ``query_proj.{i}.2.weight`` and ``key_proj.{i}.2.weight`` ``[key_size, 2 * key_size]`` per layer
      ``i``). Tensors keep their dtype.
    * ``memory.safetensors`` with ``save_memory``: the memory, as
      :meth:`~memkit.model.MemkitModel.save_memory` writes it (see ``docs/memory-files.md``).
    * ``base_model/`` with ``save_base_model``: the base model as it was before :func:`memkit.wrap`
      (the adapters left out), written by ``transformers``' ``save_pretrained``.

    Every file is written atomically. ``memkit_config.json`` is removed first and written last, so if
    saving fails part-way the folder holds no ``memkit_config.json`` and cannot be loaded (save again).
    Files of an earlier save that this one does not write are left in place and ignored by loading.
    The wrapped model is not changed. The tokenizer is not saved.

    Args:
        mem: the wrapped model.
        folder: the checkpoint folder.
        save_memory: also save the memory (pool and long-term store).
        save_base_model: also save the base model, so that :func:`load_pretrained` needs no ``model=``.

    Raises:
        CheckpointError: ``folder`` is a file or cannot be created, or the recipe cannot be written as
            TOML that reads back the same.
        UnwrappedError: ``mem`` was unwrapped.
    """
    mem._alive()
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"cannot save a memkit checkpoint to {root}: it is a file; give a folder path")
    config = _config(mem, save_memory=save_memory, save_base_model=save_base_model)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint folder {root}: {exc}; pick a writable path") from None

    config_path = root / CONFIG_FILE
    if config_path.exists():  # until the new config is written, the folder is no checkpoint at all
        config_path.unlink()
        _fsync_dir(root)

    header = {"format": _WEIGHTS_FORMAT, "format_version": str(FORMAT_VERSION)}
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in _owned_tensors(mem).items()}
    _atomic_file(root / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    if save_memory:
        mem.save_memory(root / MEMORY_FILE)
    if save_base_model:
        state = _base_state_dict(mem)
        _atomic_dir(root / BASE_MODEL_DIR, lambda tmp: mem.base_model.save_pretrained(tmp, state_dict=state))
    text = json.dumps(config, indent=2) + "\n"
    _atomic_file(config_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _config(mem: MemkitModel, *, save_memory: bool, save_base_model: bool) -> dict[str, Any]:
    try:
        recipe_text = mem.recipe.to_toml()
    except TypeError as exc:
        raise CheckpointError(
            f"the recipe {mem.recipe.name!r} cannot be written as TOML ({exc}); give its part options as "
            "numbers, strings, booleans or lists"
        ) from None
    if _parse_recipe(recipe_text, "the recipe written as TOML") != mem.recipe:
        raise CheckpointError(
            f"the recipe {mem.recipe.name!r} does not read back the same from TOML, so a checkpoint would load "
            "another recipe; give its part options as numbers, strings, booleans or lists"
        )
    model_config = mem.base_model.config
    files = [WEIGHTS_FILE]
    if save_memory:
        files.append(MEMORY_FILE)
    if save_base_model:
        files.append(BASE_MODEL_DIR)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memkit_version": __version__,
        "recipe": recipe_text,
        "model": {
            "model_type": str(getattr(model_config, "model_type", "")),
            "name_or_path": str(getattr(model_config, "_name_or_path", "")),
            "num_layers": mem.backbone.num_layers,
            "hidden_size": mem.backbone.hidden_size,
            "dtype": _dtype_name(mem.backbone.dtype),
        },
        "files": files,
        "parts": _part_classes(mem),
    }


# -- load -------------------------------------------------------------------------------------------------------


def _parse_recipe(text: str, where: str) -> Recipe:
    try:
        return Recipe.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{where} is not a valid recipe: {exc}") from None


def _read_config(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file; pass the checkpoint folder (the one holding {CONFIG_FILE})")
    path = root / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{root} has no {CONFIG_FILE}, so it is not a memkit checkpoint, or its save did not finish; save it "
            "again with memkit.pretrained.save_pretrained (official MemoryLLM and M+ checkpoints, with a "
            "config.json, load with memkit.from_pretrained)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} ({exc}); the file is damaged: save the checkpoint again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a memkit checkpoint config (its format is not {FORMAT!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version!r}, but this memkit (version {__version__}) reads version "
            f"{FORMAT_VERSION}; load it with the memkit version that wrote it "
            f"({config.get('memkit_version', 'unknown')})"
        )
    model, files = config.get("model"), config.get("files")
    fields = ("model_type", "num_layers", "hidden_size", "dtype")
    if (
        not isinstance(model, dict)
        or any(key not in model for key in fields)
        or not isinstance(files, list)
        or not isinstance(config.get("recipe"), str)
    ):
        raise CheckpointError(
            f"{path} lacks fields a memkit checkpoint config has (recipe, files, model with {', '.join(fields)}); "
            "the file is damaged: save the checkpoint again"
        )
    if WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path} lists no {WEIGHTS_FILE}; the file is damaged: save the checkpoint again")
    unknown = sorted(str(name) for name in files if name not in (WEIGHTS_FILE, MEMORY_FILE, BASE_MODEL_DIR))
    if unknown:
        raise CheckpointError(
            f"{path} lists files this memkit does not know ({', '.join(unknown)}); the file is damaged or was "
            "written by another memkit version: save the checkpoint again"
        )
    for name in files:
        if not (root / name).exists():
            raise CheckpointError(
                f"{root} lacks {name}, which {CONFIG_FILE} lists; the folder is incomplete: copy it again whole, "
                "or save the checkpoint again"
            )
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors, header = read_safetensors(
        path, CheckpointError, "weights file", "restore the checkpoint from a backup or save it again"
    )
    if header.get("format") != _WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not memkit weights (no {_WEIGHTS_FORMAT!r} header)")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has format version {header.get('format_version')!r}, but this memkit reads version "
            f"{FORMAT_VERSION}; load it with the memkit version that wrote it"
        )
    return tensors


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch dtype or its name (e.g. 'bfloat16'), got {dtype!r}")
    return resolved


def _check_model(model: Any, saved: dict[str, Any], root: Path) -> None:
    """Refuse a base model of another type or shape than the one the checkpoint was saved from."""
    if isinstance(model, MemkitModel):
        raise IncompatibleModelError(
            "model= is already wrapped; pass the base model (mem.unwrap() gives it back), load_pretrained wraps it"
        )
    if not isinstance(model, PreTrainedModel):
        raise IncompatibleModelError(
            f"model= must be a transformers PreTrainedModel, got {type(model).__name__}; load it with "
            "AutoModelForCausalLM.from_pretrained(...)"
        )
    backbone = Backbone(model)
    ours = {
        "model_type": str(getattr(model.config, "model_type", "")),
        "num_layers": backbone.num_layers,
        "hidden_size": backbone.hidden_size,
    }
    diffs = differences(saved, ours, "checkpoint has", "model has")
    if diffs:
        name = saved.get("name_or_path") or "its base model"
        raise CheckpointError(
            f"{root} was saved from another model than the one given ({'; '.join(diffs)}); pass the base model "
            f"the checkpoint was trained on ({name}) as model="
        )


def _load_base_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        # safetensors only: a pickled pytorch_model.bin in the folder is never read (it could run code)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the base model saved in {path} ({exc}); pass the base model as model= instead"
        ) from None
    assert isinstance(model, PreTrainedModel)
    return model.eval()


def _load_weights(mem: MemkitModel, saved: dict[str, torch.Tensor], path: Path) -> None:
    targets = _owned_tensors(mem)
    missing = sorted(set(targets) - set(saved))
    unexpected = sorted(set(saved) - set(targets))
    wrong = [
        f"{name} {list(saved[name].shape)} (the model has {list(targets[name].shape)})"
        for name in sorted(set(saved) & set(targets))
        if saved[name].shape != targets[name].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} does not fit the model wrapped with the saved recipe {mem.recipe.name!r}: "
            f"{tensor_problems(missing, unexpected, wrong, 'unexpected')}. The file was changed after saving, or "
            "the base model differs from the one it was saved with: pass that base model, or save the checkpoint again"
        )
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(saved[name])


def load_pretrained(
    folder: str | os.PathLike[str],
    *,
    model: PreTrainedModel | None = None,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> MemkitModel:
    """Build the wrapped model that :func:`save_pretrained` saved in ``folder``.

    Reads ``memkit_config.json``; takes the base model from ``model=``, else from ``folder/base_model``
    when the checkpoint has one (nothing is ever downloaded); checks that it is of the recorded
    ``model_type``, number of layers and hidden size; wraps it with the saved recipe; loads memkit's
    weights strictly (every tensor of the file, each into a tensor of the same name and shape); and loads
    the memory when the checkpoint has it (otherwise the memory is empty). If anything fails after
    wrapping, the model is unwrapped again (its adapters removed) before the error is raised.

    Args:
        folder: the checkpoint folder.
        model: the base model (as given to :func:`memkit.wrap`, without adapters). It is wrapped, so it
            gets the recipe's LoRA layers, as with :func:`memkit.wrap`. Required unless the checkpoint
            was saved with ``save_base_model=True``.
        tokenizer: optional tokenizer, needed to :meth:`~memkit.model.MemkitModel.inject` text.
        device: move the base model there first (``model.to(device)``, in place); ``None`` leaves it
            where it is (the CPU for a base model loaded from the folder).
        dtype: cast the base model to this dtype first (``model.to(dtype)``, in place); ``None`` keeps
            the given model's dtype, or loads the saved base model in the recorded dtype. memkit's
            weights are converted to the model's dtype; the memory loads only into the dtype it was
            saved in (unless the recipe's pool stores a fixed dtype).

    Returns:
        the wrapped model, in eval mode.

    Raises:
        CheckpointError: ``folder`` does not exist or has no ``memkit_config.json``; the config is
            unreadable, of an unknown format or format version, or lists files the folder lacks; no
            ``model=`` and no saved base model; the model differs in type or shape from the recorded one
            (every difference listed); the weights or memory file is corrupted; the weights file has
            missing, unexpected or misshapen tensors (every one listed); the memory does not fit.
        IncompatibleModelError: ``model=`` is not a ``transformers`` model, or is already wrapped.
        InputError: ``dtype`` is not a floating-point dtype.
        RecipeError, UnknownComponentError: the saved recipe cannot be applied (for example it names a
            part from a plugin that is not installed).
    """
    root = Path(folder).expanduser()
    config = _read_config(root)
    saved = config["model"]
    files = set(config["files"])
    recipe = _parse_recipe(config["recipe"], f"the recipe in {root / CONFIG_FILE}")
    weights = _read_weights(root / WEIGHTS_FILE)
    torch_dtype = _resolve_dtype(dtype)

    if model is None:
        if BASE_MODEL_DIR not in files:
            raise CheckpointError(
                f"{root} holds memkit's weights but not the base model (it was saved without "
                f"save_base_model=True); pass the base model it was trained on ({saved.get('name_or_path') or '?'}, "
                f"a {saved['model_type']} model) as model=, e.g. load_pretrained(folder, model="
                "AutoModelForCausalLM.from_pretrained(...))"
            )
        recorded = _resolve_dtype(str(saved["dtype"]))
        assert recorded is not None
        model = _load_base_model(root / BASE_MODEL_DIR, torch_dtype or recorded)
    _check_model(model, saved, root)
    movable: Any = model  # transformers' decorated ``to`` confuses type checkers
    if torch_dtype is not None and model.dtype != torch_dtype:
        movable.to(torch_dtype)
    if device is not None:
        movable.to(torch.device(device))

    mem = wrap(model, recipe, tokenizer=tokenizer)
    try:
        _load_weights(mem, weights, root / WEIGHTS_FILE)
        if MEMORY_FILE in files:
            try:
                mem.load_memory(root / MEMORY_FILE)
            except MemoryStateError as exc:
                now = _dtype_name(mem.backbone.dtype)
                hint = (
                    f" The model now runs in {now} but was saved in {saved['dtype']}: load with dtype="
                    f"{saved['dtype']!r} to load the memory as it was saved"
                    if now != saved["dtype"]
                    else ""
                )
                raise CheckpointError(f"cannot load the memory saved in {root}: {exc}.{hint}") from exc
    except BaseException:
        mem.unwrap()
        raise
    del weights
    recorded_parts = config.get("parts")
    if isinstance(recorded_parts, dict):
        built = _part_classes(mem)
        differ = [
            f"{k}: saved {recorded_parts.get(k)}, built {v}" for k, v in built.items() if recorded_parts.get(k) != v
        ]
        if differ:
            warnings.warn(
                f"{root} was saved from parts of other classes than the saved recipe builds now ({'; '.join(differ)}); "
                "the loaded model may behave differently (a model loaded with from_pretrained(..., "
                "fidelity='official') saves its recipe, not the official quirks)",
                stacklevel=2,
            )
    mem.eval()
    return mem
