"""Scale-out: two CPU processes (gloo backend) under torchrun, with DDP and with FSDP (torch's fully_shard).

Every run trains the same tiny M+ model with the same seeds (tests/ddp_worker.py), so the DDP and the
FSDP runs take the same paths on the same documents and must end with the same weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(out: Path, parallel: str, resume: Path | None = None) -> Path:
    env = {**os.environ, "MEMKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
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
        str(out),
        parallel,
        *([str(resume)] if resume is not None else []),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"rank{rank}.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        # The same sums in another order: FSDP reduces each document's gradient, DDP their sum.
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    return _torchrun(tmp_path_factory.mktemp("ddp"), "ddp")


def test_two_gloo_processes_end_with_identical_trained_weights(ddp_run):
    ranks = [_weights(ddp_run, r) for r in (0, 1)]
    initial = [load_file(str(ddp_run / f"initial{r}.safetensors")) for r in (0, 1)]
    names = sorted(ranks[0])
    assert names == sorted(ranks[1]) and any(".write." in n for n in names) and any("retriever." in n for n in names)
    # Rank 1 started from other weights; DDP broadcast rank 0's, and averaged gradients kept them equal.
    assert not all(torch.equal(initial[0][n], initial[1][n]) for n in names)
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in names)
    assert sum(not torch.equal(ranks[0][n], initial[0][n]) for n in names) > len(names) // 2, "training changed them"
    # Each process kept its own memory, written from its own share of the documents.
    memories = [load_file(str(ddp_run / f"memory{r}.safetensors")) for r in (0, 1)]
    assert not torch.equal(memories[0]["pool"], memories[1]["pool"])


@pytest.mark.slow
def test_fsdp_shards_the_model_and_trains_the_same_weights_as_ddp(ddp_run, tmp_path):
    fsdp = _torchrun(tmp_path / "fsdp", "fsdp")
    info = [json.loads((fsdp / f"run{r}.json").read_text()) for r in (0, 1)]
    assert all(all(run["sharded_layers"]) for run in info), "every decoder layer was fully_shard-ed"
    ddp_info = json.loads((ddp_run / "run0.json").read_text())
    assert not any(ddp_info["sharded_layers"])
    # Every path was taken, by both processes alike (one shared path stream), in both runs.
    assert set(info[0]["paths"][-1]) == {"two-chunk", "multi-chunk", "revisit", "plain"}
    assert info[0]["paths"] == ddp_info["paths"]
    ranks = [_weights(fsdp, r) for r in (0, 1)]
    # Rank 1 started elsewhere: FSDP broadcast rank 0's weights first, as DDP does.
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0]), "the gathered weights are one model"
    initial = load_file(str(fsdp / "initial0.safetensors"))
    assert sum(not torch.equal(ranks[0][n], initial[n]) for n in initial) > len(initial) // 2, "training changed them"
    for rank in (0, 1):
        _assert_close(ranks[rank], _weights(ddp_run, rank))
        # After train() each process holds the whole model and reads its own memory as DDP's process did.
        for name in ("logits", "memory"):
            mine = load_file(str(fsdp / f"{name}{rank}.safetensors"))
            theirs = load_file(str(ddp_run / f"{name}{rank}.safetensors"))
            for key in mine:
                torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=1e-5)
    # The checkpoint holds the whole trained weights (gathered from the shards), not rank 0's shard.
    saved = load_file(str(fsdp / "checkpoints" / "checkpoint-6" / "trainable.safetensors"))
    assert all(torch.equal(saved[n], ranks[0][n]) for n in saved)
    # Resuming from a mid-run checkpoint restores weights and optimiser state into the shards: the
    # resumed FSDP run ends where the resumed DDP run ends.
    resumed = _torchrun(tmp_path / "fsdp-resumed", "fsdp", fsdp / "checkpoints" / "checkpoint-3")
    resumed_ddp = _torchrun(tmp_path / "ddp-resumed", "ddp", ddp_run / "checkpoints" / "checkpoint-3")
    for rank in (0, 1):
        _assert_close(_weights(resumed, rank), _weights(resumed_ddp, rank))
    assert not all(torch.equal(_weights(resumed, 0)[n], initial[n]) for n in initial)
