"""Training documents: plain-text or JSONL files, or any iterable of texts or token ids.

The trainer cuts each document into chunks itself (see :class:`~memkit.training.trainer.Trainer`);
this module only turns sources into token-id tensors, one per document, and refuses what cannot
train: no documents at all, unreadable files, documents too short for one chunk and a target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from memkit.errors import DataError

__all__ = ["Documents"]

Source = str | os.PathLike[str] | Sequence[int] | torch.Tensor


class Documents:
    """Documents for training, as token ids ``[n]`` (int64), read lazily and re-readable.

    Args:
        source: a path to a ``.txt`` file (one document per file), a ``.jsonl`` file (one JSON object
            per line; its ``text_field`` is the document) or a folder of such files (sorted by name); a
            list of such paths; or any iterable of documents, each a string (needs ``tokenizer``), a list
            of token ids or a 1-D LongTensor. A one-shot iterator is read once and kept.
        tokenizer: turns text into ids (``add_special_tokens=False``: memkit places its own BOS).
        min_tokens: the fewest tokens a document needs (the trainer asks for one chunk and a target).
        text_field: the JSONL field that holds a document's text.
        skip_short: skip documents shorter than ``min_tokens`` instead of refusing them (they are
            counted in :attr:`skipped`); refusing is the default, so data problems are never silent.

    Iterating yields ``(name, ids)``: ``name`` says where the document came from (``file.jsonl:12``,
    ``#3``), for messages. Raises :class:`~memkit.errors.DataError` for a missing or unreadable file, a
    JSONL line without ``text_field``, a document too short (unless ``skip_short``), or no documents.
    """

    def __init__(
        self,
        source: Source | Iterable[Any],
        *,
        tokenizer: Any = None,
        min_tokens: int = 1,
        text_field: str = "text",
        skip_short: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.min_tokens = int(min_tokens)
        self.text_field = text_field
        self.skip_short = skip_short
        self.skipped = 0
        self._paths: list[Path] | None = None
        self._items: list[Any] | None = None
        if isinstance(source, (str, os.PathLike)):
            self._paths = _expand([Path(source)])
        elif isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
            if all(isinstance(s, os.PathLike) or Path(s).suffix in (".txt", ".jsonl") for s in source):
                self._paths = _expand([Path(s) for s in source])
            else:
                self._items = list(source)  # a list of texts
        elif isinstance(source, torch.Tensor):
            raise DataError("a single tensor is not a data set; pass a list of 1-D token-id tensors, one per document")
        elif isinstance(source, Iterable):
            self._items = list(source)
        else:
            raise DataError(
                "training data must be a path, a list of paths, or an iterable of documents; "
                f"got {type(source).__name__}"
            )

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.skipped = 0
        seen = 0
        for name, raw in self._raw():
            ids = self._ids(name, raw)
            if ids.numel() < self.min_tokens:
                if self.skip_short:
                    self.skipped += 1
                    continue
                raise DataError(
                    f"document {name} has {ids.numel()} tokens, fewer than the {self.min_tokens} one training step "
                    "needs (a chunk of min_chunk_tokens and a target of min_target_tokens); lengthen or drop it, "
                    "lower those settings of the stage, or pass skip_short=True"
                )
            seen += 1
            yield name, ids
        if seen == 0:
            what = f" (all {self.skipped} were shorter than {self.min_tokens} tokens)" if self.skipped else ""
            raise DataError(f"the training data holds no usable documents{what}; give at least one document")

    def _raw(self) -> Iterator[tuple[str, Any]]:
        if self._items is not None:
            for i, item in enumerate(self._items):
                yield f"#{i}", item
            return
        assert self._paths is not None
        for path in self._paths:
            if path.suffix == ".jsonl":
                yield from self._jsonl(path)
            else:
                yield path.name, _read(path)

    def _jsonl(self, path: Path) -> Iterator[tuple[str, Any]]:
        for number, line in enumerate(_read(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{number} is not valid JSON ({exc.msg}); each line must be one object"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
                raise DataError(
                    f"{path}:{number} has no string field {self.text_field!r}; set text_field= to the field that "
                    "holds the document"
                )
            yield f"{path.name}:{number}", record[self.text_field]

    def _ids(self, name: str, raw: Any) -> torch.Tensor:
        if isinstance(raw, str):
            if self.tokenizer is None:
                raise DataError(f"document {name} is text but no tokenizer was given; pass tokenizer= or token ids")
            return torch.tensor(self.tokenizer(raw, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if isinstance(raw, torch.Tensor):
            if raw.dim() != 1 or raw.is_floating_point() or raw.dtype == torch.bool:
                raise DataError(
                    f"document {name} must be a 1-D integer tensor of token ids, got {raw.dtype} {list(raw.shape)}"
                )
            return raw.long()
        if isinstance(raw, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
            return torch.tensor(list(raw), dtype=torch.long)
        raise DataError(f"document {name} is a {type(raw).__name__}; documents are texts or lists of token ids")


def _expand(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
            if not found:
                raise DataError(f"folder {path} holds no .txt or .jsonl files")
            out.extend(found)
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise DataError(f"{path}: training files are .txt (one document) or .jsonl (one per line)")
            out.append(path)
        else:
            raise DataError(f"training data {path} does not exist")
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read training file {path}: {exc}") from None
