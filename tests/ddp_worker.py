"""Worker for tests/test_training_ddp.py: one process of a two-process DDP run on the gloo backend.

Run by ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT``. Each process trains the same tiny
M+ model on its share of the documents; it writes its trained weights and its memory to ``OUT``.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

import memkit
from memkit.testing import tiny_model
from memkit.training import Trainer


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    mem = memkit.wrap(
        tiny_model("llama"),
        "mplus",
        chunk_size=16,
        retrieve=8,
        pool={"capacity": 24, "write_size": 8, "seed": rank},
        store={"capacity": 200, "merge_every": 3},
        retriever={"key_size": 8},
    )
    if rank == 1:  # start rank 1 elsewhere: DDP must broadcast rank 0's weights before training
        with torch.no_grad():
            for name, p in mem.named_parameters():
                if "lora_" in name:
                    p.add_(0.5)
    gen = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(5, 120, (int(torch.randint(40, 160, (1,), generator=gen)),), generator=gen) for _ in range(16)
    ]
    trainer = Trainer(
        mem,
        docs,
        stage="stage3",
        steps=6,
        progress=False,
        probe=False,
        min_chunk_tokens=8,
        max_chunk_tokens=24,
        min_target_tokens=8,
        max_target_tokens=32,
        max_contexts=4,
        learning_rate=1e-3,
    )
    initial = {name: p.detach().clone() for name, p in trainer.parameters}
    trainer.train()
    save_file({name: p.detach().contiguous() for name, p in trainer.parameters}, f"{out}/rank{rank}.safetensors")
    save_file(initial, f"{out}/initial{rank}.safetensors")
    save_file({"pool": mem.pool.read().contiguous(), "sources": mem.pool.sources()}, f"{out}/memory{rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
