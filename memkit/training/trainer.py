"""The trainer for memkit recipes: MemoryLLM's and M+'s training steps on accelerate.

One step takes one document (spec §3 and §5):

* **two-chunk** (probability ``1 - multi_chunk_prob``): the first chunk is captured *with* gradient
  under the write adapter, and the next piece of the document (the target) is scored reading only
  those new vectors (``[bos | K new]``); the only path that trains the write adapter. After the
  optimiser step the detached vectors are written into the pool.
* **multi-chunk**: up to ``max_contexts`` chunks are injected without gradient, then the target is
  scored reading the whole memory (pool, and long-term retrieval if the recipe has it).
* **revisit** (``revisit_prob``): an earlier document's target is scored again, after the
  injections of the steps since.
* **plain** (``plain_lm_prob``): the document is scored as ordinary language modelling, no memory.

The LM loss uses the read adapter. With ``train_retriever`` the retriever is trained as M+ does, on
detached hidden states: per layer, ``w_j = mean_t sigmoid(f_q(h_t) . f_k(m_j))`` over the target's
tokens ``t`` (a random prefix of them) and the pool's vectors ``m_j``, with label 1 for vectors written
from this document; loss ``[mean(-log w+) + lambda mean(-log(1 - w-))] / (1 + lambda)``, averaged over
layers, added to the LM loss with ``retriever_loss_weight``. Memory is never gradient-trained: it only
changes by writes of detached vectors.

Scale-out runs on existing engines. With ``parallel = "ddp"`` (the default) the step runs inside a
module that accelerate prepares (DDP under ``accelerate launch`` or ``torchrun``), so gradients are
averaged across processes and every process ends with the same weights. With ``parallel = "fsdp"``
torch's ``fully_shard`` (FSDP2) shards every parameter, trained or frozen, across the processes: one
group per decoder layer and one for the rest. Each process keeps its own memory, fed by its own share
of the documents (document ``i`` goes to process ``i % world``).

Sharding makes every use of a parameter collective, and memkit uses the layers outside a plain
forward (injections without gradient, retrieval, the retention probe), a different number of times on
each process. So under FSDP each micro-step gathers every group once at its start and frees the
gathered copies at its end (after the backward has reduce-scattered the gradients, before the
optimiser steps on the shards); in between no forward communicates. The processes draw the step's
path from one shared random stream, so they run the same backwards and reduce the same gradients;
their chunk lengths and counts stay their own. After :meth:`Trainer.train` every process holds the
whole trained model again (gathered), so saving and generating work as after DDP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from memkit.errors import DataError, TrainingError
from memkit.model import MemkitModel
from memkit.permissions import default_file_mode
from memkit.scoring import mean_sigmoid_scores
from memkit.state import differences
from memkit.training.config import StageConfig
from memkit.training.data import Documents

__all__ = ["TrainLog", "Trainer"]

logger = logging.getLogger("memkit.training")

CHECKPOINT_VERSION = 1


@dataclass
class TrainLog:
    """One log record (every ``log_every`` steps, and at the end).

    Attributes:
        step: optimiser steps done.
        loss: mean total loss over the steps since the last record.
        lm_loss: mean language-modelling loss over them.
        retriever_loss: mean retriever loss over the steps that had one (None if none did).
        retention: the retention probe: next-token accuracy on a fixed probe target read from memory
            after the probe context and ``probe_distractors`` other chunks were injected (None if off).
        tokens_per_second: tokens injected and scored per second of wall time since the last record.
        learning_rate: the adapters' learning rate now.
        paths: how many steps since the last record took each path (two-chunk, multi-chunk, ...).
    """

    step: int
    loss: float
    lm_loss: float
    retriever_loss: float | None
    retention: float | None
    tokens_per_second: float
    learning_rate: float
    paths: dict[str, int] = field(default_factory=dict)


@dataclass
class _Plan:
    """What one step does: its path, the chunks it injects and the target it scores."""

    path: str  # "two-chunk" | "multi-chunk" | "revisit" | "plain"
    chunks: list[torch.Tensor]
    target: torch.Tensor
    sources: list[int]  # provenance ids of this document's writes (retriever labels)
    doc_source: int = -1

    @property
    def tokens(self) -> int:
        return sum(int(c.numel()) for c in self.chunks) + int(self.target.numel())


class _Step(nn.Module):
    """The differentiable part of a step, as a module, so that accelerate can prepare it (DDP, FSDP)."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.mem = trainer.mem
        self._trainer = [trainer]  # a list: not a submodule

    def forward(self, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(loss, lm_loss, retriever_loss or None, vectors to write after the step or None)``."""
        trainer = self._trainer[0]
        mem = self.mem
        target = plan.target.to(mem.device).unsqueeze(0)
        delta = None
        hidden: dict[int, torch.Tensor] = {}
        with self._capture_inputs(hidden, enabled=trainer.trains_retriever and plan.path in ("multi-chunk", "revisit")):
            if plan.path == "two-chunk":
                delta = mem.capture(plan.chunks[0])
                out = mem.forward_with_memory(target, delta, labels=target)
            elif plan.path == "plain":
                ids = torch.cat([*plan.chunks, plan.target]).to(mem.device).unsqueeze(0)
                empty = torch.zeros(mem.backbone.num_layers, 0, mem.backbone.hidden_size, device=mem.device)
                out = mem.forward_with_memory(ids, empty.to(mem.backbone.dtype), labels=ids)
            else:
                out = mem(input_ids=target, labels=target)
        lm_loss = out.loss
        retriever_loss = trainer._retriever_loss(hidden, plan) if hidden else None
        loss = lm_loss
        if retriever_loss is not None:
            loss = loss + trainer.stage.retriever_loss_weight * retriever_loss
        return loss, lm_loss.detach(), None if retriever_loss is None else retriever_loss.detach(), delta

    @contextlib.contextmanager
    def _capture_inputs(self, into: dict[int, torch.Tensor], enabled: bool) -> Iterator[None]:
        """Keep each decoder layer's input (detached) during the block, for the retriever loss."""
        if not enabled:
            yield
            return
        handles = []
        try:
            for index, layer in enumerate(self.mem.backbone.layers):

                def pre(module: object, args: tuple, kwargs: dict, index: int = index) -> None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    into.setdefault(index, hidden[0].detach())

                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


class Trainer:
    """Train a wrapped model's recipe stage on documents.

    Args:
        mem: the wrapped model (``memkit.wrap(model, recipe)``); its backbone stays frozen.
        data: a :class:`~memkit.training.data.Documents`, or anything it accepts (paths, texts, token ids).
        stage: a stage name of the recipe's ``[training]`` section, or a :class:`StageConfig`.
        output_dir: where checkpoints (``checkpoint-<step>/``) and ``log.jsonl`` go; None: nowhere.
        tokenizer: for text data (default: the wrapper's tokenizer).
        probe: run the retention probe at every log record: the first document's first chunk is
            injected into an empty memory, then ``probe_distractors`` chunks of the next documents, and
            the tokens after that first chunk are predicted from memory (the memory is restored after).
        probe_distractors: distractor chunks in the probe.
        resume_from: a checkpoint folder to continue from (its recipe and model must be this run's).
        accelerator: an ``accelerate.Accelerator`` to use; default: one built from the stage
            (mixed precision, gradient accumulation, DDP that tolerates paths not using every parameter).
            With the stage's ``parallel = "fsdp"`` memkit shards the model itself (torch's ``fully_shard``)
            and uses the accelerator only for its processes; an accelerator configured for FSDP or
            DeepSpeed ZeRO-3 is refused.
        progress: show a progress bar (on the main process).
        **overrides: stage settings to change, e.g. ``steps=100``.

    Raises:
        TrainingError: the recipe has no such stage, nothing is trainable, or the checkpoint is another
            recipe's or model's.
        DataError: no documents, or documents too short for a chunk and a target.
    """

    def __init__(
        self,
        mem: MemkitModel,
        data: Documents | Any,
        *,
        stage: str | StageConfig = "stage1",
        output_dir: str | os.PathLike[str] | None = None,
        tokenizer: Any = None,
        probe: bool = True,
        probe_distractors: int = 2,
        resume_from: str | os.PathLike[str] | None = None,
        accelerator: Any = None,
        progress: bool = True,
        **overrides: Any,
    ) -> None:
        if not isinstance(mem, MemkitModel):
            raise TrainingError(f"Trainer trains a memkit.MemkitModel (from memkit.wrap), got {type(mem).__name__}")
        self.mem = mem
        self.stage_name, self.stage = self._resolve_stage(stage, overrides)
        cfg = self.stage
        self.min_tokens = cfg.min_chunk_tokens + cfg.min_target_tokens
        if isinstance(data, Documents):
            self.documents = data
            self.documents.min_tokens = max(self.documents.min_tokens, self.min_tokens)
        else:
            self.documents = Documents(data, tokenizer=tokenizer or mem.tokenizer, min_tokens=self.min_tokens)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.probe = probe
        self.probe_distractors = int(probe_distractors)
        self.progress = progress
        self.trains_retriever = cfg.train_retriever
        if cfg.train_retriever and (mem.retriever is None or not hasattr(mem.retriever, "queries")):
            raise TrainingError(
                f"stage {self.stage_name!r} trains the retriever, but recipe {mem.recipe.name!r} has "
                f"{'no retriever' if mem.retriever is None else 'a retriever without queries()'}; set "
                "train_retriever = false or use a recipe with the projector retriever"
            )
        self._groups = self._trainable_groups()
        if not any(self._groups.values()):
            raise TrainingError(
                f"recipe {mem.recipe.name!r} has nothing to train: no adapters, no learned BOS or memory embedding, "
                "no trained retriever; add an [adapters] section or use injector.bos = 'learned'"
            )
        self._accelerator = accelerator
        self.step = 0
        self.history: list[TrainLog] = []
        self._position = 0  # documents consumed (all processes together)
        self._revisits: list[tuple[torch.Tensor, list[int]]] = []
        self._rng = random.Random(cfg.seed)
        # The step's path (revisit, plain, multi- or two-chunk): one stream shared by every process.
        self._path_rng = random.Random(cfg.seed)
        self._sharded: list[nn.Module] = []  # parallel = "fsdp": the fully_shard-ed modules, root last
        self._used: set[str] = set()  # parallel = "fsdp": trained parameters with a gradient since the last step
        self._resume_from = Path(resume_from) if resume_from is not None else None

    # -- setup ------------------------------------------------------------------------------------------

    def _resolve_stage(self, stage: str | StageConfig, overrides: dict[str, Any]) -> tuple[str, StageConfig]:
        if isinstance(stage, StageConfig):
            name, cfg = "custom", stage
        elif isinstance(stage, str):
            stages = self.mem.recipe.training
            if stage not in stages:
                known = ", ".join(stages) or "none"
                raise TrainingError(
                    f"recipe {self.mem.recipe.name!r} defines no training stage {stage!r} (it defines: {known}); "
                    "add a [training.<stage>] section to the recipe or pass a memkit.training.StageConfig"
                )
            name, cfg = stage, stages[stage]
        else:
            raise TrainingError(f"stage is a stage name or a StageConfig, got {type(stage).__name__}")
        if overrides:
            from pydantic import ValidationError

            try:
                cfg = StageConfig.model_validate({**cfg.model_dump(), **overrides})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise TrainingError(f"invalid stage settings: {problems}") from None
        return name, cfg

    def _trainable_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters per optimiser group: ``memory`` (adapters, injector) and ``retriever``."""
        mem = self.mem
        memory: list[tuple[str, nn.Parameter]] = []
        if mem.adapters is not None:
            memory += [(n, p) for n, p in mem.named_parameters() if "lora_" in n]
        memory += [(f"injector.{n}", p) for n, p in mem.injector.named_parameters()]
        retriever: list[tuple[str, nn.Parameter]] = []
        if self.trains_retriever and mem.retriever is not None:
            retriever = [(f"retriever.{n}", p) for n, p in mem.retriever.named_parameters()]
        return {"memory": memory, "retriever": retriever}

    @property
    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every trained ``(name, parameter)``."""
        return self._groups["memory"] + self._groups["retriever"]

    def _setup(self) -> tuple[Any, Any, Any, Any]:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.stage
        accelerator = self._accelerator or Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            device_placement=False,
            cpu=self.mem.device.type == "cpu",  # accelerate runs CPU processes together (gloo) only when asked
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self._refuse_sharding(accelerator)
        for _, p in self.parameters:
            p.requires_grad_(True)
        step = _Step(self)
        sharded = cfg.parallel == "fsdp" and accelerator.num_processes > 1
        if sharded:
            self._shard(step, accelerator)
        groups = [{"params": [p for _, p in self._groups["memory"]], "lr": cfg.learning_rate}]
        if self._groups["retriever"]:
            groups.append({"params": [p for _, p in self._groups["retriever"]], "lr": cfg.retriever_learning_rate})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        module = step if sharded else accelerator.prepare_model(step, device_placement=False)
        optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
        # Not prepared: accelerate would step a prepared scheduler once per process; the schedule here
        # counts optimiser steps, and train() steps it only when the optimiser stepped.
        return accelerator, module, optimizer, scheduler

    @staticmethod
    def _refuse_sharding(accelerator: Any) -> None:
        """An accelerator that shards parameters itself (accelerate's FSDP plugin, DeepSpeed ZeRO-3) would
        gather them at every forward of a sharded module, a collective call; the processes' steps differ
        in how many forwards they run, so they would wait for ever. memkit shards with parallel='fsdp'."""
        kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", ""))
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        if kind == "FSDP" or (kind == "DEEPSPEED" and getattr(plugin, "zero_stage", None) == 3):
            shown = "FSDP" if kind == "FSDP" else "DeepSpeed ZeRO-3"
            raise TrainingError(
                f"the accelerator shards parameters ({shown}) itself; memkit's steps use the layers outside "
                "plain forwards, a different number of times on each process, so such sharding would make the "
                "processes wait on each other for ever. Set the stage's parallel = 'fsdp' with a plain "
                "accelerator (memkit then shards with torch's fully_shard and gathers once per step), or use "
                "DDP or DeepSpeed ZeRO-1/2"
            )

    def _shard(self, step: _Step, accelerator: Any) -> None:
        """Shard every parameter across the processes with torch's ``fully_shard`` (FSDP2).

        Rank 0's parameters are broadcast first (as DDP does), so every process starts from the same
        model. Groups: each decoder layer, then the rest (``step``, the root). Gathered copies are kept
        until :meth:`_gathered` frees them; gradients of trained parameters a path leaves unused are
        reduced as zeros, so every process reduces the same tensors.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if any(isinstance(m, FSDPModule) for m in self.mem.modules()):
            raise TrainingError(
                "this model was already sharded by an earlier parallel='fsdp' run (its modules keep FSDP's hooks); "
                "save it with save_pretrained and load it again with memkit.from_pretrained to train it further"
            )
        with torch.no_grad():
            for p in step.parameters():
                dist.broadcast(p.data, src=0)
        mesh = init_device_mesh(self.mem.device.type, (accelerator.num_processes,))
        layers = list(self.mem.backbone.layers)
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=False)
        fully_shard(step, mesh=mesh, reshard_after_forward=False)
        root: Any = step
        root.set_reshard_after_backward(False)
        root.set_reduce_scatter_unused_params(True)
        # No reduction during the backward: FSDP would reduce a group when autograd reaches its inputs,
        # and whether a layer's inputs need a gradient depends on each process's memory, so the order
        # of the reduce-scatters could differ between processes. _reduce_gradients does it after.
        root.set_requires_gradient_sync(False)
        # The root must be initialised before any layer runs on its own (injections happen before the
        # step's forward); torch does it at the root's first forward, through this method.
        root._get_fsdp_state()._lazy_init()
        self._sharded = [*layers, step]
        # fully_shard replaced the parameters with sharded ones: the optimiser must see those.
        self._groups = self._trainable_groups()

    @contextlib.contextmanager
    def _gathered(self, track: bool = False) -> Iterator[None]:
        """Under FSDP, every group's whole parameters for the block (one all-gather per group, on every
        process alike), freed at its end; without sharding, nothing.

        With ``track``, the names of the trained parameters that receive a gradient in the block are
        added to ``self._used`` (see :meth:`_drop_unused_gradients`).
        """
        if not self._sharded:
            yield
            return
        for module in self._sharded:
            module.unshard()  # type: ignore[operator]
        handles = []
        try:
            if track:  # the gathered parameters, which is what autograd reaches in the block
                for group in self._trainable_groups().values():
                    for name, p in group:
                        handles.append(p.register_hook(lambda grad, name=name: self._used.add(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in self._sharded:
                module.reshard()  # type: ignore[operator]

    def _reduce_gradients(self) -> None:
        """Under FSDP, after a backward: reduce-scatter every group's gradients into the shards (summed
        onto what earlier micro-steps left there), one group at a time in one fixed order on every
        process. This is FSDP's own post-backward reduction, run at a point every process reaches alike."""
        groups = []
        for module in self._sharded:
            groups += module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
        for module in self._sharded:
            module.set_requires_gradient_sync(True, recurse=False)  # type: ignore[operator]
        try:
            for group in groups:
                group.post_backward()
            for group in groups:
                group.finalize_backward()
        finally:
            for module in self._sharded:
                module.set_requires_gradient_sync(False, recurse=False)  # type: ignore[operator]

    def _drop_unused_gradients(self) -> None:
        """Under FSDP, clear the gradient of every trained parameter no process used since the last step.

        FSDP reduces zeros for a parameter a process did not use (so that every process reduces the same
        tensors); DDP leaves the gradient of a parameter no process used at None, and the optimiser then
        skips it (AdamW would otherwise move it by its momentum). This makes FSDP do what DDP does.
        """
        import torch.distributed as dist

        used = torch.tensor([name in self._used for name, _ in self.parameters], dtype=torch.int32)
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
        for (_, p), flag in zip(self.parameters, used.tolist(), strict=True):
            if not flag:
                p.grad = None
        self._used.clear()

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """Every trained parameter, whole, on the CPU (under FSDP a collective: call on every process)."""
        out = {}
        for name, p in self.parameters:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().contiguous().cpu()
        return out

    def _optimizer_state(self, optimizer: Any) -> dict[str, Any] | None:
        """The optimiser's state to save: its own state dict; under FSDP the whole (unsharded) state keyed
        by parameter name, a collective (call on every process; the main process gets it)."""
        if optimizer is None:
            return None
        inner = getattr(optimizer, "optimizer", optimizer)
        if not self._sharded:
            return inner.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self._sharded[-1], inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _lr_factor(self, step: int) -> float:
        cfg = self.stage
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = cfg.decay_steps or cfg.steps
        done = min(step - cfg.warmup_steps, span) / span
        return 1.0 - (1.0 - cfg.final_lr_factor) * done

    # -- the run --------------------------------------------------------------------------------------

    def train(self) -> list[TrainLog]:
        """Run the stage to ``steps``; returns every log record (also in :attr:`history`)."""
        cfg, mem = self.stage, self.mem
        accelerator, module, optimizer, scheduler = self._setup()
        rank, world = accelerator.process_index, accelerator.num_processes
        if self._resume_from is not None:
            self._load_checkpoint(self._resume_from, optimizer, scheduler, rank)
        else:
            torch.manual_seed(cfg.seed + rank)
            self._rng = random.Random(cfg.seed * 1_000_003 + rank)
            self._path_rng = random.Random(cfg.seed)
        probe = self._probe_data() if self.probe else None
        documents = self._stream(rank, world)
        was_training = mem.training
        mem.train()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc=f"train {self.stage_name}",
            unit="step",
            disable=not (self.progress and accelerator.is_main_process),
        )
        sums: dict[str, float] = {"loss": 0.0, "lm": 0.0, "ret": 0.0, "ret_n": 0.0, "n": 0.0, "tokens": 0.0}
        paths: dict[str, int] = {}
        clock = time.perf_counter()
        try:
            while self.step < cfg.steps:
                for _ in range(cfg.gradient_accumulation_steps):
                    with accelerator.accumulate(module):
                        with self._gathered(track=True):
                            plan = self._plan(next(documents))
                            loss, lm_loss, ret_loss, delta = module(plan)
                            accelerator.backward(loss)
                            if self._sharded:
                                self._reduce_gradients()
                        # Under FSDP the optimiser steps on the shards, after the gathered copies are freed.
                        if self._sharded and accelerator.sync_gradients:
                            self._drop_unused_gradients()
                        if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                            accelerator.clip_grad_norm_([p for _, p in self.parameters], cfg.max_grad_norm)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            scheduler.step()
                        optimizer.zero_grad()
                    if delta is not None:  # the two-chunk path's vectors join memory after the step
                        with self._gathered():  # the retriever's keys of what the pool evicts
                            mem.write_vectors(delta.detach(), plan.sources[0])
                    sums["loss"] += float(loss.detach())
                    sums["lm"] += float(lm_loss)
                    if ret_loss is not None:
                        sums["ret"] += float(ret_loss)
                        sums["ret_n"] += 1
                    sums["n"] += 1
                    sums["tokens"] += plan.tokens
                    paths[plan.path] = paths.get(plan.path, 0) + 1
                self.step += 1
                bar.update(1)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    with self._gathered():
                        record = self._record(sums, paths, clock, scheduler, probe)
                    bar.set_postfix(loss=f"{record.loss:.3f}", retention=record.retention)
                    if accelerator.is_main_process:
                        self._log(record)
                    sums = dict.fromkeys(sums, 0.0)
                    paths, clock = {}, time.perf_counter()
                if self.output_dir is not None and (last or (cfg.save_every and self.step % cfg.save_every == 0)):
                    weights = self._full_weights()  # collectives under FSDP: every process takes part
                    optimizer_state = self._optimizer_state(optimizer)
                    accelerator.wait_for_everyone()
                    if accelerator.is_main_process:
                        self._write_checkpoint(
                            self.output_dir / f"checkpoint-{self.step}", weights, optimizer_state, scheduler
                        )
            if self._sharded:  # every process gets the whole trained model back, and keeps it
                for sharded in self._sharded:
                    sharded.unshard()  # type: ignore[operator]
                self._groups = self._trainable_groups()
        finally:
            bar.close()
            mem.train(was_training)
            for _, p in self.parameters:
                p.requires_grad_(False)
            mem._invalidate()
        return self.history

    def _record(
        self, sums: dict[str, float], paths: dict[str, int], clock: float, scheduler: Any, probe: Any
    ) -> TrainLog:
        n = max(sums["n"], 1.0)
        elapsed = max(time.perf_counter() - clock, 1e-9)
        return TrainLog(
            step=self.step,
            loss=sums["loss"] / n,
            lm_loss=sums["lm"] / n,
            retriever_loss=sums["ret"] / sums["ret_n"] if sums["ret_n"] else None,
            retention=self.retention_probe(*probe) if probe is not None else None,
            tokens_per_second=sums["tokens"] / elapsed,
            learning_rate=float(scheduler.get_last_lr()[0]),
            paths=dict(paths),
        )

    def _log(self, record: TrainLog) -> None:
        self.history.append(record)
        logger.info("step %d: %s", record.step, json.dumps(asdict(record)))
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"stage": self.stage_name, **asdict(record)}) + "\n")

    # -- data -------------------------------------------------------------------------------------------

    def _stream(self, rank: int, world: int) -> Iterator[tuple[str, torch.Tensor]]:
        """This process's documents, epoch after epoch, from the resume position on."""
        while True:  # Documents raises DataError when it holds no usable document
            whole_pass, mine = self._position == 0, 0
            for index, item in enumerate(self.documents):
                if index < self._position:
                    continue
                self._position = index + 1
                if index % world == rank:
                    mine += 1
                    yield item
            if whole_pass and not mine:  # otherwise this process would loop over the data for ever
                raise DataError(
                    f"process {rank} of {world} gets no document (document i goes to process i % {world}); "
                    f"give at least {world} documents or run fewer processes"
                )
            self._position = 0

    def _chunk_length(self) -> int:
        return self._rng.randint(self.stage.min_chunk_tokens, self.stage.max_chunk_tokens)

    def _plan(self, document: tuple[str, torch.Tensor]) -> _Plan:
        cfg, mem = self.stage, self.mem
        name, ids = document
        # Every process draws the same path (three numbers per step from the shared stream).
        revisit, plain, multi_draw = (self._path_rng.random() for _ in range(3))
        if self._revisits and revisit < cfg.revisit_prob:
            target, sources = self._revisits[self._rng.randrange(len(self._revisits))]
            return _Plan("revisit", [], target, sources)
        if self._rng.random() < cfg.empty_memory_prob:
            mem.reset_memory()
        n = int(ids.numel())
        if plain < cfg.plain_lm_prob:
            piece = ids[: cfg.max_chunk_tokens + cfg.max_target_tokens]
            cut = min(cfg.max_chunk_tokens, int(piece.numel()) // 2)
            return _Plan("plain", [piece[:cut]], piece[cut:], [])
        multi = multi_draw < cfg.multi_chunk_prob
        cap = cfg.contexts_at(self.step) if multi else 1
        chunks: list[torch.Tensor] = []
        start = 0
        while len(chunks) < cap:
            length = self._chunk_length()
            if start + length + cfg.min_target_tokens > n:
                length = n - cfg.min_target_tokens - start
                if length < cfg.min_chunk_tokens:
                    break
            chunks.append(ids[start : start + length])
            start += length
        target = ids[start : start + cfg.max_target_tokens]
        source = mem.new_source(label=name)
        plan = _Plan("multi-chunk" if multi else "two-chunk", chunks, target, [source])
        if multi:
            with torch.no_grad():
                for chunk in chunks:
                    mem.write_vectors(mem.capture(chunk), source)
        self._revisits.append((target, [source]))
        if len(self._revisits) > cfg.revisit_cache:
            self._revisits.pop(0)
        return plan

    # -- the retriever loss -----------------------------------------------------------------------------

    def _retriever_loss(self, hidden: dict[int, torch.Tensor], plan: _Plan) -> torch.Tensor | None:
        """M+'s balanced BCE over the pool's vectors, averaged over layers (None without both labels)."""
        mem, cfg = self.mem, self.stage
        retriever: Any = mem.retriever
        pool = mem.pool.read()
        if pool.shape[1] == 0:
            return None
        sources = mem.pool.sources()
        positive = torch.isin(sources, torch.tensor(plan.sources, device=sources.device))
        losses = []
        for layer, states in sorted(hidden.items()):
            n = int(states.shape[0])
            states = states[: self._rng.randint(1, n)]  # a random prefix of the target (random_retriever_length)
            queries = retriever.queries(layer, mem.backbone.input_norm(layer, states).detach())
            normed = mem.backbone.input_norm(layer, pool[layer].to(mem.device, mem.backbone.dtype)).detach()
            keys = retriever.keys(layer, normed)
            w = mean_sigmoid_scores(queries.float(), keys.float()).clamp(1e-6, 1 - 1e-6)
            pos = positive[layer].to(w.device)
            if not pos.any() or pos.all():
                continue
            lam = cfg.negative_loss_weight
            losses.append((-(w[pos].log()).mean() + lam * -((1 - w[~pos]).log()).mean()) / (1 + lam))
        if not losses:
            return None
        return torch.stack(losses).mean()

    # -- retention probe ------------------------------------------------------------------------------

    def _probe_data(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        cfg = self.stage
        docs = []
        for _, ids in self.documents:
            docs.append(ids)
            if len(docs) > self.probe_distractors:
                break
        first = docs[0]
        cut = min(cfg.max_chunk_tokens, int(first.numel()) // 2)
        context, target = first[:cut], first[cut : cut + min(cfg.max_target_tokens, 256)]
        distractors = [d[: cfg.max_chunk_tokens] for d in docs[1 : 1 + self.probe_distractors]]
        return context, target, distractors

    @torch.no_grad()
    def retention_probe(self, context: torch.Tensor, target: torch.Tensor, distractors: list[torch.Tensor]) -> float:
        """Next-token accuracy on ``target`` read from memory after ``context`` and ``distractors`` were
        injected into an empty memory; the memory is restored afterwards."""
        mem = self.mem
        pool = mem.pool.snapshot()
        store = mem.store.state_dict() if mem.store is not None else None
        next_source, labels = mem._next_source, dict(mem.source_labels)
        was = mem.training
        mem.eval()
        try:
            mem.reset_memory()
            for chunk in [context, *distractors]:
                mem.write_vectors(mem.capture(chunk), mem.new_source())
            ids = target.to(mem.device).unsqueeze(0)
            logits = mem(input_ids=ids).logits[0, :-1]
            return float((logits.argmax(-1) == ids[0, 1:]).float().mean())
        finally:
            mem.pool.load_state_dict(pool)
            if mem.store is not None and store is not None:
                mem.store.load_state_dict(store)
            mem._next_source, mem.source_labels = next_source, labels
            mem._invalidate()
            mem.train(was)

    # -- checkpoints ------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        recipe = self.mem.recipe.model_copy(update={"training": {}})
        return {
            "recipe": self.mem.recipe.name,
            "recipe_sha256": hashlib.sha256(recipe.to_toml().encode()).hexdigest(),
            "fingerprint": self.mem._fingerprint(),
        }

    def save_checkpoint(self, folder: str | os.PathLike[str], optimizer: Any = None, scheduler: Any = None) -> Path:
        """Write the trained weights, optimiser, scheduler, random states, memory and position to ``folder``.

        Written into ``<folder>.tmp`` and renamed at the end, so a folder that exists is complete. Under
        ``parallel = "fsdp"`` with several processes it gathers the shards, a collective call: call it on
        every process (each writes the same whole weights; give each its own folder, or let
        :meth:`train` write checkpoints, which it does from the main process only).
        """
        return self._write_checkpoint(folder, self._full_weights(), self._optimizer_state(optimizer), scheduler)

    def _write_checkpoint(
        self,
        folder: str | os.PathLike[str],
        weights: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any] | None,
        scheduler: Any,
    ) -> Path:
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / "trainable.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        self.mem.save_memory(tmp / "memory.safetensors")
        revisits = {}
        for i, (target, sources) in enumerate(self._revisits):
            revisits[f"revisit.{i}.target"] = target.clone()
            revisits[f"revisit.{i}.sources"] = torch.tensor(sources, dtype=torch.long)
        if revisits:
            save_file(revisits, str(tmp / "revisits.safetensors"))
        torch.save(torch.get_rng_state(), tmp / "torch_rng.pt")
        state = {
            "format_version": CHECKPOINT_VERSION,
            **self._identity(),
            "stage": self.stage_name,
            "stage_config": self.stage.model_dump(),
            "step": self.step,
            "position": self._position,
            "python_rng": _rng_to_json(self._rng.getstate()),
            "path_rng": _rng_to_json(self._path_rng.getstate()),
            "parallel": "fsdp" if self._sharded else "ddp",
            "history": [asdict(r) for r in self.history],
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        for path in tmp.iterdir():  # safetensors writes its files private; a checkpoint is ordinary files
            os.chmod(path, default_file_mode())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    def _load_checkpoint(self, folder: Path, optimizer: Any, scheduler: Any, rank: int) -> None:
        path = folder / "trainer_state.json"
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TrainingError(f"{folder} is not a memkit training checkpoint (no trainer_state.json)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"cannot read {path}: {exc}") from None
        if state.get("format_version") != CHECKPOINT_VERSION:
            raise TrainingError(
                f"checkpoint {folder} has format version {state.get('format_version')!r}; this memkit reads "
                f"version {CHECKPOINT_VERSION}"
            )
        diffs = differences(state, self._identity(), "checkpoint has", "this run has")
        if diffs:
            raise TrainingError(
                f"checkpoint {folder} was made for another recipe or model ({'; '.join(diffs)}); resume with the "
                "recipe and model it was trained with, or start a new run"
            )
        parallel = "fsdp" if self._sharded else "ddp"
        if state.get("parallel", "ddp") != parallel:
            raise TrainingError(
                f"checkpoint {folder} was written by a parallel={state.get('parallel')!r} run, whose optimiser state "
                f"is laid out differently; resume it with parallel={state.get('parallel')!r} on several processes"
            )
        weights = load_file(str(folder / "trainable.safetensors"))
        mine = dict(self.parameters)
        if set(weights) != set(mine):
            missing, extra = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
            raise TrainingError(f"checkpoint {folder} trains other parameters (missing: {missing}; unknown: {extra})")
        with torch.no_grad():
            for name, tensor in weights.items():
                target: Any = mine[name]
                tensor = tensor.to(target.device, target.dtype)
                if hasattr(target, "device_mesh"):  # a shard: keep this process's part of the whole tensor
                    from torch.distributed.tensor import distribute_tensor

                    tensor = distribute_tensor(tensor, target.device_mesh, target.placements, src_data_rank=None)
                target.copy_(tensor)
        if (folder / "optimizer.pt").exists():
            saved = _load_plain(folder / "optimizer.pt")
            if self._sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(
                    self._sharded[-1],
                    getattr(optimizer, "optimizer", optimizer),
                    saved,
                    options=StateDictOptions(full_state_dict=True),
                )
            else:
                optimizer.load_state_dict(saved)
        if (folder / "scheduler.pt").exists():
            scheduler.load_state_dict(_load_plain(folder / "scheduler.pt"))
        self.mem.load_memory(folder / "memory.safetensors")
        self._revisits = []
        if (folder / "revisits.safetensors").exists():
            saved = load_file(str(folder / "revisits.safetensors"))
            for i in range(len(saved) // 2):
                self._revisits.append((saved[f"revisit.{i}.target"], saved[f"revisit.{i}.sources"].tolist()))
        torch.set_rng_state(_load_plain(folder / "torch_rng.pt"))
        self._rng = random.Random()
        self._rng.setstate(_rng_from_json(state["python_rng"]))
        if "path_rng" in state:
            self._path_rng.setstate(_rng_from_json(state["path_rng"]))
        self.step = int(state["step"])
        self._position = int(state["position"])
        self.history = [TrainLog(**r) for r in state.get("history", [])]
        if rank:
            logger.warning("resuming process %d from a checkpoint saved by the main process", rank)


def _load_plain(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``): a file that
    would need arbitrary unpickling (and could run code) is refused, never executed.

    Raises:
        TrainingError: the file cannot be read, or holds anything but tensors and plain data.
    """
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:
        raise TrainingError(
            f"cannot read {path} from the checkpoint: it is corrupted, or holds more than tensors and plain data "
            f"(memkit never unpickles arbitrary objects, which could run code) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); restore the checkpoint or start a new run"
        ) from None


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
