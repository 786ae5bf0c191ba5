"""The memory state file: safetensors tensors plus JSON metadata, written atomically.

A state file holds only memory (the pool's vectors, ages and provenance, and whatever else a part
puts in its ``state_dict``), never model weights, and never anything that needs unpickling. Its
metadata records the format version and the shape of the model and recipe it was made for, so that
loading it into another model is refused with a message saying what differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memkit.errors import MemoryStateError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "differences",
    "read_safetensors",
    "read_state",
    "tensor_problems",
    "write_state",
]

FORMAT = "memkit.memory"
FORMAT_VERSION = 1


def write_state(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` to ``path`` atomically.

    The file is written to a temporary file in the same folder, flushed to disk, and renamed over
    ``path`` in one step, so a reader (or a crash) sees either the old file or the new one, whole.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise MemoryStateError(f"cannot save memory to {target}: folder {folder} does not exist")
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta, sort_keys=True),
    }
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(contiguous, str(tmp), metadata=header)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return target
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return target


def read_state(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a state file written by :func:`write_state`.

    Raises:
        MemoryStateError: the file is missing, truncated or corrupted, not a memkit memory file, or of
            a format version this memkit cannot read. The message names the file.
    """
    source = Path(path)
    if not source.is_file():
        raise MemoryStateError(f"memory file {source} does not exist")
    tensors, header = read_safetensors(
        source, MemoryStateError, "memory file", "restore it from a backup or save the memory again"
    )
    if header.get("format") != FORMAT:
        raise MemoryStateError(f"{source} is a safetensors file but not a memkit memory file (no {FORMAT!r} header)")
    version = header.get("format_version")
    if version != str(FORMAT_VERSION):
        raise MemoryStateError(
            f"memory file {source} has format version {version}, but this memkit reads version {FORMAT_VERSION}; "
            "use the memkit version that wrote it"
        )
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError):
        raise MemoryStateError(f"memory file {source} has unreadable metadata") from None
    return tensors, meta


def read_safetensors(
    path: Path, error: type[Exception], what: str, remedy: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (on the CPU) and its string metadata.

    Raises:
        error: the file is truncated or corrupted; the message names ``what`` and the ``remedy``.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise error(f"{what} {path} is truncated or corrupted and cannot be read ({exc}); {remedy}") from None
    return tensors, header


def tensor_problems(missing: list[str], unknown: list[str], wrong: list[str], unknown_word: str = "unknown") -> str:
    """One line listing missing, unknown (or ``unknown_word``) and misshapen tensors, for error messages."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} {unknown_word} tensor(s): {', '.join(unknown)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {', '.join(wrong)}")
    return "; ".join(problems)


def differences(saved: dict[str, Any], ours: dict[str, Any], saved_has: str, ours_has: str) -> list[str]:
    """``"key: <saved_has> X, <ours_has> Y"`` for each key of ``ours`` whose value ``saved`` does not match."""
    return [f"{k}: {saved_has} {saved.get(k)!r}, {ours_has} {v!r}" for k, v in ours.items() if saved.get(k) != v]
