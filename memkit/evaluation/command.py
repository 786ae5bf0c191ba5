"""``memkit eval NAME``: run one evaluation from the command line; write its JSON report and PNG plot.

::

    memkit eval retention --samples 100 --distances 0 1 2 4 8 16 32
    memkit eval passkey --lengths 2048 4096 8192 16384 --depths 0 0.25 0.5 0.75 1
    memkit eval niah --lengths 4096 16384
    memkit eval hotpotqa --samples 100
    memkit eval perplexity --injections 64

Each run writes ``OUT/NAME.json`` and ``OUT/NAME.png`` (``--out``, default ``eval-results``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from memkit.errors import DataError, InputError, MissingTokenizerError

__all__ = ["EVALS", "register", "run"]

EVALS = ("retention", "passkey", "niah", "hotpotqa", "perplexity")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"retrieve\": 512}'")
    return value


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf file, or a local model folder")
    sub.add_argument("--recipe", default="training-free", help="recipe name or .toml file (default training-free)")
    sub.add_argument(
        "--override", type=_json_object, default=None, help="recipe overrides as JSON, e.g. '{\"retrieve\": 512}'"
    )
    sub.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="model dtype (default float32)"
    )
    sub.add_argument("--out", type=Path, default=Path("eval-results"), help="folder for NAME.json and NAME.png")
    sub.add_argument("--seed", type=int, default=0, help="seed for the data drawn (default 0)")
    sub.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(commands: Any) -> None:
    """Add the ``eval`` command, with one sub-command per evaluation, to ``memkit``'s sub-parsers."""
    parser = commands.add_parser("eval", help="evaluate memory on offline data; writes a JSON report and a PNG plot")
    evals = parser.add_subparsers(dest="eval_name", metavar="NAME")
    evals.required = True

    retention = evals.add_parser("retention", help="SQuAD v2 retention after k distractor chunks (MemoryLLM protocol)")
    retention.add_argument("--samples", type=int, default=100, help="questions (default 100)")
    retention.add_argument("--distances", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32], help="values of k")
    retention.add_argument("--chunk-tokens", type=int, default=512, help="tokens per distractor chunk (default 512)")
    retention.add_argument("--max-new-tokens", type=int, default=10, help="greedy tokens per answer (default 10)")
    retention.add_argument("--template", choices=["raw", "chat"], default="raw", help="prompt format (default raw)")
    retention.add_argument("--no-baselines", action="store_true", help="skip the in-prompt and no-context answers")

    for name, what in (("passkey", "pass keys in repeated filler"), ("niah", "a needle in Paul Graham's essays")):
        grid = evals.add_parser(name, help=f"{what}, over a grid of length by depth (heat map)")
        grid.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="tokens")
        grid.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="0 to 1")
        grid.add_argument("--samples", type=int, default=1, help="haystacks per cell (default 1)")
        grid.add_argument("--max-new-tokens", type=int, default=12, help="greedy tokens per answer (default 12)")
        grid.add_argument("--window", type=int, default=None, help="the plain baseline's window (default: the model's)")
        grid.add_argument("--no-baseline", action="store_true", help="skip the plain model on its window")

    hotpot = evals.add_parser("hotpotqa", help="HotpotQA with the supporting paragraphs in memory")
    hotpot.add_argument("--samples", type=int, default=100, help="questions (default 100)")
    hotpot.add_argument("--distractors", action="store_true", help="inject the distractor paragraphs too")
    hotpot.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer (default 16)")
    hotpot.add_argument("--template", choices=["raw", "chat"], default="raw", help="prompt format (default raw)")
    hotpot.add_argument("--no-baselines", action="store_true", help="skip the in-prompt and no-context answers")

    ppl = evals.add_parser("perplexity", help="perplexity on held-out text as injections go on")
    ppl.add_argument("--injections", type=int, default=64, help="number of injections (default 64)")
    ppl.add_argument("--warmup", type=int, default=None, help="injections before the start (default: fill the pool)")
    ppl.add_argument("--every", type=int, default=8, help="measure after every this many (default 8)")
    ppl.add_argument("--inject-tokens", type=int, default=512, help="tokens per injection (default 512)")
    ppl.add_argument("--held-out-tokens", type=int, default=1024, help="held-out tokens scored (default 1024)")
    ppl.add_argument("--text", default=None, help="a UTF-8 text file as the source (default: the essays)")

    for sub in evals.choices.values():
        _common(sub)


def _config(args: argparse.Namespace) -> BaseModel:
    """The evaluation's strict config from the parsed arguments (InputError on a bad value)."""
    name = args.eval_name
    try:
        if name == "retention":
            from memkit.evaluation.retention import RetentionConfig

            return RetentionConfig(
                samples=args.samples,
                distances=args.distances,
                chunk_tokens=args.chunk_tokens,
                max_new_tokens=args.max_new_tokens,
                template=args.template,
                baselines=not args.no_baselines,
                seed=args.seed,
            )
        if name in ("passkey", "niah"):
            from memkit.evaluation.needle import NeedleConfig

            return NeedleConfig(
                task=name,
                lengths=args.lengths,
                depths=args.depths,
                samples=args.samples,
                max_new_tokens=args.max_new_tokens,
                window=args.window,
                baseline=not args.no_baseline,
                seed=args.seed,
            )
        if name == "hotpotqa":
            from memkit.evaluation.hotpotqa import HotpotConfig

            return HotpotConfig(
                samples=args.samples,
                distractors=args.distractors,
                max_new_tokens=args.max_new_tokens,
                template=args.template,
                baselines=not args.no_baselines,
                seed=args.seed,
            )
        from memkit.evaluation.perplexity import PerplexityConfig

        return PerplexityConfig(
            injections=args.injections,
            warmup=args.warmup,
            every=args.every,
            inject_tokens=args.inject_tokens,
            held_out_tokens=args.held_out_tokens,
            text=args.text,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in exc.errors())
        raise InputError(f"bad settings for eval {name}: {problems}") from None


def evaluate(name: str, mem: Any, tokenizer: Any, config: Any, progress: bool = True) -> dict[str, Any]:
    """Run evaluation ``name`` with its ``config``; returns ``{"results": ..., "samples": [...]}``."""
    if name == "retention":
        from memkit.evaluation.retention import run_retention

        return run_retention(mem, tokenizer, config, progress)
    if name in ("passkey", "niah"):
        from memkit.evaluation.needle import run_needle

        return run_needle(mem, tokenizer, config, progress)
    if name == "hotpotqa":
        from memkit.evaluation.hotpotqa import run_hotpotqa

        return run_hotpotqa(mem, tokenizer, config, progress)
    if name == "perplexity":
        from memkit.evaluation.perplexity import run_perplexity

        return run_perplexity(mem, tokenizer, config, progress)
    raise InputError(f"unknown eval {name!r}; choose from {', '.join(EVALS)}")


def _summary(name: str, results: dict[str, Any]) -> str:
    if name == "retention":
        line = "  ".join(f"k={k}: {v['accuracy']:.2f}" for k, v in results["by_distance"].items())
        extra = (
            f"  (in prompt {results['in_prompt']:.2f}, no context {results['no_context']:.2f})"
            if "in_prompt" in results
            else ""
        )
        return f"exact hit from memory  {line}{extra}"
    if name in ("passkey", "niah"):
        extra = (
            f"; plain model on its last {results['window']} tokens {results['baseline_accuracy']:.2f}"
            if "window" in results
            else ""
        )
        return f"{name}: accuracy from memory {results['accuracy']:.2f} over the grid{extra}"
    if name == "hotpotqa":
        ways = [w for w in ("from_memory", "in_prompt", "no_context") if w in results]
        return "  ".join(f"{w}: hit {results[w]['exact_hit']:.2f} F1 {results[w]['f1']:.2f}" for w in ways)
    return (
        f"perplexity {results['start_perplexity']:.2f} -> {results['end_perplexity']:.2f} "
        f"(drift {results['end_drift']:+.2%}, largest {results['max_abs_drift']:.2%}; "
        f"plain model {results['plain_perplexity']:.2f})"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``memkit eval`` with parsed arguments; returns the exit code (errors raise MemkitError)."""
    import torch

    import memkit
    from memkit.evaluation.datasets import data_file
    from memkit.evaluation.plots import _pyplot, plot_report
    from memkit.evaluation.report import header, write_json
    from memkit.local_models import load_local_model

    name = args.eval_name
    config = _config(args)  # refuse bad settings, missing data or plotting before loading a model
    needs = {"retention": "squad.json", "hotpotqa": "hotpotqa.json", "niah": "PaulGrahamEssays.json"}
    if name == "perplexity" and getattr(config, "text", None) is None:
        needs[name] = "PaulGrahamEssays.json"
    if name in needs:
        data_file(needs[name])
    text = getattr(config, "text", None)
    if text is not None and not Path(text).is_file():
        raise DataError(f"text file {text} does not exist")
    _pyplot()
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder")
    recipe = memkit.load_recipe(args.recipe)
    if args.override:
        recipe = recipe.with_overrides(args.override)
    torch.manual_seed(args.seed)
    model, tokenizer = load_local_model(args.model, dtype=getattr(torch, args.dtype))
    if tokenizer is None:
        raise MissingTokenizerError(f"the model at {args.model} has no tokenizer; memkit eval needs one")
    mem = memkit.wrap(model, recipe, tokenizer=tokenizer)
    try:
        report = header(name, mem, args.model, config.model_dump())
        report.update(evaluate(name, mem, tokenizer, config, progress=not args.no_progress))
    finally:
        mem.unwrap()
    json_path, png_path = args.out / f"{name}.json", args.out / f"{name}.png"
    write_json(report, json_path)
    plot_report(report, png_path)
    print(_summary(name, report["results"]))
    print(f"report {json_path}, plot {png_path}", file=sys.stderr)
    return 0
