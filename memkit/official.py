"""Read the official MemoryLLM and M+ checkpoints (``YuWangX/memoryllm-8b``, ``YuWangX/mplus-8b``, ...).

:func:`from_pretrained` turns a local folder in the official layout (``config.json`` plus one
safetensors file, or shards with ``model.safetensors.index.json``) into a
:class:`~memkit.model.MemkitModel`: the Llama backbone with its LoRA adapters, the learned BOS and
new-memory embeddings, the short-term memory, and for M+ the long-term memory and the retriever.
Every tensor of the checkpoint is either loaded or listed as ignored (:func:`inspect_checkpoint`
shows which and why); a missing or unknown tensor is an error that lists them all.

See ``docs/official-checkpoints.md`` for the mapping table and the two fidelity modes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from memkit.api import wrap
from memkit.builtin.injector import KVInjector
from memkit.builtin.projector_retriever import ProjectorRetriever
from memkit.builtin.store import StagedStore
from memkit.errors import CheckpointError, InputError
from memkit.interfaces.store import LongTermStore
from memkit.model import MemkitModel
from memkit.scoring import oldest_first
from memkit.state import tensor_problems

__all__ = ["MPLUS_STORE_CAPACITY", "CheckpointPlan", "from_pretrained", "inspect_checkpoint"]

logger = logging.getLogger(__name__)

#: Long-term entries per layer memkit keeps for M+ (spec §4: M+'s recall-frequency rule is FIFO over
#: 10 merges x 60 updates x 256 tokens); a config key ``ltm_capacity`` overrides it.
MPLUS_STORE_CAPACITY = 153_600

Fidelity = Literal["memkit", "official"]

#: config.json keys that make the Llama backbone (the rest are MemoryLLM / M+ settings).
_LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_tokens",
    "num_blocks",
    "lora_config",
)
_MPLUS_KEYS = ("num_ltm_blocks", "selector_hidden_dim", "update_ltm_frequency")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LTM = re.compile(r"^ltm(_keys|_ages|_recall_frequencies)?\.\d+$")

_WHY_ENCODER_QUERY = (
    "M+'s encoder-side selector, trained to choose which short-term rows to drop; the official inference "
    "code does not use it (use_retriever=False) and memkit drops at random, so it has no memkit counterpart"
)
_WHY_RECALL = (
    "recall frequencies drive M+'s eviction at merges, whose net effect is oldest-first eviction past a "
    "capacity (spec §4); memkit's store does that by capacity, so nothing is derived from them"
)
_WHY_UNINITIALISED = (
    "the checkpoint's memory is uninitialised (initialized = 0): the pool starts empty and the first write "
    "is tiled to fill it, as the official code does"
)
_WHY_TIED = "tied to model.embed_tokens.weight (tie_word_embeddings)"


@dataclass(frozen=True)
class CheckpointPlan:
    """What :func:`from_pretrained` does with an official checkpoint; no tensor data is read to make it.

    Attributes:
        folder: the checkpoint folder.
        kind: ``"memoryllm"`` (no long-term memory) or ``"mplus"``; also the recipe used.
        config: ``config.json`` as read.
        overrides: the recipe overrides derived from the config (what ``memkit.wrap`` receives).
        loaded: tensor name -> where it goes in the :class:`~memkit.model.MemkitModel`.
        ignored: tensor name -> why it has no memkit counterpart.
        initialized: the ``initialized`` buffer (``None`` when absent, as in M+: the memory is the pool).
    """

    folder: Path
    kind: Literal["memoryllm", "mplus"]
    config: dict[str, Any]
    overrides: dict[str, Any]
    loaded: dict[str, str]
    ignored: dict[str, str]
    initialized: bool | None


# -- reading the folder ---------------------------------------------------------------------------------


def _local_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    text = os.fspath(path)
    if not folder.exists() and _HUB_ID.match(text):
        raise CheckpointError(
            f"{text!r} is not a local folder. memkit.from_pretrained downloads nothing: it reads a checkpoint "
            f"already on disk. Download it first, e.g. `huggingface-cli download {text} --local-dir "
            f"./{text.split('/')[-1]}` "
            "(or huggingface_hub.snapshot_download), then pass that folder"
        )
    if folder.is_file():
        raise CheckpointError(
            f"{folder} is a file; pass the checkpoint folder (holding config.json and the safetensors)"
        )
    raise CheckpointError(f"checkpoint folder {folder} does not exist")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json; it is not a checkpoint in the official layout") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config


class _Tensors:
    """Names and shapes of the tensors of a single-file or sharded safetensors checkpoint; data on demand."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"cannot read the shard index {index}: {exc!r}") from None
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise CheckpointError(
                f"{folder} has neither model.safetensors nor model.safetensors.index.json; memkit reads official "
                "checkpoints in safetensors only"
            )
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{index} names the shard {name}, which is not in {folder}")
            try:
                with safe_open(path, framework="pt") as handle:
                    names = handle.keys()
                    for key in names:
                        self.files[key] = path
                        self.shapes[key] = tuple(handle.get_slice(key).get_shape())
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"cannot read the safetensors file {path}: {exc}") from None
        if weight_map is not None:
            wrong = sorted(k for k, v in weight_map.items() if self.files.get(k) != folder / v)
            if wrong:
                raise CheckpointError(f"{index} places tensors in shards that do not hold them: {', '.join(wrong)}")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(path, framework="pt") as handle:
                for key in keys:
                    out[key] = handle.get_tensor(key)
        return out


# -- the plan -------------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None, config: dict[str, Any]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        return _DTYPES[name]
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"config.json's torch_dtype {name!r} is not float32, float16 or bfloat16")
    return _DTYPES[name]


def _rope(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the backbone's rope_parameters, the recipe's rope_scaling) from config.json.

    Llama-3.1's own ``llama3`` scaling belongs to the backbone; any other scaling (MemoryLLM-8B's linear
    1.8125, which stretches the window to hold the memory) is memkit's, applied during memkit calls.
    """
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}, None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"config.json's rope_scaling must be an object or null, got {scaling!r}")
    params = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "llama3":
        return {**params, "rope_type": "llama3", "rope_theta": theta}, None
    return {"rope_type": "default", "rope_theta": theta}, {**params, "rope_type": rope_type}


def _check_config(config: dict[str, Any], mplus: bool, folder: Path) -> None:
    needed = [*_REQUIRED_KEYS, *(_MPLUS_KEYS if mplus else ())]
    missing = [key for key in needed if config.get(key) is None]
    lora = config.get("lora_config")
    if isinstance(lora, dict):
        missing += [f"lora_config.{key}" for key in ("r", "lora_alpha", "target_modules") if lora.get(key) is None]
    elif lora is not None:
        missing.append("lora_config (an object)")
    if missing:
        raise CheckpointError(f"{folder}/config.json lacks fields an official checkpoint has: {', '.join(missing)}")
    model_type = config.get("model_type")
    if model_type not in (None, "memoryllm", "llama"):
        raise CheckpointError(
            f"{folder}/config.json has model_type {model_type!r}; memkit.from_pretrained reads the official "
            "MemoryLLM and M+ checkpoints (model_type 'memoryllm' on Llama). Load other models with "
            "transformers and memkit.wrap"
        )
    unsupported = []
    if mplus and config.get("num_selector_layers") not in (None, 2):
        unsupported.append(f"num_selector_layers={config['num_selector_layers']} (memkit's projector has 2)")
    if mplus and config.get("map_from_hidden_states") is False:
        unsupported.append("map_from_hidden_states=false (memkit's retriever maps normalised hidden states)")
    if mplus and config.get("update_ltm_mode") not in (None, "immediate"):
        unsupported.append(f"update_ltm_mode={config['update_ltm_mode']!r} (memkit merges as 'immediate' does)")
    blocks, ltm_blocks = int(config["num_blocks"]), int(config.get("num_ltm_blocks") or 0)
    if not 0 <= ltm_blocks < blocks:
        unsupported.append(f"num_ltm_blocks={ltm_blocks} with num_blocks={blocks}")
    if unsupported:
        raise CheckpointError(f"{folder}/config.json has settings memkit cannot reproduce: {'; '.join(unsupported)}")


def _overrides(
    config: dict[str, Any],
    mplus: bool,
    names: list[str],
    fidelity: Fidelity,
    dtype: torch.dtype,
    bos: bool,
    rope_scaling: dict[str, Any] | None,
) -> dict[str, Any]:
    k = int(config["num_tokens"])
    short_blocks = int(config["num_blocks"]) - int(config.get("num_ltm_blocks") or 0)
    lora = config["lora_config"]
    pool: dict[str, Any] = {
        "capacity": short_blocks * k,
        "write_size": k,
        "per_layer": bool(config.get("drop_memory_per_layer", False)),
        "init": "tile",
    }
    if fidelity == "official":
        pool["age_short_term"] = False
    out: dict[str, Any] = {
        "pool": pool,
        "injector": {"bos": "learned" if bos else "none"},
        "adapters": {
            "rank": int(lora["r"]),
            "alpha": float(lora["lora_alpha"]),
            "dropout": float(lora.get("lora_dropout") or 0.0),
            "targets": list(lora["target_modules"]),
            "names": names,
        },
    }
    if rope_scaling:
        out["rope_scaling"] = rope_scaling
    if mplus:
        out["retrieve"] = int(config["num_ltm_blocks"]) * k
        out["store"] = {
            "capacity": int(config.get("ltm_capacity") or MPLUS_STORE_CAPACITY),
            "merge_every": int(config["update_ltm_frequency"]),
            "dtype": str(dtype).removeprefix("torch."),
        }
        out["retriever"] = {"key_size": int(config["selector_hidden_dim"])}
    return out


@dataclass
class _Prepared:
    plan: CheckpointPlan
    tensors: _Tensors
    model: LlamaForCausalLM  # on the meta device
    base_names: dict[str, str]  # checkpoint name -> name in the plain (LoRA-free) model
    dtype: torch.dtype


def _prepare(path: str | os.PathLike[str], fidelity: Fidelity, dtype: torch.dtype | str | None) -> _Prepared:
    if fidelity not in ("memkit", "official"):
        raise InputError(f"fidelity must be 'memkit' or 'official', got {fidelity!r}")
    folder = _local_folder(path)
    config = _read_config(folder)
    tensors = _Tensors(folder)
    present = tensors.shapes
    mplus = any(_LTM.match(name) for name in present) or int(config.get("num_ltm_blocks") or 0) > 0
    _check_config(config, mplus, folder)
    torch_dtype = _resolve_dtype(dtype, config)

    backbone_rope, recipe_rope = _rope(config)
    fields = {key: config[key] for key in _LLAMA_KEYS if config.get(key) is not None}
    try:
        llama_config = LlamaConfig(**fields, rope_parameters=backbone_rope)
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config)
    except Exception as exc:
        raise CheckpointError(f"cannot build the Llama backbone from {folder}/config.json: {exc}") from exc

    layers, d = int(config["num_hidden_layers"]), int(config["hidden_size"])
    lora = config["lora_config"]
    rank, targets = int(lora["r"]), set(lora["target_modules"])
    decoder_lora = bool(config.get("add_decoder_lora", mplus))
    adapter_names = ["default", "decoder_adapter"] if decoder_lora else ["default"]
    bos = bool(config["add_bos_embedding"]) if "add_bos_embedding" in config else "bos_embedding" in present
    tied = bool(config.get("tie_word_embeddings", False))

    expected: dict[str, tuple[tuple[int, ...], str]] = {}  # required: name -> (shape, destination)
    optional: dict[str, tuple[tuple[int, ...] | None, str]] = {}  # accepted if present: (shape, note)
    base_names: dict[str, str] = {}
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        ckpt = f"{owner}.base_layer.{leaf}" if owner in linears else name
        if tied and name == "lm_head.weight":
            optional[name] = (tuple(tensor.shape), "ignored: " + _WHY_TIED)
            continue
        expected[ckpt] = (tuple(tensor.shape), f"base model {ckpt}")
        base_names[ckpt] = name
    for module_name, module in linears.items():
        for adapter in adapter_names:
            for part, shape in (("lora_A", (rank, module.in_features)), ("lora_B", (module.out_features, rank))):
                name = f"{module_name}.{part}.{adapter}.weight"
                role = "write" if adapter == "default" else "read"
                expected[name] = (shape, f"LoRA adapter {adapter!r} ({role}), base model {name}")

    k = int(config["num_tokens"])
    short = (int(config["num_blocks"]) - int(config.get("num_ltm_blocks") or 0)) * k
    expected["memory"] = ((layers, short, d), "pool vectors (short-term memory)")
    expected["new_memory_positional_emb"] = ((1, 1, d), "injector.new_memory_positional_emb")
    if bos:
        expected["bos_embedding"] = ((layers, 1, d), "injector.bos_embedding")
    optional["initialized"] = (
        None,
        "pool initial state (0: an empty pool whose first write tiles; 1: memory is the pool)",
    )
    if mplus:
        key = int(config["selector_hidden_dim"])
        hidden = 2 * key
        for layer in range(layers):
            size = next(
                (present[f"{p}.{layer}"][0] for p in ("ltm", "ltm_keys", "ltm_ages") if present.get(f"{p}.{layer}")), 0
            )
            expected[f"ltm.{layer}"] = ((size, d), f"store layer {layer} vectors (merged)")
            expected[f"ltm_keys.{layer}"] = ((size, key), f"store layer {layer} keys")
            expected[f"ltm_ages.{layer}"] = ((size,), f"store layer {layer} ages")
            optional[f"ltm_recall_frequencies.{layer}"] = ((size,), "ignored: " + _WHY_RECALL)
            attn = f"model.layers.{layer}.self_attn"
            for proj in ("query_proj", "key_proj"):
                expected[f"{attn}.{proj}.0.weight"] = ((hidden, d), f"retriever.{proj}[{layer}][0].weight")
                expected[f"{attn}.{proj}.2.weight"] = ((key, hidden), f"retriever.{proj}[{layer}][2].weight")
            optional[f"{attn}.encoder_query_proj.0.weight"] = ((hidden, d), "ignored: " + _WHY_ENCODER_QUERY)
            optional[f"{attn}.encoder_query_proj.2.weight"] = ((key, hidden), "ignored: " + _WHY_ENCODER_QUERY)

    missing = sorted(set(expected) - set(present))
    unknown = sorted(set(present) - set(expected) - set(optional))
    wrong = []
    for name, got in sorted(present.items()):
        want = expected[name][0] if name in expected else optional.get(name, (None, ""))[0]
        if name == "initialized" and got not in ((), (1,)):
            wrong.append(f"initialized {list(got)} (expected a scalar)")
        elif want is not None and got != want:
            wrong.append(f"{name} {list(got)} (expected {list(want)})")
    if missing or unknown or wrong:
        kind = "M+" if mplus else "MemoryLLM"
        raise CheckpointError(
            f"{folder} is not a {kind} checkpoint in the official layout that memkit can read (config.json: "
            f"{layers} layers, d={d}, K={k}, adapters {adapter_names}): {tensor_problems(missing, unknown, wrong)}"
        )

    initialized: bool | None = None
    if "initialized" in present:
        initialized = bool(tensors.read(["initialized"])["initialized"].reshape(-1)[0].item())
    loaded = {name: dest for name, (_, dest) in expected.items()}
    ignored = {}
    for name, (_, note) in optional.items():
        if name not in present:
            continue
        if note.startswith("ignored: "):
            ignored[name] = note.removeprefix("ignored: ")
        else:
            loaded[name] = note
    if initialized is False:
        ignored["memory"] = _WHY_UNINITIALISED
        del loaded["memory"]
    plan = CheckpointPlan(
        folder=folder,
        kind="mplus" if mplus else "memoryllm",
        config=config,
        overrides=_overrides(config, mplus, adapter_names, fidelity, torch_dtype, bos, recipe_rope),
        loaded=dict(sorted(loaded.items())),
        ignored=dict(sorted(ignored.items())),
        initialized=initialized,
    )
    return _Prepared(plan, tensors, model, base_names, torch_dtype)


def inspect_checkpoint(
    path: str | os.PathLike[str], *, fidelity: Fidelity = "memkit", dtype: torch.dtype | str | None = None
) -> CheckpointPlan:
    """Check an official checkpoint folder and say what :func:`from_pretrained` would do with each tensor.

    Reads ``config.json`` and the safetensors headers (and the one-byte ``initialized`` buffer), not the
    weights. Raises what :func:`from_pretrained` raises for a folder it cannot read.
    """
    return _prepare(path, fidelity, dtype).plan


# -- official-fidelity parts --------------------------------------------------------------------------------


class _OfficialKVInjector(KVInjector):
    """:class:`KVInjector` with the official MemoryLLM's first-write quirk.

    On the first write into uninitialised (empty) memory, the official code stores each layer's output
    without a copy, and the next layer adds ``new_memory_positional_emb`` to that same buffer in place; so
    the new memory of every layer but the last carries one extra ``new_memory_positional_emb``.
    """

    def capture(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        new = super().capture(input_ids, memory)
        emb = self.new_memory_positional_emb
        if memory.shape[1] == 0 and emb is not None and new.shape[0] > 1:
            new = torch.cat([new[:-1] + emb.to(new.dtype), new[-1:]], dim=0)
        return new


class _OfficialTieRetriever(ProjectorRetriever):
    """:class:`ProjectorRetriever` that orders equal ages as the official M+ code does.

    The official code sorts the selected entries oldest first with numpy's default (unstable) argsort;
    with numpy's SIMD sort off, the observed rule is: among equal ages, the entry later in the candidate
    list (long-term rows, then staged rows; memkit's entry ids) comes first.
    """

    def select(self, layer: int, hidden: torch.Tensor, store: LongTermStore, k: int) -> torch.Tensor:
        ids = super().select(layer, hidden, store, k)
        if ids.numel() < 2:
            return ids
        ages = store.ages(layer, ids) if isinstance(store, StagedStore) else store.get(layer, ids).ages
        later_first = torch.sort(ids, descending=True).indices
        return oldest_first(ids[later_first], ages[later_first])


# -- loading -------------------------------------------------------------------------------------------------


def _materialise(model: LlamaForCausalLM, state: dict[str, torch.Tensor], tied: bool, device: torch.device) -> None:
    """Put ``state`` into the meta-device ``model`` and rebuild the buffers a checkpoint does not hold."""
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"these tensors of the backbone were not filled from the checkpoint: {', '.join(left)}")


def _copy(target: torch.Tensor | None, value: torch.Tensor, what: str) -> None:
    if target is None:
        raise CheckpointError(f"the wrapped model has no {what} to load the checkpoint's tensor into")
    with torch.no_grad():
        target.copy_(value)


def from_pretrained(
    path: str | os.PathLike[str],
    *,
    model: Any = None,
    tokenizer: Any = None,
    fidelity: Fidelity = "memkit",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> MemkitModel:
    """Load a memkit checkpoint, or a MemoryLLM or M+ checkpoint in the official layout, from a local folder.

    A folder holding ``memkit_config.json`` is a checkpoint that :func:`memkit.pretrained.save_pretrained`
    wrote: it goes to :func:`memkit.pretrained.load_pretrained` with ``model``, ``tokenizer``, ``device``
    and ``dtype`` (the base model comes from ``model=``, or from the folder when it was saved with it; see
    ``docs/pretrained.md``). Every other folder is read as an official checkpoint, as follows.

    The official folder holds ``config.json`` (``model_type`` ``memoryllm``: Llama fields plus MemoryLLM's and M+'s)
    and ``model.safetensors`` or shards named by ``model.safetensors.index.json``. Nothing is downloaded:
    fetch ``YuWangX/memoryllm-8b`` or ``YuWangX/mplus-8b`` first (``huggingface-cli download ... --local-dir``).

    The recipe is ``mplus`` if the checkpoint has long-term memory (``ltm*`` tensors), else ``memoryllm``,
    with its numbers taken from the config: pool capacity ``(num_blocks - num_ltm_blocks) * num_tokens``,
    ``write_size = num_tokens``, ``per_layer = drop_memory_per_layer``; for M+ ``retrieve = num_ltm_blocks
    * num_tokens``, store ``merge_every = update_ltm_frequency`` (capacity 153,600 unless the config has
    ``ltm_capacity``; in the model's dtype), retriever ``key_size = selector_hidden_dim``; LoRA adapters
    from ``lora_config``, named ``default`` (writes) and, with ``add_decoder_lora``, ``decoder_adapter``
    (reads), so that their tensor names are the checkpoint's. A ``linear`` (or other non-``llama3``)
    ``rope_scaling`` becomes the recipe's ``rope_scaling``; Llama-3.1's own ``llama3`` scaling stays in
    the backbone.

    Memory: with ``initialized`` = 0 the pool starts empty and tiles its first write (the stored memory is
    unused, as in the official code); otherwise (1, or no buffer as in M+) the stored memory is the pool.
    Stored short-term memory has no ages or sources: sources are ``-1``; ages see ``fidelity``. The
    long-term memory goes into the store as merged entries (ages from ``ltm_ages``, sources ``-1``).
    ``encoder_query_proj`` and ``ltm_recall_frequencies`` are accepted and ignored (logged at INFO;
    :func:`inspect_checkpoint` lists them with the reason).

    Args:
        path: the local checkpoint folder.
        model: for a memkit checkpoint only: the base model to wrap (required unless the checkpoint holds
            its base model). An official checkpoint builds its own Llama backbone and refuses it.
        tokenizer: optional tokenizer for :meth:`~memkit.model.MemkitModel.inject` of text. The official
            models take prompts without a BOS token (the learned per-layer BOS replaces it).
        fidelity: ``"memkit"`` (default): memkit's behaviour, which fixes the official code's bugs: the
            loaded short-term memory gets ages ``s-1..0`` by slot (the smallest ages its order allows),
            every write ages the pool, ties among equal ages keep the retriever's score order, and the
            first write into uninitialised MemoryLLM memory has no aliasing quirk.
            ``"official"``: reproduces the official code where it differs: short-term ages start at 0
            after loading and never advance (pool ``age_short_term = False``), so rows reach the
            long-term memory with ages ``K-1..0``; among equal ages the retrieved entry later in the
            candidate list comes first (the official order with numpy's SIMD sort off); in MemoryLLM, the
            first write into uninitialised memory adds ``new_memory_positional_emb`` once more to the new
            memory of every layer but the last. Not reproduced in either mode: M+'s recall-frequency
            eviction (memkit evicts oldest-first past capacity) and its cyclic padding when the long-term
            memory holds fewer entries than ``retrieve`` (memkit retrieves fewer).
        dtype: ``torch.float32``, ``float16`` or ``bfloat16`` (or their names); ``None`` takes config.json's
            ``torch_dtype`` (float32 for the released checkpoints).
        device: where the backbone, memkit's parameters and the short-term memory go (default CPU);
            the long-term store stays on the CPU, as in M+.

    Returns:
        the wrapped model, in eval mode.

    Raises:
        CheckpointError: ``path`` is not a local folder (a hub id says to download it first), config.json
            lacks a needed field or has a setting memkit cannot reproduce, or tensors are missing, unknown
            or of the wrong shape (the message lists every one). For a memkit checkpoint, what
            :func:`memkit.pretrained.load_pretrained` raises.
        InputError: a bad ``fidelity`` or ``dtype``; ``fidelity="official"`` for a memkit checkpoint;
            ``model=`` for an official checkpoint.
    """
    if (Path(path).expanduser() / "memkit_config.json").is_file():
        from memkit.pretrained import load_pretrained

        if fidelity != "memkit":
            raise InputError(
                f"{path} is a memkit checkpoint (it has memkit_config.json); fidelity applies to official "
                "checkpoints only, so leave it at 'memkit'"
            )
        return load_pretrained(path, model=model, tokenizer=tokenizer, device=device, dtype=dtype)
    if model is not None:
        raise InputError(
            f"model= is for memkit checkpoints (folders with memkit_config.json), and {path} has none; an "
            "official checkpoint builds its own Llama backbone from config.json, so leave model= out"
        )
    prep = _prepare(path, fidelity, dtype)
    plan, tensors, model = prep.plan, prep.tensors, prep.model
    tied = bool(plan.config.get("tie_word_embeddings", False))

    base = tensors.read(prep.base_names)
    target = torch.device(device) if device is not None else torch.device("cpu")
    state = {
        prep.base_names[name]: t.to(device=target, dtype=prep.dtype if t.is_floating_point() else t.dtype)
        for name, t in base.items()
    }
    del base
    _materialise(model, state, tied, target)
    del state
    model.eval()
    generation = plan.folder / "generation_config.json"
    if generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(plan.folder)

    mem = wrap(model, plan.kind, tokenizer=tokenizer, **plan.overrides)
    try:
        _load_memkit_parts(mem, prep, fidelity)
    except BaseException:
        mem.unwrap()
        raise
    mem.eval()
    if plan.ignored:
        logger.info(
            "memkit.from_pretrained(%s): %d tensor(s) not used: %s",
            plan.folder,
            len(plan.ignored),
            "; ".join(f"{name}: {why}" for name, why in plan.ignored.items()),
        )
    return mem


def _load_memkit_parts(mem: MemkitModel, prep: _Prepared, fidelity: Fidelity) -> None:
    plan, tensors = prep.plan, prep.tensors
    mplus = plan.kind == "mplus"
    layers = mem.backbone.num_layers
    if fidelity == "official":
        if not mplus and isinstance(mem.injector, KVInjector):
            mem.injector = _OfficialKVInjector(
                mem.injector.config, backbone=mem.backbone, write_size=mem.pool.write_size
            )
        if mplus and isinstance(mem.retriever, ProjectorRetriever):
            mem.retriever = _OfficialTieRetriever(mem.retriever.config, backbone=mem.backbone)

    lora_names = [name for name in plan.loaded if ".lora_" in name]
    missing, unexpected = mem.base_model.load_state_dict(tensors.read(lora_names), strict=False)
    left = sorted(set(n for n in missing if ".lora_" in n))
    if left or unexpected:
        raise CheckpointError(
            f"the recipe's adapters do not match the checkpoint's: not in the checkpoint {left}, "
            f"not in the model {sorted(unexpected)}"
        )

    extra = tensors.read(n for n in ("bos_embedding", "new_memory_positional_emb") if n in plan.loaded)
    if "bos_embedding" in extra:
        _copy(getattr(mem.injector, "bos_embedding", None), extra["bos_embedding"], "injector.bos_embedding")
    _copy(
        getattr(mem.injector, "new_memory_positional_emb", None),
        extra["new_memory_positional_emb"],
        "injector.new_memory_positional_emb",
    )

    if "memory" in plan.loaded:
        vectors = tensors.read(["memory"])["memory"]
        s = int(vectors.shape[1])
        if fidelity == "official":
            ages = torch.zeros(layers, s, dtype=torch.long)
        else:
            ages = torch.arange(s - 1, -1, -1, dtype=torch.long).expand(layers, s)
        sources = torch.full((layers, s), -1, dtype=torch.long)
        mem.pool.load_state_dict({"vectors": vectors, "ages": ages, "sources": sources})

    if not mplus:
        return
    assert mem.store is not None and mem.retriever is not None
    d, key = mem.backbone.hidden_size, mem.retriever.key_size
    store_state: dict[str, torch.Tensor] = {
        "updates": torch.tensor(0, dtype=torch.long),
        "evicted": torch.zeros(layers, dtype=torch.long),
    }
    for layer in range(layers):
        ltm = tensors.read([f"ltm.{layer}", f"ltm_keys.{layer}", f"ltm_ages.{layer}"])
        raw_ages = ltm[f"ltm_ages.{layer}"].double()
        if not bool(torch.isfinite(raw_ages).all()) or bool((raw_ages < 0).any()):
            raise CheckpointError(f"ltm_ages.{layer} holds negative or non-finite ages")
        ages = raw_ages.round().long()
        size = int(ages.shape[0])
        store_state[f"layers.{layer}.merged.vectors"] = ltm[f"ltm.{layer}"]
        store_state[f"layers.{layer}.merged.keys"] = ltm[f"ltm_keys.{layer}"]
        store_state[f"layers.{layer}.merged.ages"] = ages
        store_state[f"layers.{layer}.merged.sources"] = torch.full((size,), -1, dtype=torch.long)
        store_state[f"layers.{layer}.staged.vectors"] = torch.zeros(0, d)
        store_state[f"layers.{layer}.staged.keys"] = torch.zeros(0, key)
        store_state[f"layers.{layer}.staged.ages"] = torch.zeros(0, dtype=torch.long)
        store_state[f"layers.{layer}.staged.sources"] = torch.zeros(0, dtype=torch.long)
    try:
        mem.store.load_state_dict(store_state)
    except Exception as exc:
        raise CheckpointError(f"cannot load the checkpoint's long-term memory into the store: {exc}") from exc

    retriever = mem.retriever
    for proj in ("query_proj", "key_proj"):
        modules = getattr(retriever, proj, None)
        if not isinstance(modules, nn.ModuleList):
            raise CheckpointError(f"the recipe's retriever has no {proj} to load the checkpoint's selector into")
        names = [f"model.layers.{layer}.self_attn.{proj}.{i}.weight" for layer in range(layers) for i in (0, 2)]
        weights = tensors.read(names)
        for layer, block in enumerate(modules):
            for i in (0, 2):
                target = getattr(block[i], "weight", None) if isinstance(block, nn.Sequential) else None
                _copy(target, weights[f"model.layers.{layer}.self_attn.{proj}.{i}.weight"], f"retriever.{proj}")
