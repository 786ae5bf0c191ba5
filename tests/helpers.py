"""Test helpers: an independent reference for reading memory, and loading the benchmark scripts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers import PreTrainedModel

from memkit.backbone import Backbone


def concat_reference_logits(model: PreTrainedModel, memory: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``input_ids`` ``[1, n]`` when ``memory[i]`` ``[p, d]`` is concatenated before layer i's input.

    Runs the model's ordinary forward over ``p + n`` positions; a pre-hook on every decoder layer
    overwrites the first ``p`` positions of its input with that layer's memory. Causal attention lets
    every token see all memory; the memory rows' outputs are discarded. This is the definition that
    memkit's cache-based read path must match.
    """
    layers = Backbone(model).layers
    p = memory.shape[1]
    embeds = model.get_input_embeddings()(input_ids)
    full = torch.cat([embeds.new_zeros(1, p, embeds.shape[-1]), embeds], dim=1)
    handles = []

    def make(i: int):
        def pre(module, args, kwargs):
            hidden = torch.cat([memory[i].unsqueeze(0).to(args[0].dtype), args[0][:, p:]], dim=1)
            return (hidden, *args[1:]), kwargs

        return pre

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make(i), with_kwargs=True))
        return model(inputs_embeds=full).logits[:, p:]
    finally:
        for h in handles:
            h.remove()


# -- the official MemoryLLM reference (tests/fixtures/official-memoryllm-tiny) -------------------------------

OFFICIAL_ATOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, atol: float = OFFICIAL_ATOL) -> bool:
    """Same shape and max absolute difference at most ``atol``."""
    return a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= atol


def set_pool_memory(mem, vectors: torch.Tensor) -> None:
    """Put ``vectors`` ``[l, n, d]`` in the pool (ages and sources zero)."""
    lyr, n, _ = vectors.shape
    zeros = torch.zeros(lyr, n, dtype=torch.long)
    mem.pool.load_state_dict({"vectors": vectors, "ages": zeros, "sources": zeros})


def check_official_scenario_a_from_a1(mem, ref: dict[str, torch.Tensor]) -> None:
    """From A1's memory: read, inject context 2 (seed 7), read and generate as the official code did."""
    set_pool_memory(mem, ref["A1_memory"])
    assert close(mem(ref["input_prompt"]).logits, ref["A1_logits_prompt"])
    torch.manual_seed(7)
    mem.inject(ref["input_context2"])
    assert close(mem.pool.read(), ref["A2_memory"])
    assert close(mem(ref["input_prompt"]).logits, ref["A2_logits_prompt"])
    out = mem.generate(
        ref["input_prompt"],
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, ref["A2_generate_ids"])
    assert close(torch.stack(out.logits, dim=1), ref["A2_generate_step_logits"])


def check_official_scenario_b(mem, ref: dict[str, torch.Tensor]) -> None:
    """With the checkpoint's memory in the pool: read, inject context 1 (seed 7), read, as the official code did."""
    assert close(mem(ref["input_prompt"]).logits, ref["B0_logits_prompt"])
    torch.manual_seed(7)
    mem.inject(ref["input_context1"])
    assert close(mem.pool.read(), ref["B1_memory"])
    assert close(mem(ref["input_prompt"]).logits, ref["B1_logits_prompt"])


def full_state(mem: Any) -> dict[str, Any]:
    """Everything that makes up a wrapped model's memory: pool and store tensors, labels, the next provenance id."""
    state: dict[str, Any] = {f"pool.{k}": v.clone() for k, v in mem.pool.state_dict().items()}
    if mem.store is not None:
        state.update({f"store.{k}": v.clone() for k, v in mem.store.state_dict().items()})
    state["source_labels"] = dict(mem.source_labels)
    state["next_source"] = mem._next_source
    return state


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Two :func:`full_state` results are equal: same keys, tensors equal in dtype and value, the rest equal."""
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == after[key].dtype and torch.equal(value, after[key]), f"{key} changed"
        else:
            assert value == after[key], f"{key} changed"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"memkit_benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
