"""The trainer on tiny models: paths, losses, stages, data, logs, checkpoints, resuming, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import memkit
from memkit.testing import tiny_model
from memkit.training import Documents, StageConfig, Trainer
from memkit.training.trainer import _Plan, _Step

SMALL = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 24, "write_size": 8, "seed": 0},
    "store": {"capacity": 200, "merge_every": 3},
    "retriever": {"key_size": 8},
}
FAST = {
    "min_chunk_tokens": 8,
    "max_chunk_tokens": 24,
    "min_target_tokens": 8,
    "max_target_tokens": 32,
    "max_contexts": 4,
    "learning_rate": 1e-3,
    "log_every": 5,
}


def _mplus(**overrides):
    return memkit.wrap(tiny_model("llama"), "mplus", **{**SMALL, **overrides})


def _docs(count=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(5, 120, (int(torch.randint(40, 160, (1,), generator=gen)),), generator=gen) for _ in range(count)
    ]


def _trainable(mem):
    names = [n for n, _ in mem.named_parameters() if "lora_" in n]
    out = {n: p.detach().clone() for n, p in mem.named_parameters() if n in names}
    out.update({f"injector.{n}": p.detach().clone() for n, p in mem.injector.named_parameters()})
    out.update({f"retriever.{n}": p.detach().clone() for n, p in mem.retriever.named_parameters()})
    return out


# ---------------------------------------------------------------------------------------------------
# stages in recipes
# ---------------------------------------------------------------------------------------------------


def test_the_mplus_recipe_defines_the_three_stages_with_the_spec_settings():
    stages = memkit.load_recipe("mplus").training
    assert list(stages) == ["stage1", "stage2", "stage3"]
    one, two, three = stages["stage1"], stages["stage2"], stages["stage3"]
    assert (one.learning_rate, one.multi_chunk_prob, one.train_retriever) == (4.6e-5, 0.8, False)
    assert (two.learning_rate, two.multi_chunk_prob, two.train_retriever) == (4.6e-6, 0.9, True)
    assert (three.empty_memory_prob, three.train_retriever, three.max_contexts) == (0.2, True, 200)
    for stage in (one, two, three):
        assert (stage.min_chunk_tokens, stage.max_chunk_tokens, stage.max_target_tokens) == (16, 512, 2048)
        assert (stage.retriever_learning_rate, stage.final_lr_factor, stage.decay_steps) == (1e-4, 0.1, 100_000)
    assert one.contexts_at(0) == 50 and one.contexts_at(100_000) == 100 and one.contexts_at(250_000) == 200


def test_stage_settings_round_trip_through_the_recipe_toml():
    recipe = memkit.load_recipe("mplus").with_overrides({"training": {"stage2": {"steps": 7}}})
    assert recipe.training["stage2"].steps == 7 and recipe.training["stage2"].learning_rate == 4.6e-6
    import tomllib

    again = memkit.Recipe.model_validate(tomllib.loads(recipe.to_toml()))
    assert again == recipe


def test_a_stage_the_recipe_lacks_is_refused_with_the_stages_it_has():
    with pytest.raises(memkit.TrainingError, match="no training stage 'stage9'.*stage1, stage2, stage3"):
        Trainer(_mplus(), _docs(), stage="stage9")


def test_invalid_stage_settings_are_refused():
    with pytest.raises(memkit.TrainingError, match="multi_chunk_prob"):
        Trainer(_mplus(), _docs(), stage="stage1", multi_chunk_prob=2.0)
    with pytest.raises(ValueError, match="min_chunk_tokens"):
        StageConfig(min_chunk_tokens=64, max_chunk_tokens=16)


def test_a_recipe_with_nothing_to_train_is_refused():
    mem = memkit.wrap(
        tiny_model("llama"), "training-free", chunk_size=8, retrieve=0, pool={"capacity": 32, "write_size": 8}
    )
    with pytest.raises(memkit.TrainingError, match="nothing to train"):
        Trainer(mem, _docs(), stage=StageConfig(steps=1))


def test_training_the_retriever_needs_a_trainable_retriever():
    mem = memkit.wrap(tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    with pytest.raises(memkit.TrainingError, match="no retriever"):
        Trainer(mem, _docs(), stage=StageConfig(steps=1, train_retriever=True))


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


class _CharTokenizer:
    """One token per character (a test double for a real tokenizer)."""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [5 + ord(c) % 100 for c in text]}


def test_text_and_jsonl_files_and_folders_are_read_as_documents(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 40)
    lines = [json.dumps({"text": "y" * 30}), "", json.dumps({"text": "z" * 50, "id": 3})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    docs = list(Documents(tmp_path, tokenizer=_CharTokenizer(), min_tokens=10))
    assert [(name, ids.numel()) for name, ids in docs] == [("a.txt", 40), ("b.jsonl:1", 30), ("b.jsonl:3", 50)]
    again = list(Documents([tmp_path / "b.jsonl"], tokenizer=_CharTokenizer()))
    assert len(again) == 2 and torch.equal(again[0][1], docs[1][1])


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(memkit.DataError, match="no usable documents"):
        list(Documents([]))
    with pytest.raises(memkit.DataError, match="does not exist"):
        Documents(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(memkit.DataError, match=r"bad.jsonl:1 has no string field 'text'"):
        list(Documents(tmp_path / "bad.jsonl", tokenizer=_CharTokenizer()))
    with pytest.raises(memkit.DataError, match="no tokenizer"):
        list(Documents(["some text"]))
    with pytest.raises(memkit.DataError, match="1-D integer tensor"):
        list(Documents([torch.zeros(3)]))


def test_documents_too_short_for_a_chunk_and_a_target_are_refused_or_skipped():
    docs = [torch.arange(5, 50), torch.arange(5, 12)]
    with pytest.raises(memkit.DataError, match=r"document #1 has 7 tokens, fewer than the 16"):
        list(Documents(docs, min_tokens=16))
    kept = Documents(docs, min_tokens=16, skip_short=True)
    assert len(list(kept)) == 1 and kept.skipped == 1
    with pytest.raises(memkit.DataError, match="all 1 were shorter"):
        list(Documents([torch.arange(5, 12)], min_tokens=16, skip_short=True))
    trainer = Trainer(_mplus(), [torch.arange(5, 12)], stage="stage1", **FAST)
    with pytest.raises(memkit.DataError, match="fewer than the 16"):
        trainer.train()


def test_a_process_whose_share_of_the_documents_is_empty_gets_an_error_not_an_endless_loop():
    trainer = Trainer(_mplus(), _docs(count=1), stage="stage1", **FAST)
    assert next(trainer._stream(0, 2))[0] == "#0"
    with pytest.raises(memkit.DataError, match="process 1 of 2 gets no document.*at least 2 documents"):
        next(trainer._stream(1, 2))


@pytest.mark.parametrize(
    ("kind", "zero_stage", "refused"),
    [("FSDP", None, "FSDP"), ("DEEPSPEED", 3, "DeepSpeed ZeRO-3"), ("DEEPSPEED", 2, None), ("MULTI_CPU", None, None)],
)
def test_an_accelerator_that_shards_parameters_is_refused_before_training(kind, zero_stage, refused):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop  # reached only when the accelerator was accepted

    accelerator = SimpleNamespace(
        distributed_type=DistributedType(kind),
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage) if zero_stage else None),
        prepare_model=stop,
    )
    mem = _mplus()
    before = {n: p.clone() for n, p in mem.named_parameters()}
    trainer = Trainer(mem, _docs(), stage="stage3", steps=1, accelerator=accelerator, progress=False, **FAST)
    with pytest.raises(
        memkit.TrainingError if refused else Stop, match=refused and f"shards parameters \\({refused}\\)"
    ):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in mem.named_parameters())


# ---------------------------------------------------------------------------------------------------
# the step: paths and losses
# ---------------------------------------------------------------------------------------------------


def _grads_after(mem, trainer, plan):
    for _, p in trainer.parameters:
        p.requires_grad_(True)
        p.grad = None
    mem.train()
    loss, lm_loss, ret_loss, delta = _Step(trainer)(plan)
    loss.backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in trainer.parameters}
    return grads, lm_loss, ret_loss, delta


def test_the_two_chunk_path_trains_the_write_adapter_and_the_multi_chunk_path_only_reads():
    mem = _mplus()
    # Non-zero LoRA B everywhere, so that gradients reach the A matrices too.
    with torch.no_grad():
        for n, p in mem.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    trainer = Trainer(mem, _docs(), stage="stage1", **FAST)
    ids = torch.arange(10, 60)
    grads, _, _, delta = _grads_after(mem, trainer, _Plan("two-chunk", [ids[:16]], ids[16:40], [mem.new_source()]))
    assert delta is not None and delta.requires_grad and delta.shape == (2, 8, 32)
    write = [n for n in grads if ".write." in n]
    read = [n for n in grads if ".read." in n]
    assert write and read and all(grads[n] for n in write) and all(grads[n] for n in read)
    assert grads["injector.bos_embedding"] and grads["injector.new_memory_positional_emb"]
    # Multi-chunk: the chunks were injected without gradient; only reading is trained.
    source = mem.new_source()
    with torch.no_grad():
        mem.write_vectors(mem.capture(ids[:16]), source)
    grads, _, _, delta = _grads_after(mem, trainer, _Plan("multi-chunk", [ids[:16]], ids[16:40], [source]))
    assert delta is None
    assert not any(grads[n] for n in write) and all(grads[n] for n in read)
    assert grads["injector.bos_embedding"] and not grads["injector.new_memory_positional_emb"]


def test_the_two_chunk_path_reads_only_the_new_vectors():
    mem = _mplus()
    mem.eval()
    mem.inject(torch.arange(20, 70))  # memory that the two-chunk path must not see
    trainer = Trainer(mem, _docs(), stage="stage1", **FAST)
    ids = torch.arange(10, 60)
    with torch.no_grad():
        delta = mem.capture(ids[:16])
        _, lm_loss, _, _ = _Step(trainer)(_Plan("two-chunk", [ids[:16]], ids[16:40], [0]))
        fresh = _mplus()
        fresh.eval()
        alone = fresh.forward_with_memory(ids[16:40].unsqueeze(0), delta, labels=ids[16:40].unsqueeze(0)).loss
    assert torch.allclose(lm_loss, alone, atol=1e-6)


def test_the_retriever_loss_is_m_plus_balanced_bce_on_detached_states():
    mem = _mplus()
    trainer = Trainer(mem, _docs(), stage="stage3", **FAST, negative_loss_weight=0.5)
    other, mine = mem.new_source(), mem.new_source()
    with torch.no_grad():
        mem.write_vectors(mem.capture(torch.arange(30, 46)), other)
        mem.write_vectors(mem.capture(torch.arange(50, 66)), mine)
    hidden = {layer: torch.randn(6, 32) for layer in range(2)}
    for _, p in trainer.parameters:
        p.requires_grad_(True)
    trainer._rng.seed(5)
    got = trainer._retriever_loss(hidden, _Plan("multi-chunk", [], torch.arange(5), [mine]))
    trainer._rng.seed(5)
    expected = []
    for layer in range(2):
        n = trainer._rng.randint(1, 6)
        q = mem.retriever.queries(layer, mem.backbone.input_norm(layer, hidden[layer][:n]))
        k = mem.retriever.keys(layer, mem.backbone.input_norm(layer, mem.pool.read()[layer]))
        w = torch.sigmoid(q @ k.T).mean(0)
        pos = mem.pool.sources()[layer] == mine
        expected.append((-(w[pos].log()).mean() + 0.5 * -((1 - w[~pos]).log()).mean()) / 1.5)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-5)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mem.retriever.parameters())
    # detached hidden states: nothing but the retriever learns from this loss
    assert not any(p.grad is not None for n, p in mem.named_parameters() if "lora_" in n)
    assert all(p.grad is None for p in mem.injector.parameters())


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------


def test_training_changes_the_trained_parts_only_and_memory_evolves_without_gradient(tmp_path):
    mem = _mplus()
    base = {n: p.detach().clone() for n, p in mem.base_model.named_parameters() if "lora_" not in n}
    before = _trainable(mem)
    history = Trainer(mem, _docs(), stage="stage3", steps=12, output_dir=tmp_path, progress=False, **FAST).train()
    after = _trainable(mem)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_A" not in n)
    assert all(torch.equal(p, base[n]) for n, p in mem.base_model.named_parameters() if "lora_" not in n)
    assert not any(p.requires_grad for p in mem.parameters()), "trained parts are frozen again after training"
    assert mem.pool.size == mem.pool.capacity and not mem.pool.read().requires_grad
    assert mem.store.size(0) > 0
    assert [r.step for r in history] == [5, 10, 12]
    for record, steps in zip(history, (5, 5, 2), strict=True):
        assert math.isfinite(record.loss) and record.tokens_per_second > 0 and 0 <= record.retention <= 1
        assert sum(record.paths.values()) == steps and record.retriever_loss is not None
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [5, 10, 12] and logged[0]["stage"] == "stage3"
    assert (tmp_path / "checkpoint-12" / "trainer_state.json").is_file()


def test_the_same_seed_repeats_a_run_exactly():
    runs = []
    for _ in range(2):
        mem = _mplus()
        history = Trainer(mem, _docs(), stage="stage3", steps=8, progress=False, **FAST).train()
        runs.append((_trainable(mem), [r.loss for r in history], mem.pool.read().clone()))
    (w1, l1, p1), (w2, l2, p2) = runs
    assert l1 == l2 and torch.equal(p1, p2)
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    mem = _mplus()
    Trainer(mem, _docs(), stage="stage3", steps=8, progress=False, **{**FAST, "seed": 1}).train()
    assert not all(torch.equal(w1[n], t) for n, t in _trainable(mem).items())


def test_resuming_from_a_checkpoint_continues_the_run_exactly(tmp_path):
    mem = _mplus()
    Trainer(
        mem, _docs(), stage="stage3", steps=10, save_every=5, output_dir=tmp_path / "a", progress=False, **FAST
    ).train()
    straight = _trainable(mem)
    assert (tmp_path / "a" / "checkpoint-5").is_dir()
    resumed = _mplus()
    trainer = Trainer(
        resumed,
        _docs(),
        stage="stage3",
        steps=10,
        output_dir=tmp_path / "b",
        resume_from=tmp_path / "a" / "checkpoint-5",
        progress=False,
        **FAST,
    )
    history = trainer.train()
    assert history[0].step == 5 and history[-1].step == 10
    assert all(torch.equal(straight[n], t) for n, t in _trainable(resumed).items())
    assert torch.equal(mem.pool.read(), resumed.pool.read())
    saved = load_file(str(tmp_path / "b" / "checkpoint-10" / "trainable.safetensors"))
    assert set(saved) == {n for n, _ in trainer.parameters}
    # ordinary files, as open() would make them under this umask (safetensors alone makes them private)
    mask = os.umask(0)
    os.umask(mask)
    files = list((tmp_path / "b" / "checkpoint-10").iterdir())
    assert files and all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in files)


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path):
    Trainer(_mplus(), _docs(), stage="stage3", steps=2, output_dir=tmp_path, progress=False, **FAST).train()
    other = _mplus(pool={**SMALL["pool"], "capacity": 32})
    with pytest.raises(memkit.TrainingError, match="another recipe or model.*recipe_sha256"):
        Trainer(other, _docs(), stage="stage3", steps=4, resume_from=tmp_path / "checkpoint-2", **FAST).train()
    with pytest.raises(memkit.TrainingError, match="not a memkit training checkpoint"):
        Trainer(_mplus(), _docs(), stage="stage3", steps=4, resume_from=tmp_path, **FAST).train()
    # An FSDP run's optimiser state is keyed by parameter name; a process that does not shard cannot take it.
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["parallel"] == "ddp"
    state_file.write_text(json.dumps({**state, "parallel": "fsdp"}))
    with pytest.raises(memkit.TrainingError, match="written by a parallel='fsdp' run.*resume it with parallel='fsdp'"):
        Trainer(_mplus(), _docs(), stage="stage3", steps=4, resume_from=tmp_path / "checkpoint-2", **FAST).train()


def test_a_trained_model_saves_and_loads_with_identical_logits(tmp_path):
    mem = _mplus()
    Trainer(mem, _docs(), stage="stage3", steps=6, progress=False, **FAST).train()
    mem.eval()
    mem.save_pretrained(tmp_path / "trained")
    loaded = memkit.from_pretrained(tmp_path / "trained", model=tiny_model("llama"))
    prompt = torch.arange(40, 52).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(mem(prompt).logits, loaded(prompt).logits)


def test_gradient_accumulation_takes_several_documents_per_step_and_the_schedule_counts_steps():
    mem = _mplus()
    history = Trainer(
        mem,
        _docs(),
        stage="stage3",
        steps=4,
        progress=False,
        **{**FAST, "log_every": 2, "gradient_accumulation_steps": 3, "decay_steps": 4},
    ).train()
    assert [sum(r.paths.values()) for r in history] == [6, 6]
    # linear decay from 1e-3 to 0.1 of it over 4 optimiser steps
    assert [r.learning_rate for r in history] == pytest.approx([1e-3 * 0.55, 1e-3 * 0.1])
