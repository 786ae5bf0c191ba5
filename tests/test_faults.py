"""Faults: a save killed at any moment, damaged memory files, and failures in the middle of an injection."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import memkit
from memkit.backbone import Backbone
from memkit.state import CHECKSUMS_KEY, read_state
from memkit.testing import tiny_model
from tests.helpers import assert_same_state, full_state

HERE = Path(__file__).resolve().parent


def _kill_child_module() -> Any:
    """tests/kill_child.py as a module (tests/ is not a package), for its list of phases."""
    spec = importlib.util.spec_from_file_location("memkit_tests_kill_child", HERE / "kill_child.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_KILL_CHILD = _kill_child_module()
PHASES: tuple[str, ...] = _KILL_CHILD.PHASES
BEFORE_REPLACE: tuple[str, ...] = _KILL_CHILD.BEFORE_REPLACE

SMALL_MPLUS = {
    "chunk_size": 16,
    "retrieve": 8,
    "pool": {"capacity": 24, "write_size": 8, "seed": 0},
    "store": {"capacity": 40, "merge_every": 3},
    "retriever": {"key_size": 8},
}


def _memoryllm() -> memkit.MemkitModel:
    return memkit.wrap(
        tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8, "seed": 0}
    )


def _same_state(path: Path, reference: Path) -> bool:
    """Whether two memory files hold the same metadata and bit-identical tensors."""
    tensors, meta = read_state(path)
    ref_tensors, ref_meta = read_state(reference)
    return (
        meta == ref_meta
        and tensors.keys() == ref_tensors.keys()
        and all(torch.equal(t, ref_tensors[name]) for name, t in tensors.items())
    )


# ---------------------------------------------------------------------------------------------------
# SIGKILL during save_memory, with a real child process
# ---------------------------------------------------------------------------------------------------


class _Child:
    """tests/kill_child.py running in a subprocess, with lines read by a thread (so reads can time out)."""

    def __init__(self, folder: Path) -> None:
        env = {**os.environ, "MEMKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "kill_child.py"), str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, prefix: str, timeout: float = 60.0) -> list[str]:
        """The words of the next line, which must start with ``prefix``."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"kill_child.py said nothing within {timeout} s (expected {prefix!r})") from None
        assert line.startswith(prefix), f"kill_child.py said {line!r}, expected {prefix!r}"
        return line.split()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def kill_worker(self, pid: int) -> None:
        """SIGKILL the worker and check that it died of it."""
        os.kill(pid, signal.SIGKILL)
        status = int(self.expect("reaped")[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[_Child]:
    started = _Child(tmp_path)
    try:
        started.expect("ready", timeout=300)  # imports torch and memkit once
        yield started
    finally:
        started.close()


@pytest.mark.skipif(sys.platform != "linux", reason="kill_child.py forks its workers")
def test_sigkill_at_any_moment_of_save_memory_leaves_a_whole_loadable_file(child: _Child, tmp_path: Path) -> None:
    target, ref_a, ref_b = tmp_path / "target.memkit", tmp_path / "a.ref", tmp_path / "b.ref"
    assert not _same_state(ref_a, ref_b), "the two states must differ for the test to tell them apart"
    mem = memkit.wrap(
        tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 256, "write_size": 8, "seed": 0}
    )

    # at every phase of the write: the target is the old state until the rename, the new one after
    for phase in PHASES:
        child.send(f"stop {phase}")
        words = child.expect("at")
        assert words[1] == phase
        child.kill_worker(int(words[2]))
        expected = ref_a if phase in BEFORE_REPLACE else ref_b
        assert _same_state(target, expected), f"killed at {phase}: the target is not the expected whole state"
        mem.load_memory(target)
        assert torch.equal(mem.pool.read(), read_state(expected)[0]["pool.vectors"])

    # at random moments while saving A and B in a loop: the target is always one of them, whole
    rng = random.Random(0)
    for _ in range(25):
        child.send("loop")
        pid = int(child.expect("looping")[1])
        time.sleep(rng.uniform(0.0, 0.03))
        child.kill_worker(pid)
        mem.load_memory(target)  # loads: never a partial file
        assert _same_state(target, ref_a) or _same_state(target, ref_b), "the target is neither state saved"

    # what a kill can leave behind is a hidden temporary file next to the target (memkit's own, or the one
    # safetensors writes before renaming it to memkit's), never a file under another name
    leftovers = {p.name for p in tmp_path.iterdir()} - {"target.memkit", "a.ref", "b.ref"}
    odd = {
        n for n in leftovers if not ((n.startswith(".target.memkit.") and n.endswith(".tmp")) or n.startswith(".tmp"))
    }
    assert not odd, odd


# ---------------------------------------------------------------------------------------------------
# damaged and foreign files
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[memkit.MemkitModel, Path]:
    """A wrapped model with some memory, saved to ``good.memkit``."""
    mem = _memoryllm()
    with torch.no_grad():
        mem.inject(torch.arange(3, 60), label="doc")
    path = tmp_path / "good.memkit"
    mem.save_memory(path)
    return mem, path


def _header_length(data: bytes) -> int:
    return int(struct.unpack("<Q", data[:8])[0])


def _refused(mem: memkit.MemkitModel, path: Path, *what: str) -> str:
    """Load ``path``; it must raise MemoryStateError naming the file (and ``what``) and leave memory as it was."""
    before = {name: t.clone() for name, t in mem.pool.state_dict().items()}
    with pytest.raises(memkit.MemoryStateError) as info:
        mem.load_memory(path)
    message = str(info.value)
    assert str(path) in message, f"the message does not name the file: {message}"
    for word in what:
        assert word in message, f"the message does not say {word!r}: {message}"
    after = mem.pool.state_dict()
    assert all(torch.equal(after[name], t) for name, t in before.items())
    return message


def _damage(path: Path, how: str) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"{how}.memkit")
    if how == "truncated":
        out.write_bytes(data[: len(data) - 100])
    elif how == "header-only":
        out.write_bytes(data[: 8 + _header_length(data)])
    elif how == "empty":
        out.write_bytes(b"")
    elif how == "text":
        out.write_text("this is not a memory file\n")
    elif how == "wrong-length":
        out.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    else:
        raise AssertionError(how)
    return out


@pytest.mark.parametrize("how", ["truncated", "header-only", "empty", "text", "wrong-length"])
def test_a_truncated_empty_or_non_safetensors_file_is_refused_naming_the_file(
    saved: tuple[memkit.MemkitModel, Path], how: str
) -> None:
    mem, path = saved
    _refused(mem, _damage(path, how), "truncated or corrupted")


def test_every_flipped_byte_of_the_tensor_data_is_caught_by_the_checksum(
    saved: tuple[memkit.MemkitModel, Path],
) -> None:
    mem, path = saved
    data = bytearray(path.read_bytes())
    start = 8 + _header_length(bytes(data))
    bad = path.with_name("flipped.memkit")
    positions = range(start, len(data), max(1, (len(data) - start) // 150))  # ~150 places across every tensor
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 0x01  # one bit: the smallest corruption, invisible to safetensors itself
        bad.write_bytes(bytes(flipped))
        _refused(mem, bad, "checksum", "tensor")


def test_every_flipped_byte_of_the_header_is_refused(saved: tuple[memkit.MemkitModel, Path]) -> None:
    mem, path = saved
    data = path.read_bytes()
    end = 8 + _header_length(data)
    bad = path.with_name("flipped.memkit")
    for position in range(end):  # the length prefix, the JSON header, the metadata and the checksums
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        bad.write_bytes(bytes(flipped))
        _refused(mem, bad)


def test_a_change_to_the_metadata_is_caught_by_the_checksum(saved: tuple[memkit.MemkitModel, Path]) -> None:
    mem, path = saved
    tensors, _ = read_state(path)
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    header["meta"] = header["meta"].replace('"doc"', '"dog"')  # the same length, still valid JSON
    forged = path.with_name("forged.memkit")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(forged), metadata=header)
    _refused(mem, forged, "checksum", "the metadata")


def test_a_version_2_file_without_checksums_is_refused(saved: tuple[memkit.MemkitModel, Path]) -> None:
    mem, path = saved
    tensors, _ = read_state(path)
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    del header[CHECKSUMS_KEY]
    stripped = path.with_name("stripped.memkit")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(stripped), metadata=header)
    _refused(mem, stripped, "no checksums")


def test_a_tensor_added_to_a_file_is_refused(saved: tuple[memkit.MemkitModel, Path]) -> None:
    mem, path = saved
    tensors, _ = read_state(path)
    with safe_open(str(path), framework="pt") as handle:
        header = dict(handle.metadata())
    extra = path.with_name("extra.memkit")
    save_file({**{k: v.contiguous() for k, v in tensors.items()}, "pool.extra": torch.zeros(3)}, str(extra), header)
    _refused(mem, extra, "pool.extra")


@pytest.mark.parametrize("version", ["0", "3", "99", "", "1.0"])
def test_a_file_of_another_state_format_version_is_refused_saying_which(
    saved: tuple[memkit.MemkitModel, Path], version: str
) -> None:
    mem, path = saved
    tensors, meta = read_state(path)
    other = path.with_name("other-version.memkit")
    header = {"format": "memkit.memory", "format_version": version, "meta": json.dumps(meta)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(other), metadata=header)
    _refused(mem, other, f"format version {version}", "use the memkit version that wrote it")


def test_a_version_1_file_without_checksums_still_loads(saved: tuple[memkit.MemkitModel, Path]) -> None:
    mem, path = saved
    tensors, meta = read_state(path)
    old = path.with_name("v1.memkit")
    header = {"format": "memkit.memory", "format_version": "1", "meta": json.dumps(meta, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(old), metadata=header)
    other = _memoryllm()
    other.load_memory(old)
    assert torch.equal(other.pool.read(), mem.pool.read())
    assert other.source_labels == {0: "doc"}


def test_saved_files_record_a_checksum_of_the_metadata_and_of_every_tensor(
    saved: tuple[memkit.MemkitModel, Path],
) -> None:
    _, path = saved
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        names = set(handle.keys())
    assert header["format_version"] == "2"
    recorded = json.loads(header[CHECKSUMS_KEY])
    assert set(recorded) == {"meta"} | {f"tensor:{name}" for name in names}
    assert all(len(value) == 64 for value in recorded.values())


# ---------------------------------------------------------------------------------------------------
# a failure in the middle of an injection leaves the memory exactly as it was
# ---------------------------------------------------------------------------------------------------


class _Failing:
    """Wraps a callable; the ``fail_on``-th call (counting from 1) raises ``error`` instead."""

    def __init__(self, function: Callable[..., Any], fail_on: int, error: BaseException) -> None:
        self.function, self.fail_on, self.error, self.calls = function, fail_on, error, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.error
        return self.function(*args, **kwargs)


def _patch_pool_write(mem: memkit.MemkitModel, error: BaseException) -> _Failing:
    failing = _Failing(mem.pool.write, 3, error)
    mem.pool.write = failing  # type: ignore[method-assign]
    return failing


def _patch_store_add(mem: memkit.MemkitModel, error: BaseException) -> _Failing:
    assert mem.store is not None
    failing = _Failing(mem.store.add, 4, error)  # the second layer of the second update
    mem.store.add = failing  # type: ignore[method-assign]
    return failing


def _patch_store_advance(mem: memkit.MemkitModel, error: BaseException) -> _Failing:
    assert mem.store is not None
    failing = _Failing(mem.store.advance, 3, error)
    mem.store.advance = failing  # type: ignore[method-assign]
    return failing


def _patch_retriever_keys(mem: memkit.MemkitModel, error: BaseException) -> _Failing:
    assert mem.retriever is not None
    failing = _Failing(mem.retriever.keys, 3, error)
    mem.retriever.keys = failing  # type: ignore[method-assign]
    return failing


def _patch_layer_forward(mem: memkit.MemkitModel, error: BaseException) -> _Failing:
    layer = Backbone(mem.base_model).layers[1]
    failing = _Failing(layer.forward, 3, error)  # the third chunk, after two were written
    layer.forward = failing
    return failing


FAULTS: dict[str, tuple[Callable[[memkit.MemkitModel, BaseException], _Failing], BaseException]] = {
    "pool-write-raises": (_patch_pool_write, RuntimeError("plugin pool failed")),
    "store-add-raises": (_patch_store_add, RuntimeError("plugin store failed")),
    "store-add-out-of-memory": (_patch_store_add, MemoryError()),
    "store-advance-raises": (_patch_store_advance, ValueError("plugin store failed")),
    "retriever-keys-raises": (_patch_retriever_keys, RuntimeError("plugin retriever failed")),
    "layer-torch-out-of-memory": (_patch_layer_forward, torch.OutOfMemoryError("CUDA out of memory (simulated)")),
    "layer-runtime-out-of-memory": (_patch_layer_forward, RuntimeError("out of memory")),
    "layer-keyboard-interrupt": (_patch_layer_forward, KeyboardInterrupt()),
}


@pytest.mark.parametrize("store", ["exact", "hnsw"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failure_midway_through_inject_leaves_the_memory_exactly_as_it_was(fault: str, store: str) -> None:
    # exact: the cheap snapshot (references to columns never modified in place); hnsw: the interface's copy
    options = {**SMALL_MPLUS, "store": {**SMALL_MPLUS["store"], "name": store}}
    mem = memkit.wrap(tiny_model("llama"), "mplus", **options)
    with torch.no_grad():
        for i in range(4):  # fill the pool and put entries in the store (some staged, some merged)
            mem.inject(torch.arange(3 + 10 * i, 43 + 10 * i) % 120 + 3, label=f"doc-{i}")
    assert mem.store is not None and mem.store.size(0) > 0 and mem.memory_size == mem.pool.capacity
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = mem(prompt).logits
    before = full_state(mem)

    patch, error = FAULTS[fault]
    failing = patch(mem, error)
    with torch.no_grad(), pytest.raises(type(error)):
        mem.inject(torch.arange(10, 74), label="never")  # four chunks: the fault comes midway
    assert failing.calls == failing.fail_on, "the fault did not fire where the test meant it to"

    assert_same_state(before, full_state(mem))
    with torch.no_grad():
        assert torch.equal(mem(prompt).logits, logits)


def test_after_a_failed_inject_the_next_inject_matches_a_memory_that_never_failed() -> None:
    mem = memkit.wrap(tiny_model("llama"), "mplus", **SMALL_MPLUS)
    twin = memkit.wrap(tiny_model("llama"), "mplus", **SMALL_MPLUS)
    with torch.no_grad():
        for m in (mem, twin):
            for i in range(3):
                m.inject(torch.arange(3 + 10 * i, 43 + 10 * i), label=f"doc-{i}")
        _patch_store_add(mem, RuntimeError("once"))
        with pytest.raises(RuntimeError, match="once"):
            mem.inject(torch.arange(10, 74))
        for m in (mem, twin):
            m.inject(torch.arange(20, 90), label="after")
    assert_same_state(full_state(twin), full_state(mem))
