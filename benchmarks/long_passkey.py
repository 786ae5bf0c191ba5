"""Pass keys hidden at several depths of long filler, read back from memory by SmolLM2-135M.

Runs the ``training-free`` recipe (a KV-cache-like pool plus attention-scored long-term retrieval) on
SmolLM2-135M-Instruct, whose window is 8,192 tokens, over documents of 32k and 64k tokens, and compares
it with the plain model given only the last 8k tokens of the same document. Writes a JSON report.

    python benchmarks/long_passkey.py --lengths 32768 65536 --out benchmarks/results/long_passkey.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import memkit
from memkit.local_models import load_smollm2
from memkit.testing.passkey import haystack, question


def answer(model, tokenizer, prompt_ids: torch.Tensor, n: int = 8) -> str:
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)


def run(
    lengths: list[int],
    depths: list[float],
    seed: int,
    together: bool,
    dtype: str = "float32",
    overrides: dict | None = None,
    window_tokens: int = 8192,
) -> dict:
    model, tok = load_smollm2(dtype=getattr(torch, dtype))
    rows = []
    # One haystack per depth (a single pass key each), or all depths' keys in one haystack (--together).
    groups = [depths] if together else [[d] for d in depths]
    for length in lengths:
        for group in groups:
            rows += _one_haystack(
                model, tok, length, group, seed + length + int(group[0] * 1000), window_tokens, overrides or {}
            )
    summary = {}
    for length in lengths:
        sel = [r for r in rows if abs(r["length"] - length) < length * 0.05]
        summary[str(length)] = {
            "memory_accuracy": sum(r["memory_hit"] for r in sel) / len(sel),
            "last_8k_accuracy": sum(r["last_8k_hit"] for r in sel) / len(sel),
        }
    return {
        "recipe": "training-free",
        "model": "SmolLM2-135M-Instruct",
        "dtype": dtype,
        "overrides": overrides or {},
        "together": together,
        "rows": rows,
        "summary": summary,
    }


def _one_haystack(
    model, tok, length: int, depths: list[float], seed: int, window_tokens: int, overrides: dict
) -> list[dict]:
    rows = []
    text, needles = haystack(tok, length, depths, seed)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    mem = memkit.wrap(model, "training-free", tokenizer=tok, **overrides)
    start = time.perf_counter()
    mem.inject(torch.tensor(ids))
    inject_s = time.perf_counter() - start
    for (name, key), depth in zip(needles, depths, strict=True):
        q = tok(question(name), return_tensors="pt", add_special_tokens=False)["input_ids"]
        start = time.perf_counter()
        from_memory = answer(mem, tok, q)
        read_s = time.perf_counter() - start
        budget = window_tokens - q.shape[1] - 16
        tail = torch.tensor([ids[-budget:]])
        plain = answer(model, tok, torch.cat([tail, q], dim=1))
        rows.append(
            {
                "length": len(ids),
                "depth": depth,
                "key": key,
                "memory_answer": from_memory,
                "memory_hit": key in from_memory,
                "last_8k_answer": plain,
                "last_8k_hit": key in plain,
                "inject_seconds": round(inject_s, 1),
                "read_seconds": round(read_s, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    mem.unwrap()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--together", action="store_true", help="all pass keys in one haystack (harder)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype")
    parser.add_argument(
        "--override", type=json.loads, default=None, help="recipe overrides as JSON, e.g. '{\"retrieve\": 512}'"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/long_passkey.json"))
    args = parser.parse_args()
    report = run(args.lengths, args.depths, args.seed, args.together, args.dtype, args.override)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
