"""The ``memkit`` command line: help everywhere, clear errors with exit codes, inject/ask/chat for real."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import memkit
from memkit.cli import main

COMMANDS = ["demo", "inject", "ask", "chat", "eval", "bench"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: memkit") and (command is None or command in out)


def test_bad_usage_exits_2(capsys):
    for argv in ([], ["nonsense"], ["ask"], ["inject", "--memory", "m.memkit"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_a_missing_file_is_an_error_message_and_exit_1_not_a_traceback(tmp_path, capsys):
    assert main(["inject", str(tmp_path / "missing.txt"), "--memory", str(tmp_path / "m.memkit")]) == 1
    err = capsys.readouterr().err
    assert "memkit inject: error: file" in err and "missing.txt does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "m.memkit").exists()


def test_asking_without_a_memory_file_says_how_to_make_one(tmp_path, capsys):
    assert main(["ask", "Who?", "--memory", str(tmp_path / "none.memkit")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "memkit inject FILE --memory" in err


def test_an_unknown_recipe_and_a_non_local_model_are_refused_before_anything_is_written(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("Some notes.")
    memory = tmp_path / "m.memkit"
    assert main(["inject", str(text), "--memory", str(memory), "--recipe", "no-such-recipe"]) == 1
    assert "no-such-recipe" in capsys.readouterr().err
    assert main(["inject", str(text), "--memory", str(memory), "--model", "someone/some-model"]) == 1
    assert "nothing is downloaded" in capsys.readouterr().err
    assert not memory.exists()


def test_the_memkit_module_runs_as_a_program():
    done = subprocess.run([sys.executable, "-m", "memkit.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "inject" in done.stdout


@pytest.mark.slow
def test_inject_then_ask_and_chat_answer_from_the_memory_file(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text(
        "The ferry to Varenholm leaves from Eastwick harbour every morning at seven. "
        "The lighthouse keeper of Varenholm is called Margit Olsen."
    )
    memory = tmp_path / "notes.memkit"
    assert main(["inject", str(notes), "--memory", str(memory), "--no-progress"]) == 0
    assert memory.is_file() and "tokens injected" in capsys.readouterr().out
    assert main(["ask", "Who is the lighthouse keeper of Varenholm?", "--memory", str(memory)]) == 0
    assert "Margit" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("Where does the ferry to Varenholm leave from?\n\n"))
    assert main(["chat", "--memory", str(memory), "--max-new-tokens", "24"]) == 0
    assert "Eastwick" in capsys.readouterr().out
    # the memory file is refused by a wrapper of another recipe, with a message and exit code 1
    other = tmp_path / "smaller.toml"
    other.write_text(memkit.load_recipe("training-free").with_overrides({"pool": {"capacity": 1024}}).to_toml())
    assert main(["ask", "Who?", "--memory", str(memory), "--recipe", str(other)]) == 1
    err = capsys.readouterr().err
    assert "another model or recipe" in err and "capacity" in err


def test_a_local_model_folder_loads_and_one_without_a_tokenizer_is_refused(tmp_path, capsys):
    from memkit.testing import tiny_model

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    text = tmp_path / "notes.txt"
    text.write_text("Some notes.")
    assert main(["inject", str(text), "--memory", str(tmp_path / "m.memkit"), "--model", str(folder)]) == 1
    assert "has no tokenizer" in capsys.readouterr().err
