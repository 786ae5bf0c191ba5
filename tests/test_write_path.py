"""The MemoryLLM write path: prefix, positional embedding, capture, short chunks, gradients."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.backbone import Backbone
from memkit.testing import tiny_model

K = 8


def _mem(family="llama", **injector):
    model = tiny_model(family)
    mem = memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": K}, injector=injector)
    with torch.no_grad():  # a non-zero new-memory embedding, so that leaving it out would show
        mem.injector.new_memory_positional_emb.normal_(0, 0.5)
    return model, mem


def reference_write(model, bos, memory, ids, pos_emb, reread):
    """New memory by concatenation: [bos | memory[-K:-r]] as prefix, memory[-r:] re-read, then the chunk."""
    layers = Backbone(model).layers
    prefix = torch.cat([bos, memory[:, memory.shape[1] - K : memory.shape[1] - reread]], dim=1)
    p = prefix.shape[1]
    embeds = model.get_input_embeddings()(ids)
    full = torch.cat([embeds.new_zeros(1, p + reread, embeds.shape[-1]), embeds], dim=1)
    out = {}
    handles = []
    for i, layer in enumerate(layers):

        def pre(module, args, kwargs, i=i):
            h = args[0]
            parts = [prefix[i].unsqueeze(0)]
            if reread:
                parts.append(memory[i, -reread:].unsqueeze(0))
            parts.append(h[:, p + reread :])
            h = torch.cat(parts, dim=1)
            h = torch.cat([h[:, :-K], h[:, -K:] + pos_emb], dim=1)
            return (h, *args[1:]), kwargs

        def post(module, args, output, i=i):
            out[i] = output[0, -K:]

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    try:
        model(inputs_embeds=full)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([out[i] for i in range(len(layers))])


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("n", [12, 5])  # a full chunk, and one shorter than K (re-read)
@torch.no_grad()
def test_new_memory_is_each_layers_output_after_the_last_k_memory_vectors(family, n):
    model, mem = _mem(family)
    mem.inject(torch.arange(3, 27))  # fill the pool (24 = N)
    before = mem.pool.read().clone()
    ids = torch.arange(40, 40 + n).unsqueeze(0)
    new = mem.injector.capture(ids, before)
    ref = reference_write(
        model,
        mem.injector.bos_embedding,
        before,
        ids,
        mem.injector.new_memory_positional_emb,
        reread=max(K - n, 0),
    )
    assert new.shape == (2, K, 32)
    assert (new - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_short_chunk_partial_writes_only_the_chunk_and_error_refuses_it():
    _, partial = _mem(short_chunk="partial")
    partial.inject(torch.arange(3, 27))
    partial.inject(torch.arange(40, 45))
    assert partial.pool.ages()[0, -5:].tolist() == [4, 3, 2, 1, 0]
    assert partial.memory_size == 24
    _, strict = _mem(short_chunk="error")
    with pytest.raises(memkit.InputError, match="shorter than K"):
        strict.inject(torch.arange(40, 45))


@torch.no_grad()
def test_a_document_is_cut_into_chunks_of_the_recipe_chunk_size():
    _, mem = _mem()
    report = mem.inject(torch.arange(3, 3 + 40))  # chunks of 16: 16, 16, 8
    assert (report.num_chunks, report.num_tokens) == (3, 40)
    assert mem.pool.sources().unique().tolist() == [report.source]


def test_with_gradients_the_injection_is_differentiable_end_to_end():
    # The two-chunk training path: loss on chunk 2 read through the memory chunk 1 wrote.
    _, mem = _mem()
    mem.injector.requires_grad_(True)
    new = mem.injector.capture(torch.arange(3, 19).unsqueeze(0), mem.pool.read())
    prefix = mem.injector.prefix(new)
    assert new.requires_grad and prefix.layer_kv[0][0].requires_grad
    keys = torch.stack([k.sum() + v.sum() for k, v in prefix.layer_kv]).sum()
    keys.backward()
    assert mem.injector.new_memory_positional_emb.grad.abs().sum() > 0
    assert mem.injector.bos_embedding.grad.abs().sum() > 0


@torch.no_grad()
def test_hooks_are_gone_after_an_injection_also_when_it_fails():
    model, mem = _mem()
    layers = Backbone(model).layers
    mem.inject(torch.arange(3, 27))
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    before = mem.pool.read().clone()
    layers[1].mlp.forward = boom
    try:
        with pytest.raises(RuntimeError, match="boom"):
            mem.inject(torch.arange(3, 60))
    finally:
        del layers[1].mlp.forward
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
    assert torch.equal(mem.pool.read(), before)
    assert list(Backbone(model).layers) == list(layers)
