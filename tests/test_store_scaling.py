"""The store-scaling benchmark (benchmarks/store_scaling.py) at a small size: it builds the stores it is
given, measures them against exact scoring, and reports what the prefilter changes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import load_benchmark


def test_store_scaling_reports_recall_speed_and_bytes_for_each_variant(tmp_path: Path, threads: None) -> None:
    plain, pre = "mips-l2:M=8:overfetch=2.2:index_dims=32", "mips-l2:M=8:overfetch=2.2:index_dims=32:prefilter=1.2"
    out = tmp_path / "scaling.json"
    args = ["--entries", "12000", "--prompts", "2", "--threads", "1", "--variants", f"{plain},{pre}", "--out", str(out)]
    assert load_benchmark("store_scaling").main(args) == 0
    report = json.loads(out.read_text())
    raw = report["raw_bytes_per_entry"]
    assert raw == 4096 * 2 + 256 * 2 + 16
    memory = report["memory"]
    for name in ("exact", f"hnsw-{plain}", f"hnsw-{pre}"):
        assert memory[name]["entries"] == 12000 and memory[name]["evicted"] == 1200
    assert memory["exact"]["accounted_vs_raw"] == 1.0
    # the prefilter's projected keys: 32 float16 values more per entry
    extra = memory[f"hnsw-{pre}"]["tensor_bytes"] - memory[f"hnsw-{plain}"]["tensor_bytes"]
    assert extra == 12000 * 32 * 2
    at_2560 = report["retrieval"]["2560"]
    assert at_2560["exact"]["candidates"] == 12000
    assert at_2560[f"hnsw-{plain}"]["candidates"] == 5632  # ceil(2.2 * 2560)
    assert at_2560[f"hnsw-{pre}"]["candidates"] == 3072  # ceil(1.2 * 2560) of them
    for name in (f"hnsw-{plain}", f"hnsw-{pre}"):
        assert 0.9 <= at_2560[name]["recall_mean"] <= 1.0
        assert at_2560[name]["speedup_vs_exact"] > 0
        assert set(report["aims"][f"{name}@k=2560"]) == {
            "recall>=0.95",
            "speedup>=10x",
            "bytes<=1.1x_raw(accounted)",
            "bytes<=1.1x_raw(process)",
        }
    # at k = 64 the fetch is min_fetch (1,024) and the prefilter keeps the same share, 1.2 / 2.2
    assert report["retrieval"]["64"][f"hnsw-{pre}"]["candidates"] == 559
