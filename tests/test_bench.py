"""``memkit bench``: report structure and sanity, plots written, bad input refused (never a timed assertion)."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest
import torch

import memkit
from memkit.benchmark import PeakMemory, command, growth_exponent, run_speed, run_store_cost, time_interleaved
from memkit.errors import InputError, MemkitError, UnknownComponentError
from memkit.testing.models import tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_RECIPE = {
    "chunk_size": 32,
    "retrieve": 16,
    "pool": {"capacity": 64, "write_size": 32},
    "injector": {"write_context": 32},
    "store": {"capacity": 1024, "merge_every": 4},
}
SMALL_STORE = ["--sizes", "300,1200", "--k", "8", "--key-size", "16", "--hidden", "8", "--queries", "4"]
SMALL_STORE += ["--prompts", "2", "--write", "64", "--merge-every", "2", "--ef-construction", "16"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memkit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    command.register(commands)
    return parser


def _run(argv: list[str]) -> int:
    return command.run(_parser().parse_args(argv))


@pytest.fixture
def tiny_mem():
    return memkit.wrap(tiny_model("llama"), "training-free", **TINY_RECIPE)


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """A saved tiny model folder (no tokenizer) and a recipe file small enough for it."""
    folder = tmp_path_factory.mktemp("bench")
    tiny_model("llama").save_pretrained(folder / "tiny")
    recipe = folder / "tiny.toml"
    recipe.write_text(memkit.load_recipe("training-free").with_overrides(TINY_RECIPE).to_toml())
    return folder / "tiny", recipe


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# -- meters -----------------------------------------------------------------------------------------


def test_peak_memory_sees_a_block_that_allocates():
    with PeakMemory() as peak:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
    assert block.numel() and peak.method in {"rss_sampled", "ru_maxrss"}
    if peak.method == "rss_sampled":
        assert peak.bytes >= 32 * 2**20 and peak.samples >= 1
    assert peak.bytes == max(peak.peak_bytes - peak.start_bytes, 0)


def test_time_interleaved_alternates_and_takes_a_returned_float_as_the_sample():
    calls: list[str] = []

    def own() -> float:
        calls.append("own")
        return 0.25

    timings = time_interleaved({"own": own, "wall": lambda: calls.append("wall")}, repeats=3, warmup=2)
    assert calls == ["own", "wall"] * 5
    assert timings["own"].samples_s == (0.25, 0.25, 0.25) and timings["own"].median_s == 0.25
    assert len(timings["wall"].samples_s) == 3 and all(s >= 0 for s in timings["wall"].samples_s)
    with pytest.raises(ValueError):
        time_interleaved({"x": own}, repeats=0)


# -- speed ------------------------------------------------------------------------------------------


def _check_figure(fig: dict) -> None:
    assert fig["memory"] >= 0 and fig["plain"] >= 0
    if fig["plain"] > 0:
        assert math.isclose(fig["ratio"], fig["memory"] / fig["plain"])
    else:
        assert fig["ratio"] is None
    if fig["aim"] is not None:
        assert fig["aim_met"] == (fig["ratio"] >= fig["aim"])


def test_run_speed_reports_every_figure_against_the_plain_model(tiny_mem):
    report = run_speed(tiny_mem, None, memory_tokens=160, decode_tokens=4, repeats=2, chunk_tokens=24)
    setup = report["setup"]
    assert (setup["memory_tokens"], setup["decode_tokens"], setup["chunk_tokens"], setup["repeats"]) == (160, 4, 24, 2)
    # read cache: BOS + 16 retrieved + a full pool of 64; the plain prompt is as long plus the question
    assert setup["memory_read_positions"] == 1 + 16 + 64
    assert setup["plain_prompt_tokens"] == setup["memory_read_positions"] + setup["prompt_tokens"]
    figures = report["figures"]
    assert set(figures) == {"inject", "decode", "first_token", "peak_memory_inject", "peak_memory_decode"}
    for name in ("inject", "decode", "first_token"):
        assert figures[name]["memory"] > 0 and figures[name]["plain"] > 0
    for fig in figures.values():
        _check_figure(fig)
    assert figures["inject"]["aim"] == 0.8 and figures["decode"]["aim"] == 0.9
    assert set(report["aims"]) == {"inject", "decode"}
    assert len(figures["decode"]["memory_timing"]["samples_s"]) == 2
    # decoding rate is over the tokens after the first, from the median of the timed samples
    assert math.isclose(figures["decode"]["memory"], 3 / figures["decode"]["memory_timing"]["median_s"])
    assert math.isclose(figures["inject"]["plain"], 24 / figures["inject"]["plain_timing"]["median_s"])
    prefill = figures["inject"]["versus_prefill"]
    assert prefill["plain"] > 0 and math.isclose(prefill["ratio"], figures["inject"]["memory"] / prefill["plain"])
    retrieval = report["retrieval"]
    assert retrieval["k"] == 16 and retrieval["entries_per_layer"] == 160 - 64
    assert len(retrieval["ms_per_layer"]) == 2 and all(ms > 0 for ms in retrieval["ms_per_layer"])
    assert retrieval["ms_per_read"] > 0
    assert set(retrieval["ms_per_layer_parts"]) == {"select", "get", "layer_kv"}
    # the timing wrappers are gone again
    assert "select" not in vars(tiny_mem.retriever) and "get" not in vars(tiny_mem.store)
    json.dumps(report)  # serialisable as it is


def test_run_speed_without_a_store_reports_no_retrieval():
    mem = memkit.wrap(tiny_model("llama"), "memoryllm", chunk_size=32, pool={"capacity": 64, "write_size": 32})
    report = run_speed(mem, None, memory_tokens=64, decode_tokens=3, repeats=1, warmup=0)
    assert report["retrieval"] is None and report["recipe"]["store"] is None
    assert report["setup"]["memory_read_positions"] == 1 + 64


def test_run_speed_refuses_bad_counts(tiny_mem):
    for kwargs, words in (
        ({"decode_tokens": 1}, "at least 2"),
        ({"repeats": 0}, "repeats must be"),
        ({"memory_tokens": -4}, "memory-tokens must be"),
        ({"chunk_tokens": 33}, "more than one chunk"),
        ({"decode_tokens": 600}, "window"),
    ):
        with pytest.raises(InputError, match=words):
            run_speed(tiny_mem, None, **{"memory_tokens": 64, "repeats": 1, **kwargs})


# -- store ------------------------------------------------------------------------------------------


def test_growth_exponent_is_the_log_log_slope():
    sizes = [10, 100, 1000, 10_000]
    assert math.isclose(growth_exponent(sizes, [3 * s**0.5 for s in sizes]), 0.5)
    assert math.isclose(growth_exponent(sizes, [0.1 * s for s in sizes]), 1.0)
    assert growth_exponent([10], [1.0]) is None


def test_run_store_cost_reports_each_size_and_backend():
    report = run_store_cost(
        [1200, 300],
        key_size=16,
        hidden=8,
        k=8,
        queries=4,
        prompts=2,
        write=64,
        merge_every=2,
        store_options={"ef_construction": 16},
    )
    assert report["setup"]["sizes"] == [300, 1200]
    assert report["setup"]["raw_bytes_per_entry"] == (8 + 16) * 2 + 16
    assert list(report["results"]) == ["exact", "hnsw"]
    for backend, rows in report["results"].items():
        assert [r["size"] for r in rows] == [300, 1200] and [r["held"] for r in rows] == [300, 1200]
        for r in rows:
            assert r["add_us_per_entry"] > 0 and r["latency_ms_median"] > 0 and len(r["latency_ms_samples"]) == 2
            assert r["accounted_vs_raw"] >= 1.0 and r["k"] == 8
            assert math.isclose(r["latency_ms_median"], statistics.median(r["latency_ms_samples"]))
            if backend == "hnsw":
                assert 0.0 <= r["recall"] <= 1.0
        slope = growth_exponent([r["size"] for r in rows], [r["latency_ms_median"] for r in rows])
        assert math.isclose(report["growth"][backend]["slope"], slope)
        assert report["growth"][backend]["sublinear"] == (slope < 1)
    assert report["aim"]["met"] == any(g["sublinear"] for g in report["growth"].values())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"sizes": [0]}, "sizes must be"),
        ({"sizes": [100, -5]}, "sizes must be"),
        ({"sizes": []}, "at least one store size"),
        ({"backends": ["nope"]}, "unknown store backend 'nope'"),
        ({"dtype": "float8"}, "dtype must be"),
        ({"k": 0}, "k must be"),
    ],
)
def test_run_store_cost_refuses_bad_input(kwargs, words):
    with pytest.raises(InputError, match=words):
        run_store_cost(**{"sizes": [100], "key_size": 8, "hidden": 8, **kwargs})


# -- command ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["bench"], ["bench", "speed"], ["bench", "store"]])
def test_bench_commands_have_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0 and "usage: memkit bench" in capsys.readouterr().out


def test_parse_sizes_takes_k_and_m():
    assert command.parse_sizes("10k, 31_623,1M,2.5k") == [10_000, 31_623, 1_000_000, 2_500]


def test_bench_store_writes_a_json_report_and_a_png(tmp_path, capsys):
    assert _run(["bench", "store", *SMALL_STORE, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench-store.json").read_text())
    assert report["benchmark"] == "store" and report["setup"]["sizes"] == [300, 1200]
    assert report["setup"]["store_options"] == {"ef_construction": 16}
    assert _is_png(tmp_path / "out" / "bench-store.png")
    out = capsys.readouterr().out
    assert "growth exact" in out and "bench-store.json" in out


def test_bench_speed_writes_a_json_report_and_a_png(tmp_path, tiny_sources, capsys):
    model, recipe = tiny_sources
    argv = ["bench", "speed", "--model", str(model), "--recipe", str(recipe), "--out", str(tmp_path)]
    assert _run([*argv, "--memory-tokens", "128", "--decode-tokens", "3", "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "bench-speed.json").read_text())
    assert report["model"]["source"] == str(model) and report["setup"]["memory_tokens"] == 128
    assert _is_png(tmp_path / "bench-speed.png")
    assert "decode (tokens/s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "error", "words"),
    [
        (["store", "--sizes", "0"], InputError, "must be > 0"),
        (["store", "--sizes", "10k,-3"], InputError, "is not a size"),
        (["store", "--sizes", "lots"], InputError, "is not a size"),
        (["store", "--backends", "exact,nope"], InputError, "unknown store backend 'nope'"),
        (["store", "--dtype", "float8"], InputError, "dtype must be"),
        (["store", "--sizes", "100", "--k", "0"], InputError, "k must be"),
        (["store", "--threads", "0"], InputError, "--threads must be"),
        (["speed", "--model", "missing.gguf"], InputError, "no such file or folder"),
        (["speed", "--recipe", "no-such-recipe"], UnknownComponentError, "no-such-recipe"),
        (["speed", "--repeats", "0"], InputError, "--repeats must be"),
    ],
)
def test_bad_input_is_a_memkit_error(argv, error, words, tmp_path):
    with pytest.raises(error, match=words) as caught:
        _run(["bench", *argv, "--out", str(tmp_path)])
    assert isinstance(caught.value, MemkitError) and "\n" not in str(caught.value)


def test_an_out_path_that_is_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="is a file"):
        _run(["bench", "store", *SMALL_STORE, "--out", str(blocker)])


def test_a_model_folder_that_memkit_cannot_load_is_a_memkit_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemkitError, match="neither"):
        _run(["bench", "speed", "--model", str(tmp_path / "empty"), "--out", str(tmp_path)])


@pytest.mark.slow
def test_speed_on_smollm2_reads_a_full_store(smollm2):
    model, tok = smollm2
    mem = memkit.wrap(model, "training-free", tokenizer=tok, pool={"capacity": 512}, retrieve=128)
    try:
        report = run_speed(mem, tok, memory_tokens=1024, decode_tokens=3, chunk_tokens=64, repeats=1, warmup=0)
    finally:
        mem.unwrap()
    assert report["setup"]["memory_read_positions"] == 1 + 128 + 512
    assert report["setup"]["tokens"] == "tokenised synthetic notes"
    for fig in report["figures"].values():
        _check_figure(fig)
    assert report["retrieval"]["k"] == 128 and len(report["retrieval"]["ms_per_layer"]) == 30
