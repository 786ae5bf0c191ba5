"""Training works: on a tiny model and a synthetic fact-recall task, trained M+ keeps facts longer.

The backbone is a tiny Llama (2 layers, d = 64) first trained, all weights, to answer a fact from its
context window (memkit.testing.facts.pretrain_in_context): it stands in for a pretrained LM. Then it
is frozen and wrapped. Both recipes keep each layer's *input* as memory (``capture = "input"``, as the
training-free recipe does: a randomly initialised tiny model cannot learn MemoryLLM's layer-output
memory in minutes, while this way the untrained memory already reads like the context), with the same
short-term pool: 64 vectors per layer, 16 written per chunk, random drops. ``memoryllm`` has only that
pool; ``mplus`` also keeps what the pool drops and brings 16 entries per layer back with its projector
retriever, which memkit's trainer fits (M+'s stage-3 retriever loss, the adapters nearly frozen).

Measured: a fact chunk, then k distractor chunks, then the question. With 16 distractors a fact's
vectors survive random drops with probability 0.75^16 = 1%, so ``memoryllm`` forgets it; ``mplus``
must retrieve it from the store.
"""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing import tiny_model
from memkit.testing.facts import CHUNK, pretrain_in_context, recall, training_documents
from memkit.training import StageConfig, Trainer

pytestmark = pytest.mark.slow

POOL = {"capacity": 64, "write_size": 16, "seed": 0}


def test_trained_mplus_keeps_facts_across_more_distractors_than_untrained_mplus_and_memoryllm():
    torch.manual_seed(0)
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    assert pretrain_in_context(model) < 0.05  # the backbone answers from its context
    common = {"chunk_size": CHUNK, "pool": POOL, "injector": {"capture": "input"}}

    plain = memkit.wrap(model, "memoryllm", **common)
    memoryllm = {k: recall(plain, k) for k in (0, 16)}
    plain.unwrap()

    mem = memkit.wrap(
        model,
        "mplus",
        retrieve=16,
        store={"capacity": 4000, "merge_every": 1},
        retriever={"key_size": 16},
        adapters={"rank": 8, "dropout": 0.0},
        **common,
    )
    untrained = recall(mem, 16)
    stage = StageConfig(
        steps=1500,
        learning_rate=1e-5,  # the adapters barely move: the retriever is what this stage trains
        retriever_learning_rate=1e-2,
        decay_steps=None,
        min_chunk_tokens=CHUNK,
        max_chunk_tokens=CHUNK,
        min_target_tokens=3,
        max_target_tokens=3,
        max_contexts=1,
        multi_chunk_prob=1.0,
        revisit_prob=0.0,
        plain_lm_prob=0.0,
        train_retriever=True,
        log_every=500,
    )
    history = Trainer(mem, training_documents(4000), stage=stage, progress=False, probe=False).train()
    trained = recall(mem, 16)
    report = f"memoryllm {memoryllm}, mplus untrained {untrained}, trained {trained}; history {history}"
    print(report)  # shown with -s or -rA: the figures docs/training.md reports

    assert memoryllm[0] >= 0.9, report  # with no distractor both recipes answer: memory reads like context
    assert memoryllm[16] <= 0.15, report  # the pool alone has dropped the fact
    assert trained >= untrained + 0.15, report  # training the retriever is what brings the fact back
    assert trained >= memoryllm[16] + 0.15, report
    assert recall(mem, 0) >= 0.9, report  # and training did not cost the short-term answers
