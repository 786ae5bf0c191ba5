"""The soak benchmark (benchmarks/soak.py) in its quick mode: flat resident memory, stable perplexity."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import memkit
from tests.helpers import load_benchmark

soak = load_benchmark("soak")


def _run(tmp_path: Path, model: str, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "soak.json"
    code = soak.main(["--quick", "--model", model, "--threads", "1", "--no-progress", "--out", str(out), *extra])
    return code, json.loads(out.read_text())


def _check_series(run: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    rows = run["checkpoints"]
    assert len(rows) == 1 + math.ceil(plan["injections"] / plan["every"])
    assert [r["injections"] for r in rows] == [min(i * plan["every"], plan["injections"]) for i in range(len(rows))]
    for row in rows:
        assert row["rss_bytes"] > 0 and row["peak_rss_bytes"] >= row["rss_bytes"]
        assert row["state_bytes"] > 0 and row["other_rss_bytes"] == row["rss_bytes"] - row["state_bytes"]
        assert row["pool_bytes"] + row["store_live_bytes"] <= row["state_bytes"]
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert math.isfinite(row["drift"])
    # the store filled during the run, not before it, and stayed full
    full = [row["store_full"] for row in rows]
    assert not full[0] and full[-1]
    assert full == sorted(full)
    assert all(size == run["model"]["store_capacity"] for size in rows[-1]["store_entries"])
    return rows


def test_quick_soak_of_the_tiny_model_keeps_memory_flat_and_perplexity_stable(tmp_path: Path, threads: None) -> None:
    code, report = _run(tmp_path, "tiny")
    assert code == 0 and report["passed"] and report["quick"] and report["complete"]
    run = report["runs"]["tiny"]
    assert run["plan"]["recipe"] == "mplus"
    rows = _check_series(run, run["plan"])
    rss, ppl = run["verdicts"]["rss_flat"], run["verdicts"]["perplexity"]
    assert rss["passed"] and ppl["passed"] and run["verdicts"]["state_bounded"]["passed"]
    assert rss["checkpoints"] >= 5  # most of the run is measured after the store is full
    assert rss["max_growth_bytes"] <= rss["tolerance_bytes"]
    assert ppl["max_rise"] <= 0.02
    # once full, the store holds its capacity of live rows, and at most 8/7 of them in its tensors
    for row in rows:
        if row["store_full"]:
            assert row["store_live_rows"] == run["model"]["layers"] * run["model"]["store_capacity"]
            assert row["store_rows"] <= 8 / 7 * row["store_live_rows"]
    # what save_memory writes holds the same entries; its size is constant once the store is full
    files = {row["memory_file_bytes"] for row in rows if row["store_full"]}
    assert len(files) <= 2 and all(f > 0 for f in files)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "soak.png").stat().st_size > 0


def test_a_leak_of_32_kb_per_injection_fails_the_memory_verdict(
    tmp_path: Path, threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept: list[torch.Tensor] = []
    inject = memkit.MemkitModel.inject

    def leaking(self: Any, *args: Any, **kwargs: Any) -> Any:
        kept.append(torch.ones(8192))  # 32 KB, never freed: 32 MB over the quick run
        return inject(self, *args, **kwargs)

    monkeypatch.setattr(memkit.MemkitModel, "inject", leaking)
    code, report = _run(tmp_path, "tiny")
    rss = report["runs"]["tiny"]["verdicts"]["rss_flat"]
    assert code == 1 and not report["passed"]
    assert not rss["passed"]
    assert rss["slope_bytes_per_injection"] > 16_000


def test_the_verdicts_on_made_up_series() -> None:
    mib = 2**20

    def rows(rss: list[float], ppl: list[float], full_from: int = 1) -> list[dict[str, Any]]:
        out = [
            {"injections": 100 * i, "rss_bytes": r, "other_rss_bytes": r - mib, "perplexity": p}
            for i, (r, p) in enumerate(zip(rss, ppl, strict=True))
        ]
        for i, row in enumerate(out):
            row["store_full"] = i >= full_from
            row["drift"] = row["perplexity"] / out[0]["perplexity"] - 1
            row["drift_from_pool_full"] = row["drift"]
        return out

    flat = rows([400 * mib, 402 * mib, 402.5 * mib, 401.8 * mib, 402.2 * mib], [10, 10.1, 9.9, 10.15, 10.0])
    assert soak.rss_verdict(flat, 0.02, 8 * mib)["passed"]
    assert soak.perplexity_verdict(flat, 0.02)["passed"]
    growing = rows([400 * mib + i * 3 * mib for i in range(5)], [10, 10.1, 10.2, 10.25, 10.3])
    assert not soak.rss_verdict(growing, 0.02, 8 * mib)["passed"]  # 9 MiB over 300 injections
    verdict = soak.perplexity_verdict(growing, 0.02)
    assert not verdict["passed"] and verdict["max_rise"] == pytest.approx(0.03)
    lower = rows([400 * mib] * 5, [10, 9.5, 9.0, 9.2, 9.1])
    assert soak.perplexity_verdict(lower, 0.02)["passed"]  # lower perplexity is not a degradation
    assert soak.perplexity_verdict(lower, 0.02)["max_abs_drift"] == pytest.approx(0.1)
    never = rows([400 * mib] * 5, [10] * 5, full_from=99)
    assert not soak.rss_verdict(never, 0.02, 8 * mib)["passed"]
    # the store's dead rows come and go (a sawtooth in VmRSS); the rest of the process is what must stay flat
    sawtooth = rows([400 * mib, 450 * mib, 500 * mib, 400 * mib, 450 * mib], [10] * 5)
    for row, state in zip(sawtooth, [0, 50, 100, 0, 50], strict=True):
        row["other_rss_bytes"] = row["rss_bytes"] - state * mib
        row.update(store_rows=1000 + state, store_live_rows=1000, state_bytes=state * mib, store_live_bytes=0)
    assert soak.rss_verdict(sawtooth, 0.02, 8 * mib)["passed"]
    assert soak.state_verdict(sawtooth, 500, 2)["passed"]
    assert not soak.state_verdict(sawtooth, 400, 2)["passed"]  # live rows != capacity x layers
    sawtooth[2]["store_rows"] = 1200  # more than 8/7 of the live rows
    assert not soak.state_verdict(sawtooth, 500, 2)["passed"]


@pytest.mark.slow
def test_quick_soak_of_smollm2(tmp_path: Path, threads: None, smollm2: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(soak, "load_smollm2", lambda dtype=torch.float32: smollm2)
    code, report = _run(tmp_path, "smollm2")
    run = report["runs"]["smollm2"]
    assert run["plan"]["recipe"] == "training-free"
    _check_series(run, run["plan"])
    assert run["verdicts"]["rss_flat"]["passed"]
    assert run["verdicts"]["perplexity"]["passed"]
    assert code == 0
    assert math.isfinite(run["plain_perplexity"]) and math.isfinite(run["pool_full_perplexity"])
