"""save_pretrained / load_pretrained: a trained wrapped model (recipe, memkit's weights, memory) in one folder."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

import memkit
from memkit.pretrained import (
    BASE_MODEL_DIR,
    CONFIG_FILE,
    MEMORY_FILE,
    WEIGHTS_FILE,
    load_pretrained,
    save_pretrained,
)
from memkit.testing import tiny_model

#: Scaled-down recipes on the tiny 2-layer Llama (d = 32): every part and tensor kind, in seconds.
CASES = {
    "mplus": {
        "chunk_size": 16,
        "retrieve": 8,
        "pool": {"capacity": 24, "write_size": 8, "seed": 0},
        "store": {"capacity": 200, "merge_every": 3},
        "retriever": {"key_size": 8},
    },
    "memoryllm": {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8, "seed": 0}},
    # bos = "token" (a buffer computed from the model) and the parameter-free attention retriever
    "training-free": {
        "chunk_size": 8,
        "retrieve": 4,
        "pool": {"capacity": 24, "write_size": 8},
        "store": {"capacity": 100},
        "injector": {"write_context": 8},
    },
}
PROMPT = torch.tensor([[5, 6, 7, 8]])


def _wrap(recipe: str, seed: int = 0, **model_overrides):
    return memkit.wrap(tiny_model("llama", seed=seed, **model_overrides), recipe, **CASES[recipe])


def _trained(recipe: str = "mplus"):
    """A wrapped tiny model whose every memkit tensor is non-trivial, with memory in the pool and the store."""
    # eval(): peft adds the LoRA dropout modules in training mode even to a model in eval mode, and with
    # non-zero lora_B that dropout would make every output random
    mem = _wrap(recipe).eval()
    gen = torch.Generator().manual_seed(1234)
    own = list(mem.injector.parameters())
    if mem.retriever is not None:
        own += list(mem.retriever.parameters())
    if mem.adapters is not None:
        own += mem.adapters.parameters()  # untrained lora_B is zero and would hide a bug
    with torch.no_grad():
        for parameter in own:
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=gen))
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(4):
            mem.inject(torch.randint(3, 128, (40,)), label=f"doc-{i}")
    assert mem.memory_size > 0
    if mem.store is not None:
        assert all(mem.store.size(layer) >= mem.recipe.retrieve for layer in range(2))
    return mem


def _outputs(mem):
    with torch.no_grad():
        logits = mem(PROMPT).logits
        generated = mem.generate(PROMPT, max_new_tokens=6, do_sample=False)
    return logits, generated


def _lora_layers(model) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def _rewrite_weights(folder, change) -> None:
    path = folder / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(path), metadata=header)


# -- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["mplus", "memoryllm", "training-free"])
def test_loaded_model_gives_identical_logits_generation_memory_and_later_writes(tmp_path, recipe):
    mem = _trained(recipe)
    logits, generated = _outputs(mem)
    save_pretrained(mem, tmp_path / "ckpt")

    if recipe != "training-free":  # the memory alone, without the trained weights, reads differently
        memory_only = _wrap(recipe).eval()
        memory_only.load_memory(tmp_path / "ckpt" / MEMORY_FILE)
        assert not torch.equal(_outputs(memory_only)[0], logits)

    fresh = tiny_model("llama", seed=0)
    loaded = load_pretrained(tmp_path / "ckpt", model=fresh)
    assert loaded.base_model is fresh
    assert not loaded.training
    assert loaded.recipe == mem.recipe
    got_logits, got_generated = _outputs(loaded)
    assert torch.equal(got_logits, logits)
    assert torch.equal(got_generated, generated)
    for (name, a), (name_b, b) in zip(mem.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    for name, tensor in mem.pool.state_dict().items():
        assert torch.equal(loaded.pool.state_dict()[name], tensor), name
    if mem.store is not None:
        for name, tensor in mem.store.state_dict().items():
            assert torch.equal(loaded.store.state_dict()[name], tensor), name
    assert loaded.source_labels == mem.source_labels

    # writing on continues identically: the pool's generator, the store's update count and ages came along
    torch.manual_seed(7)
    more = torch.randint(3, 128, (24,))
    with torch.no_grad():
        mem.inject(more)
        loaded.inject(more)
    assert torch.equal(_outputs(loaded)[0], _outputs(mem)[0])


def test_weights_file_holds_adapters_injector_and_retriever_tensors_by_prefix(tmp_path):
    mem = _trained("mplus")
    save_pretrained(mem, tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as handle:
        names = set(handle.keys())
        bos = handle.get_tensor("injector.bos_embedding")
    lora = {f"adapters.{n}" for n, _ in mem.base_model.named_parameters() if "lora_" in n}
    assert len(lora) == 48  # 2 layers x 6 targets x 2 adapters x (A, B)
    assert any(".lora_B.write." in n for n in lora) and any(".lora_B.read." in n for n in lora)
    retriever = {f"retriever.{n}" for n in mem.retriever.state_dict()}
    assert names == lora | {"injector.bos_embedding", "injector.new_memory_positional_emb"} | retriever
    assert torch.equal(bos, mem.injector.bos_embedding)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, MEMORY_FILE])

    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["format"] == "memkit.pretrained" and config["format_version"] == 1
    assert config["memkit_version"] == memkit.__version__
    assert memkit.Recipe.model_validate(tomllib.loads(config["recipe"])) == mem.recipe
    assert config["model"] == {
        "model_type": "llama",
        "name_or_path": "",
        "num_layers": 2,
        "hidden_size": 32,
        "dtype": "float32",
    }
    assert config["files"] == [WEIGHTS_FILE, MEMORY_FILE]


def test_from_pretrained_sends_a_memkit_folder_to_load_pretrained(tmp_path):
    mem = _trained("mplus")
    logits, _ = _outputs(mem)
    save_pretrained(mem, tmp_path)
    loaded = memkit.from_pretrained(tmp_path, model=tiny_model("llama", seed=0))
    assert torch.equal(_outputs(loaded)[0], logits)


def test_from_pretrained_refuses_model_for_a_folder_that_is_not_a_memkit_checkpoint(tmp_path):
    with pytest.raises(memkit.InputError, match="model= is for memkit checkpoints"):
        memkit.from_pretrained(tmp_path, model=tiny_model("llama"))


def test_from_pretrained_refuses_official_fidelity_for_a_memkit_checkpoint(tmp_path):
    save_pretrained(_wrap("memoryllm"), tmp_path)
    with pytest.raises(memkit.InputError, match="fidelity applies to official checkpoints"):
        memkit.from_pretrained(tmp_path, model=tiny_model("llama"), fidelity="official")


def test_save_base_model_loads_without_model_argument(tmp_path):
    mem = _trained("mplus")
    logits, generated = _outputs(mem)
    save_pretrained(mem, tmp_path, save_base_model=True)
    assert (tmp_path / BASE_MODEL_DIR / "config.json").is_file()
    with safe_open(str(tmp_path / BASE_MODEL_DIR / "model.safetensors"), framework="pt") as handle:
        base_names = set(handle.keys())
    assert base_names == set(tiny_model("llama").state_dict())  # the model as it was: no LoRA, no base_layer

    loaded = load_pretrained(tmp_path)
    got_logits, got_generated = _outputs(loaded)
    assert torch.equal(got_logits, logits)
    assert torch.equal(got_generated, generated)


def test_save_memory_false_loads_with_empty_memory_and_the_same_weights(tmp_path):
    mem = _trained("mplus")
    save_pretrained(mem, tmp_path, save_memory=False)
    assert not (tmp_path / MEMORY_FILE).exists()
    loaded = load_pretrained(tmp_path, model=tiny_model("llama", seed=0))
    assert loaded.memory_size == 0
    assert all(loaded.store.size(layer) == 0 for layer in range(2))
    mem.reset_memory()
    assert torch.equal(_outputs(loaded)[0], _outputs(mem)[0])


def test_saving_leaves_the_wrapped_model_unchanged(tmp_path):
    mem = _trained("mplus")
    logits, generated = _outputs(mem)
    state = {name: t.clone() for name, t in mem.state_dict().items()}
    pool = {name: t.clone() for name, t in mem.pool.state_dict().items()}
    store = {name: t.clone() for name, t in mem.store.state_dict().items()}
    flags = {name: p.requires_grad for name, p in mem.named_parameters()}
    lora_layers, active, labels = _lora_layers(mem.base_model), mem.adapters.active, dict(mem.source_labels)

    save_pretrained(mem, tmp_path, save_base_model=True)

    assert set(mem.state_dict()) == set(state)
    assert all(torch.equal(t, state[name]) for name, t in mem.state_dict().items())
    assert all(torch.equal(t, pool[name]) for name, t in mem.pool.state_dict().items())
    assert all(torch.equal(t, store[name]) for name, t in mem.store.state_dict().items())
    assert {name: p.requires_grad for name, p in mem.named_parameters()} == flags
    assert _lora_layers(mem.base_model) == lora_layers and mem.adapters.active == active
    assert mem.source_labels == labels and not mem.training
    got_logits, got_generated = _outputs(mem)
    assert torch.equal(got_logits, logits) and torch.equal(got_generated, generated)


def test_saving_again_replaces_the_checkpoint_and_leaves_no_temporary_files(tmp_path):
    mem = _trained("mplus")
    save_pretrained(mem, tmp_path, save_base_model=True)
    with torch.no_grad():
        mem.injector.new_memory_positional_emb.add_(1.0)
    save_pretrained(mem, tmp_path, save_base_model=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, MEMORY_FILE, BASE_MODEL_DIR]
    )
    loaded = load_pretrained(tmp_path)
    assert torch.equal(loaded.injector.new_memory_positional_emb, mem.injector.new_memory_positional_emb)


def test_a_save_that_fails_part_way_leaves_no_loadable_checkpoint(tmp_path, monkeypatch):
    mem = _trained("mplus")
    save_pretrained(mem, tmp_path)

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(mem, "save_memory", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(mem, tmp_path)
    assert not (tmp_path / CONFIG_FILE).exists()  # the old config went first; the new one was never written
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(memkit.CheckpointError, match="has no memkit_config.json"):
        load_pretrained(tmp_path, model=tiny_model("llama"))


def test_dtype_casts_the_model_and_converts_memkit_weights(tmp_path):
    mem = _trained("mplus")
    save_pretrained(mem, tmp_path, save_memory=False)
    loaded = load_pretrained(tmp_path, model=tiny_model("llama", seed=0), dtype="bfloat16")
    assert loaded.backbone.dtype == torch.bfloat16
    assert loaded.injector.bos_embedding.dtype == torch.bfloat16
    assert torch.equal(loaded.injector.bos_embedding, mem.injector.bos_embedding.to(torch.bfloat16))


# -- refusals ----------------------------------------------------------------------------------------------------


def test_loading_without_model_and_without_saved_base_model_raises_checkpoint_error(tmp_path):
    save_pretrained(_trained("mplus"), tmp_path)
    with pytest.raises(memkit.CheckpointError, match=r"not the base model.*as model="):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "difference"),
    [
        ({"num_hidden_layers": 3}, "num_layers: checkpoint has 2, model has 3"),
        ({"hidden_size": 48}, "hidden_size: checkpoint has 32, model has 48"),
    ],
)
def test_a_model_of_another_shape_is_refused_naming_the_difference(tmp_path, overrides, difference):
    save_pretrained(_trained("mplus"), tmp_path)
    other = tiny_model("llama", **overrides)
    with pytest.raises(memkit.CheckpointError, match=difference):
        load_pretrained(tmp_path, model=other)
    assert _lora_layers(other) == 0  # refused before anything was added to it


def test_a_model_of_another_family_is_refused_naming_the_model_type(tmp_path):
    save_pretrained(_trained("memoryllm"), tmp_path)
    with pytest.raises(memkit.CheckpointError, match="model_type: checkpoint has 'llama', model has 'qwen2'"):
        load_pretrained(tmp_path, model=tiny_model("qwen2"))


def test_a_weights_file_with_a_missing_tensor_is_refused_listing_it(tmp_path):
    save_pretrained(_trained("mplus"), tmp_path)
    gone = ["adapters.model.layers.1.mlp.down_proj.lora_B.read.weight", "retriever.key_proj.0.2.weight"]
    _rewrite_weights(tmp_path, lambda tensors: [tensors.pop(name) for name in gone])
    model = tiny_model("llama")
    with pytest.raises(memkit.CheckpointError, match="2 missing tensor") as info:
        load_pretrained(tmp_path, model=model)
    assert all(name in str(info.value) for name in gone)
    assert _lora_layers(model) == 0  # unwrapped again after the failure


def test_a_weights_file_with_an_extra_tensor_is_refused_listing_it(tmp_path):
    save_pretrained(_trained("memoryllm"), tmp_path)
    _rewrite_weights(tmp_path, lambda tensors: tensors.update({"injector.extra_table": torch.zeros(3)}))
    with pytest.raises(memkit.CheckpointError, match=r"1 unexpected tensor\(s\): injector\.extra_table"):
        load_pretrained(tmp_path, model=tiny_model("llama"))


def test_a_weights_file_with_a_tensor_of_the_wrong_shape_is_refused_listing_it(tmp_path):
    save_pretrained(_trained("memoryllm"), tmp_path)
    _rewrite_weights(tmp_path, lambda tensors: tensors.update({"injector.new_memory_positional_emb": torch.zeros(5)}))
    with pytest.raises(memkit.CheckpointError, match=r"injector\.new_memory_positional_emb \[5\] \(the model has"):
        load_pretrained(tmp_path, model=tiny_model("llama"))


def test_a_folder_without_memkit_config_is_refused(tmp_path):
    with pytest.raises(memkit.CheckpointError, match="has no memkit_config.json"):
        load_pretrained(tmp_path, model=tiny_model("llama"))
    with pytest.raises(memkit.CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere", model=tiny_model("llama"))


@pytest.mark.parametrize("version", [2, "1", None])
def test_an_unknown_format_version_is_refused(tmp_path, version):
    save_pretrained(_trained("memoryllm"), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["format_version"] = version
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(memkit.CheckpointError, match="format version .* this memkit .* reads version 1"):
        load_pretrained(tmp_path, model=tiny_model("llama"))


def test_a_config_that_is_not_json_is_refused(tmp_path):
    save_pretrained(_trained("memoryllm"), tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(memkit.CheckpointError, match="cannot read .*memkit_config.json"):
        load_pretrained(tmp_path, model=tiny_model("llama"))


@pytest.mark.parametrize("name", [WEIGHTS_FILE, MEMORY_FILE])
def test_a_truncated_safetensors_file_is_refused(tmp_path, name):
    save_pretrained(_trained("mplus"), tmp_path)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    model = tiny_model("llama")
    with pytest.raises(memkit.CheckpointError, match="truncated or corrupted"):
        load_pretrained(tmp_path, model=model)
    assert _lora_layers(model) == 0


def test_a_listed_file_that_is_missing_is_refused(tmp_path):
    save_pretrained(_trained("mplus"), tmp_path)
    (tmp_path / MEMORY_FILE).unlink()
    with pytest.raises(memkit.CheckpointError, match="lacks memory.safetensors, which memkit_config.json lists"):
        load_pretrained(tmp_path, model=tiny_model("llama"))


def test_memory_saved_in_another_dtype_is_refused_with_a_hint(tmp_path):
    save_pretrained(_trained("memoryllm"), tmp_path)
    with pytest.raises(memkit.CheckpointError, match="load with dtype='float32'"):
        load_pretrained(tmp_path, model=tiny_model("llama", seed=0), dtype=torch.bfloat16)


def test_saving_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(memkit.CheckpointError, match="it is a file"):
        save_pretrained(_wrap("memoryllm"), target)


# -- official checkpoints, saved in memkit's layout ------------------------------------------------------------

OFFICIAL = Path(__file__).parent / "fixtures" / "official-memoryllm-tiny" / "checkpoint"


def test_an_official_checkpoint_saved_with_its_base_model_loads_back_identically(tmp_path):
    mem = memkit.from_pretrained(OFFICIAL)
    with torch.no_grad():
        mem.inject(torch.arange(3, 40))
    logits, generated = _outputs(mem)
    save_pretrained(mem, tmp_path, save_base_model=True)

    loaded = memkit.from_pretrained(tmp_path)  # no config.json at the top: goes to load_pretrained
    assert loaded.adapters is not None and loaded.adapters.spec.names == mem.adapters.spec.names
    got_logits, got_generated = _outputs(loaded)
    assert torch.equal(got_logits, logits)
    assert torch.equal(got_generated, generated)


def test_a_model_loaded_with_official_fidelity_warns_that_its_quirks_are_not_saved(tmp_path):
    mem = memkit.from_pretrained(OFFICIAL, fidelity="official")
    save_pretrained(mem, tmp_path, save_base_model=True)
    with pytest.warns(UserWarning, match="_OfficialKVInjector"):
        loaded = load_pretrained(tmp_path)
    assert type(loaded.injector).__name__ == "KVInjector"


def test_a_pretrained_folder_and_its_files_get_the_umask_default_modes(tmp_path):
    mem = _trained("mplus")
    old = os.umask(0o022)
    try:
        save_pretrained(mem, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files)
