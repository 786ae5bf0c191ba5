"""Bad input gets a MemkitError that names what was wrong and what to do; nothing is half-written."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memkit
from memkit.testing import tiny_model


@pytest.fixture
def mem():
    m = memkit.wrap(tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    m.inject(torch.arange(3, 30))
    return m


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ("", memkit.EmptyInputError, "empty string"),
        ("   ", memkit.EmptyInputError, "empty string"),
        ([], memkit.EmptyInputError, "zero tokens"),
        (torch.zeros(1, 0, dtype=torch.long), memkit.EmptyInputError, "zero tokens"),
        ("some text", memkit.MissingTokenizerError, "pass tokenizer="),
        ([1, 2, 500], memkit.InputError, r"in \[0, 128\)"),
        ([-1, 2], memkit.InputError, r"in \[0, 128\)"),
        (torch.ones(2, 5, dtype=torch.long), memkit.InputError, "one text at a time"),
        (torch.ones(5, dtype=torch.float32), memkit.InputError, "must be integers"),
        (3.5, memkit.InputError, "expected text"),
        ([1, "a"], memkit.InputError, "expected text"),
        (torch.ones(1, 1, 3, dtype=torch.long), memkit.InputError, "shape"),
    ],
)
def test_bad_inject_input_is_refused_and_memory_is_unchanged(mem, data, error, match):
    before = mem.pool.read().clone()
    with pytest.raises(error, match=match):
        mem.inject(data)
    assert torch.equal(mem.pool.read(), before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_ids": None}, "input_ids are required"),
        ({"input_ids": torch.tensor([5, 6])}, r"\[batch, length\]"),
        ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, "zero tokens"),
        ({"input_ids": torch.tensor([[5.0, 6.0]])}, "integer token ids"),
        ({"input_ids": torch.tensor([[5, 999]])}, r"in \[0, 128\)"),
        ({"input_ids": torch.tensor([[5, 6]], device="meta")}, "move them with"),
        (
            {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 3)},
            "attention_mask has shape",
        ),
        ({"input_ids": torch.tensor([[5, 6]]), "past_key_values": object()}, "MemoryCache"),
    ],
)
def test_bad_forward_input_is_refused(mem, kwargs, match):
    with pytest.raises(memkit.InputError, match=match):
        mem(**kwargs)


def test_generate_refuses_a_cache_or_embeddings_of_its_own(mem):
    with pytest.raises(memkit.InputError, match="past_key_values"):
        mem.generate(torch.tensor([[5]]), past_key_values=None, max_new_tokens=1)
    with pytest.raises(memkit.InputError, match="inputs_embeds"):
        mem.generate(torch.tensor([[5]]), inputs_embeds=torch.zeros(1, 1, 32), max_new_tokens=1)


def test_a_module_that_is_not_a_transformers_model_is_refused():
    with pytest.raises(memkit.IncompatibleModelError, match="PreTrainedModel"):
        memkit.wrap(nn.Linear(3, 3), "memoryllm")


def test_a_model_whose_layers_do_not_use_the_kv_cache_is_refused():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(memkit.IncompatibleModelError, match="keys and values"):
        memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})


def test_a_plugin_part_that_produces_nan_leaves_memory_unchanged(mem):
    before = mem.pool.read().clone()
    original = mem.injector.capture

    def nan_capture(ids, memory):
        return original(ids, memory) * float("nan")

    mem.injector.capture = nan_capture
    try:
        with pytest.raises(memkit.InputError, match="NaN"):
            mem.inject(torch.arange(3, 40))
    finally:
        del mem.injector.capture
    assert torch.equal(mem.pool.read(), before)


def test_every_error_is_a_memkit_error_and_the_builtin_kind():
    assert issubclass(memkit.RecipeError, ValueError)
    assert issubclass(memkit.UnknownComponentError, LookupError)
    assert issubclass(memkit.InputError, ValueError)
    for cls in (
        memkit.RecipeError,
        memkit.UnknownComponentError,
        memkit.InputError,
        memkit.MemoryStateError,
        memkit.IncompatibleModelError,
        memkit.RegistrationError,
        memkit.PluginError,
    ):
        assert issubclass(cls, memkit.MemkitError)
