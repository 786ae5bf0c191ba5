"""Helper process for tests/test_faults.py: save memory over and over, to be killed with SIGKILL.

Run as ``python tests/kill_child.py FOLDER``. It imports memkit once, wraps two tiny models holding
different memories (A and B), writes ``FOLDER/a.ref`` and ``FOLDER/b.ref`` with them, saves A to
``FOLDER/target.memkit`` and prints ``ready``. Then it reads commands from stdin, one per line, and for
each forks a worker process (so that memkit is imported once, not once per kill):

* ``loop``: the worker prints ``looping PID``, then saves A, B, A, B, ... to the target for ever.
* ``stop PHASE``: the worker saves A to the target, then saves B and stops at ``PHASE`` of the write
  (printing ``at PHASE PID`` and sleeping) until it is killed. Phases: ``start`` (nothing written
  yet), ``temp-created`` (an empty temporary file exists), ``temp-written`` (the temporary file holds
  B, not yet synced), ``temp-synced``, ``replaced`` (the target is B, the folder not yet synced),
  ``done`` (save_memory returned).
* ``quit``: exit.

The test kills the worker with SIGKILL; this process reaps it and prints ``reaped STATUS``. Linux only
(``os.fork``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import memkit
import memkit.state
from memkit.testing import tiny_model

PHASES = ("start", "temp-created", "temp-written", "temp-synced", "replaced", "done")
#: Phases at which the target still holds the state saved before (A); at the others it holds B.
BEFORE_REPLACE = ("start", "temp-created", "temp-written", "temp-synced")


def build(seed: int, tokens: torch.Tensor) -> memkit.MemkitModel:
    """A tiny wrapped model whose memory holds ``tokens`` (a few hundred vectors, so saving takes a moment)."""
    mem = memkit.wrap(
        tiny_model("llama", seed=0), "memoryllm", chunk_size=16, pool={"capacity": 256, "write_size": 8, "seed": seed}
    )
    with torch.no_grad():
        mem.inject(tokens, label=f"doc-{seed}")
    return mem


def _stop(phase: str) -> None:
    print(f"at {phase} {os.getpid()}", flush=True)
    while True:
        time.sleep(60)


def _after(phase: str, stop_at: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, stopping at ``phase`` right after it ran, if that is the phase asked for."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = function(*args, **kwargs)
        if phase == stop_at:
            _stop(phase)
        return out

    return wrapped


def stop_during_save(mem: memkit.MemkitModel, target: Path, phase: str) -> None:
    """Save ``mem`` to ``target``, stopping (for ever) at ``phase`` of the write."""
    if phase == "start":
        _stop(phase)
    tempfile.mkstemp = _after("temp-created", phase, tempfile.mkstemp)
    memkit.state.save_file = _after("temp-written", phase, memkit.state.save_file)
    fsync = os.fsync
    calls = {"n": 0}

    def counting_fsync(fd: Any) -> None:  # the first fsync is the temporary file's, the second the folder's
        fsync(fd)
        calls["n"] += 1
        if calls["n"] == 1 and phase == "temp-synced":
            _stop(phase)

    os.fsync = counting_fsync
    os.replace = _after("replaced", phase, os.replace)
    mem.save_memory(target)
    _stop("done")


def worker(command: list[str], folder: Path, a: memkit.MemkitModel, b: memkit.MemkitModel) -> None:
    target = folder / "target.memkit"
    if command[0] == "loop":
        print(f"looping {os.getpid()}", flush=True)
        while True:
            a.save_memory(target)
            b.save_memory(target)
    elif command[0] == "stop":
        a.save_memory(target)
        stop_during_save(b, target, command[1])


def main() -> None:
    folder = Path(sys.argv[1])
    os.environ.setdefault("MEMKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # read when wrap first builds the registry
    torch.set_num_threads(1)
    a = build(1, torch.arange(3, 123) % 120 + 3)
    b = build(2, torch.arange(200, 320) % 120 + 3)
    a.save_memory(folder / "a.ref")
    b.save_memory(folder / "b.ref")
    a.save_memory(folder / "target.memkit")
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                worker(command, folder, a, b)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {status}", flush=True)


if __name__ == "__main__":
    main()
