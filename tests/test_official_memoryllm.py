"""The memoryllm recipe reproduces the official MemoryLLM code on its tiny reference checkpoint.

The fixture (tests/fixtures/official-memoryllm-tiny, see its README) was made by running the official
code; scenario B and scenario A from A1_memory on are compared (A1 itself depends on an aliasing bug
of the original, which memkit does not reproduce).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import memkit
from tests.helpers import check_official_scenario_a_from_a1, check_official_scenario_b, close, set_pool_memory

FIXTURE = Path(__file__).parent / "fixtures" / "official-memoryllm-tiny"


@pytest.fixture(scope="module")
def official():
    raw = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
    ]
    model = LlamaForCausalLM(LlamaConfig(**{k: raw[k] for k in keys})).eval()
    lora = raw["lora_config"]
    inject_adapter_in_model(
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["lora_alpha"],
            lora_dropout=0.0,
            target_modules=lora["target_modules"],
        ),
        model,
    )
    weights = load_file(FIXTURE / "checkpoint" / "model.safetensors")
    extra = {k: weights.pop(k) for k in ("memory", "bos_embedding", "new_memory_positional_emb", "initialized")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not missing and not unexpected
    n, k = raw["num_blocks"] * raw["num_tokens"], raw["num_tokens"]
    mem = memkit.wrap(
        model,
        "memoryllm",
        chunk_size=512,
        pool={"capacity": n, "write_size": k, "per_layer": raw["drop_memory_per_layer"], "init": "tile"},
    )
    with torch.no_grad():
        mem.injector.bos_embedding.copy_(extra["bos_embedding"])
        mem.injector.new_memory_positional_emb.copy_(extra["new_memory_positional_emb"])
    return mem, load_file(FIXTURE / "reference.safetensors")


@torch.no_grad()
def test_uninitialised_memory_reads_as_the_plain_lora_model(official):
    mem, ref = official
    mem.reset_memory()
    assert close(mem(ref["input_prompt"]).logits, ref["A0_logits_prompt"])


@torch.no_grad()
def test_scenario_b_read_inject_and_random_drop_match_the_official_code(official):
    mem, ref = official
    set_pool_memory(mem, ref["A0_memory_checkpoint"])
    check_official_scenario_b(mem, ref)


@torch.no_grad()
def test_scenario_a_second_injection_and_generation_match_the_official_code(official):
    mem, ref = official
    check_official_scenario_a_from_a1(mem, ref)


@torch.no_grad()
def test_a_bos_token_id_in_the_prompt_is_an_ordinary_token(official):
    mem, ref = official
    set_pool_memory(mem, ref["A2_memory"])
    with_bos = torch.cat([torch.tensor([[1]]), ref["input_prompt"]], dim=1)
    assert close(mem(with_bos).logits, ref["A2_logits_prompt_with_bos_id1"])
