"""save_memory / load_memory: a file apart from the weights, atomic, refused for another model."""

from __future__ import annotations

import os

import pytest
import torch

import memkit
from memkit.testing import tiny_model


def _mem(recipe="memoryllm", family="llama", **overrides):
    options = {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8, "seed": 0}}
    options.update(overrides)
    return memkit.wrap(tiny_model(family), recipe, **options)


@torch.no_grad()
def test_round_trip_restores_vectors_ages_sources_and_outputs(tmp_path):
    mem = _mem()
    mem.inject(torch.arange(3, 40), label="doc-a")
    mem.inject(torch.arange(50, 80), label="doc-b")
    prompt = torch.tensor([[5, 6, 7]])
    before = mem(prompt).logits
    path = tmp_path / "notes.memkit"
    mem.save_memory(path)

    other = _mem()
    other.load_memory(path)
    for name in ("vectors", "ages", "sources"):
        assert torch.equal(other.pool.state_dict()[name], mem.pool.state_dict()[name])
    assert other.source_labels == {0: "doc-a", 1: "doc-b"}
    assert torch.equal(other(prompt).logits, before)
    # the seeded pool's generator travels too: the next random drop is the same in both
    mem.inject(torch.arange(90, 110))
    other.inject(torch.arange(90, 110))
    assert torch.equal(other.pool.read(), mem.pool.read())


def test_the_file_holds_memory_only_not_weights(tmp_path):
    from safetensors import safe_open

    mem = _mem()
    mem.inject(torch.arange(3, 40))
    mem.save_memory(tmp_path / "m.memkit")
    with safe_open(str(tmp_path / "m.memkit"), framework="pt") as f:
        names = set(f.keys())
    assert names == {"pool.vectors", "pool.ages", "pool.sources", "pool.generator"}


@pytest.mark.parametrize(
    ("overrides", "family", "what"),
    [
        ({"pool": {"capacity": 32, "write_size": 8}}, "llama", "capacity"),
        ({}, "qwen2", "model_type"),
        ({}, "llama-wide", "hidden_size"),
    ],
)
def test_a_file_for_another_model_or_recipe_is_refused_and_memory_is_unchanged(tmp_path, overrides, family, what):
    mem = _mem()
    mem.inject(torch.arange(3, 40))
    mem.save_memory(tmp_path / "m.memkit")
    if family == "llama-wide":
        other = memkit.wrap(
            tiny_model("llama", hidden_size=48),
            "memoryllm",
            chunk_size=16,
            pool={"capacity": 24, "write_size": 8},
        )
    else:
        other = _mem(family=family, **overrides)
    other.inject(torch.arange(3, 20))
    kept = other.pool.read().clone()
    with pytest.raises(memkit.MemoryStateError, match=what):
        other.load_memory(tmp_path / "m.memkit")
    assert torch.equal(other.pool.read(), kept)


def test_missing_truncated_and_foreign_files_are_refused_naming_the_file(tmp_path):
    mem = _mem()
    with pytest.raises(memkit.MemoryStateError, match="does not exist"):
        mem.load_memory(tmp_path / "nope.memkit")
    mem.inject(torch.arange(3, 40))
    good = tmp_path / "good.memkit"
    mem.save_memory(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.memkit"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(memkit.MemoryStateError, match="cut.memkit"):
        mem.load_memory(cut)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(memkit.MemoryStateError, match="not a memkit memory file"):
        mem.load_memory(foreign)


def test_a_file_from_another_format_version_is_refused(tmp_path):
    from memkit.state import read_state, write_state

    mem = _mem()
    mem.save_memory(tmp_path / "m.memkit")
    tensors, meta = read_state(tmp_path / "m.memkit")
    write_state(tmp_path / "m.memkit", tensors, meta)  # still fine
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp_path / "v99.memkit"),
        metadata={"format": "memkit.memory", "format_version": "99", "meta": "{}"},
    )
    with pytest.raises(memkit.MemoryStateError, match="format version 99"):
        mem.load_memory(tmp_path / "v99.memkit")


def test_a_failed_save_leaves_the_previous_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    mem = _mem()
    mem.inject(torch.arange(3, 40))
    path = tmp_path / "m.memkit"
    mem.save_memory(path)
    original = path.read_bytes()
    mem.inject(torch.arange(50, 90))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        mem.save_memory(path)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.memkit"]


def test_saving_into_a_missing_folder_says_so(tmp_path):
    mem = _mem()
    with pytest.raises(memkit.MemoryStateError, match="does not exist"):
        mem.save_memory(tmp_path / "missing" / "m.memkit")


@torch.no_grad()
def test_half_precision_pool_round_trips(tmp_path):
    mem = _mem(pool={"capacity": 24, "write_size": 8, "dtype": "bfloat16"})
    mem.inject(torch.arange(3, 40))
    mem.save_memory(tmp_path / "m.memkit")
    other = _mem(pool={"capacity": 24, "write_size": 8, "dtype": "bfloat16"})
    other.load_memory(tmp_path / "m.memkit")
    assert other.pool.read().dtype == torch.bfloat16
    assert torch.equal(other.pool.read(), mem.pool.read())


def test_reset_memory_empties_the_pool_and_reads_as_the_plain_model():
    model = tiny_model("llama")
    mem = memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    mem.inject(torch.arange(3, 40), label="x")
    mem.reset_memory()
    assert mem.memory_size == 0 and mem.source_labels == {}
    with torch.no_grad():
        assert torch.equal(mem(torch.tensor([[5, 6]])).logits, model(torch.tensor([[5, 6]])).logits)


def test_a_file_of_another_dtype_is_refused_rather_than_converted(tmp_path):
    mem = _mem(pool={"capacity": 24, "write_size": 8, "dtype": "bfloat16"})
    mem.inject(torch.arange(3, 40))
    mem.save_memory(tmp_path / "m.memkit")
    other = _mem()
    with pytest.raises(memkit.MemoryStateError, match="bfloat16.*float32.*'dtype': 'bfloat16'"):
        other.load_memory(tmp_path / "m.memkit")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_saved_memory_file_gets_the_umask_default_mode_not_a_private_one(tmp_path, mask):
    mem = _mem()
    mem.inject(torch.arange(3, 40))
    old = os.umask(mask)
    try:
        mem.save_memory(tmp_path / "notes.memkit")
    finally:
        os.umask(old)
    assert (tmp_path / "notes.memkit").stat().st_mode & 0o777 == 0o666 & ~mask
