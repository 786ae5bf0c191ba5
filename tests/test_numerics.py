"""Numerical health: non-finite hidden states never reach memory; half-precision memory keeps its precision."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import memkit
from memkit.backbone import Backbone
from memkit.testing import tiny_model
from tests.helpers import assert_same_state, full_state

SMALL_MPLUS: dict[str, Any] = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 24, "write_size": 8, "seed": 0},
    "store": {"capacity": 40, "merge_every": 3},
    "retriever": {"key_size": 8},
}
SMALL_MEMORYLLM: dict[str, Any] = {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8, "seed": 0}}
PROMPT = torch.tensor([[5, 6, 7, 8]])
#: Four chunks of 16 tokens; token 100 occurs only in the second chunk.
FOUR_CHUNKS = torch.cat([torch.arange(3, 19), torch.arange(90, 106), torch.arange(20, 36), torch.arange(40, 56)])
ODD_TOKEN = 100
#: Unit roundoff (round to nearest) of each storage dtype: 2**-(mantissa bits + 1).
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _options(recipe: str, dtype: str | None = None) -> dict[str, Any]:
    base = SMALL_MPLUS if recipe == "mplus" else SMALL_MEMORYLLM
    options = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    if dtype is not None:
        options["pool"]["dtype"] = dtype
        if recipe == "mplus":
            options["store"]["dtype"] = dtype
    return options


def _wrap(recipe: str, dtype: str | None = None, **model_overrides: Any) -> memkit.MemkitModel:
    torch.manual_seed(0)
    return memkit.wrap(tiny_model("llama", **model_overrides), recipe, **_options(recipe, dtype))


@torch.no_grad()
def _filled(recipe: str, dtype: str | None = None) -> memkit.MemkitModel:
    """A wrapped model whose pool is full and (mplus) whose store holds merged and staged entries."""
    mem = _wrap(recipe, dtype)
    for i in range(4):
        mem.inject(torch.arange(3 + 10 * i, 43 + 10 * i) % 120 + 3, label=f"doc-{i}")
    assert mem.memory_size == mem.pool.capacity
    if mem.store is not None:
        assert mem.store.size(0) > 0
    return mem


class _CountingWrites:
    """Spies on ``mem.pool.write``: how many writes went through (the refusal must come after some did)."""

    def __init__(self, mem: memkit.MemkitModel) -> None:
        self.function = mem.pool.write
        self.done = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.function(*args, **kwargs)
        self.done += 1
        return out


@pytest.fixture
def count_writes() -> Iterator[Any]:
    spies: list[tuple[memkit.MemkitModel, _CountingWrites]] = []

    def attach(mem: memkit.MemkitModel) -> _CountingWrites:
        spy = _CountingWrites(mem)
        mem.pool.write = spy  # type: ignore[method-assign]
        spies.append((mem, spy))
        return spy

    yield attach
    for mem, _ in spies:
        del mem.pool.write  # the instance attribute shadowed the method


# ---------------------------------------------------------------------------------------------------
# non-finite hidden states are refused and leave the whole memory as it was
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["memoryllm", "mplus"])
@pytest.mark.parametrize(
    ("layer", "value"),
    [(0, float("nan")), (1, float("inf")), (0, float("-inf"))],
    ids=["layer0-nan", "layer1-inf", "layer0--inf"],
)
def test_a_layer_output_with_nan_or_inf_in_one_chunk_refuses_the_injection_and_keeps_the_memory(
    recipe: str, layer: int, value: float, count_writes: Any
) -> None:
    mem = _filled(recipe)
    with torch.no_grad():
        logits = mem(PROMPT).logits
    before = full_state(mem)
    calls = {"n": 0}

    def poison(module: torch.nn.Module, args: Any, output: Any) -> Any:
        calls["n"] += 1
        if calls["n"] != 2:  # the second chunk's forward through this layer
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, -1, 3] = value  # one number of the last position
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = Backbone(mem.base_model).layers[layer].register_forward_hook(poison)
    writes = count_writes(mem)
    try:
        with torch.no_grad(), pytest.raises(memkit.InputError, match="NaN or infinite hidden states"):
            mem.inject(FOUR_CHUNKS, label="poisoned")
    finally:
        handle.remove()
    assert calls["n"] == 2, "the poison did not fire on the second chunk"
    assert writes.done == 1, "the first chunk should have been written (and then rolled back)"
    assert_same_state(before, full_state(mem))
    with torch.no_grad():
        assert torch.equal(mem(PROMPT).logits, logits)


@pytest.mark.parametrize("recipe", ["memoryllm", "mplus"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_a_token_embedding_patched_to_inf_refuses_the_injection_and_keeps_the_memory(
    recipe: str, value: float, count_writes: Any
) -> None:
    mem = _filled(recipe)
    with torch.no_grad():
        logits_clean = mem(PROMPT).logits  # PROMPT does not contain ODD_TOKEN
        before = full_state(mem)
        embeddings = mem.base_model.get_input_embeddings().weight
        saved_row = embeddings[ODD_TOKEN].clone()
        embeddings[ODD_TOKEN] = value
    writes = count_writes(mem)
    try:
        with torch.no_grad(), pytest.raises(memkit.InputError, match="NaN or infinite") as info:
            mem.inject(FOUR_CHUNKS, label="poisoned")
        assert "memory is unchanged" in str(info.value)
        assert writes.done == 1, "the first chunk (without the bad token) should have been written, then rolled back"
        assert_same_state(before, full_state(mem))
    finally:
        with torch.no_grad():
            embeddings[ODD_TOKEN] = saved_row
    with torch.no_grad():
        assert torch.equal(mem(PROMPT).logits, logits_clean)


def test_after_a_refused_injection_the_next_one_matches_a_memory_that_never_saw_it() -> None:
    mem, twin = _filled("mplus"), _filled("mplus")
    with torch.no_grad():
        embeddings = mem.base_model.get_input_embeddings().weight
        saved_row = embeddings[ODD_TOKEN].clone()
        embeddings[ODD_TOKEN] = float("inf")
        with pytest.raises(memkit.InputError):
            mem.inject(FOUR_CHUNKS)
        embeddings[ODD_TOKEN] = saved_row
        for m in (mem, twin):
            out = m.inject(torch.arange(20, 90), label="after")
            assert out.source == 4  # the refused call used no provenance id
    assert_same_state(full_state(twin), full_state(mem))


@pytest.mark.parametrize("recipe", ["memoryllm", "mplus"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_write_vectors_refuses_non_finite_vectors_and_keeps_the_memory(recipe: str, value: float) -> None:
    mem = _filled(recipe)
    before = full_state(mem)
    with torch.no_grad():
        vectors = mem.capture(torch.arange(60, 68))
    assert bool(torch.isfinite(vectors).all())
    vectors[1, 4, 7] = value
    with pytest.raises(memkit.InputError, match="NaN or infinite"):
        mem.write_vectors(vectors, mem._next_source)
    assert_same_state(before, full_state(mem))


# ---------------------------------------------------------------------------------------------------
# half-precision memory
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["memoryllm", "mplus"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_memory_round_trips_bit_exactly_through_a_file(recipe: str, dtype: str, tmp_path: Path) -> None:
    torch_dtype = getattr(torch, dtype)
    mem = _filled(recipe, dtype)
    path = tmp_path / "half.memkit"
    mem.save_memory(path)
    with safe_open(str(path), framework="pt") as handle:
        stored = {name: handle.get_tensor(name).dtype for name in handle.keys()}  # noqa: SIM118
    floats = {name: dt for name, dt in stored.items() if dt.is_floating_point}
    assert floats and set(floats.values()) == {torch_dtype}, f"the file widened or changed dtypes: {floats}"
    if recipe == "mplus":
        assert any(name.startswith("store.") for name in floats)

    other = _wrap(recipe, dtype)
    other.load_memory(path)
    assert_same_state(full_state(mem), full_state(other))
    with torch.no_grad():
        assert torch.equal(other(PROMPT).logits, mem(PROMPT).logits)
        ids = mem.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(other.generate(PROMPT, max_new_tokens=4, do_sample=False, pad_token_id=0), ids)


def _within_roundoff(half: torch.Tensor, exact: torch.Tensor) -> None:
    """``half`` is ``exact`` (float32) rounded to its dtype: relative error <= the unit roundoff, except in the
    subnormal range, where the error is at most half the smallest subnormal."""
    u = UNIT_ROUNDOFF[half.dtype]
    floor = torch.finfo(half.dtype).smallest_normal * torch.finfo(half.dtype).eps / 2
    err = (half.float() - exact).abs()
    assert bool((err <= u * exact.abs() + floor).all()), f"max relative error {(err / exact.abs()).max()} > {u}"
    assert bool((err > 0).any()), "nothing was rounded: the comparison would not catch a widened pool"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_pool_holds_the_float32_captures_rounded_to_nearest(dtype: str) -> None:
    torch_dtype = getattr(torch, dtype)
    half, full = _wrap("memoryllm", dtype), _wrap("memoryllm")
    assert half.pool.read().dtype == torch_dtype and full.pool.read().dtype == torch.float32
    with torch.no_grad():
        # a chunk into empty memory reads no memory, so both capture the same float32 vectors
        half.inject(torch.arange(3, 19))
        full.inject(torch.arange(3, 19))
        # then the same float32 captures through write_vectors, past capacity (the seeded drops agree)
        for start in (20, 36, 52, 68):
            vectors = full.capture(torch.arange(start, start + 8))
            for m in (half, full):
                m.write_vectors(vectors, m.new_source())
    assert torch.equal(half.pool.read(), full.pool.read().to(torch_dtype))
    assert torch.equal(half.pool.sources(), full.pool.sources())
    _within_roundoff(half.pool.read(), full.pool.read())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_store_holds_the_float32_evictions_rounded_to_nearest(dtype: str) -> None:
    torch_dtype = getattr(torch, dtype)
    half_options, full_options = _options("mplus"), _options("mplus")
    half_options["store"]["dtype"] = dtype
    full_options["store"]["dtype"] = "float32"
    torch.manual_seed(0)
    half = memkit.wrap(tiny_model("llama"), "mplus", **half_options)
    torch.manual_seed(0)
    full = memkit.wrap(tiny_model("llama"), "mplus", **full_options)
    with torch.no_grad():
        for m in (half, full):
            for i in range(4):  # injection never reads the store, so both pools stay equal
                m.inject(torch.arange(3 + 10 * i, 43 + 10 * i) % 120 + 3)
    assert half.store is not None and full.store is not None
    assert torch.equal(half.pool.read(), full.pool.read())
    for layer in range(2):
        h, f = half.store.entries(layer), full.store.entries(layer)
        assert len(f) > 0 and h.vectors.dtype == torch_dtype and f.vectors.dtype == torch.float32
        assert torch.equal(h.vectors, f.vectors.to(torch_dtype))
        assert torch.equal(h.keys, f.keys.to(torch_dtype))
        assert torch.equal(h.ages, f.ages) and torch.equal(h.sources, f.sources)
        _within_roundoff(h.vectors, f.vectors)
