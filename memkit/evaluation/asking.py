"""Prompts and greedy answers, three ways: from memory, with the text in the prompt, with no text.

Two templates:

* ``raw`` (MemoryLLM's protocol): memory receives ``"Context: {text}"`` and the prompt is
  ``"Question: {question} Answer:"``; the in-prompt baseline puts both in one prompt.
* ``chat``: for instruct models, the text is a system turn (in memory, or in the prompt for the
  baseline) and the question a user turn, through the tokenizer's chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from memkit.errors import InputError

__all__ = ["Template", "generate_answer", "memory_text", "plain_model", "prompt_text"]

Template = Literal["raw", "chat"]
SYSTEM = "Answer with a short phrase, using this text: "


def _check_chat(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("template 'chat' needs a tokenizer with a chat template; use template 'raw'")


def memory_text(tokenizer: Any, context: str, template: Template) -> str:
    """What memory receives for ``context``."""
    if template == "raw":
        return f"Context: {context}"
    _check_chat(tokenizer)
    messages = [{"role": "system", "content": SYSTEM + context}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def prompt_text(tokenizer: Any, question: str, template: Template, context: str | None = None) -> str:
    """The prompt for ``question``; with ``context`` it also carries the text (the in-prompt baseline)."""
    if template == "raw":
        ask = f"Question: {question} Answer:"
        return ask if context is None else f"Context: {context}\n{ask}"
    _check_chat(tokenizer)
    messages = [
        {"role": "system", "content": SYSTEM + (context or "")},
        {"role": "user", "content": question},
    ]
    full = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    if context is not None:
        return full
    # Without the text the system turn stays out of the prompt: memory holds it (or nothing does).
    system_only = str(tokenizer.apply_chat_template(messages[:1], tokenize=False))
    return full[len(system_only) :] if full.startswith(system_only) else full


@contextlib.contextmanager
def plain_model(mem: Any) -> Iterator[Any]:
    """The wrapped model's base model with memkit's adapters (if any) off: the plain model of the baselines."""
    adapters = getattr(mem, "adapters", None)
    if adapters is None:
        yield mem.base_model
        return
    with adapters.disabled():
        yield mem.base_model


@torch.no_grad()
def generate_answer(model: Any, tokenizer: Any, prompt: str | list[int], max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (text tokenised without special tokens, or token ids).

    ``model`` is a :class:`memkit.MemkitModel` (reads memory) or a plain model (reads nothing).
    """
    ids = prompt if isinstance(prompt, list) else tokenizer(prompt, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return str(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)).strip()
