"""unwrap() gives back the base model exactly as it was before wrap()."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing import TINY_FAMILIES, tiny_model


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_unwrap_restores_parameters_modules_and_outputs(family):
    model = tiny_model(family)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before_logits = model(ids).logits
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_modules = [(name, type(m), id(m)) for name, m in model.named_modules()]
    before_grad = {k: p.requires_grad for k, p in model.named_parameters()}
    before_training = model.training

    mem = memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    mem.inject(torch.arange(3, 50))
    mem.generate(ids, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        mem(ids, labels=ids)
    back = mem.unwrap()

    assert back is model
    assert [(name, type(m), id(m)) for name, m in back.named_modules()] == before_modules
    assert back.state_dict().keys() == before_state.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in before_state.items())
    assert {k: p.requires_grad for k, p in back.named_parameters()} == before_grad
    assert back.training == before_training
    assert _hooks(back) == 0
    with torch.no_grad():
        assert torch.equal(back(ids).logits, before_logits)


def test_a_wrapper_cannot_be_used_after_unwrap():
    mem = memkit.wrap(tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    mem.unwrap()
    with pytest.raises(memkit.UnwrappedError):
        mem.inject([5, 6, 7])
    with pytest.raises(memkit.UnwrappedError):
        mem.generate(torch.tensor([[5]]), max_new_tokens=1)


def test_wrapping_a_wrapped_model_is_refused():
    mem = memkit.wrap(tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    with pytest.raises(memkit.IncompatibleModelError, match="already wrapped"):
        memkit.wrap(mem)


def test_unwrap_removes_the_recipe_lora_adapters_and_restores_the_model():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before_logits = model(ids).logits
    before_modules = [(name, type(m)) for name, m in model.named_modules()]
    before_grad = {k: p.requires_grad for k, p in model.named_parameters()}
    mem = memkit.wrap(
        model,
        "mplus",
        chunk_size=16,
        retrieve=8,
        pool={"capacity": 24, "write_size": 8},
        store={"capacity": 100},
        retriever={"key_size": 8},
        adapters={"rank": 2},
    )
    assert any("lora_A" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(mem(ids).logits, before_logits)  # fresh LoRA adapters are the identity
        for layer in mem.adapters.layers:  # make both adapters matter
            for adapter in ("write", "read"):
                layer.lora_B[adapter].weight.normal_()
    mem.inject(torch.arange(3, 60))
    back = mem.unwrap()
    assert [(name, type(m)) for name, m in back.named_modules()] == before_modules
    assert {k: p.requires_grad for k, p in back.named_parameters()} == before_grad
    assert "peft_config" not in vars(back)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, before_logits)


def test_the_write_adapter_is_active_while_writing_and_the_read_adapter_while_reading():
    model = tiny_model("llama")
    mem = memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8}, adapters={"rank": 2})
    seen = []
    layer = mem.adapters.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.active_adapters[0]))
    try:
        mem.inject(torch.arange(3, 20))
        written = set(seen)
        seen.clear()
        with torch.no_grad():
            mem(torch.tensor([[5, 6]]))
        read = set(seen)
    finally:
        handle.remove()
    assert written == {"write"} and read == {"read"}
