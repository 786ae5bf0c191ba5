"""The read path: memory as a pre-filled cache equals memory concatenated into every layer's input."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing import TINY_FAMILIES, tiny_model
from tests.helpers import concat_reference_logits

FAMILIES = list(TINY_FAMILIES)


def _wrapped(family: str, recipe: str = "memoryllm", **overrides):
    model = tiny_model(family)
    options = {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8}}
    options.update(overrides)
    return model, memkit.wrap(model, recipe, **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_read_matches_concatenation_reference(family):
    model, mem = _wrapped(family)
    torch.manual_seed(1)
    mem.inject(torch.randint(3, 128, (40,)))
    ids = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        ours = mem(ids).logits
        prefix = torch.cat([mem.injector.bos_embedding, mem.pool.read()], dim=1)
        ref = concat_reference_logits(model, prefix, ids)
    assert mem.memory_size == 24
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_training_free_memory_equals_kv_cache_of_injected_tokens(family):
    # capture="input", a BOS sink and all memory in view: reading memory equals BOS + the text in the prompt.
    model, mem = _wrapped(
        family,
        "training-free",
        chunk_size=8,
        retrieve=0,
        pool={"capacity": 64, "write_size": 8},
        injector={"write_context": "all"},
    )
    text = torch.randint(3, 128, (21,))  # two full chunks and a short one
    mem.inject(text)
    prompt = torch.randint(3, 128, (1, 5))
    bos = torch.tensor([[model.config.bos_token_id]])
    with torch.no_grad():
        ours = mem(prompt).logits
        plain = model(torch.cat([bos, text.unsqueeze(0), prompt], dim=1)).logits[:, -5:]
    assert mem.memory_size == 21
    assert (ours - plain).abs().max().item() <= 1e-5


def test_memory_keys_and_values_are_computed_once_per_memory_version():
    _, mem = _wrapped("llama")
    mem.inject(torch.arange(3, 27))
    with torch.no_grad():
        first = mem.memory_prefix()
        mem(torch.tensor([[5, 6, 7]]))
        mem.generate(torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=False)
        assert mem.memory_prefix() is first
        mem.inject(torch.arange(30, 54))
        assert mem.memory_prefix() is not first


def test_with_gradients_enabled_the_memory_read_reaches_the_injector_parameters():
    _, mem = _wrapped("llama")
    mem.inject(torch.arange(3, 27))
    mem.injector.requires_grad_(True)
    loss = mem(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss
    loss.backward()
    assert mem.injector.bos_embedding.grad is not None
    assert mem.injector.bos_embedding.grad.abs().sum() > 0


def test_padded_batch_rows_match_their_unpadded_reads():
    _, mem = _wrapped("llama")
    mem.inject(torch.arange(3, 40))
    long = torch.tensor([[11, 12, 13, 14, 15]])
    short = torch.tensor([[21, 22, 23]])
    batch = torch.tensor([[11, 12, 13, 14, 15], [0, 0, 21, 22, 23]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        both = mem(batch, attention_mask=mask).logits
        one = mem(long).logits
        two = mem(short).logits
    assert (both[0] - one[0]).abs().max() <= 1e-5
    assert (both[1, 2:] - two[0]).abs().max() <= 1e-5


def test_labels_give_the_loss_of_the_base_model_over_the_memory_read():
    _, mem = _wrapped("llama")
    mem.inject(torch.arange(3, 40))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    out = mem(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_continuing_from_a_returned_cache_equals_one_longer_call():
    _, mem = _wrapped("llama")
    mem.inject(torch.arange(3, 40))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        whole = mem(ids).logits
        first = mem(ids[:, :4], use_cache=True)
        rest = mem(ids[:, 4:], past_key_values=first.past_key_values).logits
    assert (torch.cat([first.logits, rest], dim=1) - whole).abs().max() <= 1e-5


def test_empty_memory_reads_as_the_plain_model():
    model, mem = _wrapped("llama")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(mem(ids).logits, model(ids).logits)
