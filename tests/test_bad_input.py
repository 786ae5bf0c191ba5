"""Bad input, all of it: one table of cases across the Python API and the command line, each with the error
it gets. :func:`test_bad_input_gets_its_documented_error` runs every row; ``docs/bad-input.md`` is rendered
from the same table (:func:`render_markdown`; regenerate it with ``python tests/test_bad_input.py``) and
:func:`test_the_bad_input_page_lists_every_case` keeps the two from drifting apart.
"""

from __future__ import annotations

import os
import pickle
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache

import memkit
from memkit import plugins
from memkit.builtin.pool import RandomDropPool
from memkit.cli import main
from memkit.errors import MemkitError
from memkit.testing import tiny_model
from memkit.testing.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
SMALL: dict[str, Any] = {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8}}
MPLUS_SMALL: dict[str, Any] = {
    **SMALL,
    "retrieve": 8,
    "store": {"capacity": 64, "merge_every": 3},
    "retriever": {"key_size": 8},
}
SMALL_TOML = 'name = "small"\nchunk_size = 16\n[pool]\nname = "random_drop"\ncapacity = 24\nwrite_size = 8\n'
SMALL_TOML += '[injector]\nname = "kv"\n'
IDS = torch.tensor([[5, 6, 7]])


# ---------------------------------------------------------------------------------------------------
# the context every Python case runs against
# ---------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What the triggers use: a wrapped tiny Llama without tokenizer (``mem``), wrappers of other shapes,
    an unwrapped wrapper, and a folder of prepared files (``tmp``)."""

    mem: memkit.MemkitModel
    other_model: memkit.MemkitModel
    mplus: memkit.MemkitModel
    unwrapped: memkit.MemkitModel
    tmp: Path


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    tmp = tmp_path_factory.mktemp("bad-input")
    mem = memkit.wrap(tiny_model("llama"), "memoryllm", **SMALL)
    mem.inject(torch.arange(3, 30))
    mem.save_memory(tmp / "llama.memkit")
    mplus = memkit.wrap(tiny_model("llama"), "mplus", **MPLUS_SMALL)
    mplus.save_memory(tmp / "mplus.memkit")
    unwrapped = memkit.wrap(tiny_model("llama"), "memoryllm", **SMALL)
    unwrapped.unwrap()
    (tmp / "notes.txt").write_text("The ferry leaves at seven.")
    (tmp / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp / "junk.memkit").write_text("hello, this is not a safetensors file")
    (tmp / "pickled.memkit").write_bytes(pickle.dumps({"pool.vectors": [1.0, 2.0]}))
    save_file({"a": torch.zeros(2)}, str(tmp / "plain.safetensors"))
    (tmp / "syntax.toml").write_text("name = [")
    (tmp / "latin1.toml").write_bytes(b'name = "caf\xe9"')
    (tmp / "unknown-part.toml").write_text(SMALL_TOML.replace('"random_drop"', '"nosuch"'))
    (tmp / "small.toml").write_text(SMALL_TOML)
    (tmp / "a-file").write_text("x")
    (tmp / "empty-dir").mkdir()
    for folder, family in (("tiny", "llama"), ("tiny-qwen", "qwen2")):  # local models with a byte tokenizer
        tiny_model(family, vocab_size=BYTE_VOCAB_SIZE).save_pretrained(tmp / folder)
        byte_tokenizer().save_pretrained(tmp / folder)
    cli_mem = memkit.wrap(tiny_model("llama", vocab_size=BYTE_VOCAB_SIZE), tmp / "small.toml")
    cli_mem.save_memory(tmp / "tiny.memkit")
    return Ctx(mem, memkit.wrap(tiny_model("qwen2"), "memoryllm", **SMALL), mplus, unwrapped, tmp)


# ---------------------------------------------------------------------------------------------------
# plugin helpers: every plugin case runs on a registry rebuilt before and forgotten after
# ---------------------------------------------------------------------------------------------------


class _Plugin:
    """A plugin object (pluggy compares plugins by identity)."""


def _plugin(**hooks: Callable[..., None]) -> _Plugin:
    plugin = _Plugin()
    for name, fn in hooks.items():
        setattr(plugin, name, memkit.hookimpl(fn))
    return plugin


@contextmanager
def _fresh_plugins(env: dict[str, str] | None = None) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    plugins.reset()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        plugins.reset()


def _register(**hooks: Callable[..., None]) -> Callable[[Ctx], object]:
    def trigger(ctx: Ctx) -> object:
        with _fresh_plugins():
            plugins.register_plugin(_plugin(**hooks), name="bad-plugin")
        return None

    return trigger


def _register_twice(ctx: Ctx) -> None:
    plugin = _plugin(register_pools=lambda registry: None)
    with _fresh_plugins():
        plugins.register_plugin(plugin, name="twice")
        plugins.register_plugin(plugin, name="twice")


def _register_recipe_twice(ctx: Ctx) -> None:
    recipe = memkit.load_recipe("memoryllm").with_overrides({"chunk_size": 8})  # a hook must not load recipes by name
    _register(register_recipes=lambda registry: registry.add_recipe("memoryllm", recipe))(ctx)


def _allow_and_block(ctx: Ctx) -> None:
    env = {plugins.DISABLE_AUTOLOAD_ENV: "0", plugins.ALLOW_ENV: "one", plugins.BLOCK_ENV: "two"}
    with _fresh_plugins(env):
        plugins.get_registry()


class _BadNamePool(RandomDropPool):
    name = "Bad Name"


def _raise(exc: Exception) -> Callable[..., None]:
    def hook(registry: Any) -> None:
        raise exc

    return hook


# ---------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: where it goes in, what it is, how to trigger it, and the error it gets.

    ``trigger`` is a callable of :class:`Ctx` (``surface == "python"``) or the ``memkit`` command's argv
    (``surface == "cli"``, ``{tmp}`` standing for the folder of prepared files). ``error`` is the
    ``MemkitError`` subclass raised, or the CLI's exit code (1: a memkit error, 2: bad usage).
    ``message`` is a substring of the error message.
    """

    id: str
    surface: str
    description: str
    trigger: Callable[[Ctx], object] | tuple[str, ...]
    error: type[MemkitError] | int
    message: str


def py(id: str, description: str, trigger: Callable[[Ctx], object], error: type[MemkitError], message: str) -> Case:
    return Case(id, "python", description, trigger, error, message)


def cli(id: str, description: str, argv: str | tuple[str, ...], code: int, message: str) -> Case:
    return Case(id, "cli", description, tuple(argv.split()) if isinstance(argv, str) else argv, code, message)


def _wrap(*args: Any, **kwargs: Any) -> Callable[[Ctx], object]:
    return lambda ctx: memkit.wrap(tiny_model("llama"), *args, **kwargs)


CASES: list[Case] = [
    # -- wrap -------------------------------------------------------------------------------------------
    py(
        "wrap-not-a-model",
        "`wrap(nn.Linear(3, 3))`: a module that is not a transformers model",
        lambda ctx: memkit.wrap(torch.nn.Linear(3, 3), "memoryllm"),
        memkit.IncompatibleModelError,
        "PreTrainedModel",
    ),
    py(
        "wrap-none",
        "`wrap(None)`",
        lambda ctx: memkit.wrap(None),  # type: ignore[arg-type]
        memkit.IncompatibleModelError,
        "got NoneType",
    ),
    py(
        "wrap-twice",
        "`wrap(mem)`: a model that is already a `MemkitModel`",
        lambda ctx: memkit.wrap(ctx.mem),
        memkit.IncompatibleModelError,
        "already wrapped",
    ),
    py(
        "wrap-no-layers",
        "a model with zero decoder layers",
        lambda ctx: memkit.wrap(tiny_model("llama", num_hidden_layers=0), "memoryllm", **SMALL),
        memkit.IncompatibleModelError,
        "decoder layers",
    ),
    py(
        "wrap-unknown-recipe",
        '`wrap(model, "nosuch")`: a recipe name nothing registered',
        _wrap("nosuch"),
        memkit.UnknownComponentError,
        "known recipes: memoryllm, mplus, training-free",
    ),
    py(
        "wrap-recipe-wrong-type",
        "`wrap(model, 5)`: a recipe that is neither name, path nor `Recipe`",
        _wrap(5),
        memkit.RecipeError,
        "got int",
    ),
    py(
        "wrap-tokenizer-not-callable",
        '`wrap(model, tokenizer="gpt2")`: a tokenizer that is a string',
        _wrap("memoryllm", tokenizer="gpt2", **SMALL),
        memkit.InputError,
        "tokenizer must be a callable tokenizer",
    ),
    py(
        "override-unknown-key",
        "`wrap(model, recipe, colour=1)`: an override that is no recipe field",
        _wrap("memoryllm", colour=1),
        memkit.RecipeError,
        "unknown recipe override 'colour'",
    ),
    py(
        "override-wrong-type",
        '`chunk_size="big"`',
        _wrap("memoryllm", chunk_size="big"),
        memkit.RecipeError,
        "chunk_size: Input should be a valid integer",
    ),
    py("override-zero", "`chunk_size=0`", _wrap("memoryllm", chunk_size=0), memkit.RecipeError, "greater than 0"),
    py(
        "override-negative-retrieve",
        "`retrieve=-1`",
        _wrap("memoryllm", retrieve=-1, **SMALL),
        memkit.RecipeError,
        "retrieve: Input should be greater than or equal to 0",
    ),
    py(
        "override-part-not-a-table",
        "`pool=5`: a part section that is not a mapping",
        _wrap("memoryllm", pool=5),
        memkit.RecipeError,
        "pool: Input should be a valid dictionary",
    ),
    py(
        "override-unknown-part-option",
        '`pool={"colour": 1}`: an option the part does not have',
        _wrap("memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8, "colour": 1}),
        memkit.RecipeError,
        "Valid options: capacity, write_size",
    ),
    py(
        "recipe-write-size-over-capacity",
        "`pool={capacity: 8, write_size: 16}`: K larger than N",
        _wrap("memoryllm", chunk_size=16, pool={"capacity": 8, "write_size": 16}),
        memkit.RecipeError,
        "write_size K=16 is larger than capacity N=8",
    ),
    py(
        "recipe-memory-over-window",
        'the full `"memoryllm"` recipe (12,800 vectors) on a model with a 512-position window',
        _wrap("memoryllm"),
        memkit.RecipeError,
        "leaves no room in llama's window of 512 positions",
    ),
    py(
        "recipe-retrieve-without-store",
        "`retrieve=4` on a recipe without a long-term store",
        _wrap("memoryllm", retrieve=4, **SMALL),
        memkit.RecipeError,
        "retrieves 4 entries but has no store",
    ),
    py(
        "recipe-store-without-retriever",
        '`store={"name": "exact"}` without a retriever',
        _wrap("memoryllm", store={"name": "exact", "capacity": 64}, **SMALL),
        memkit.RecipeError,
        "names a store without a retriever",
    ),
    py(
        "recipe-retrieve-over-store",
        "`retrieve` larger than the store's capacity",
        _wrap("mplus", **{**MPLUS_SMALL, "store": {"capacity": 4}}),
        memkit.RecipeError,
        "more than its store can ever hold (4)",
    ),
    py(
        "recipe-input-capture-long-chunks",
        '`capture="input"` with chunks longer than a write',
        _wrap("memoryllm", injector={"capture": "input"}, **SMALL),
        memkit.RecipeError,
        "Set chunk_size <= pool.write_size",
    ),
    py(
        "recipe-unknown-part",
        '`pool={"name": "nosuch"}`: a part name nothing registered',
        _wrap("memoryllm", chunk_size=16, pool={"name": "nosuch"}),
        memkit.UnknownComponentError,
        "unknown pool 'nosuch'; registered pools: random_drop",
    ),
    py(
        "recipe-adapters-unknown-target",
        '`adapters={"targets": ["nosuch"]}`: LoRA targets the model lacks',
        _wrap("memoryllm", adapters={"rank": 2, "targets": ["nosuch"]}, **SMALL),
        memkit.RecipeError,
        "cannot add the recipe's LoRA adapters",
    ),
    py(
        "recipe-file-syntax-error",
        "`load_recipe(path)` of a TOML file with a syntax error",
        lambda ctx: memkit.load_recipe(ctx.tmp / "syntax.toml"),
        memkit.RecipeError,
        "is not valid TOML",
    ),
    py(
        "recipe-file-not-utf8",
        "`load_recipe(path)` of a file in Latin-1",
        lambda ctx: memkit.load_recipe(ctx.tmp / "latin1.toml"),
        memkit.RecipeError,
        "is not UTF-8 text",
    ),
    py(
        "recipe-file-missing",
        "`load_recipe(path)` of a `.toml` file that does not exist",
        lambda ctx: memkit.load_recipe(ctx.tmp / "none.toml"),
        memkit.RecipeError,
        "does not exist",
    ),
    py(
        "recipe-file-unknown-part",
        "`wrap(model, path)`: a recipe file naming an unknown pool",
        lambda ctx: memkit.wrap(tiny_model("llama"), ctx.tmp / "unknown-part.toml"),
        memkit.UnknownComponentError,
        "unknown pool 'nosuch'",
    ),
    py(
        "recipe-overrides-not-a-mapping",
        '`recipe.with_overrides([("chunk_size", 8)])`',
        lambda ctx: memkit.load_recipe("memoryllm").with_overrides([("chunk_size", 8)]),  # type: ignore[arg-type]
        memkit.RecipeError,
        "must be a mapping",
    ),
    # -- inject -----------------------------------------------------------------------------------------
    py("inject-empty-string", '`inject("")`', lambda ctx: ctx.mem.inject(""), memkit.EmptyInputError, "empty string"),
    py(
        "inject-whitespace",
        '`inject("  \\n\\t")`',
        lambda ctx: ctx.mem.inject("  \n\t"),
        memkit.EmptyInputError,
        "empty string",
    ),
    py("inject-empty-list", "`inject([])`", lambda ctx: ctx.mem.inject([]), memkit.EmptyInputError, "zero tokens"),
    py(
        "inject-empty-tensor",
        "`inject(torch.zeros(1, 0, dtype=torch.long))`",
        lambda ctx: ctx.mem.inject(torch.zeros(1, 0, dtype=torch.long)),
        memkit.EmptyInputError,
        "zero tokens",
    ),
    py(
        "inject-text-without-tokenizer",
        '`inject("some text")` on a wrapper made without `tokenizer=`',
        lambda ctx: ctx.mem.inject("some text"),
        memkit.MissingTokenizerError,
        "pass tokenizer= to memkit.wrap",
    ),
    py(
        "inject-huge-text-without-tokenizer",
        "10 MB of text without a tokenizer (refused before any work)",
        lambda ctx: ctx.mem.inject("x" * 10_000_000),
        memkit.MissingTokenizerError,
        "pass tokenizer= to memkit.wrap",
    ),
    py(
        "inject-text-beyond-vocabulary",
        "text whose tokenizer makes ids the model does not have (a tokenizer for another vocabulary)",
        lambda ctx: memkit.wrap(tiny_model("llama"), "memoryllm", tokenizer=byte_tokenizer(), **SMALL).inject("café"),
        memkit.InputError,
        "token ids must be in [0, 128)",
    ),
    py(
        "inject-dict",
        '`inject({"text": "..."})`',
        lambda ctx: ctx.mem.inject({"text": "hello"}),  # type: ignore[arg-type]
        memkit.InputError,
        "got dict",
    ),
    py(
        "inject-none",
        "`inject(None)`",
        lambda ctx: ctx.mem.inject(None),  # type: ignore[arg-type]
        memkit.InputError,
        "got NoneType",
    ),
    py(
        "inject-bytes",
        '`inject(b"hello")`: bytes, not text',
        lambda ctx: ctx.mem.inject(b"hello"),  # type: ignore[arg-type]
        memkit.InputError,
        "decode it to str first",
    ),
    py(
        "inject-float-list",
        "`inject([1.0, 2.0])`",
        lambda ctx: ctx.mem.inject([1.0, 2.0]),  # type: ignore[list-item]
        memkit.InputError,
        "holding float at index 0",
    ),
    py(
        "inject-float-tensor",
        "`inject(torch.ones(5))`: a float32 tensor",
        lambda ctx: ctx.mem.inject(torch.ones(5)),
        memkit.InputError,
        "token ids must be integers, got a torch.float32 tensor",
    ),
    py(
        "inject-float64-tensor",
        "a float64 tensor",
        lambda ctx: ctx.mem.inject(torch.ones(5, dtype=torch.float64)),
        memkit.InputError,
        "got a torch.float64 tensor",
    ),
    py(
        "inject-bool-tensor",
        "a bool tensor",
        lambda ctx: ctx.mem.inject(torch.ones(5, dtype=torch.bool)),
        memkit.InputError,
        "got a torch.bool tensor",
    ),
    py(
        "inject-complex-tensor",
        "a complex64 tensor",
        lambda ctx: ctx.mem.inject(torch.ones(5, dtype=torch.complex64)),
        memkit.InputError,
        "got a torch.complex64 tensor",
    ),
    py(
        "inject-sparse-tensor",
        "a sparse LongTensor",
        lambda ctx: ctx.mem.inject(torch.ones(5, dtype=torch.long).to_sparse()),
        memkit.InputError,
        "must be a dense tensor",
    ),
    py(
        "inject-meta-tensor",
        "a LongTensor on the meta device",
        lambda ctx: ctx.mem.inject(torch.ones(5, dtype=torch.long, device="meta")),
        memkit.InputError,
        "on the meta device",
    ),
    py(
        "inject-two-rows",
        "`inject(torch.ones(2, 5, dtype=torch.long))`: a batch of two texts",
        lambda ctx: ctx.mem.inject(torch.ones(2, 5, dtype=torch.long)),
        memkit.InputError,
        "inject one text at a time",
    ),
    py(
        "inject-huge-batch",
        "a 3-row batch of 10^12 tokens each (an expanded view: nothing allocated, refused at once)",
        lambda ctx: ctx.mem.inject(torch.zeros(1, dtype=torch.long).expand(3, 10**12)),
        memkit.InputError,
        "got a batch of 3 rows",
    ),
    py(
        "inject-3d-tensor",
        "a `[1, 1, 3]` tensor",
        lambda ctx: ctx.mem.inject(torch.ones(1, 1, 3, dtype=torch.long)),
        memkit.InputError,
        "must be [n] or [1, n], got shape [1, 1, 3]",
    ),
    py(
        "inject-scalar-tensor",
        "a 0-d tensor",
        lambda ctx: ctx.mem.inject(torch.tensor(5)),
        memkit.InputError,
        "got shape []",
    ),
    py(
        "inject-id-over-vocab",
        "`inject([1, 2, 500])` on a vocabulary of 128",
        lambda ctx: ctx.mem.inject([1, 2, 500]),
        memkit.InputError,
        "token ids must be in [0, 128), got values from 1 to 500",
    ),
    py(
        "inject-negative-id",
        "`inject([-1, 2])`",
        lambda ctx: ctx.mem.inject([-1, 2]),
        memkit.InputError,
        "got values from -1 to 2",
    ),
    py(
        "inject-id-over-int64",
        "`inject([2**70])`: an id too large for any integer tensor",
        lambda ctx: ctx.mem.inject([2**70]),
        memkit.InputError,
        "does not fit in 64 bits",
    ),
    # -- forward and generate ---------------------------------------------------------------------------
    py(
        "forward-inputs-embeds",
        "`mem(inputs_embeds=...)`",
        lambda ctx: ctx.mem(inputs_embeds=torch.zeros(1, 3, 32)),
        memkit.InputError,
        "not inputs_embeds",
    ),
    py(
        "forward-foreign-cache",
        "`mem(ids, past_key_values=DynamicCache())`: a cache memkit did not make",
        lambda ctx: ctx.mem(input_ids=IDS, past_key_values=DynamicCache()),
        memkit.InputError,
        "got DynamicCache",
    ),
    py(
        "forward-ids-a-list",
        "`mem(input_ids=[[5, 6]])`: a list, not a tensor",
        lambda ctx: ctx.mem(input_ids=[[5, 6]]),
        memkit.InputError,
        "[batch, length] LongTensor",
    ),
    py(
        "forward-bool-ids",
        "`input_ids` of dtype bool",
        lambda ctx: ctx.mem(input_ids=torch.ones(1, 3, dtype=torch.bool)),
        memkit.InputError,
        "integer token ids, got torch.bool",
    ),
    py(
        "forward-float64-ids",
        "`input_ids` of dtype float64",
        lambda ctx: ctx.mem(input_ids=IDS.double()),
        memkit.InputError,
        "integer token ids, got torch.float64",
    ),
    py(
        "forward-meta-ids",
        "`input_ids` on the meta device (the model is on the CPU)",
        lambda ctx: ctx.mem(input_ids=IDS.to("meta")),
        memkit.InputError,
        "move them with .to(model.device)",
    ),
    py(
        "forward-mask-shape",
        "an `attention_mask` of another shape than `input_ids`",
        lambda ctx: ctx.mem(input_ids=IDS, attention_mask=torch.ones(1, 2, dtype=torch.long)),
        memkit.InputError,
        "attention_mask has shape [1, 2] but input_ids [1, 3]",
    ),
    py(
        "forward-mask-a-list",
        "`attention_mask=[[1, 1, 1]]`: a list, not a tensor",
        lambda ctx: ctx.mem(input_ids=IDS, attention_mask=[[1, 1, 1]]),
        memkit.InputError,
        "attention_mask must be a [batch, length] tensor, got list",
    ),
    py(
        "forward-mask-meta",
        "an `attention_mask` on the meta device",
        lambda ctx: ctx.mem(input_ids=IDS, attention_mask=torch.ones(1, 3, device="meta")),
        memkit.InputError,
        "attention_mask is on meta",
    ),
    py(
        "forward-labels-shape",
        "`labels` of another shape than `input_ids`",
        lambda ctx: ctx.mem(input_ids=IDS, labels=torch.ones(1, 5, dtype=torch.long)),
        memkit.InputError,
        "labels must be a tensor of input_ids' shape [1, 3]",
    ),
    py(
        "generate-id-over-vocab",
        "`generate([[5, 999]])`",
        lambda ctx: ctx.mem.generate(torch.tensor([[5, 999]]), max_new_tokens=1),
        memkit.InputError,
        "token ids must be in [0, 128)",
    ),
    py(
        "generate-1d-ids",
        "`generate(torch.tensor([5, 6]))`: no batch dimension",
        lambda ctx: ctx.mem.generate(torch.tensor([5, 6]), max_new_tokens=1),
        memkit.InputError,
        "[batch, length] LongTensor",
    ),
    py(
        "generate-empty-ids",
        "`generate` of a `[1, 0]` tensor",
        lambda ctx: ctx.mem.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1),
        memkit.EmptyInputError,
        "zero tokens",
    ),
    py(
        "generate-no-ids",
        "`generate(max_new_tokens=1)` without `input_ids`",
        lambda ctx: ctx.mem.generate(max_new_tokens=1),
        memkit.InputError,
        "input_ids are required",
    ),
    py(
        "generate-own-cache",
        "`generate(ids, past_key_values=...)`",
        lambda ctx: ctx.mem.generate(IDS, past_key_values=DynamicCache(), max_new_tokens=1),
        memkit.InputError,
        "does not take past_key_values",
    ),
    py(
        "generate-inputs-embeds",
        "`generate(ids, inputs_embeds=...)`",
        lambda ctx: ctx.mem.generate(IDS, inputs_embeds=torch.zeros(1, 3, 32), max_new_tokens=1),
        memkit.InputError,
        "does not take inputs_embeds",
    ),
    # -- memory files -----------------------------------------------------------------------------------
    py(
        "load-missing-file",
        "`load_memory` of a file that does not exist",
        lambda ctx: ctx.mem.load_memory(ctx.tmp / "none.memkit"),
        memkit.MemoryStateError,
        "does not exist",
    ),
    py(
        "load-a-folder",
        "`load_memory` of a folder",
        lambda ctx: ctx.mem.load_memory(ctx.tmp / "empty-dir"),
        memkit.MemoryStateError,
        "is a folder, not a memory file",
    ),
    py(
        "load-none",
        "`load_memory(None)`",
        lambda ctx: ctx.mem.load_memory(None),  # type: ignore[arg-type]
        memkit.InputError,
        "expected a file path",
    ),
    py(
        "load-not-safetensors",
        "`load_memory` of a text file",
        lambda ctx: ctx.mem.load_memory(ctx.tmp / "junk.memkit"),
        memkit.MemoryStateError,
        "is truncated or corrupted",
    ),
    py(
        "load-a-pickle",
        "`load_memory` of a pickle (nothing is unpickled)",
        lambda ctx: ctx.mem.load_memory(ctx.tmp / "pickled.memkit"),
        memkit.MemoryStateError,
        "is truncated or corrupted",
    ),
    py(
        "load-plain-safetensors",
        "`load_memory` of a safetensors file memkit did not write",
        lambda ctx: ctx.mem.load_memory(ctx.tmp / "plain.safetensors"),
        memkit.MemoryStateError,
        "not a memkit memory file",
    ),
    py(
        "load-file-of-another-model",
        "`load_memory` of a Llama's memory into a Qwen2 wrapper",
        lambda ctx: ctx.other_model.load_memory(ctx.tmp / "llama.memkit"),
        memkit.MemoryStateError,
        "model_type: file has 'llama', this model has 'qwen2'",
    ),
    py(
        "load-file-of-another-recipe",
        '`load_memory` of an `"mplus"` memory into a `"memoryllm"` wrapper',
        lambda ctx: ctx.mem.load_memory(ctx.tmp / "mplus.memkit"),
        memkit.MemoryStateError,
        "store: file has 'exact', this model has None",
    ),
    py(
        "save-into-missing-folder",
        "`save_memory` into a folder that does not exist",
        lambda ctx: ctx.mem.save_memory(ctx.tmp / "nope" / "m.memkit"),
        memkit.MemoryStateError,
        "does not exist",
    ),
    py(
        "save-onto-a-folder",
        "`save_memory` to the path of an existing folder",
        lambda ctx: ctx.mem.save_memory(ctx.tmp / "empty-dir"),
        memkit.MemoryStateError,
        "it is a folder; give a file path",
    ),
    py(
        "save-none",
        "`save_memory(None)`",
        lambda ctx: ctx.mem.save_memory(None),  # type: ignore[arg-type]
        memkit.InputError,
        "expected a file path",
    ),
    # -- use after unwrap -------------------------------------------------------------------------------
    py(
        "unwrapped-inject",
        "`inject` after `unwrap()`",
        lambda ctx: ctx.unwrapped.inject([3, 4]),
        memkit.UnwrappedError,
        "was unwrapped",
    ),
    py(
        "unwrapped-generate",
        "`generate` after `unwrap()`",
        lambda ctx: ctx.unwrapped.generate(IDS, max_new_tokens=1),
        memkit.UnwrappedError,
        "was unwrapped",
    ),
    py(
        "unwrapped-unwrap",
        "`unwrap()` twice",
        lambda ctx: ctx.unwrapped.unwrap(),
        memkit.UnwrappedError,
        "was unwrapped",
    ),
    # -- plugins ----------------------------------------------------------------------------------------
    py(
        "plugin-duplicate-part",
        "a plugin registering a pool named `random_drop` again",
        _register(register_pools=lambda registry: registry.add_pool(RandomDropPool)),
        memkit.RegistrationError,
        "pool 'random_drop' is registered twice",
    ),
    py(
        "plugin-duplicate-recipe",
        "a plugin registering a recipe named `memoryllm` again",
        _register_recipe_twice,
        memkit.RegistrationError,
        "recipe 'memoryllm' is registered twice",
    ),
    py(
        "plugin-bad-name",
        'a plugin registering a pool named `"Bad Name"`',
        _register(register_pools=lambda registry: registry.add_pool(_BadNamePool)),
        memkit.RegistrationError,
        "names are lowercase letters",
    ),
    py(
        "plugin-hook-raises",
        "a plugin whose `register_pools` hook raises `KeyError`",
        _register(register_pools=_raise(KeyError("boom"))),
        memkit.PluginError,
        "'bad-plugin' raised KeyError('boom') in its register_pools hook",
    ),
    py(
        "plugin-unknown-hook",
        "a plugin implementing a hook memkit does not define",
        _register(register_widgets=lambda registry: None),
        memkit.PluginError,
        "implements a hook memkit does not have",
    ),
    py(
        "plugin-registered-twice",
        "`register_plugin` of the same plugin object twice",
        _register_twice,
        memkit.PluginError,
        "cannot register plugin 'twice'",
    ),
    py(
        "plugin-allow-and-block",
        "both `MEMKIT_PLUGINS_ALLOW` and `MEMKIT_PLUGINS_BLOCK` set",
        _allow_and_block,
        memkit.PluginError,
        "set only one",
    ),
    # -- the command line -------------------------------------------------------------------------------
    cli("cli-no-command", "no command", "", 2, "the following arguments are required: COMMAND"),
    cli("cli-unknown-command", "an unknown command", "nosuch", 2, "invalid choice: 'nosuch'"),
    cli(
        "cli-inject-missing-file",
        "a text file that does not exist",
        "inject {tmp}/missing.txt --memory {tmp}/m.memkit",
        1,
        "missing.txt does not exist",
    ),
    cli(
        "cli-inject-not-utf8",
        "a text file in Latin-1",
        "inject {tmp}/latin1.txt --memory {tmp}/m.memkit",
        1,
        "as UTF-8 text",
    ),
    cli(
        "cli-inject-memory-is-a-folder",
        "`--memory` naming a folder",
        "inject {tmp}/notes.txt --memory {tmp}/empty-dir",
        1,
        "is a folder; give a file path",
    ),
    cli(
        "cli-inject-unknown-recipe",
        "`--recipe` naming no recipe",
        "inject {tmp}/notes.txt --memory {tmp}/m.memkit --recipe nosuch",
        1,
        "unknown recipe 'nosuch'",
    ),
    cli(
        "cli-inject-recipe-syntax-error",
        "`--recipe` a TOML file with a syntax error",
        "inject {tmp}/notes.txt --memory {tmp}/m.memkit --recipe {tmp}/syntax.toml",
        1,
        "is not valid TOML",
    ),
    cli(
        "cli-inject-model-not-local",
        "`--model` a hub id (nothing is downloaded)",
        "inject {tmp}/notes.txt --memory {tmp}/m.memkit --model someone/some-model",
        1,
        "nothing is downloaded",
    ),
    cli(
        "cli-inject-recipe-contradicts-model",
        "the default recipe on a model with a 512-position window",
        "inject {tmp}/notes.txt --memory {tmp}/m.memkit --model {tmp}/tiny",
        1,
        "leaves no room in llama's window",
    ),
    cli(
        "cli-ask-without-memory",
        "`ask` with a memory file that does not exist",
        "ask Who? --memory {tmp}/none.memkit",
        1,
        "memkit inject FILE --memory",
    ),
    cli(
        "cli-ask-empty-question",
        "`ask` an empty question",
        ("ask", " ", "--memory", "{tmp}/none.memkit"),
        1,
        "question is empty",
    ),
    cli(
        "cli-ask-memory-of-another-model",
        "`ask` with a Llama's memory file on a Qwen2 model",
        "ask Who? --memory {tmp}/tiny.memkit --model {tmp}/tiny-qwen --recipe {tmp}/small.toml",
        1,
        "was made for another model or recipe",
    ),
    cli(
        "cli-ask-corrupted-memory",
        "`ask` with a memory file that is not safetensors",
        "ask Who? --memory {tmp}/junk.memkit --model {tmp}/tiny --recipe {tmp}/small.toml",
        1,
        "is truncated or corrupted",
    ),
    cli(
        "cli-ask-bad-int",
        "`--max-new-tokens abc`",
        "ask Who? --memory {tmp}/none.memkit --max-new-tokens abc",
        2,
        "invalid int value: 'abc'",
    ),
    cli(
        "cli-chat-without-memory",
        "`chat` with a memory file that does not exist",
        "chat --memory {tmp}/none.memkit",
        1,
        "does not exist",
    ),
    cli("cli-eval-unknown", "`eval nosuch`", "eval nosuch", 2, "invalid choice: 'nosuch'"),
    cli(
        "cli-eval-zero-samples",
        "`eval retention --samples 0`",
        "eval retention --samples 0 --out {tmp}/eval",
        1,
        "samples: Input should be greater than or equal to 1",
    ),
    cli(
        "cli-eval-depth-out-of-range",
        "`eval passkey --depths 2`",
        "eval passkey --depths 2 --out {tmp}/eval",
        1,
        "depths must lie in [0, 1]",
    ),
    cli(
        "cli-eval-override-not-an-object",
        "`eval retention --override [1]`",
        "eval retention --override [1]",
        2,
        "must be a JSON object",
    ),
    cli(
        "cli-eval-missing-text",
        "`eval perplexity --text` a file that does not exist",
        "eval perplexity --text {tmp}/none.txt --out {tmp}/eval",
        1,
        "none.txt does not exist",
    ),
    cli(
        "cli-bench-zero-size",
        "`bench store --sizes 0`",
        "bench store --sizes 0 --out {tmp}/bench",
        1,
        "every size must be > 0",
    ),
    cli(
        "cli-bench-bad-size",
        "`bench store --sizes abc`",
        "bench store --sizes abc --out {tmp}/bench",
        1,
        "'abc' is not a size",
    ),
    cli(
        "cli-bench-unknown-backend",
        "`bench store --backends nosuch`",
        "bench store --sizes 1k --backends nosuch --out {tmp}/bench",
        1,
        "unknown store backend 'nosuch'",
    ),
    cli(
        "cli-bench-bad-dtype",
        "`bench store --dtype int8`",
        "bench store --sizes 1k --dtype int8 --out {tmp}/bench",
        1,
        "dtype must be one of float32, float16, bfloat16",
    ),
    cli(
        "cli-bench-zero-threads",
        "`bench store --threads 0`",
        "bench store --threads 0 --out {tmp}/bench",
        1,
        "--threads must be a whole number > 0",
    ),
    cli(
        "cli-bench-out-is-a-file",
        "`bench store --out` an existing file",
        "bench store --out {tmp}/a-file",
        1,
        "is a file; give a folder",
    ),
    cli(
        "cli-bench-zero-repeats",
        "`bench speed --repeats 0`",
        "bench speed --repeats 0 --out {tmp}/bench",
        1,
        "--repeats must be a whole number > 0",
    ),
    cli(
        "cli-bench-model-not-local",
        "`bench speed --model` a hub id",
        "bench speed --model someone/some-model --out {tmp}/bench",
        1,
        "no such file or folder",
    ),
]


# ---------------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------------


def test_the_table_is_large_unique_and_names_memkit_errors() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert {case.surface for case in CASES} == {"python", "cli"}
    for case in CASES:
        if case.surface == "python":
            assert isinstance(case.error, type) and issubclass(case.error, MemkitError), case.id
        else:
            assert case.error in (1, 2), case.id


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_its_documented_error(case: Case, ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> None:
    if case.surface == "python":
        assert callable(case.trigger)
        before = ctx.mem.pool.read().clone()
        with pytest.raises(MemkitError) as info:
            case.trigger(ctx)
        assert type(info.value) is case.error, f"{case.id}: got {type(info.value).__name__}: {info.value}"
        assert case.message in str(info.value)
        assert torch.equal(ctx.mem.pool.read(), before), "a refused call changed the memory"
        return
    assert isinstance(case.trigger, tuple)
    argv = [arg.format(tmp=ctx.tmp) for arg in case.trigger]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == case.error, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0] == err.rstrip("\n").splitlines()[-1], err
    assert errors[0].startswith("memkit") and case.message in errors[0]
    assert not (ctx.tmp / "m.memkit").exists(), "a refused command wrote a memory file"


def _error_name(case: Case) -> str:
    if isinstance(case.error, int):
        return f"exit {case.error}" + (" (usage)" if case.error == 2 else " (MemkitError)")
    return case.error.__name__


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(cases: list[Case]) -> str:
    """The ``docs/bad-input.md`` page: an introduction, then one table row per case."""
    lines = [
        "# Bad input",
        "",
        "What memkit does with input it cannot use, across the Python API and the `memkit` command line.",
        "Every row is a case of the table in `tests/test_bad_input.py`, which runs them all; this page is",
        "rendered from that table (`python tests/test_bad_input.py`), and a test fails if the two differ.",
        "",
        "In Python every refusal is a [`MemkitError`](errors.md) subclass, raised before memory changes:",
        "the memory is exactly as it was before the call. On the command line a memkit error prints one",
        "line, `memkit COMMAND: error: ...`, with no traceback, and exits with 1; bad usage (an unknown",
        "command or option, a value of the wrong type) prints argparse's usage and exits with 2. In the",
        "Python rows `mem` is a tiny Llama (vocabulary 128, window 512) wrapped without a tokenizer.",
        "",
        "| id | surface | input | error | message excerpt |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        if case.surface == "cli":
            what = f"{case.description}: `{shlex.join(['memkit', *case.trigger]).replace('{tmp}/', '')}`"
        else:
            what = case.description
        lines.append(
            f"| `{case.id}` | {case.surface} | {_cell(what)} | `{_error_name(case)}` | {_cell(case.message)} |"
        )
    return "\n".join(lines) + "\n"


def test_the_bad_input_page_lists_every_case() -> None:
    page = DOC.read_text(encoding="utf-8")
    for case in CASES:
        row = next((line for line in page.splitlines() if line.startswith(f"| `{case.id}` |")), None)
        assert row is not None, f"docs/bad-input.md lacks {case.id}; run python tests/test_bad_input.py"
        assert f"`{_error_name(case)}`" in row, f"docs/bad-input.md gives {case.id} another error"
    assert page == render_markdown(CASES), "docs/bad-input.md is out of date; run python tests/test_bad_input.py"


if __name__ == "__main__":
    DOC.write_text(render_markdown(CASES), encoding="utf-8")
    print(f"wrote {DOC} ({len(CASES)} cases)")
