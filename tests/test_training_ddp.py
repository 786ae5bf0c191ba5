"""Scale-out through accelerate: two CPU processes (gloo backend) end with identical trained weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_gloo_processes_end_with_identical_trained_weights(tmp_path):
    env = {**os.environ, "MEMKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    initial = [load_file(str(tmp_path / f"initial{r}.safetensors")) for r in (0, 1)]
    names = sorted(ranks[0])
    assert names == sorted(ranks[1]) and any(".write." in n for n in names) and any("retriever." in n for n in names)
    # Rank 1 started from other weights; DDP broadcast rank 0's, and averaged gradients kept them equal.
    assert not all(torch.equal(initial[0][n], initial[1][n]) for n in names)
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in names)
    assert sum(not torch.equal(ranks[0][n], initial[0][n]) for n in names) > len(names) // 2, "training changed them"
    # Each process kept its own memory, written from its own share of the documents.
    memories = [load_file(str(tmp_path / f"memory{r}.safetensors")) for r in (0, 1)]
    assert not torch.equal(memories[0]["pool"], memories[1]["pool"])
