"""Determinism: the same seed and the same injections give bit-identical memory and outputs.

In one process, across two processes, and under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import memkit
from memkit.testing import tiny_model

HERE = Path(__file__).resolve().parent

SMALL_MPLUS: dict[str, Any] = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 24, "write_size": 8, "seed": 0},
    "store": {"capacity": 40, "merge_every": 3},
    "retriever": {"key_size": 8},
}
#: variant -> (recipe, wrap options). ``memoryllm-global`` leaves the pool's seed unset, so its random
#: drops come from torch's global generator (seeded by ``torch.manual_seed``); the others seed the pool's own.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "memoryllm-seeded": ("memoryllm", {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8, "seed": 0}}),
    "memoryllm-global": ("memoryllm", {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8}}),
    "mplus": ("mplus", SMALL_MPLUS),
}
PROMPT = torch.tensor([[5, 6, 7, 8]])
#: Texts of several lengths: whole chunks, a short last chunk (reread), a text shorter than K.
TEXTS = [
    torch.arange(3, 43),
    torch.arange(50, 61),
    (torch.arange(0, 70) * 7) % 120 + 3,
    torch.arange(100, 105),
    (torch.arange(0, 33) * 11) % 120 + 3,
    torch.arange(20, 52),
]


def _options(variant: str, pool_seed: int | None = None) -> tuple[str, dict[str, Any]]:
    recipe, base = VARIANTS[variant]
    options = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    if pool_seed is not None:
        options["pool"]["seed"] = pool_seed
    return recipe, options


def build(variant: str, pool_seed: int | None = None) -> memkit.MemkitModel:
    """The tiny llama wrapped for ``variant``; every random initialisation (model, learned BOS and new-memory
    embedding, adapters, retriever) follows ``torch.manual_seed(0)``."""
    recipe, options = _options(variant, pool_seed)
    torch.manual_seed(0)
    return memkit.wrap(tiny_model("llama", seed=0), recipe, **options)


@torch.no_grad()
def run(mem: memkit.MemkitModel, seed: int = 1234, disturb_global_rng: bool = False) -> dict[str, torch.Tensor | Any]:
    """Inject :data:`TEXTS` after ``torch.manual_seed(seed)``; return the memory state and the outputs.

    ``disturb_global_rng`` draws from torch's global generator between injections (as other code would).
    """
    torch.manual_seed(seed)
    for i, text in enumerate(TEXTS):
        mem.inject(text, label=f"text-{i}")
        if disturb_global_rng:
            torch.rand(i + 1)
    return {**memory_state(mem), **outputs(mem)}


def memory_state(mem: memkit.MemkitModel) -> dict[str, Any]:
    state: dict[str, Any] = {f"pool.{k}": v.clone() for k, v in mem.pool.state_dict().items()}
    if mem.store is not None:
        state.update({f"store.{k}": v.clone() for k, v in mem.store.state_dict().items()})
    state["source_labels"] = dict(mem.source_labels)
    state["next_source"] = mem._next_source
    return state


@torch.no_grad()
def outputs(mem: memkit.MemkitModel) -> dict[str, torch.Tensor]:
    """Logits of :data:`PROMPT`, greedy ids, and ids sampled after ``torch.manual_seed(7)``."""
    greedy = mem.generate(PROMPT, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.manual_seed(7)
    sampled = mem.generate(PROMPT, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
    return {"out.logits": mem(PROMPT).logits, "out.greedy": greedy, "out.sampled": sampled}


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            other = b[key]
            assert value.dtype == other.dtype and value.shape == other.shape, f"{key}: dtype or shape differs"
            assert torch.equal(value, other), f"{key} differs"
        else:
            assert value == b[key], f"{key} differs"


def file_parts(path: Path) -> tuple[int, dict[str, Any], bytes]:
    """A safetensors file as (header length, parsed JSON header, data bytes).

    safetensors (0.8) writes the ``__metadata__`` entries from a Rust ``HashMap``, so their order in the
    header JSON changes from one save to the next, even of the same memory in the same process; that order
    is the one thing two saves of the same memory may differ in. Everything else, the header's values and
    every byte of the tensor data, must match.
    """
    data = path.read_bytes()
    length = int(struct.unpack("<Q", data[:8])[0])
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def assert_same_file(a: Path, b: Path) -> None:
    length_a, header_a, data_a = file_parts(a)
    length_b, header_b, data_b = file_parts(b)
    assert length_a == length_b and header_a == header_b, f"{a.name}: the headers differ"
    assert data_a == data_b, f"{a.name}: the tensor bytes differ"


def _tensors_differ(a: dict[str, Any], b: dict[str, Any], key: str) -> bool:
    x, y = a[key], b[key]
    return x.shape != y.shape or not torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------
# (a) twice in one process
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_same_seed_and_injections_give_bit_identical_memory_and_outputs_in_one_process(variant: str) -> None:
    first = run(build(variant))
    second = run(build(variant))
    assert first["pool.vectors"].shape[1] == 24, "the pool must be full, so that random drops happened"
    if variant == "mplus":
        assert any(k.startswith("store.") and k.endswith(".vectors") and v.numel() for k, v in first.items())
    assert_identical(first, second)


def test_the_comparison_sees_the_random_drop_a_different_seed_changes_the_memory() -> None:
    # without this, the tests above could pass with a pool that never drops at random
    reference = run(build("memoryllm-seeded"))
    assert _tensors_differ(reference, run(build("memoryllm-seeded", pool_seed=1)), "pool.vectors")
    global_reference = run(build("memoryllm-global"))
    assert _tensors_differ(global_reference, run(build("memoryllm-global"), seed=4321), "pool.vectors")


def test_a_pool_with_its_own_seed_ignores_draws_from_the_global_generator() -> None:
    quiet = run(build("memoryllm-seeded"))
    disturbed = run(build("memoryllm-seeded"), seed=999, disturb_global_rng=True)
    quiet_state = {k: v for k, v in quiet.items() if not k.startswith("out.")}
    disturbed_state = {k: v for k, v in disturbed.items() if not k.startswith("out.")}
    assert_identical(quiet_state, disturbed_state)
    # whereas a pool on the global generator follows it
    global_quiet = run(build("memoryllm-global"))
    global_disturbed = run(build("memoryllm-global"), disturb_global_rng=True)
    assert _tensors_differ(global_quiet, global_disturbed, "pool.vectors")


# ---------------------------------------------------------------------------------------------------
# (b) across two processes
# ---------------------------------------------------------------------------------------------------


def child_main(folder: str) -> None:
    """In a fresh process: for every variant, build, inject, save the memory and the outputs into ``folder``."""
    for variant in VARIANTS:
        mem = build(variant)
        result = run(mem)
        mem.save_memory(Path(folder) / f"{variant}.memkit")
        tensors = {k: v.contiguous() for k, v in result.items() if k.startswith("out.")}
        save_file(tensors, str(Path(folder) / f"{variant}.outputs.safetensors"))


def test_two_processes_write_identical_memory_files_and_outputs(tmp_path: Path) -> None:
    env = {**os.environ, "MEMKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_determinism as t; t.child_main(sys.argv[1])"
    folders = [tmp_path / "first", tmp_path / "second"]
    procs = []
    for folder in folders:
        folder.mkdir()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
    names = sorted(p.name for p in folders[0].iterdir())
    assert names == sorted(p.name for p in folders[1].iterdir())
    assert len(names) == 2 * len(VARIANTS)
    # the memory file has no timestamp and no random id: header values and tensor bytes must all match
    for name in names:
        assert_same_file(folders[0] / name, folders[1] / name)
    # and it is what this process computes (with the children's thread count), and loads back whole
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mem = build("mplus")
        here = run(mem)
    finally:
        torch.set_num_threads(threads)
    mem.save_memory(tmp_path / "here.memkit")
    assert_same_file(tmp_path / "here.memkit", folders[0] / "mplus.memkit")
    child_outputs = load_file(str(folders[0] / "mplus.outputs.safetensors"))
    assert_identical({k: v for k, v in here.items() if k.startswith("out.")}, child_outputs)
    loaded = build("mplus")
    loaded.load_memory(folders[0] / "mplus.memkit")
    assert_identical(memory_state(mem), memory_state(loaded))


# ---------------------------------------------------------------------------------------------------
# (c) under torch.use_deterministic_algorithms(True)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic_algorithms() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deterministic_algorithms_mode_runs_inject_forward_generate_save_and_load_identically(
    variant: str, tmp_path: Path, deterministic_algorithms: None
) -> None:
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    first_mem, second_mem = build(variant), build(variant)
    first, second = run(first_mem), run(second_mem)
    assert_identical(first, second)
    # on the CPU, deterministic mode picks no other kernel for anything memkit runs: same numbers as without it
    torch.use_deterministic_algorithms(False)
    assert_identical(first, run(build(variant)))
    torch.use_deterministic_algorithms(True)
    first_mem.save_memory(tmp_path / "first.memkit")
    second_mem.save_memory(tmp_path / "second.memkit")
    assert_same_file(tmp_path / "first.memkit", tmp_path / "second.memkit")

    loaded = build(variant)
    loaded.load_memory(tmp_path / "first.memkit")
    assert_identical(memory_state(first_mem), memory_state(loaded))
    assert_identical(outputs(first_mem), outputs(loaded))
    # the next injection after loading continues exactly as in the memory that was saved
    with torch.no_grad():
        for m in (first_mem, loaded):
            torch.manual_seed(5)  # memoryllm-global draws its drops from the global generator
            m.inject(torch.arange(60, 90))
    assert_identical(memory_state(first_mem), memory_state(loaded))
