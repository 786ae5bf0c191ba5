"""The built-in :class:`~memkit.interfaces.Injector`: memory as pre-filled keys and values."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from memkit.cache import LayerKV, build_memory_cache
from memkit.config import MemkitConfig
from memkit.errors import IncompatibleModelError, InputError
from memkit.hookspecs import hookimpl
from memkit.interfaces.injector import Injector, MemoryPrefix
from memkit.registry import Registry

if TYPE_CHECKING:
    from memkit.backbone import Backbone

__all__ = ["KVInjector"]


class KVInjector(Injector):
    """Reads memory as keys and values computed by the model's own layers; writes by MemoryLLM's rule.

    **Read** (:meth:`prefix`): per layer ``i`` the prefix is ``[bos_i | memory_i]`` (or just
    ``memory_i`` with ``bos="none"``) at positions ``0, 1, ..., p-1``; the prompt then starts at ``p``.
    This is the official MemoryLLM layout (BOS at 0, memory at 1..N, text after). An empty pool
    gives no prefix at all, as the official code does before its memory is initialised.

    **Write** (:meth:`capture`), for a chunk of ``n`` tokens and ``K`` = the pool's write size:

    1. the prefix is ``[bos_i | the last C pool vectors of layer i]`` with ``C = write_context``
       (``K`` by default, as in MemoryLLM), so the cost does not grow with ``N``;
    2. before every layer, the new-memory positional embedding (if enabled) is added to the last ``K``
       token positions;
    3. the layer's output (``capture="output"``, MemoryLLM) or input (``capture="input"``, training-free:
       memory then equals an ordinary KV cache of the injected tokens) at the last ``K`` token
       positions becomes that layer's new memory.

    **A chunk shorter than K** (``n < K``), by ``short_chunk``:

    * ``"reread"`` (MemoryLLM, paper Fig. 8): the ``r = K - n`` most recent pool vectors of each layer
      leave the prefix and are read again as token positions ahead of the chunk (at each layer their
      input is that layer's stored vector), so ``K`` new vectors are still written: ``r`` refreshed
      old ones and ``n`` from the chunk. If the pool holds fewer than ``r`` vectors, all it holds are
      re-read and the write is shorter than ``K``.
    * ``"partial"``: only the chunk's ``n`` vectors are written (a write of ``n < K``).
    * ``"error"``: refuse the chunk with :class:`~memkit.errors.InputError`.

    Shapes: ``l`` layers, ``m`` pool vectors, ``d`` hidden size, ``n`` chunk tokens.
    """

    name = "kv"

    class Config(MemkitConfig):
        bos: Literal["learned", "token", "none"] = Field(
            "learned",
            description="what sits at position 0 of every prefix: a learned per-layer BOS vector ('learned', "
            "initialised from the BOS token embedding as MemoryLLM does), each layer's input for the BOS token "
            "itself ('token': a fixed attention sink, so that memory equals a KV cache of BOS + the injected "
            "tokens), or nothing ('none')",
        )
        capture: Literal["output", "input"] = Field(
            "output",
            description="new memory is each layer's output (MemoryLLM) or input (training-free: memory equals "
            "the KV cache of the injected tokens) at the last K token positions",
        )
        new_memory_embedding: bool = Field(
            True, description="add a learned positional embedding to the last K positions before every layer"
        )
        write_context: int | Literal["all"] | None = Field(
            None,
            description="pool vectors visible as prefix while writing: a number, 'all', or None for K (MemoryLLM)",
        )
        short_chunk: Literal["reread", "partial", "error"] = Field(
            "reread", description="what a chunk shorter than K does (see the class documentation)"
        )
        bos_token_id: int | None = Field(
            None,
            description="token whose embedding initialises the learned BOS; None takes the model config's",
        )

    config: Config

    def __init__(self, config: Config, *, backbone: Backbone, write_size: int) -> None:
        super().__init__(config, backbone=backbone, write_size=write_size)
        lyr, d = backbone.num_layers, backbone.hidden_size
        dev, dt = backbone.device, backbone.dtype
        self.bos_embedding: torch.Tensor | None = None
        self.new_memory_positional_emb: nn.Parameter | None = None
        if config.bos != "none":
            bos_id = config.bos_token_id if config.bos_token_id is not None else backbone.config.bos_token_id
            if isinstance(bos_id, (list, tuple)):
                bos_id = bos_id[0]
            vocab = backbone.vocab_size
            if bos_id is None or not 0 <= int(bos_id) < vocab:
                raise IncompatibleModelError(
                    f"the injector's learned BOS needs a BOS token id in [0, {vocab}), got {bos_id!r} from the "
                    "model config; set injector.bos_token_id in the recipe or use injector.bos = 'none'"
                )
            token = torch.tensor([[int(bos_id)]], device=dev)
            with torch.no_grad():
                init = backbone.embeddings(token).to(dt)
                if config.bos == "learned":
                    self.bos_embedding = nn.Parameter(init.reshape(1, 1, d).repeat(lyr, 1, 1).clone())
                else:
                    inputs: dict[int, torch.Tensor] = {}

                    def keep(layer: int, hidden: torch.Tensor) -> None:
                        inputs[layer] = hidden[0].detach().clone()

                    backbone.run_decoder(init, None, pre_hook=keep)
                    del self.bos_embedding  # the plain attribute set above; it becomes a buffer
                    self.register_buffer("bos_embedding", torch.stack([inputs[i] for i in range(lyr)]))
        if config.new_memory_embedding:
            self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d, device=dev, dtype=dt))
        self.requires_grad_(False)

    # -- read -----------------------------------------------------------------------------------------

    def _with_bos(self, memory: torch.Tensor) -> torch.Tensor:
        memory = memory.to(device=self.backbone.device, dtype=self.backbone.dtype)
        if self.bos_embedding is None:
            return memory
        return torch.cat([self.bos_embedding.to(memory.dtype), memory], dim=1)

    @property
    def gap_start(self) -> int:
        return 0 if self.bos_embedding is None else 1

    def prefix(self, memory: torch.Tensor, gap: int = 0, *, always: bool = False) -> MemoryPrefix:
        if memory.shape[1] == 0 and gap == 0 and not always:
            return MemoryPrefix([], 0)
        vectors = self._with_bos(memory)
        length = int(vectors.shape[1])
        positions = torch.arange(length, device=vectors.device)
        start = self.gap_start
        positions[start:] += gap  # memory moves right to make room for `gap` retrieved vectors
        kv = self.backbone.layer_kv(vectors, positions)
        if gap:
            kv = [(_open_gap(k, start, gap), _open_gap(v, start, gap)) for k, v in kv]
        return MemoryPrefix(kv, length + gap)

    def layer_kv(self, layer: int, vectors: torch.Tensor, position_ids: torch.Tensor) -> LayerKV:
        return self.backbone.layer_kv_single(layer, vectors.to(self.backbone.device), position_ids)

    # -- write ----------------------------------------------------------------------------------------

    def capture(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        cfg, bb = self.config, self.backbone
        big_k = self.write_size
        n, m = int(input_ids.shape[1]), int(memory.shape[1])
        if n == 0:
            raise InputError("cannot write an empty chunk")
        reread = 0
        if n < big_k:
            if cfg.short_chunk == "error":
                raise InputError(
                    f"chunk of {n} tokens is shorter than K={big_k}, and this recipe's injector refuses short "
                    "chunks (short_chunk='error'); inject at least K tokens or set short_chunk"
                )
            if cfg.short_chunk == "reread":
                reread = min(big_k - n, m)
        if cfg.write_context is None:
            context = big_k
        elif cfg.write_context == "all":
            context = m
        else:
            context = int(cfg.write_context)
        visible = min(m, max(context, reread))
        prefix_mem = memory[:, m - visible : m - reread]
        reread_mem = memory[:, m - reread :].to(device=bb.device, dtype=bb.dtype)
        # A fixed BOS sink ('token') precedes every write, even into empty memory, so that memory is the KV
        # cache of BOS + the injected text; MemoryLLM's own rule writes into empty memory without a prefix.
        sink = cfg.bos == "token"
        prefix = self.prefix(prefix_mem, always=sink) if (visible - reread) > 0 or sink else MemoryPrefix([], 0)
        cache = build_memory_cache(bb.model.config, prefix.layer_kv, 1) if prefix.length else None

        embeds = bb.embeddings(input_ids.to(bb.device))
        if reread:
            embeds = torch.cat([embeds.new_zeros(1, reread, embeds.shape[-1]), embeds], dim=1)
        k_out = min(big_k, reread + n)
        captured: dict[int, torch.Tensor] = {}
        pos_emb = self.new_memory_positional_emb

        def pre(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
            changed = False
            if reread:
                hidden = torch.cat([reread_mem[layer].unsqueeze(0).to(hidden.dtype), hidden[:, reread:]], dim=1)
                changed = True
            if cfg.capture == "input":
                captured[layer] = hidden[0, -k_out:]
            if pos_emb is not None:
                hidden = torch.cat([hidden[:, :-k_out], hidden[:, -k_out:] + pos_emb.to(hidden.dtype)], dim=1)
                changed = True
            return hidden if changed else None

        def post(layer: int, hidden: torch.Tensor) -> None:
            if cfg.capture == "output":
                captured[layer] = hidden[0, -k_out:]

        bb.run_decoder(embeds, cache, pre_hook=pre, post_hook=post)
        if len(captured) != bb.num_layers:
            raise IncompatibleModelError(
                f"captured new memory from {len(captured)} of {bb.num_layers} decoder layers; the decoder "
                "skipped some layers, so memkit cannot write memory for this model"
            )
        return torch.stack([captured[i] for i in range(bb.num_layers)])


def _open_gap(states: torch.Tensor, start: int, gap: int) -> torch.Tensor:
    """Insert ``gap`` zero positions at ``start`` along the sequence axis of ``[1, h, p, e]``."""
    zeros = states.new_zeros(*states.shape[:2], gap, states.shape[3])
    return torch.cat([states[:, :, :start], zeros, states[:, :, start:]], dim=2)


@hookimpl
def register_injectors(registry: Registry) -> None:
    registry.add_injector(KVInjector)
