"""HF generate reads memory: greedy, sampling and beam search, batch of one or more."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing import tiny_model
from tests.helpers import concat_reference_logits

TEXT = torch.arange(10, 45)  # 35 tokens: four full chunks of 8 and a short one


@pytest.fixture
def free():
    model = tiny_model("llama")
    mem = memkit.wrap(
        model,
        "training-free",
        chunk_size=8,
        retrieve=0,
        pool={"capacity": 64, "write_size": 8},
        injector={"write_context": "all"},
    )
    mem.inject(TEXT)
    return model, mem


def _plain_generate(model, prompts: torch.Tensor, **kwargs) -> torch.Tensor:
    # memory of the training-free recipe equals the KV cache of BOS + TEXT: compare with them in the prompt.
    bos_text = torch.cat([torch.tensor([model.config.bos_token_id]), TEXT])
    with_text = torch.cat([bos_text.expand(prompts.shape[0], -1), prompts], dim=1)
    out = model.generate(with_text, attention_mask=torch.ones_like(with_text), **kwargs)
    return torch.cat([prompts.repeat_interleave(out.shape[0] // prompts.shape[0], 0), out[:, with_text.shape[1] :]], 1)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_equals_the_text_in_the_prompt(free, batch):
    model, mem = free
    prompts = torch.tensor([[50, 51, 52], [60, 61, 62]])[:batch]
    ours = mem.generate(prompts, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, _plain_generate(model, prompts, max_new_tokens=6, do_sample=False))


def test_beam_search_with_a_batch_of_two(free):
    model, mem = free
    prompts = torch.tensor([[50, 51, 52], [60, 61, 62]])
    kwargs = {"max_new_tokens": 5, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    ours = mem.generate(prompts, **kwargs)
    assert ours.shape[0] == 4
    assert torch.equal(ours, _plain_generate(model, prompts, **kwargs))


def test_sampling_with_a_seed_is_repeatable_and_matches_the_prompt_baseline(free):
    model, mem = free
    prompts = torch.tensor([[50, 51, 52], [60, 61, 62]])
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_k": 0, "temperature": 1.0}
    torch.manual_seed(3)
    first = mem.generate(prompts, **kwargs)
    torch.manual_seed(3)
    second = mem.generate(prompts, **kwargs)
    torch.manual_seed(3)
    plain = _plain_generate(model, prompts, **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(first, plain)


def test_greedy_generation_with_memoryllm_memory_matches_the_concatenation_reference():
    model = tiny_model("qwen2")
    mem = memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    mem.inject(torch.arange(3, 50))
    prompt = torch.tensor([[7, 8, 9]])
    ours = mem.generate(prompt, max_new_tokens=5, do_sample=False)
    prefix = torch.cat([mem.injector.bos_embedding, mem.pool.read()], dim=1).detach()
    ids = prompt
    with torch.no_grad():
        for _ in range(5):
            nxt = concat_reference_logits(model, prefix, ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(ours, ids)


def test_one_generate_call_does_not_leak_its_prompt_into_the_next(free):
    _, mem = free
    a = mem.generate(torch.tensor([[50, 51, 52]]), max_new_tokens=4, do_sample=False)
    mem.generate(torch.tensor([[70, 71, 72, 73, 74]]), max_new_tokens=4, do_sample=False)
    again = mem.generate(torch.tensor([[50, 51, 52]]), max_new_tokens=4, do_sample=False)
    assert torch.equal(a, again)
