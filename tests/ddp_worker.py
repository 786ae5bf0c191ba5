"""Worker for tests/test_training_ddp.py: one process of a two-process run on the gloo backend.

Run by ``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT [ddp|fsdp] [RESUME]``. Each process trains
the same tiny M+ model on its share of the documents (``parallel`` = ddp or fsdp), with a checkpoint in
``OUT/checkpoints``; it writes its trained weights, its memory and the logits of a fixed prompt read
from its memory to ``OUT``. With ``RESUME`` (a checkpoint folder) it continues that run instead.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

import memkit
from memkit.testing import tiny_model
from memkit.training import Trainer


def main(out: str, parallel: str = "ddp", resume: str | None = None) -> None:
    rank = int(os.environ["RANK"])
    mem = memkit.wrap(
        tiny_model("llama"),
        "mplus",
        chunk_size=16,
        retrieve=8,
        pool={"capacity": 24, "write_size": 8},
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
        # every path, and two documents per step
        multi_chunk_prob=0.5,
        revisit_prob=0.3,
        plain_lm_prob=0.15,
        gradient_accumulation_steps=2,
        parallel=parallel,
        output_dir=f"{out}/checkpoints",
        save_every=3,
        resume_from=resume,
    )
    initial = {name: p.detach().clone() for name, p in trainer.parameters}
    trainer.train()
    sharded = [isinstance(layer, FSDPModule) for layer in mem.backbone.layers]
    with open(f"{out}/run{rank}.json", "w") as fh:
        json.dump({"sharded_layers": sharded, "paths": [r.paths for r in trainer.history]}, fh)
    save_file({name: p.detach().contiguous() for name, p in trainer.parameters}, f"{out}/rank{rank}.safetensors")
    save_file(initial, f"{out}/initial{rank}.safetensors")
    save_file({"pool": mem.pool.read().contiguous(), "sources": mem.pool.sources()}, f"{out}/memory{rank}.safetensors")
    with torch.no_grad():  # the trained model, whole again on every process, reads its memory
        logits = mem(input_ids=torch.arange(5, 25).unsqueeze(0)).logits
    save_file({"logits": logits.contiguous()}, f"{out}/logits{rank}.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
