"""The mplus recipe on Llama-3.1-8B, built on the meta device: shapes, parameter counts, memory sizes.

Nothing is allocated: the model, memory and parameters live on PyTorch's ``meta`` device. The numbers
are M+'s (spec sections 1, 4, 5 and 7).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memkit

LLAMA_31_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_parameters": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def mplus_8b():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_31_8B))
    return memkit.wrap(model, "mplus")


def test_llama_31_8b_has_eight_billion_parameters(mplus_8b):
    base = sum(p.numel() for n, p in mplus_8b.base_model.named_parameters() if "lora_" not in n)
    assert 8.0e9 < base < 8.1e9  # 8.03B


def test_short_term_memory_is_40_blocks_of_256_per_layer(mplus_8b):
    assert (mplus_8b.pool.capacity, mplus_8b.pool.write_size) == (10240, 256)
    footprint = mplus_8b.memory_footprint()
    assert footprint["pool"] == 32 * 10240 * 4096 * 4  # 1.34B vectors in float32 (meta tensors are fp32)
    assert 32 * 10240 * 4096 == 1_342_177_280


def test_long_term_store_and_retrieval_sizes(mplus_8b):
    assert mplus_8b.recipe.retrieve == 2560
    assert mplus_8b.store.capacity == 153_600
    assert mplus_8b.retriever.key_size == 256
    footprint = mplus_8b.memory_footprint()
    assert footprint["store"] == 32 * 153_600 * (4096 + 256) * 2  # bfloat16 vectors and keys
    # one read: BOS + 2,560 retrieved + 10,240 short-term positions, keys and values, 8 KV heads of 128
    assert footprint["read_cache"] == 32 * 2 * (1 + 2560 + 10240) * 8 * 128 * 4


def test_two_rank_16_lora_adapters_of_37_7_million_parameters_each(mplus_8b):
    lora = {n: p for n, p in mplus_8b.base_model.named_parameters() if "lora_" in n}
    for name in ("write", "read"):
        count = sum(p.numel() for n, p in lora.items() if f".{name}." in n)
        assert count == 37_748_736
    a = mplus_8b.base_model.model.layers[0].self_attn.q_proj.lora_A["write"].weight
    assert tuple(a.shape) == (16, 4096)
    assert not any("o_proj.lora" in n for n in lora)


def test_projector_retriever_shapes_match_the_official_checkpoint(mplus_8b):
    retriever = mplus_8b.retriever
    assert tuple(retriever.query_proj[0][0].weight.shape) == (512, 4096)
    assert tuple(retriever.query_proj[0][2].weight.shape) == (256, 512)
    assert sum(p.numel() for p in retriever.parameters()) == 32 * 2 * (4096 * 512 + 512 * 256)
    assert tuple(mplus_8b.injector.bos_embedding.shape) == (32, 1, 4096)
    assert tuple(mplus_8b.injector.new_memory_positional_emb.shape) == (1, 1, 4096)


def test_everything_stays_on_the_meta_device(mplus_8b):
    assert mplus_8b.pool.read().device.type == "meta"
    assert all(p.device.type == "meta" for p in mplus_8b.parameters())


def test_the_scaling_rule_gives_back_the_reference_numbers_on_llama_31_8b(mplus_8b):
    overrides = memkit.scale_recipe(mplus_8b.base_model)
    recipe = memkit.load_recipe("mplus")
    assert overrides["pool"] == {"capacity": recipe.pool.options["capacity"], "write_size": 256}
    assert overrides["retrieve"] == recipe.retrieve == 2560
    assert overrides["store"]["capacity"] == recipe.store.options["capacity"] == 153_600
    assert overrides["retriever"]["key_size"] == 256 and overrides["chunk_size"] == 512


def test_the_scaling_rule_fits_a_small_window():
    from memkit.testing import tiny_model

    model = tiny_model(
        "llama", max_position_embeddings=8192, hidden_size=576, num_attention_heads=9, num_key_value_heads=3
    )
    overrides = memkit.scale_recipe(model)
    assert overrides["pool"] == {"capacity": 5120, "write_size": 128}
    assert overrides["retrieve"] == 1280 and overrides["chunk_size"] == 256
    assert overrides["retriever"]["key_size"] == 40
    mem = memkit.wrap(model, "mplus", **overrides)
    assert 1 + mem.recipe.retrieve + mem.pool.capacity + mem.recipe.chunk_size <= 8192
