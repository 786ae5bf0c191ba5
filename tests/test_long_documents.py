"""SmolLM2-135M (an 8,192-token window) answers pass-key questions about 32k- and 64k-token documents.

The ``training-free`` recipe keeps the most recent 2,048 injected tokens in its pool and everything
older in its long-term store; at read time every layer brings back the 1,024 stored tokens its own
attention scores highest. A pass key hidden at depth 0.1 or 0.5 of these documents lies outside both
the pool and the last 8k tokens that the plain model could be given, so only retrieval can answer.

The model runs in bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX: 2.7x faster than
float32, a 32k-token document injected in about 45 s) and in float32 elsewhere (an AVX2-only CPU
emulates bfloat16 some 10x slower than float32). The 64k document is asked at one depth to keep the
suite's time in bounds; ``memkit eval passkey`` and ``benchmarks/long_passkey.py`` run full grids
and add the plain model on the last 8k tokens; docs/results.md and docs/recipes.md report them.
"""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.testing.passkey import haystack, question

pytestmark = pytest.mark.slow

WINDOW = 8_192


def _native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (else torch emulates it, far slower than float32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.fixture(scope="module")
def smollm2_fast():
    from memkit.local_models import load_smollm2

    model, tok = load_smollm2(dtype=torch.bfloat16 if _native_bfloat16() else torch.float32)
    model.eval()
    return model, tok


def _ask(model, tok, length: int, depth: float) -> tuple[bool, str, dict[str, int]]:
    """Inject one document with one pass key at ``depth``; (hit, answer, where the key sits)."""
    text, [(name, key)] = haystack(tok, length, [depth], seed=length + int(depth * 1000))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    key_at = len(tok(text[: text.index(key)], add_special_tokens=False)["input_ids"])
    mem = memkit.wrap(model, "training-free", tokenizer=tok)
    try:
        mem.inject(torch.tensor(ids))
        pool = mem.pool.size
        assert pool == mem.recipe.pool.capacity and mem.store.size(0) == len(ids) - pool
        prompt = tok(question(name), return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = mem.generate(prompt, max_new_tokens=8, do_sample=False)
        answer = tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    finally:
        mem.unwrap()
    return key in answer, answer, {"tokens": len(ids), "key_at": key_at, "pool": pool}


@pytest.mark.parametrize(("length", "depths"), [(32_768, (0.1, 0.5, 0.9)), (65_536, (0.5,))])
def test_pass_keys_at_several_depths_of_long_documents_come_back_from_memory(smollm2_fast, length, depths):
    model, tok = smollm2_fast
    hits, report = 0, []
    for depth in depths:
        hit, answer, where = _ask(model, tok, length, depth)
        hits += hit
        report.append(f"depth {depth}: {'hit' if hit else 'miss'} ({answer!r}, {where})")
        assert where["tokens"] > 0.95 * length
        if depth < 0.9:  # far behind: neither in the pool nor in the plain model's last 8k tokens
            assert where["key_at"] < where["tokens"] - WINDOW and where["key_at"] < where["tokens"] - where["pool"]
    assert hits == len(depths), f"{hits}/{len(depths)} pass keys at {length} tokens: " + "; ".join(report)
