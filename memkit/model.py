"""``MemkitModel``: a HuggingFace causal LM with memory, built from a recipe."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from memkit import __version__
from memkit.adapters import Adapters
from memkit.backbone import Backbone
from memkit.cache import MemoryCache, build_memory_cache
from memkit.errors import (
    EmptyInputError,
    IncompatibleModelError,
    InputError,
    MemoryStateError,
    MissingTokenizerError,
    RecipeError,
    UnwrappedError,
)
from memkit.interfaces import Evicted, Injector, LongTermStore, MemoryPool, MemoryPrefix, Retriever, StoreEntries
from memkit.plugins import get_registry
from memkit.recipe import PartSpec, Recipe
from memkit.retrieval import retrieval_hooks
from memkit.state import differences, read_state, write_state

__all__ = ["Injection", "MemkitModel"]

F = TypeVar("F", bound=Callable[..., Any])


def _memkit_call(method: F) -> F:
    """Refuse an unwrapped wrapper, and put the recipe's position settings in place for the call."""

    @functools.wraps(method)
    def wrapper(self: MemkitModel, *args: Any, **kwargs: Any) -> Any:
        self._alive()
        with self.backbone.active():
            return method(self, *args, **kwargs)

    return cast(F, wrapper)


@dataclass(frozen=True)
class Injection:
    """What one :meth:`MemkitModel.inject` call wrote.

    Attributes:
        source: the provenance id given to every vector this call wrote (see ``MemkitModel.sources``).
        num_tokens: tokens injected.
        num_chunks: chunks (pool writes) they were cut into.
    """

    source: int
    num_tokens: int
    num_chunks: int


def _state_path(path: Any, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; :class:`InputError` for anything that is not a path."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what}: expected a file path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def _build_part(kind: str, spec: PartSpec, recipe: Recipe, **kwargs: Any) -> Any:
    from pydantic import ValidationError

    cls = get_registry().get(kind, spec.name)
    try:
        config = cls.Config(**spec.options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        valid = ", ".join(cls.Config.model_fields)
        raise RecipeError(
            f"recipe {recipe.name!r}: [{kind}] {spec.name!r} has invalid options: {problems}. Valid options: {valid}"
        ) from None
    return cls(config, **kwargs)


class MemkitModel(nn.Module):
    """A causal LM with latent memory: :meth:`inject` text, then :meth:`generate` from memory.

    Build it with :func:`memkit.wrap`. The base model is held as ``base_model``; its code and weights are
    never modified: memory reaches it as a pre-filled ``transformers`` cache, and hooks exist only during
    a call. A recipe with ``[adapters]`` adds peft LoRA layers (each keeping the original as
    ``base_layer``) that :meth:`unwrap` removes again.

    Args:
        model: the HuggingFace causal LM.
        recipe: a validated :class:`~memkit.recipe.Recipe`.
        tokenizer: optional tokenizer; needed to :meth:`inject` text.
    """

    def __init__(self, model: PreTrainedModel, recipe: Recipe, tokenizer: Any = None) -> None:
        super().__init__()
        self.backbone = Backbone(model)
        self.base_model = model
        self.recipe = recipe
        self.tokenizer = tokenizer
        bb = self.backbone
        bb.set_rope_scaling(recipe.rope_scaling)
        self.adapters: Adapters | None = Adapters(model, recipe.adapters) if recipe.adapters else None
        try:
            self._build(recipe)
        except BaseException:
            if self.adapters is not None:
                self.adapters.remove()
            raise
        self._prefix_key: tuple[Any, ...] | None = None
        self._prefix: MemoryPrefix | None = None
        self._next_source = 0
        self.source_labels: dict[int, str] = {}
        self._unwrapped = False
        # nn.Module starts in training mode, and peft's LoRA layers too: follow the model's mode instead,
        # so that wrapping an eval-mode model leaves no dropout active.
        self.train(model.training)

    def _build(self, recipe: Recipe) -> None:
        bb = self.backbone
        self.pool: MemoryPool = _build_part(
            "pool",
            recipe.pool,
            recipe,
            num_layers=bb.num_layers,
            hidden_size=bb.hidden_size,
            device=bb.device,
            dtype=bb.dtype,
        )
        self.injector: Injector = _build_part(
            "injector", recipe.injector, recipe, backbone=bb, write_size=self.pool.write_size
        )
        self.retriever: Retriever | None = None
        self.store: LongTermStore | None = None
        if (recipe.store is None) != (recipe.retriever is None):
            raise RecipeError(
                f"recipe {recipe.name!r} names a {'store' if recipe.store else 'retriever'} without a "
                f"{'retriever' if recipe.store else 'store'}; long-term memory needs both"
            )
        if recipe.retriever is not None and recipe.store is not None:
            self.retriever = _build_part("retriever", recipe.retriever, recipe, backbone=bb)
            self.store = _build_part(
                "store",
                recipe.store,
                recipe,
                num_layers=bb.num_layers,
                hidden_size=bb.hidden_size,
                key_size=self.retriever.key_size,
            )
        elif recipe.retrieve:
            raise RecipeError(f"recipe {recipe.name!r} retrieves {recipe.retrieve} entries but has no store")
        if self.store is not None and recipe.retrieve > self.store.capacity:
            raise RecipeError(
                f"recipe {recipe.name!r} retrieves {recipe.retrieve} entries per layer, more than its store can ever "
                f"hold ({self.store.capacity}); lower retrieve or raise store.capacity"
            )
        self._check_recipe_fits()
        self._check_layers_carry_memory()

    # -- validation -----------------------------------------------------------------------------------

    def _check_recipe_fits(self) -> None:
        recipe, cfg = self.recipe, self.backbone.config
        window = getattr(cfg, "max_position_embeddings", None)
        bos = self.injector.gap_start  # positions before memory (a BOS vector, or none)
        if window is not None:
            window = int(int(window) * self.backbone.position_scale)
        span = bos + recipe.retrieve + self.pool.capacity
        if window is not None and span >= window:
            raise RecipeError(
                f"recipe {recipe.name!r} keeps {self.pool.capacity} memory vectors per layer and retrieves "
                f"{recipe.retrieve} (positions 0..{span - 1}), which leaves no room in {cfg.model_type}'s window "
                f"of {window} positions; lower pool.capacity (wrap(model, recipe, pool={{'capacity': ...}})) or "
                "stretch the window with the recipe's rope_scaling"
            )
        capture = getattr(self.injector.config, "capture", None)
        if capture == "input" and recipe.chunk_size > self.pool.write_size:
            raise RecipeError(
                f"recipe {recipe.name!r} captures layer inputs but cuts chunks of {recipe.chunk_size} tokens while "
                f"a write keeps only K={self.pool.write_size}; the tokens in between would be lost. "
                "Set chunk_size <= pool.write_size"
            )

    def _check_layers_carry_memory(self) -> None:
        bb = self.backbone
        probe = torch.zeros(bb.num_layers, 1, bb.hidden_size, device=bb.device, dtype=bb.dtype)
        with torch.no_grad(), bb.active():
            kv = bb.layer_kv(probe, torch.zeros(1, dtype=torch.long, device=bb.device))
        if len(kv) != bb.num_layers:
            raise IncompatibleModelError(f"only {len(kv)} of {bb.num_layers} layers produced keys and values")

    def _alive(self) -> None:
        if self._unwrapped:
            raise UnwrappedError("this MemkitModel was unwrapped; call memkit.wrap(model, ...) again to use memory")

    # -- properties -------------------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The base model's config."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def memory_size(self) -> int:
        """Vectors held per memory layer now."""
        return self.pool.size

    def memory_footprint(self) -> dict[str, int]:
        """Sizes the recipe implies, computed from shapes (nothing is allocated), in bytes.

        Keys:
            ``pool``: the short-term vectors at capacity, ``l * N * d`` in the pool's dtype.
            ``store``: the long-term store at capacity, vectors and keys (0 without a store).
            ``read_cache``: the memory keys and values of one read, per row of a batch:
            ``l * 2 * (bos + retrieved + N) * kv_heads * head_dim`` in the model's dtype.
            ``parameters``: memkit's own parameters (injector, retriever, adapters) in their dtypes.
        """
        cfg = self.backbone.config
        lyr, d = self.backbone.num_layers, self.backbone.hidden_size
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or d // heads)
        pool_bytes = lyr * self.pool.capacity * d * self.pool.dtype.itemsize
        store_bytes = 0
        if self.store is not None and self.retriever is not None:
            dtype_name = str(getattr(self.store.config, "dtype", "float32"))
            item = getattr(torch, dtype_name).itemsize
            store_bytes = lyr * self.store.capacity * (d + self.retriever.key_size) * item
        bos = self.injector.gap_start
        positions = bos + self.recipe.retrieve + self.pool.capacity
        cache_bytes = lyr * 2 * positions * kv_heads * head_dim * self.backbone.dtype.itemsize
        own = [p for p in self.injector.parameters()]
        if self.retriever is not None:
            own += list(self.retriever.parameters())
        if self.adapters is not None:
            own += self.adapters.parameters()
        param_bytes = sum(p.numel() * p.dtype.itemsize for p in own)
        return {"pool": pool_bytes, "store": store_bytes, "read_cache": cache_bytes, "parameters": param_bytes}

    def sources(self) -> torch.Tensor:
        """Provenance id of each pool vector, ``[l, s]``; :attr:`source_labels` names them."""
        return self.pool.sources()

    # -- memory prefix ------------------------------------------------------------------------------------

    def _param_state(self) -> tuple[Any, ...]:
        return (self.device, self.backbone.dtype, sum(p._version for p in self.parameters()))

    @_memkit_call
    def memory_prefix(self, gap: int = 0) -> MemoryPrefix:
        """Per-layer memory keys and values for reading, computed once per memory version.

        Args:
            gap: positions left empty (after any BOS) for long-term entries retrieved during the read.

        With gradients enabled and trainable parameters present, they are recomputed on every call so
        that the loss reaches those parameters.
        """
        self._alive()
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        key = (self.pool.version, gap, *self._param_state())
        if not training and self._prefix is not None and self._prefix_key == key:
            return self._prefix
        prefix = self.injector.prefix(self.pool.read(), gap=gap)
        if training:
            return prefix
        self._prefix, self._prefix_key = prefix, key
        return prefix

    def _invalidate(self) -> None:
        self._prefix, self._prefix_key = None, None

    # -- inputs --------------------------------------------------------------------------------------------

    def _token_ids(self, data: str | Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
        if isinstance(data, str):
            if not data.strip():
                raise EmptyInputError(f"{what}: got an empty string; give some text to inject")
            if self.tokenizer is None:
                raise MissingTokenizerError(
                    f"{what}: got text but no tokenizer; pass tokenizer= to memkit.wrap, or give token ids"
                )
            ids = torch.tensor(self.tokenizer(data, add_special_tokens=False)["input_ids"], dtype=torch.long)
        elif isinstance(data, torch.Tensor):
            ids = data
            if ids.layout != torch.strided:
                raise InputError(f"{what}: token ids must be a dense tensor, got a {ids.layout} one; call .to_dense()")
            if ids.is_meta:
                raise InputError(f"{what}: token ids are on the meta device and hold no values; give real token ids")
        elif isinstance(data, (bytes, bytearray)):
            raise InputError(f"{what}: got {type(data).__name__}; decode it to str first (or give token ids as a list)")
        elif isinstance(data, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in data):
            try:
                ids = torch.tensor(list(data), dtype=torch.long)
            except (OverflowError, RuntimeError, ValueError):
                raise InputError(
                    f"{what}: token ids must be in [0, {self.backbone.vocab_size}), got a value that does not fit "
                    "in 64 bits"
                ) from None
        elif isinstance(data, Sequence):
            bad = next(i for i, t in enumerate(data) if not isinstance(t, int) or isinstance(t, bool))
            raise InputError(
                f"{what}: expected text, a list of token ids or a LongTensor, got a {type(data).__name__} holding "
                f"{type(data[bad]).__name__} at index {bad}; token ids are Python ints"
            )
        else:
            raise InputError(f"{what}: expected text, a list of token ids or a LongTensor, got {type(data).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InputError(f"{what}: token ids must be integers, got a {ids.dtype} tensor")
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise InputError(
                    f"{what}: got a batch of {ids.shape[0]} rows; memory is shared, so inject one text at a time"
                )
            ids = ids[0]
        if ids.dim() != 1:
            raise InputError(f"{what}: token ids must be [n] or [1, n], got shape {list(ids.shape)}")
        if ids.numel() == 0:
            raise EmptyInputError(f"{what}: got zero tokens; give at least one token to inject")
        self._check_vocab(ids, what)
        return ids.long()

    def _check_vocab(self, ids: torch.Tensor, what: str) -> None:
        vocab = self.backbone.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise InputError(f"{what}: token ids must be in [0, {vocab}), got values from {lo} to {hi}")

    def _check_batch(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> None:
        if input_ids is None:
            raise InputError("input_ids are required (memkit does not take inputs_embeds)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise InputError(
                f"input_ids must be a [batch, length] LongTensor, got {getattr(input_ids, 'shape', input_ids)}"
            )
        if input_ids.shape[1] == 0:
            raise EmptyInputError("input_ids has zero tokens")
        if input_ids.device != self.device:
            raise InputError(
                f"input_ids are on {input_ids.device} but the model is on {self.device}; "
                "move them with .to(model.device)"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        self._check_vocab(input_ids, "input_ids")
        if attention_mask is None:
            return
        if not isinstance(attention_mask, torch.Tensor):
            raise InputError(f"attention_mask must be a [batch, length] tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InputError(
                f"attention_mask has shape {list(attention_mask.shape)} but input_ids {list(input_ids.shape)}"
            )
        if attention_mask.device != input_ids.device:
            raise InputError(
                f"attention_mask is on {attention_mask.device} but input_ids on {input_ids.device}; "
                "move it with .to(model.device)"
            )

    # -- write ---------------------------------------------------------------------------------------------

    @_memkit_call
    def inject(
        self, data: str | Sequence[int] | torch.Tensor, *, label: str | None = None, progress: bool = False
    ) -> Injection:
        """Write text (or token ids) into memory, one chunk of ``recipe.chunk_size`` tokens at a time.

        Args:
            data: text (needs a tokenizer; tokenised without special tokens), token ids ``[n]`` or ``[1, n]``.
            label: optional name of this text, kept in :attr:`source_labels` and in saved memory.
            progress: show a progress bar over the chunks.

        Returns:
            an :class:`Injection` naming the provenance id of what was written.

        Runs under the caller's grad mode (training wraps it in a grad-enabled context). If anything
        fails (a chunk, a part raising, running out of memory, an interrupt), the memory is restored to
        what it was before the call: the pool, the long-term store, the source labels and the next id.
        """
        self._alive()
        ids = self._token_ids(data, "inject")
        size = self.recipe.chunk_size
        chunks = [ids[i : i + size] for i in range(0, ids.numel(), size)]
        source = self._next_source
        snapshot = self.pool.snapshot()
        store_snapshot: Any = None
        # Injection reads only the pool, never the long-term store, so the store's updates can wait until
        # every chunk is written: a failing chunk then leaves the store untouched and the pool restored.
        updates: list[tuple[int, list[StoreEntries]]] = []
        try:
            for chunk in tqdm(chunks, desc="inject", unit="chunk", disable=not progress):
                new = self._capture_ids(chunk, "text")
                evicted = self.pool.write(new, source)
                if self.store is not None:
                    updates.append((int(new.shape[1]), self._store_entries(evicted)))
            if self.store is not None and updates:
                # A store that fails midway (a plugin raising, no memory left) is put back as it was.
                store_snapshot = self.store.snapshot()
                for amount, per_layer in updates:
                    self._update_store(amount, per_layer)
        except BaseException:
            self.pool.load_state_dict(snapshot)
            if self.store is not None and store_snapshot is not None:
                self.store.restore(store_snapshot)
            raise
        finally:
            self._invalidate()
        self._next_source += 1
        if label is not None:
            self.source_labels[source] = label
        return Injection(source=source, num_tokens=int(ids.numel()), num_chunks=len(chunks))

    # -- lower-level write and read (trainers) ------------------------------------------------------------

    def new_source(self, label: str | None = None) -> int:
        """A fresh provenance id for vectors about to be written with :meth:`write_vectors`."""
        self._alive()
        source = self._next_source
        self._next_source += 1
        if label is not None:
            self.source_labels[source] = label
        return source

    @_memkit_call
    def capture(self, chunk: torch.Tensor) -> torch.Tensor:
        """The new memory one chunk would write, ``[l, k, d]``, without writing it.

        ``chunk`` is ``[n]`` or ``[1, n]`` token ids. Runs the injector with the write adapter under the
        caller's grad mode, so a trainer can backpropagate through the write (MemoryLLM's two-chunk path).
        """
        return self._capture_ids(self._token_ids(chunk, "capture"), "chunk")

    def _capture_ids(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        """The injector's new memory ``[l, k, d]`` for token ids ``[n]``, under the write adapter, checked finite."""
        with self._writing():
            new = self.injector.capture(ids.unsqueeze(0).to(self.device), self.pool.read())
        if not torch.isfinite(new).all():
            raise InputError(f"the model produced NaN or infinite hidden states for this {what}; memory is unchanged")
        return new

    def write_vectors(self, vectors: torch.Tensor, source: int) -> None:
        """Write captured vectors ``[l, k, d]`` into the pool now (detached), and what it evicts into the store.

        One pool update: the store ages by ``k`` and takes the evicted vectors with their retriever keys.
        """
        self._alive()
        try:
            evicted = self.pool.write(vectors.detach(), source)
        finally:
            self._invalidate()
        if self.store is not None:
            self._update_store(int(vectors.shape[1]), self._store_entries(evicted))

    def _update_store(self, amount: int, per_layer: list[StoreEntries]) -> None:
        """One pool update of the store: age it by ``amount``, then add each layer's evicted entries."""
        assert self.store is not None
        self.store.advance(amount)
        for layer, entries in enumerate(per_layer):
            if len(entries):
                self.store.add(layer, entries)

    @_memkit_call
    def forward_with_memory(
        self, input_ids: torch.Tensor, memory: torch.Tensor, labels: torch.Tensor | None = None
    ) -> Any:
        """The base model's forward reading ``memory`` ``[l, m, d]`` instead of the pool (no retrieval).

        ``input_ids`` and ``labels`` are ``[b, n]``. Gradients flow into ``memory`` and through the
        injector's read prefix (MemoryLLM's two-chunk path reads only the vectors just captured).
        """
        self._check_batch(input_ids, None)
        lyr, d = self.backbone.num_layers, self.backbone.hidden_size
        if memory.dim() != 3 or memory.shape[0] != lyr or memory.shape[2] != d:
            raise InputError(f"memory must be [layers={lyr}, m, d={d}], got {list(memory.shape)}")
        prefix = self.injector.prefix(memory)
        cache = (
            build_memory_cache(self.base_model.config, prefix.layer_kv, input_ids.shape[0]) if prefix.length else None
        )
        return self._forward(input_ids, torch.ones_like(input_ids), labels, cache, 0, {})

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        """The write adapter, if the recipe has adapters, for the duration of a write."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.use(self.adapters.spec.write)

    def _store_entries(self, evicted: Evicted) -> list[StoreEntries]:
        """Per layer, the evicted vectors with their retriever keys, ready for the long-term store."""
        assert self.retriever is not None
        out = []
        with torch.no_grad():
            for layer in range(self.backbone.num_layers):
                vectors = evicted.vectors[layer]
                if vectors.shape[0]:
                    normed = self.backbone.input_norm(layer, vectors.to(self.device, self.backbone.dtype))
                    keys = self.retriever.keys(layer, normed)
                else:
                    keys = vectors.new_zeros(0, self.retriever.key_size)
                out.append(StoreEntries(vectors, keys.detach(), evicted.ages[layer], evicted.sources[layer]))
        return out

    def reset_memory(self) -> None:
        """Empty the memory (the pool returns to its initial state); weights are untouched."""
        self._alive()
        self.pool.reset()
        if self.store is not None:
            self.store.reset()
        self.source_labels.clear()
        self._next_source = 0
        self._invalidate()

    # -- read ----------------------------------------------------------------------------------------------

    def _retrieve_count(self) -> int:
        """Long-term entries each layer brings back for a read now: the recipe's count, or fewer if the
        store holds fewer (every layer's store holds the same number)."""
        if self.store is None or not self.recipe.retrieve:
            return 0
        return min(self.recipe.retrieve, min(self.store.size(i) for i in range(self.backbone.num_layers)))

    @contextlib.contextmanager
    def _read(self, rows: int, token_mask: torch.Tensor) -> Iterator[MemoryCache | None]:
        """A fresh read cache for ``rows`` rows, with retrieval hooks while the block runs.

        ``token_mask`` ``[rows, n]`` marks each row's real prompt tokens (retrieval queries).
        """
        gap = self._retrieve_count()
        prefix = self.memory_prefix(gap=gap)
        if prefix.length == 0:
            yield None
            return
        cache = build_memory_cache(self.base_model.config, prefix.layer_kv, rows, writable=gap > 0)
        if gap == 0:
            yield cache
            return
        assert self.retriever is not None and self.store is not None
        with retrieval_hooks(self.backbone, self.injector, self.retriever, self.store, cache, token_mask, gap):
            yield cache

    @staticmethod
    def _widen_mask(mask: torch.Tensor | None, input_ids: torch.Tensor, memory: int) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(input_ids)
        ones = torch.ones(mask.shape[0], memory, dtype=mask.dtype, device=mask.device)
        return torch.cat([ones, mask], dim=1)

    @_memkit_call
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: MemoryCache | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward, reading memory. Same arguments and outputs as the base model.

        ``input_ids`` ``[b, n]``; ``attention_mask`` ``[b, n]`` (padding), widened here to cover memory;
        ``labels`` ``[b, n]`` give ``loss``. Passing back the ``past_key_values`` of an earlier call
        continues from it (memory is already in it). Positions follow from the mask: the first real token
        of each row sits right after memory.
        """
        self._alive()
        if "inputs_embeds" in kwargs:
            raise InputError("memkit's forward takes input_ids, not inputs_embeds")
        self._check_batch(input_ids, attention_mask)
        assert input_ids is not None
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            raise InputError(
                f"labels must be a tensor of input_ids' shape {list(input_ids.shape)}, "
                f"got {list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if past_key_values is None:
            with self._read(input_ids.shape[0], attention_mask) as cache:
                return self._forward(input_ids, attention_mask, labels, cache, 0, kwargs)
        if isinstance(past_key_values, MemoryCache):
            past = past_key_values.get_seq_length() - past_key_values.memory_length
            return self._forward(input_ids, attention_mask, labels, past_key_values, past, kwargs)
        raise InputError(
            "past_key_values must be a cache returned by this MemkitModel (a memkit MemoryCache); "
            f"got {type(past_key_values).__name__}"
        )

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        cache: MemoryCache | None,
        past: int,
        kwargs: dict[str, Any],
    ) -> Any:
        memory = cache.memory_length if cache is not None else 0
        if past:
            prev = torch.ones(input_ids.shape[0], past, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([prev, attention_mask], dim=1)
        full_mask = self._widen_mask(attention_mask, input_ids, memory)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        return self.base_model(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=position_ids,
            past_key_values=cache,
            labels=labels,
            use_cache=kwargs.pop("use_cache", cache is not None),
            **kwargs,
        )

    @torch.no_grad()
    @_memkit_call
    def generate(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """The base model's ``generate`` (greedy, sampling, beam search; any batch), reading memory.

        Takes the same arguments as ``transformers``' ``generate`` except ``past_key_values`` (memkit
        supplies the cache) and ``inputs_embeds``. Returns what it returns: ``input_ids`` followed by the
        new tokens (memory is not part of the returned sequences).
        """
        self._alive()
        for key in ("past_key_values", "inputs_embeds"):
            if key in kwargs:
                raise InputError(f"memkit's generate does not take {key}; memory supplies the cache")
        self._check_batch(input_ids, attention_mask)
        assert input_ids is not None
        model: Any = self.base_model
        base_config = kwargs.get("generation_config") or self.base_model.generation_config or GenerationConfig()
        beams = int(kwargs.get("num_beams") or getattr(base_config, "num_beams", 1) or 1)
        returns = int(kwargs.get("num_return_sequences") or getattr(base_config, "num_return_sequences", 1) or 1)
        expand = max(beams, returns)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        with self._read(input_ids.shape[0] * expand, mask.repeat_interleave(expand, dim=0)) as cache:
            if cache is None:
                return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            full_mask = self._widen_mask(attention_mask, input_ids, cache.memory_length)
            return model.generate(input_ids=input_ids, attention_mask=full_mask, past_key_values=cache, **kwargs)

    # -- persistence -------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.backbone.config
        return {
            "model_type": str(getattr(cfg, "model_type", "")),
            "num_layers": self.backbone.num_layers,
            "hidden_size": self.backbone.hidden_size,
            "pool": self.recipe.pool.name,
            "capacity": self.pool.capacity,
            "write_size": self.pool.write_size,
            "store": self.recipe.store.name if self.recipe.store else None,
            "store_capacity": self.store.capacity if self.store is not None else None,
            "retriever": self.recipe.retriever.name if self.recipe.retriever else None,
            "key_size": self.retriever.key_size if self.retriever is not None else None,
        }

    def save_memory(self, path: str | os.PathLike[str]) -> None:
        """Save the memory state (not the weights) to one safetensors file, atomically.

        The file records the model and recipe shape it was made for; :meth:`load_memory` refuses it
        for another.
        """
        self._alive()
        target = _state_path(path, "save_memory")
        if target.is_dir():
            raise MemoryStateError(f"cannot save memory to {target}: it is a folder; give a file path")
        tensors = {f"pool.{name}": t for name, t in self.pool.state_dict().items()}
        if self.store is not None:
            tensors.update({f"store.{name}": t for name, t in self.store.state_dict().items()})
        meta = {
            "memkit_version": __version__,
            "recipe": self.recipe.name,
            "fingerprint": self._fingerprint(),
            "dtype": str(self.pool.dtype).removeprefix("torch."),
            "next_source": self._next_source,
            "source_labels": {str(k): v for k, v in self.source_labels.items()},
        }
        write_state(path, tensors, meta)

    def load_memory(self, path: str | os.PathLike[str]) -> None:
        """Replace the memory with the state saved in ``path``.

        Raises:
            MemoryStateError: the file is missing, corrupted, of another format version, or made for a model
                or recipe of another shape (the message lists what differs). The memory is unchanged then.
        """
        self._alive()
        if _state_path(path, "load_memory").is_dir():
            raise MemoryStateError(f"memory file {path} is a folder, not a memory file; give the file's path")
        tensors, meta = read_state(path)
        diffs = differences(meta.get("fingerprint", {}), self._fingerprint(), "file has", "this model has")
        if diffs:
            raise MemoryStateError(
                f"memory file {path} was made for another model or recipe ({'; '.join(diffs)}); "
                "load it into a model wrapped the same way, or start from an empty memory"
            )
        dtype = str(self.pool.dtype).removeprefix("torch.")
        if meta.get("dtype") != dtype:
            raise MemoryStateError(
                f"memory file {path} holds {meta.get('dtype')} vectors but this pool stores {dtype}; converting "
                f"would change them silently. Wrap with pool={{'dtype': '{meta.get('dtype')}'}} to load it as it is"
            )
        pool_state = {name[len("pool.") :]: t for name, t in tensors.items() if name.startswith("pool.")}
        store_state = {name[len("store.") :]: t for name, t in tensors.items() if name.startswith("store.")}
        snapshot = self.pool.snapshot()
        store_snapshot = self.store.state_dict() if self.store is not None else None
        try:
            self.pool.load_state_dict(pool_state)
            if self.store is not None:
                self.store.load_state_dict(store_state)
        except BaseException:
            self.pool.load_state_dict(snapshot)
            if self.store is not None and store_snapshot is not None:
                self.store.restore(store_snapshot)
            raise
        finally:
            self._invalidate()
        self._next_source = int(meta.get("next_source", 0))
        self.source_labels = {int(k): str(v) for k, v in meta.get("source_labels", {}).items()}

    def save_pretrained(self, folder: str | os.PathLike[str], **kwargs: Any) -> None:
        """Save the recipe, memkit's own weights and (by default) the memory into ``folder``.

        Keywords and layout: :func:`memkit.pretrained.save_pretrained` (``save_memory``, ``save_base_model``);
        :func:`memkit.from_pretrained` loads the folder back.
        """
        from memkit.pretrained import save_pretrained  # lazy: memkit.pretrained imports this module

        save_pretrained(self, folder, **kwargs)

    # -- unwrap --------------------------------------------------------------------------------------------

    def unwrap(self) -> PreTrainedModel:
        """Detach memkit and return the base model exactly as it was before :func:`memkit.wrap`.

        memkit leaves no hook or module behind between calls, so this only releases memkit's own state;
        the wrapper cannot be used afterwards.
        """
        self._alive()
        model = self.base_model
        if self.adapters is not None:
            self.adapters.remove()
        self._invalidate()
        self._unwrapped = True
        del self.base_model
        return model

    def __repr__(self) -> str:
        if self._unwrapped:
            return "MemkitModel(<unwrapped>)"
        return (
            f"MemkitModel(recipe={self.recipe.name!r}, model={type(self.base_model).__name__}, "
            f"layers={self.backbone.num_layers}, memory={self.pool.size}/{self.pool.capacity}, "
            f"K={self.pool.write_size})"
        )
