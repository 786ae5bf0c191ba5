"""M+ on tiny models: evicted memory goes to the long-term store and comes back per layer at reads."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.backbone import Backbone
from memkit.testing import tiny_model

SMALL = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 24, "write_size": 8, "seed": 0},
    "store": {"capacity": 200, "merge_every": 3},
    "retriever": {"key_size": 8},
}


def _mplus(family="llama", **overrides):
    options = {**SMALL, **overrides}
    return memkit.wrap(tiny_model(family), "mplus", **options)


def reference_logits(mem, input_ids):
    """Concatenate [bos | retrieved (chosen independently, per layer) | pool] into every layer's input."""
    model, bb = mem.base_model, Backbone(mem.base_model)
    stm = mem.pool.read()
    bos = mem.injector.bos_embedding
    k = mem.recipe.retrieve
    p = 1 + k + stm.shape[1]
    embeds = model.get_input_embeddings()(input_ids)
    full = torch.cat([embeds.new_zeros(1, p, embeds.shape[-1]), embeds], dim=1)
    handles = []
    for i, layer in enumerate(bb.layers):

        def pre(module, args, kwargs, i=i):
            hidden = args[0]
            prompt = hidden[0, p:]
            ids = mem.retriever.select(i, bb.input_norm(i, prompt), mem.store, k)
            ltm = mem.store.get(i, ids).vectors.to(hidden.dtype)
            prefix = torch.cat([bos[i], ltm, stm[i]], dim=0).unsqueeze(0)
            return (torch.cat([prefix, hidden[:, p:]], dim=1), *args[1:]), kwargs

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        return model(inputs_embeds=full).logits[:, p:]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3"])
@torch.no_grad()
def test_read_with_retrieval_matches_concatenating_retrieved_and_pool_memory(family):
    mem = _mplus(family)
    torch.manual_seed(0)
    for _ in range(4):
        mem.inject(torch.randint(3, 128, (40,)))
    assert mem.store.size(0) >= 8
    ids = torch.randint(3, 128, (1, 6))
    ours = mem(ids).logits
    assert (ours - reference_logits(mem, ids)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_evicted_vectors_go_to_the_store_and_nothing_is_lost():
    mem = _mplus(pool={"capacity": 24, "write_size": 8, "init": "empty"})  # tiling would add copies
    total = 0
    for _ in range(6):
        report = mem.inject(torch.randint(3, 128, (32,)))
        total += report.num_chunks * 8
    for layer in range(2):
        held = mem.pool.size + mem.store.size(layer) + mem.store.evicted(layer)
        assert held == total  # every written vector is in the pool, in the store, or counted as evicted


@torch.no_grad()
def test_ages_advance_for_short_and_long_term_memory_so_the_order_holds_after_long_runs():
    mem = _mplus(store={"capacity": 120, "merge_every": 5})
    for _ in range(40):  # far more updates than the pool or the store can hold
        mem.inject(torch.randint(3, 128, (16,)))
    for layer in range(2):
        store = mem.store.entries(layer)
        ages = torch.cat([store.ages, mem.pool.ages()[layer]])
        sources = torch.cat([store.sources, mem.pool.sources()[layer]])
        # written later (a larger source id) always means younger (a smaller age), across both tiers
        order = torch.argsort(sources, stable=True)
        later_younger = ages[order][1:] <= ages[order][:-1]
        same = sources[order][1:] == sources[order][:-1]
        assert bool((later_younger | same).all())
        assert mem.store.evicted(layer) > 0
        assert int(store.ages.min()) >= 0


@torch.no_grad()
def test_retrieval_brings_back_exactly_k_distinct_entries_oldest_first():
    mem = _mplus()
    for _ in range(5):
        mem.inject(torch.randint(3, 128, (32,)))
    hidden = torch.randn(5, 32)
    for layer in range(2):
        ids = mem.retriever.select(layer, hidden, mem.store, 8)
        ages = mem.store.get(layer, ids).ages
        assert len(set(ids.tolist())) == 8
        assert bool((ages[1:] <= ages[:-1]).all())


def _training_free(family="llama", **retriever):
    return memkit.wrap(
        tiny_model(family),
        "training-free",
        chunk_size=16,
        retrieve=12,
        pool={"capacity": 16, "write_size": 16},
        injector={"write_context": 16},
        store={"capacity": 200, "merge_every": 2},
        retriever=retriever,
    )


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@torch.no_grad()
def test_the_attention_retriever_scores_by_the_attention_mass_each_query_head_gives_an_entry(family):
    mem = _training_free(family, block=1)  # single entries (the recipe retrieves passages)
    for _ in range(6):
        mem.inject(torch.randint(5, 100, (1, 16)))
    retriever, store = mem.retriever, mem.store
    hidden = torch.randn(7, mem.backbone.hidden_size)
    queries = retriever._queries(1, hidden)  # [n, H, e]
    keys = store.keys(1).float().view(store.size(1), retriever.kv_heads, retriever.head_dim)
    group = retriever.heads // retriever.kv_heads
    mass = torch.zeros(store.size(1))
    for h in range(retriever.heads):  # head h reads key head h // group
        logits = queries[:, h] @ keys[:, h // group].T / retriever.head_dim**0.5  # [n, m]
        mass += logits.softmax(dim=-1).sum(dim=0)
    torch.testing.assert_close(retriever._mass(queries, store.keys(1)), mass)
    expected = set(mass.topk(12).indices.tolist())
    assert set(retriever.select(1, hidden, store, 12).tolist()) == expected


@torch.no_grad()
def test_block_retrieval_returns_the_best_runs_of_consecutive_entries_whole():
    torch.manual_seed(0)
    mem = _training_free(block=6)
    for _ in range(6):
        mem.inject(torch.randint(5, 100, (1, 16)))
    retriever, store = mem.retriever, mem.store
    size = store.size(0)
    assert size % 6 != 0  # the store's last run is short
    hidden = torch.randn(7, mem.backbone.hidden_size)
    mass = retriever._mass(retriever._queries(0, hidden), store.keys(0))
    runs = torch.zeros(-(-size // 6)).index_add_(0, torch.arange(size) // 6, mass)
    expected: list[int] = []  # runs of 6 stored entries, best first, until 12 ids (the last run cut short)
    for run in runs.argsort(descending=True).tolist():
        expected += range(run * 6, min(run * 6 + 6, size))
        if len(expected) >= 12:
            break
    ids = retriever.select(0, hidden, store, 12)
    assert len(set(ids.tolist())) == 12
    assert set(ids.tolist()) == set(expected[:12])
    ages = store.ages(0, ids)
    assert bool((ages[1:] <= ages[:-1]).all()), "oldest first, as M+ places them"
    # retrieval of every entry in runs still returns exactly k distinct ids (the short last run included)
    assert len(set(retriever.select(0, hidden, store, size).tolist())) == size


@torch.no_grad()
def test_each_row_of_a_batch_retrieves_for_itself():
    mem = _mplus()
    for _ in range(5):
        mem.inject(torch.randint(3, 128, (32,)))
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[90, 91, 92, 93]])
    both = mem(torch.cat([a, b]))
    assert torch.allclose(both.logits[0], mem(a).logits[0], atol=1e-5)
    assert torch.allclose(both.logits[1], mem(b).logits[0], atol=1e-5)


@torch.no_grad()
def test_generate_reads_retrieved_memory_and_equals_step_by_step_forward():
    mem = _mplus()
    for _ in range(5):
        mem.inject(torch.randint(3, 128, (32,)))
    prompt = torch.tensor([[5, 6, 7]])
    out = mem.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    # retrieval runs once, at prefill, on the prompt; decoding reuses that cache, as in M+
    with mem._read(1, torch.ones_like(prompt)) as cache:
        step = mem._forward(prompt, torch.ones_like(prompt), None, cache, 0, {})
        logits = [step.logits[0, -1]]
        ids = prompt
        for _ in range(3):
            nxt = logits[-1].argmax().view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            step = mem._forward(nxt, torch.ones_like(nxt), None, cache, ids.shape[1] - 1, {})
            logits.append(step.logits[0, -1])
    assert torch.allclose(torch.stack(out.logits, 1)[0], torch.stack(logits), atol=1e-5)
    assert out.sequences.shape == (1, 7)


def test_store_is_saved_and_loaded_with_the_memory(tmp_path):
    mem = _mplus()
    for _ in range(5):
        mem.inject(torch.randint(3, 128, (32,)))
    mem.save_memory(tmp_path / "m.memkit")
    other = _mplus()
    other.load_memory(tmp_path / "m.memkit")
    for layer in range(2):
        a, b = mem.store.entries(layer), other.store.entries(layer)
        assert torch.equal(a.vectors, b.vectors) and torch.equal(a.ages, b.ages)
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7]])
        assert torch.equal(mem(ids).logits, other(ids).logits)


@torch.no_grad()
def test_a_failed_injection_leaves_the_store_unchanged():
    mem = _mplus()
    for _ in range(5):
        mem.inject(torch.randint(3, 128, (32,)))
    before = [mem.store.entries(layer).vectors.clone() for layer in range(2)]
    original = mem.retriever.keys

    def broken(layer, vectors):
        raise RuntimeError("retriever plugin failed")

    mem.retriever.keys = broken
    try:
        with pytest.raises(RuntimeError, match="plugin failed"):
            mem.inject(torch.randint(3, 128, (64,)))
    finally:
        mem.retriever.keys = original
    for layer in range(2):
        assert torch.equal(mem.store.entries(layer).vectors, before[layer])


def test_a_store_without_a_retriever_is_refused():
    with pytest.raises(memkit.RecipeError, match="long-term memory needs both"):
        memkit.wrap(
            tiny_model("llama"),
            "memoryllm",
            chunk_size=16,
            pool={"capacity": 24, "write_size": 8},
            store={"name": "exact", "capacity": 10},
        )


def test_a_retriever_returning_the_wrong_number_of_ids_is_refused():
    mem = _mplus()
    for _ in range(5):
        mem.inject(torch.randint(3, 128, (32,)))
    original = mem.retriever.select
    mem.retriever.select = lambda layer, hidden, store, k: original(layer, hidden, store, k)[:-1]
    with pytest.raises(memkit.PluginError, match="exactly 8 distinct"):
        mem(torch.tensor([[5, 6]]))


def test_retrieving_more_than_the_store_can_hold_is_refused():
    with pytest.raises(memkit.RecipeError, match="more than its store can ever hold"):
        _mplus(retrieve=16, store={"capacity": 10})


@torch.no_grad()
def test_a_retriever_returning_ids_out_of_range_gets_a_clear_error():
    mem = _mplus()
    for _ in range(5):
        mem.inject(torch.randint(3, 128, (32,)))
    size = mem.store.size(0)
    mem.retriever.select = lambda layer, hidden, store, k: torch.arange(size, size + k)
    with pytest.raises(memkit.InputError):
        mem(torch.tensor([[5, 6]]))
