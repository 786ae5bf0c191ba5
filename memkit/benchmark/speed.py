"""Speed and memory of a wrapped model beside its plain base model, in one process, on the same tokens.

:func:`run_speed` measures four things and reports each as a ratio against the plain model, with both
raw numbers, the aim and whether it was met:

* **inject**: tokens per second of ``mem.inject`` for one chunk of token ids (pool already full, so
  the chunk evicts into the long-term store as it would in use) against the plain model's forward
  over the same chunk (``base_model(chunk)``: logits of every position, a fresh KV cache).
  Aim: at least 0.8 times as fast. Beside it (``versus_prefill``, no aim): against the plain
  model's prefill of the chunk (``logits_to_keep=1``), which skips the vocabulary projection of
  every position but the last, as memkit's injection does.
* **decode**: tokens per second of greedy decoding (``min_new_tokens = max_new_tokens``, so EOS does
  not stop it) with memory holding ``memory_tokens`` injected tokens, against the plain model decoding
  after a prompt whose KV cache is exactly as long as memkit's (its memory read cache plus the
  prompt). The plain prompt is the most recent injected tokens followed by the same question; its
  context is pre-filled once into an ordinary ``DynamicCache`` (outside the timing), so that both
  sides of every ``generate`` call start from a cache and prefill only the question. Decoding time is
  taken from a stopping criterion's clock: from the first new token to the last, so the prefill and
  the read (retrieval) are excluded. Aim: at least 0.9 times as fast.
* **first_token**: the same calls' time to the first new token, as first tokens per second: for
  memkit one read (read cache, retrieval in every layer) plus the question's prefill; for the plain
  model the question's prefill over its cached context. No aim.
* **peak memory** of one injection and of one ``generate`` call on each side (growth of the resident
  set over the call; CUDA: ``max_memory_allocated``), as ``memory / plain``. No aim.

With a long-term store, **retrieval** latency per layer: during the memory side's ``generate`` calls
the retriever's ``select``, the store's ``get`` and the injector's ``layer_kv`` (the three steps
:func:`memkit.retrieval.retrieval_hooks` runs per layer) are timed through temporary wrappers on
those instances, removed afterwards.

Ratios are ``memory / plain`` of the figure's value: tokens per second for speeds (above 1: memkit is
faster), bytes for memory (above 1: memkit uses more).
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from memkit.benchmark.meter import PeakMemory, machine_info, release_memory, time_interleaved
from memkit.cache import MemoryCache
from memkit.errors import InputError
from memkit.model import MemkitModel

__all__ = ["AIM_DECODE", "AIM_INJECT", "run_speed"]

#: Aims on CPU, as ``memory / plain`` tokens per second.
AIM_INJECT = 0.8
AIM_DECODE = 0.9

_NAMES = ("Ada", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hugo")
_THINGS = ("ferry", "lighthouse", "market", "bridge", "library", "orchard", "harbour", "observatory")
_ACTS = ("painted", "repaired", "visited", "measured", "photographed", "described", "guarded", "sold")


def _text(rng: random.Random, sentences: int) -> str:
    parts = []
    for i in range(sentences):
        name, thing, act = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_ACTS)
        parts.append(f"Note {i}: {name} {act} the {thing} at {rng.randint(1, 12)}:{rng.randint(0, 59):02d}. ")
    return "".join(parts)


def _token_stream(mem: MemkitModel, tokenizer: Any, length: int, seed: int) -> torch.Tensor:
    """``[length]`` deterministic token ids: tokenised notes with a tokenizer, else random ids."""
    rng = random.Random(seed)
    if tokenizer is None:
        vocab = mem.backbone.vocab_size
        low = min(10, vocab - 1)  # keep clear of the special ids at the start of small vocabularies
        return torch.tensor([rng.randrange(low, vocab) for _ in range(length)], dtype=torch.long)
    sentences = max(length // 8, 4)
    while True:
        ids = tokenizer(_text(rng, sentences), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            return torch.tensor(ids[:length], dtype=torch.long)
        sentences *= 2


def _prompt(mem: MemkitModel, tokenizer: Any, tokens: int, seed: int) -> torch.Tensor:
    """``[1, n]`` question ids: a question about the notes with a tokenizer, else ``tokens`` random ids."""
    if tokenizer is None:
        return _token_stream(mem, None, tokens, seed + 1)[None]
    ids = tokenizer("Question: who repaired the lighthouse, and when? Answer:", add_special_tokens=False)
    return torch.tensor(ids["input_ids"], dtype=torch.long)[None]


class _StepClock(StoppingCriteria):
    """A stopping criterion that never stops: it records the time each new token is ready."""

    def __init__(self, sync: Callable[[], None] | None) -> None:
        self.sync = sync
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.sync is not None:
            self.sync()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _timed_calls(
    obj: object, method: str, sink: list[tuple[str, int, float]], sync: Callable[[], None] | None
) -> Iterator[None]:
    """While the block runs, every ``obj.method(layer, ...)`` call appends ``(method, layer, seconds)``."""
    original = getattr(obj, method)
    shadowed = method in vars(obj)

    def timed(layer: int, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = original(layer, *args, **kwargs)
        if sync is not None:
            sync()
        sink.append((method, int(layer), time.perf_counter() - start))
        return out

    setattr(obj, method, timed)
    try:
        yield
    finally:
        if shadowed:
            setattr(obj, method, original)
        else:
            delattr(obj, method)


def _figure(memory: float, plain: float, unit: str, aim: float | None, what: str, **raw: Any) -> dict[str, Any]:
    ratio = memory / plain if plain > 0 else None
    met = None if aim is None or ratio is None else ratio >= aim
    return {
        "memory": memory,
        "plain": plain,
        "unit": unit,
        "ratio": ratio,
        "aim": aim,
        "aim_met": met,
        "what": what,
        **raw,
    }


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{name.replace('_', '-')} must be a whole number > 0, got {value!r}")


def _plain_cache(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh ordinary cache holding ``kv`` (per layer ``[1, h, p, e]`` keys and values; ``kv`` itself is
    left as it is, since a ``DynamicCache`` concatenates into new tensors)."""
    cache = DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    return cache


def _prefill(model: Any, ids: torch.Tensor) -> Any:
    """The plain model's KV cache of ``ids`` ``[1, n]`` (last position's logits only, where the model allows)."""
    try:
        return model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    except TypeError:
        return model(input_ids=ids, use_cache=True).past_key_values


def run_speed(
    mem: MemkitModel,
    tokenizer: Any,
    *,
    chunk_tokens: int | None = None,
    decode_tokens: int = 32,
    memory_tokens: int = 4096,
    repeats: int = 3,
    seed: int = 0,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure ``mem`` against its own base model (see the module docstring); returns the report.

    The memory is reset and refilled: ``memory_tokens`` tokens are injected before decoding, then the
    timed chunk ``warmup + repeats + 1`` times (the injection is measured last, on a full pool). Runs
    under ``torch.no_grad``.

    Args:
        mem: the wrapped model; ``mem.base_model``, called directly, is the plain model.
        tokenizer: turns the benchmark's notes into tokens; ``None`` uses random token ids.
        chunk_tokens: tokens in the timed chunk (default and maximum: the recipe's ``chunk_size``).
        decode_tokens: new tokens per ``generate`` call (at least 2: the rate is over the tokens after the first).
        memory_tokens: tokens injected before decoding (more than the pool holds fills the long-term store).
        repeats: timed runs of each measurement (the median is reported); ``warmup`` untimed runs first.
        seed: seeds the token stream and torch (random pool eviction).
        progress: show a progress bar while memory is filled.

    Raises:
        InputError: a count that is not a whole number > 0, a chunk longer than the recipe's, or a
            prompt that would not fit the model's position window.
    """
    _check_positive(decode_tokens=decode_tokens, memory_tokens=memory_tokens, repeats=repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be a whole number >= 0, got {warmup!r}")
    chunk = mem.recipe.chunk_size if chunk_tokens is None else chunk_tokens
    _check_positive(chunk_tokens=chunk)
    if chunk > mem.recipe.chunk_size:
        raise InputError(
            f"chunk-tokens {chunk} is more than one chunk of recipe {mem.recipe.name!r} ({mem.recipe.chunk_size} "
            "tokens); give at most the recipe's chunk_size"
        )
    if decode_tokens < 2:
        raise InputError("decode-tokens must be at least 2 (the rate is over the tokens after the first), got 1")
    torch.manual_seed(seed)
    device = mem.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    plain_model: Any = mem.base_model
    machine = machine_info(device)  # the load average before the run, beside the one after it
    with torch.no_grad():
        stream = _token_stream(mem, tokenizer, memory_tokens + chunk, seed)
        prompt = _prompt(mem, tokenizer, 16, seed).to(device)
        mem.reset_memory()
        start = time.perf_counter()
        mem.inject(stream[:memory_tokens], progress=progress)
        fill_s = time.perf_counter() - start
        read = mem(prompt)
        read_length = read.past_key_values.memory_length if isinstance(read.past_key_values, MemoryCache) else 0
        del read
        window = getattr(mem.config, "max_position_embeddings", None)
        need = read_length + prompt.shape[1] + decode_tokens
        if window is not None and need > int(window):
            raise InputError(
                f"decoding needs {need} positions (memory read {read_length} + prompt {prompt.shape[1]} + "
                f"{decode_tokens} new tokens), beyond the model's window of {window}; lower decode-tokens"
            )
        context = _context(stream, memory_tokens, read_length).to(device)
        plain_prompt = torch.cat([context[None], prompt], dim=1)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if read_length:
            filled = _prefill(plain_model, context[None])
            kv = [(layer.keys, layer.values) for layer in filled.layers]
            del filled
        decode = _decode(mem, plain_model, prompt, plain_prompt, kv, decode_tokens, repeats, warmup, sync)
        chunk_ids = stream[memory_tokens : memory_tokens + chunk]
        inject = _inject(mem, plain_model, chunk_ids, repeats, warmup, sync)
    report: dict[str, Any] = {
        "benchmark": "speed",
        "model": _model_info(mem),
        "recipe": _recipe_info(mem),
        "setup": {
            "chunk_tokens": chunk,
            "decode_tokens": decode_tokens,
            "memory_tokens": memory_tokens,
            "prompt_tokens": int(prompt.shape[1]),
            "memory_read_positions": read_length,
            "plain_prompt_tokens": int(plain_prompt.shape[1]),
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "tokens": "tokenised synthetic notes" if tokenizer is not None else "random token ids",
            "fill_tokens_per_s": memory_tokens / fill_s,
            "memory_size_after_fill": mem.memory_size,
        },
        "machine": {**machine, "load_average_after": machine_info().get("load_average_1_5_15_min")},
        "figures": {
            "inject": inject["figure"],
            "decode": decode["figure"],
            "first_token": decode["first_token"],
            "peak_memory_inject": inject["peak"],
            "peak_memory_decode": decode["peak"],
        },
        "retrieval": decode["retrieval"],
        "memory_footprint_bytes": mem.memory_footprint(),
        "ratio_definition": "memory / plain of the figure's value (tokens/s for speeds, bytes for memory)",
    }
    report["aims"] = {
        name: {"aim": fig["aim"], "ratio": fig["ratio"], "met": fig["aim_met"]}
        for name, fig in report["figures"].items()
        if fig["aim"] is not None
    }
    return report


def _context(stream: torch.Tensor, memory_tokens: int, length: int) -> torch.Tensor:
    """``[length]`` plain-model context: the most recent injected tokens (earlier stream tokens first if short)."""
    injected = stream[:memory_tokens]
    if length <= memory_tokens:
        return injected[memory_tokens - length :]
    extra = stream[memory_tokens:]
    while extra.numel() < length - memory_tokens:
        extra = torch.cat([extra, injected])
    return torch.cat([extra[: length - memory_tokens], injected])


def _decode(
    mem: MemkitModel,
    plain_model: Any,
    prompt: torch.Tensor,
    plain_prompt: torch.Tensor,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    new_tokens: int,
    repeats: int,
    warmup: int,
    sync: Callable[[], None] | None,
) -> dict[str, Any]:
    gen = plain_model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad if pad is not None else 0,
        eos_token_id=gen.eos_token_id,
    )
    first: dict[str, list[float]] = {"memory": [], "plain": []}
    calls: list[list[tuple[str, int, float]]] = []

    def run(side: str) -> float:
        clock = _StepClock(sync)
        # The plain model's context is cached before its clock starts (as a chat turn's would be);
        # memkit builds its read cache inside generate, so that is on its clock.
        cache = _plain_cache(plain_model, kv) if side == "plain" and kv else None
        if sync is not None:
            sync()
        start = time.perf_counter()
        if side == "memory":
            out = mem.generate(
                input_ids=prompt, generation_config=config, stopping_criteria=StoppingCriteriaList([clock])
            )
            produced = out.shape[1] - prompt.shape[1]
        else:
            out = plain_model.generate(
                input_ids=plain_prompt,
                attention_mask=torch.ones_like(plain_prompt),
                past_key_values=cache,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
            produced = out.shape[1] - plain_prompt.shape[1]
        if produced != new_tokens or len(clock.stamps) != new_tokens:
            raise RuntimeError(f"{side} generate made {produced} tokens, not {new_tokens}; the benchmark is void")
        first[side].append(clock.stamps[0] - start)
        return clock.stamps[-1] - clock.stamps[0]

    def memory_run() -> float:
        sink: list[tuple[str, int, float]] = []
        with contextlib.ExitStack() as stack:
            if mem.retriever is not None and mem.store is not None:
                stack.enter_context(_timed_calls(mem.retriever, "select", sink, sync))
                stack.enter_context(_timed_calls(mem.store, "get", sink, sync))
                stack.enter_context(_timed_calls(mem.injector, "layer_kv", sink, sync))
            seconds = run("memory")
        calls.append(sink)
        return seconds

    timings = time_interleaved({"memory": memory_run, "plain": lambda: run("plain")}, repeats=repeats, warmup=warmup)
    steps = new_tokens - 1
    rates = {side: steps / max(t.median_s, 1e-12) for side, t in timings.items()}
    figure = _figure(
        rates["memory"],
        rates["plain"],
        "tokens/s",
        AIM_DECODE,
        f"greedy decoding of {new_tokens} tokens (rate over the last {steps}), memory vs plain model over an "
        "equally long KV cache",
        memory_timing=timings["memory"].as_dict(),
        plain_timing=timings["plain"].as_dict(),
    )
    ttft = {side: statistics.median(values[warmup:]) for side, values in first.items()}
    first_token = _figure(
        1 / ttft["memory"],
        1 / ttft["plain"],
        "first tokens/s",
        None,
        "time to the first new token: memkit's read (with retrieval) + the prompt's prefill, vs the plain "
        "model's prefill of the prompt over its cached context",
        memory_first_token_s=ttft["memory"],
        plain_first_token_s=ttft["plain"],
    )
    peaks = {}
    for side in ("memory", "plain"):
        release_memory()
        with PeakMemory(mem.device) as peak:
            run(side)
        peaks[side] = peak
    peak_fig = _figure(
        float(peaks["memory"].bytes),
        float(peaks["plain"].bytes),
        "bytes",
        None,
        f"peak memory growth over one generate call ({peaks['memory'].method})",
    )
    return {
        "figure": figure,
        "first_token": first_token,
        "peak": peak_fig,
        "retrieval": _retrieval(mem, calls[warmup:]),
    }


def _retrieval(mem: MemkitModel, calls: list[list[tuple[str, int, float]]]) -> dict[str, Any] | None:
    """Per-layer retrieval latency from the timed ``generate`` calls, or ``None`` without a store."""
    if mem.store is None or mem.retriever is None:
        return None
    layers = mem.backbone.num_layers
    entries = min(mem.store.size(i) for i in range(layers))
    k = min(mem.recipe.retrieve, entries)
    if not calls or not any(calls):
        return {
            "entries_per_layer": entries,
            "k": k,
            "note": "nothing was retrieved: the store is empty (memory-tokens not above the pool's capacity) "
            "or the recipe retrieves 0",
        }
    parts = ("select", "get", "layer_kv")
    per_layer: dict[str, list[float]] = {}
    for part in parts:
        per_layer[part] = [
            1e3 * statistics.median([sum(s for p, layer, s in call if p == part and layer == i) for call in calls])
            for i in range(layers)
        ]
    totals = [sum(per_layer[p][i] for p in parts) for i in range(layers)]
    per_read = [1e3 * sum(s for _, _, s in call) for call in calls]
    return {
        "entries_per_layer": entries,
        "k": k,
        "layers": layers,
        "ms_per_layer": totals,
        "ms_per_layer_median": statistics.median(totals),
        "ms_per_layer_parts": per_layer,
        "ms_per_read": statistics.median(per_read),
        "what": "per layer and read: retriever.select (candidates, scoring, top-k) + store.get (the chosen "
        "entries) + injector.layer_kv (their keys and values), timed inside memkit's retrieval hooks",
    }


def _inject(
    mem: MemkitModel,
    plain_model: Any,
    chunk_ids: torch.Tensor,
    repeats: int,
    warmup: int,
    sync: Callable[[], None] | None,
) -> dict[str, Any]:
    n = int(chunk_ids.numel())
    plain_ids = chunk_ids[None].to(mem.device)
    calls: dict[str, Callable[[], object]] = {
        "memory": lambda: mem.inject(chunk_ids),
        "plain": lambda: plain_model(input_ids=plain_ids),
        # What filling an ordinary KV cache with the chunk costs: generate's prefill, last logits only.
        "prefill": lambda: plain_model(input_ids=plain_ids, logits_to_keep=1),
    }
    try:
        calls["prefill"]()
    except TypeError:  # a model whose forward has no logits_to_keep
        del calls["prefill"]
    timings = time_interleaved(calls, repeats=repeats, warmup=warmup, sync=sync)
    rates = {side: n / max(t.median_s, 1e-12) for side, t in timings.items()}
    figure = _figure(
        rates["memory"],
        rates["plain"],
        "tokens/s",
        AIM_INJECT,
        f"mem.inject of one {n}-token chunk (pool full) vs the plain model's forward over the same chunk "
        "(logits of every position)",
        memory_timing=timings["memory"].as_dict(),
        plain_timing=timings["plain"].as_dict(),
    )
    if "prefill" in timings:
        figure["versus_prefill"] = {
            "plain": rates["prefill"],
            "ratio": rates["memory"] / rates["prefill"],
            "plain_timing": timings["prefill"].as_dict(),
            "what": "the same injection vs the plain model's prefill of the chunk (logits of the last position "
            "only, as generate computes them); no aim",
        }
    peaks = {}
    for side, call in calls.items():
        release_memory()
        with PeakMemory(mem.device) as peak:
            call()
        peaks[side] = peak
    peak_fig = _figure(
        float(peaks["memory"].bytes),
        float(peaks["plain"].bytes),
        "bytes",
        None,
        f"peak memory growth over one {n}-token injection vs one plain forward ({peaks['memory'].method})",
    )
    if "prefill" in peaks:
        prefill = float(peaks["prefill"].bytes)
        peak_fig["versus_prefill"] = {"plain": prefill, "ratio": peak_fig["memory"] / prefill if prefill else None}
    return {"figure": figure, "peak": peak_fig}


def _model_info(mem: MemkitModel) -> dict[str, Any]:
    cfg = mem.config
    return {
        "model_type": str(getattr(cfg, "model_type", "")),
        "class": type(mem.base_model).__name__,
        "layers": mem.backbone.num_layers,
        "hidden_size": mem.backbone.hidden_size,
        "parameters": sum(p.numel() for p in mem.base_model.parameters()),
        "dtype": str(mem.backbone.dtype).removeprefix("torch."),
        "window": getattr(cfg, "max_position_embeddings", None),
    }


def _recipe_info(mem: MemkitModel) -> dict[str, Any]:
    recipe = mem.recipe
    return {
        "name": recipe.name,
        "chunk_size": recipe.chunk_size,
        "pool_capacity": mem.pool.capacity,
        "write_size": mem.pool.write_size,
        "retrieve": recipe.retrieve,
        "store": recipe.store.name if recipe.store else None,
        "store_capacity": mem.store.capacity if mem.store is not None else None,
        "retriever": recipe.retriever.name if recipe.retriever else None,
    }
