"""The memory state file: safetensors tensors plus JSON metadata, written atomically.

A state file holds only memory (the pool's vectors, ages and provenance, and whatever else a part
puts in its ``state_dict``), never model weights, and never anything that needs unpickling. Its
metadata records the format version and the shape of the model and recipe it was made for, so that
loading it into another model is refused with a message saying what differs, and (from format
version 2) a SHA-256 checksum of the metadata and of every tensor, so that a corrupted file is refused
rather than loaded with wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memkit.errors import MemoryStateError
from memkit.permissions import default_file_mode

__all__ = [
    "CHECKSUMS_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "checksums",
    "differences",
    "read_safetensors",
    "read_state",
    "tensor_problems",
    "write_state",
]

FORMAT = "memkit.memory"
#: The version written. Version 2 added the ``checksums`` header entry; version 1 files (without it)
#: still load, unverified.
FORMAT_VERSION = 2
#: The versions :func:`read_state` accepts.
READABLE_VERSIONS = ("1", "2")
#: The header entry holding the SHA-256 checksums (a JSON object: ``"meta"`` and one per tensor name).
CHECKSUMS_KEY = "checksums"


def _tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (hex), independent of the file layout."""
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def checksums(tensors: dict[str, torch.Tensor], meta_text: str) -> dict[str, str]:
    """The checksums a state file records: ``"meta"`` for the metadata JSON text, plus one per tensor.

    A tensor named ``meta`` would clash with the metadata entry, so tensor entries are prefixed with
    ``tensor:``.
    """
    out = {"meta": hashlib.sha256(meta_text.encode()).hexdigest()}
    out.update({f"tensor:{name}": _tensor_digest(t) for name, t in tensors.items()})
    return out


def write_state(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` to ``path`` atomically.

    The file is written to a temporary file in the same folder, flushed to disk, and renamed over
    ``path`` in one step, so a reader (or a crash) sees either the old file or the new one, whole.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise MemoryStateError(f"cannot save memory to {target}: folder {folder} does not exist")
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    meta_text = json.dumps(meta, sort_keys=True)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta": meta_text,
        CHECKSUMS_KEY: json.dumps(checksums(contiguous, meta_text), sort_keys=True),
    }
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(contiguous, str(tmp), metadata=header)
        os.chmod(tmp, default_file_mode())  # mkstemp and safetensors make it private; it is an ordinary file
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

    A version 2 file must carry checksums, and every one must match: the metadata and each tensor
    (its dtype, shape and bytes). A version 1 file (written before checksums existed) is read
    unverified.

    Raises:
        MemoryStateError: the file is missing, truncated or corrupted (a checksum that does not match
            names the tensor or the metadata), not a memkit memory file, or of a format version this
            memkit cannot read. The message names the file.
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
    if version not in READABLE_VERSIONS:
        raise MemoryStateError(
            f"memory file {source} has format version {version}, but this memkit reads versions "
            f"{', '.join(READABLE_VERSIONS)}; use the memkit version that wrote it"
        )
    if version != "1" or CHECKSUMS_KEY in header:
        _verify_checksums(source, tensors, header)
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError):
        raise MemoryStateError(f"memory file {source} has unreadable metadata") from None
    if not isinstance(meta, dict):
        raise MemoryStateError(f"memory file {source} has unreadable metadata (not a JSON object)")
    return tensors, meta


def _verify_checksums(source: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    """Refuse ``source`` unless its recorded checksums cover exactly its tensors and metadata, and match."""
    remedy = "the file is corrupted; restore it from a backup or save the memory again"
    try:
        recorded = json.loads(header[CHECKSUMS_KEY])
    except KeyError:
        raise MemoryStateError(
            f"memory file {source} has format version {header.get('format_version')} but no checksums; {remedy}"
        ) from None
    except json.JSONDecodeError:
        raise MemoryStateError(f"memory file {source} has an unreadable checksum record; {remedy}") from None
    if not isinstance(recorded, dict):
        raise MemoryStateError(f"memory file {source} has an unreadable checksum record; {remedy}")
    actual = checksums(tensors, header.get("meta", ""))
    missing = sorted(k.removeprefix("tensor:") for k in recorded.keys() - actual.keys())
    unknown = sorted(k.removeprefix("tensor:") for k in actual.keys() - recorded.keys())
    if missing or unknown:
        raise MemoryStateError(
            f"memory file {source} does not hold the tensors its checksums list "
            f"({tensor_problems(missing, unknown, [], 'unlisted')}); {remedy}"
        )
    wrong = [k for k in sorted(actual) if recorded[k] != actual[k]]
    if wrong:
        what = ", ".join("the metadata" if k == "meta" else f"tensor {k.removeprefix('tensor:')!r}" for k in wrong)
        raise MemoryStateError(f"memory file {source} fails its SHA-256 checksum for {what}; {remedy}")


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
