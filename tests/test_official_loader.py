"""memkit.from_pretrained reads MemoryLLM and M+ checkpoints in the official layout.

Two checkpoints: the real tiny MemoryLLM one made by the official code (tests/fixtures/official-memoryllm-tiny),
whose reference tensors the loaded model must reproduce, and a synthetic tiny M+ one written here with
random tensors in exactly the layout and config.json of /work/shared/reference/official-layout.md.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import memkit
from memkit.official import MPLUS_STORE_CAPACITY, inspect_checkpoint
from tests.helpers import check_official_scenario_a_from_a1, check_official_scenario_b, close

FIXTURE = Path(__file__).parent / "fixtures" / "official-memoryllm-tiny"
CHECKPOINT = FIXTURE / "checkpoint"


@pytest.fixture(scope="module")
def ref():
    return load_file(FIXTURE / "reference.safetensors")


@pytest.fixture
def initialised_checkpoint(tmp_path):
    """The fixture checkpoint with its ``initialized`` buffer set to 1 (as released checkpoints ship)."""
    folder = tmp_path / "memoryllm-initialised"
    shutil.copytree(CHECKPOINT, folder)
    weights = load_file(folder / "model.safetensors")
    weights["initialized"] = torch.ones((), dtype=torch.uint8)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# -- the real tiny MemoryLLM checkpoint ------------------------------------------------------------------------


def test_the_memoryllm_plan_follows_its_config():
    plan = inspect_checkpoint(CHECKPOINT)
    assert plan.kind == "memoryllm"
    assert plan.initialized is False
    assert plan.overrides["pool"] == {"capacity": 32, "write_size": 8, "per_layer": False, "init": "tile"}
    assert plan.overrides["adapters"]["names"] == ["default"]
    assert (plan.overrides["adapters"]["rank"], plan.overrides["adapters"]["alpha"]) == (4, 8.0)
    assert "store" not in plan.overrides and "retrieve" not in plan.overrides
    names = {line.split("\t")[0] for line in (FIXTURE / "tensor_names.txt").read_text().splitlines() if line}
    assert set(plan.loaded) | set(plan.ignored) == names  # every tensor is accounted for
    assert set(plan.ignored) == {"memory"}  # uninitialised: the stored memory is not used


@torch.no_grad()
def test_every_memoryllm_tensor_lands_where_it_should():
    mem = memkit.from_pretrained(CHECKPOINT)
    weights = load_file(CHECKPOINT / "model.safetensors")
    state = mem.base_model.state_dict()
    for name, tensor in weights.items():
        if name in ("memory", "initialized", "bos_embedding", "new_memory_positional_emb"):
            continue
        assert torch.equal(state[name], tensor), name
    assert torch.equal(mem.injector.bos_embedding, weights["bos_embedding"])
    assert torch.equal(mem.injector.new_memory_positional_emb, weights["new_memory_positional_emb"])
    assert mem.pool.size == 0  # initialized = 0
    assert mem.adapters is not None and mem.adapters.active == "default"
    assert not mem.base_model.training
    assert not any(t.is_meta for t in (*mem.base_model.parameters(), *mem.base_model.buffers()))


@torch.no_grad()
def test_uninitialised_memory_reads_as_the_plain_lora_model(ref):
    mem = memkit.from_pretrained(CHECKPOINT)
    assert close(mem(ref["input_prompt"]).logits, ref["A0_logits_prompt"])


@torch.no_grad()
def test_scenario_a_from_a1_on_matches_the_official_code(ref):
    mem = memkit.from_pretrained(CHECKPOINT)
    check_official_scenario_a_from_a1(mem, ref)
    with_bos = torch.cat([torch.tensor([[1]]), ref["input_prompt"]], dim=1)
    assert close(mem(with_bos).logits, ref["A2_logits_prompt_with_bos_id1"])


@torch.no_grad()
def test_scenario_b_an_initialised_checkpoint_reads_and_drops_from_its_stored_memory(ref, initialised_checkpoint):
    assert inspect_checkpoint(initialised_checkpoint).initialized is True
    mem = memkit.from_pretrained(initialised_checkpoint)
    assert torch.equal(mem.pool.read(), ref["A0_memory_checkpoint"])
    assert torch.equal(mem.sources(), torch.full((2, 32), -1))
    check_official_scenario_b(mem, ref)


@torch.no_grad()
def test_official_fidelity_reproduces_the_first_injection_quirk_and_all_of_scenario_a(ref):
    mem = memkit.from_pretrained(CHECKPOINT, fidelity="official")
    assert close(mem(ref["input_prompt"]).logits, ref["A0_logits_prompt"])
    mem.inject(ref["input_context1"])
    assert close(mem.pool.read(), ref["A1_memory"])  # memkit's own mode differs here by ~0.24
    assert close(mem(ref["input_prompt"]).logits, ref["A1_logits_prompt"])
    torch.manual_seed(7)
    mem.inject(ref["input_context2"])
    assert close(mem.pool.read(), ref["A2_memory"])
    assert close(mem(ref["input_prompt"]).logits, ref["A2_logits_prompt"])


@torch.no_grad()
def test_memkit_fidelity_writes_the_first_injection_without_the_quirk(ref):
    mem = memkit.from_pretrained(CHECKPOINT)
    mem.inject(ref["input_context1"])
    emb = mem.injector.new_memory_positional_emb
    quirk = mem.pool.read().clone()
    quirk[0] += emb[0]  # the official delta of every layer but the last has one more positional embedding
    assert close(quirk, ref["A1_memory"])


@torch.no_grad()
def test_a_dtype_can_be_chosen(ref):
    mem = memkit.from_pretrained(CHECKPOINT, dtype="bfloat16")
    assert mem.backbone.dtype == torch.bfloat16 and mem.pool.dtype == torch.bfloat16
    assert mem.injector.bos_embedding.dtype == torch.bfloat16
    logits = mem(ref["input_prompt"]).logits
    assert close(logits, ref["A0_logits_prompt"], atol=0.1)


def _with_config(tmp_path, **changes):
    folder = tmp_path / "changed"
    shutil.copytree(CHECKPOINT, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@torch.no_grad()
def test_memoryllm_8b_linear_rope_scaling_becomes_the_recipe_s(tmp_path, ref):
    folder = _with_config(tmp_path, rope_scaling={"type": "linear", "factor": 1.8125})
    mem = memkit.from_pretrained(folder, device="cpu")
    assert mem.recipe.rope_scaling == {"factor": 1.8125, "rope_type": "linear"}
    assert mem.backbone.position_scale == 1.8125
    assert mem.base_model.config.rope_parameters["rope_type"] == "default"  # the backbone is left as it was
    assert not close(mem(ref["input_prompt"]).logits, ref["A0_logits_prompt"], atol=1e-3)


def test_llama_3_1_rope_scaling_stays_in_the_backbone(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    mem = memkit.from_pretrained(_with_config(tmp_path, rope_scaling=scaling))
    assert mem.recipe.rope_scaling is None
    params = mem.base_model.config.rope_parameters
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0 and params["rope_theta"] == 10000.0


# -- a synthetic tiny M+ checkpoint in the official layout ----------------------------------------------------------

MPLUS_CONFIG = json.loads(
    """
{
  "add_bos_embedding": true,
  "add_decoder_lora": true,
  "add_encoder_retriever": true,
  "add_selector": true,
  "architectures": ["MPlus"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "decay_frequency": 1,
  "detach_hidden_state": true,
  "drop_memory_per_layer": true,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 64,
  "initial_rf_when_moving_stm_to_ltm": 10,
  "initializer_range": 0.02,
  "intermediate_size": 128,
  "lora_config": {
    "inference_mode": true,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "r": 4,
    "target_modules": ["q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj"]
  },
  "ltm_initial_size": 24,
  "max_position_embeddings": 2048,
  "mlp_bias": false,
  "model_type": "memoryllm",
  "num_attention_heads": 4,
  "num_blocks": 5,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "num_ltm_blocks": 1,
  "num_memory_tokens": 40,
  "num_selector_layers": 2,
  "num_tokens": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "selector_hidden_dim": 16,
  "tie_word_embeddings": false,
  "torch_dtype": "float32",
  "transformers_version": "4.48.2",
  "update_ltm_frequency": 2,
  "update_ltm_mode": "immediate",
  "use_cache": true,
  "vocab_size": 211
}
"""
)

# The layout's tensor list (layer 0 shown; every layer repeats the model.layers.0 and ltm*.0 entries).
MPLUS_LAYOUT = """
bos_embedding	[2, 1, 64]
lm_head.weight	[211, 64]
ltm.0	[24, 64]
ltm_ages.0	[24]
ltm_keys.0	[24, 16]
ltm_recall_frequencies.0	[24]
memory	[2, 32, 64]
model.embed_tokens.weight	[211, 64]
model.layers.0.input_layernorm.weight	[64]
model.layers.0.mlp.down_proj.base_layer.weight	[64, 128]
model.layers.0.mlp.down_proj.lora_A.decoder_adapter.weight	[4, 128]
model.layers.0.mlp.down_proj.lora_A.default.weight	[4, 128]
model.layers.0.mlp.down_proj.lora_B.decoder_adapter.weight	[64, 4]
model.layers.0.mlp.down_proj.lora_B.default.weight	[64, 4]
model.layers.0.mlp.gate_proj.base_layer.weight	[128, 64]
model.layers.0.mlp.gate_proj.lora_A.decoder_adapter.weight	[4, 64]
model.layers.0.mlp.gate_proj.lora_A.default.weight	[4, 64]
model.layers.0.mlp.gate_proj.lora_B.decoder_adapter.weight	[128, 4]
model.layers.0.mlp.gate_proj.lora_B.default.weight	[128, 4]
model.layers.0.mlp.up_proj.base_layer.weight	[128, 64]
model.layers.0.mlp.up_proj.lora_A.decoder_adapter.weight	[4, 64]
model.layers.0.mlp.up_proj.lora_A.default.weight	[4, 64]
model.layers.0.mlp.up_proj.lora_B.decoder_adapter.weight	[128, 4]
model.layers.0.mlp.up_proj.lora_B.default.weight	[128, 4]
model.layers.0.post_attention_layernorm.weight	[64]
model.layers.0.self_attn.encoder_query_proj.0.weight	[32, 64]
model.layers.0.self_attn.encoder_query_proj.2.weight	[16, 32]
model.layers.0.self_attn.k_proj.base_layer.weight	[32, 64]
model.layers.0.self_attn.k_proj.lora_A.decoder_adapter.weight	[4, 64]
model.layers.0.self_attn.k_proj.lora_A.default.weight	[4, 64]
model.layers.0.self_attn.k_proj.lora_B.decoder_adapter.weight	[32, 4]
model.layers.0.self_attn.k_proj.lora_B.default.weight	[32, 4]
model.layers.0.self_attn.key_proj.0.weight	[32, 64]
model.layers.0.self_attn.key_proj.2.weight	[16, 32]
model.layers.0.self_attn.o_proj.weight	[64, 64]
model.layers.0.self_attn.q_proj.base_layer.weight	[64, 64]
model.layers.0.self_attn.q_proj.lora_A.decoder_adapter.weight	[4, 64]
model.layers.0.self_attn.q_proj.lora_A.default.weight	[4, 64]
model.layers.0.self_attn.q_proj.lora_B.decoder_adapter.weight	[64, 4]
model.layers.0.self_attn.q_proj.lora_B.default.weight	[64, 4]
model.layers.0.self_attn.query_proj.0.weight	[32, 64]
model.layers.0.self_attn.query_proj.2.weight	[16, 32]
model.layers.0.self_attn.v_proj.base_layer.weight	[32, 64]
model.layers.0.self_attn.v_proj.lora_A.decoder_adapter.weight	[4, 64]
model.layers.0.self_attn.v_proj.lora_A.default.weight	[4, 64]
model.layers.0.self_attn.v_proj.lora_B.decoder_adapter.weight	[32, 4]
model.layers.0.self_attn.v_proj.lora_B.default.weight	[32, 4]
model.norm.weight	[64]
new_memory_positional_emb	[1, 1, 64]
"""


def mplus_shapes() -> dict[str, list[int]]:
    """Every tensor name of the tiny M+ checkpoint (both layers) and its shape."""
    shapes = {}
    for line in MPLUS_LAYOUT.strip().splitlines():
        name, shape = line.split("\t")
        dims = json.loads(shape)
        if name.startswith("model.layers.0.") or (name.endswith(".0") and name.startswith("ltm")):
            for layer in range(MPLUS_CONFIG["num_hidden_layers"]):
                if name.startswith("model.layers.0."):
                    shapes[name.replace("model.layers.0.", f"model.layers.{layer}.")] = dims
                else:
                    shapes[f"{name[:-2]}.{layer}"] = dims
        else:
            shapes[name] = dims
    return shapes


def mplus_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every name, with values where meaning requires them (norms near 1, integer ages)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in mplus_shapes().items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.startswith("ltm_ages."):
            t = (8 * torch.randint(1, 6, shape, generator=g)).float()  # multiples of K: many ties, as in M+
        elif name.startswith("ltm_recall_frequencies."):
            t = torch.randint(1, 11, shape, generator=g).float()
        elif name.startswith("ltm_keys.") or "query_proj" in name or "key_proj" in name:
            t = 0.5 * torch.randn(shape, generator=g)
        elif "lora_B" in name:
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        out[name] = t.float().contiguous()
    return out


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def mplus_tiny(tmp_path):
    tensors = mplus_tensors()
    return write_checkpoint(tmp_path / "mplus-tiny", tensors, MPLUS_CONFIG), tensors


def test_the_synthetic_checkpoint_has_the_official_tensor_list():
    shapes = mplus_shapes()
    assert len(shapes) == 6 + 2 * (4 + 39)  # 6 global tensors, then per layer 4 ltm* and 39 model.layers.{l}.*
    assert shapes["model.layers.1.self_attn.query_proj.2.weight"] == [16, 32]
    assert shapes["ltm_keys.1"] == [24, 16]


def test_the_mplus_recipe_numbers_follow_the_config(mplus_tiny):
    folder, _ = mplus_tiny
    mem = memkit.from_pretrained(folder)
    assert mem.recipe.name == "mplus"
    assert (mem.pool.capacity, mem.pool.write_size) == ((5 - 1) * 8, 8)
    assert mem.pool.config.per_layer is True and mem.pool.config.age_short_term is True
    assert mem.recipe.retrieve == 1 * 8
    assert mem.store is not None and mem.retriever is not None
    assert (mem.store.capacity, mem.store.merge_every) == (MPLUS_STORE_CAPACITY, 2)
    assert mem.retriever.key_size == 16
    spec = mem.adapters.spec
    assert (spec.rank, spec.alpha, spec.dropout, spec.names) == (4, 8, 0.0, ["default", "decoder_adapter"])
    assert set(spec.targets) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert (spec.write, spec.read) == ("default", "decoder_adapter")
    assert mem.recipe.rope_scaling is None


@torch.no_grad()
def test_every_mplus_tensor_lands_where_it_should(mplus_tiny):
    folder, tensors = mplus_tiny
    plan = inspect_checkpoint(folder)
    assert plan.kind == "mplus" and plan.initialized is None
    assert set(plan.loaded) | set(plan.ignored) == set(tensors)
    assert set(plan.ignored) == {
        *(f"ltm_recall_frequencies.{i}" for i in range(2)),
        *(f"model.layers.{i}.self_attn.encoder_query_proj.{j}.weight" for i in range(2) for j in (0, 2)),
    }

    mem = memkit.from_pretrained(folder)
    state = mem.base_model.state_dict()
    selector = (".query_proj.", ".key_proj.", ".encoder_query_proj.")
    model_names = [n for n in tensors if n.startswith(("model.", "lm_head.")) and not any(s in n for s in selector)]
    assert len(model_names) == 3 + 2 * 33  # embeddings, norm, head; per layer 2 norms, o_proj, 6 x (base + 4 LoRA)
    for name in model_names:
        assert torch.equal(state[name], tensors[name]), name
    assert torch.equal(mem.injector.bos_embedding, tensors["bos_embedding"])
    assert torch.equal(mem.injector.new_memory_positional_emb, tensors["new_memory_positional_emb"])
    assert torch.equal(mem.pool.read(), tensors["memory"])
    assert torch.equal(mem.pool.ages(), torch.arange(31, -1, -1).expand(2, 32))  # slot order, newest last
    assert torch.equal(mem.pool.sources(), torch.full((2, 32), -1))
    for layer in range(2):
        entries = mem.store.entries(layer)
        assert torch.equal(entries.vectors, tensors[f"ltm.{layer}"])
        assert torch.equal(entries.keys, tensors[f"ltm_keys.{layer}"])
        assert torch.equal(entries.ages, tensors[f"ltm_ages.{layer}"].long())
        assert torch.equal(entries.sources, torch.full((24,), -1))
        assert mem.store.staged(layer) == 0
        for proj in ("query_proj", "key_proj"):
            for i in (0, 2):
                loaded = getattr(mem.retriever, proj)[layer][i].weight
                assert torch.equal(loaded, tensors[f"model.layers.{layer}.self_attn.{proj}.{i}.weight"])


@torch.no_grad()
def test_a_sharded_checkpoint_loads_the_same(tmp_path):
    tensors = mplus_tensors()
    one = memkit.from_pretrained(write_checkpoint(tmp_path / "one", tensors, MPLUS_CONFIG))
    three = memkit.from_pretrained(write_checkpoint(tmp_path / "three", tensors, MPLUS_CONFIG, shards=3))
    assert (tmp_path / "three" / "model.safetensors.index.json").is_file()
    prompt = torch.arange(50, 60).unsqueeze(0)
    assert torch.equal(one(prompt).logits, three(prompt).logits)
    assert torch.equal(one.store.entries(1).keys, three.store.entries(1).keys)


@torch.no_grad()
def test_the_loaded_mplus_reads_injects_merges_and_generates(mplus_tiny):
    folder, _ = mplus_tiny
    mem = memkit.from_pretrained(folder)
    prompt = torch.arange(50, 62).unsqueeze(0)
    logits = mem(prompt).logits
    assert logits.shape == (1, 12, 211) and torch.isfinite(logits).all()
    torch.manual_seed(0)
    mem.inject(torch.arange(10, 34))  # one chunk of 24 tokens: K=8 rows per layer drop into the staging buffer
    assert [mem.store.staged(i) for i in range(2)] == [8, 8]
    mem.inject(torch.arange(100, 124))  # the second update merges both updates' rows (update_ltm_frequency = 2)
    assert [(mem.store.size(i), mem.store.staged(i)) for i in range(2)] == [(40, 0), (40, 0)]
    mem.inject(torch.arange(130, 154))
    assert [(mem.store.size(i), mem.store.staged(i)) for i in range(2)] == [(48, 8), (48, 8)]
    out = mem.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 15) and torch.equal(out[:, :12], prompt)


def _read_and_write(mem):
    """(prompt logits read from the loaded memory, the K new memory rows one injection writes)."""
    prompt = torch.arange(50, 62).unsqueeze(0)
    logits = mem(prompt).logits
    torch.manual_seed(3)
    mem.inject(torch.arange(10, 34))
    return logits, mem.pool.read()[:, -8:].clone()


def _perturb(mem, adapter):
    for name, param in mem.base_model.named_parameters():
        if f".lora_B.{adapter}." in name:
            param.add_(0.5)


@torch.no_grad()
def test_the_decoder_adapter_reads_and_the_default_adapter_injects(mplus_tiny):
    folder, _ = mplus_tiny
    read0, write0 = _read_and_write(memkit.from_pretrained(folder))

    mem = memkit.from_pretrained(folder)
    _perturb(mem, "decoder_adapter")
    read1, write1 = _read_and_write(mem)
    assert not close(read1, read0, atol=1e-3)  # reads go through decoder_adapter
    assert torch.equal(write1, write0)  # injections do not

    mem = memkit.from_pretrained(folder)
    _perturb(mem, "default")
    read2, write2 = _read_and_write(mem)
    assert torch.equal(read2, read0)  # reads do not go through default
    assert not close(write2, write0, atol=1e-3)  # injections do


@torch.no_grad()
def test_official_fidelity_keeps_short_term_ages_at_zero_and_never_advances_them(mplus_tiny):
    folder, tensors = mplus_tiny
    mem = memkit.from_pretrained(folder, fidelity="official")
    assert mem.pool.config.age_short_term is False
    assert torch.equal(mem.pool.ages(), torch.zeros(2, 32, dtype=torch.long))
    torch.manual_seed(0)
    mem.inject(torch.arange(10, 34))
    new = torch.arange(7, -1, -1)
    assert torch.equal(mem.pool.ages(), torch.cat([torch.zeros(24, dtype=torch.long), new]).expand(2, 32))
    for layer in range(2):
        ages = mem.store.ages(layer)
        assert torch.equal(ages[:24], tensors[f"ltm_ages.{layer}"].long() + 8)  # long-term ages advance by K
        assert torch.equal(ages[24:], torch.zeros(8, dtype=torch.long))  # dropped rows keep their STM age 0
    mem.inject(torch.arange(100, 124))
    assert torch.equal(mem.pool.ages()[:, -8:], new.expand(2, 8))
    assert int(mem.pool.ages()[:, :24].max()) <= 7  # never advanced

    ours = memkit.from_pretrained(folder)
    torch.manual_seed(0)
    ours.inject(torch.arange(10, 34))
    assert torch.equal(ours.pool.ages()[:, -8:], new.expand(2, 8))
    assert int(ours.store.ages(0)[24:].min()) >= 8  # memkit ages the pool: dropped rows are at least K old


@torch.no_grad()
def test_official_fidelity_puts_the_later_candidate_first_among_equal_ages(mplus_tiny):
    folder, _ = mplus_tiny
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for fidelity in ("memkit", "official"):
        mem = memkit.from_pretrained(folder, fidelity=fidelity)
        for layer in range(2):
            ids = mem.retriever.select(layer, hidden, mem.store, 8)
            ages = mem.store.ages(layer, ids)
            assert bool((ages[:-1] >= ages[1:]).all())  # oldest first in both modes
            ties = [i for i in range(7) if ages[i] == ages[i + 1]]
            assert ties  # the checkpoint's ages are multiples of K, so the top 8 share some
            if fidelity == "official":
                assert all(ids[i] > ids[i + 1] for i in ties)
            else:
                queries = mem.retriever.queries(layer, hidden).float()
                keys = mem.store.keys(layer, ids).float()
                scores = torch.sigmoid(queries @ keys.T).mean(0)
                assert all(scores[i] >= scores[i + 1] for i in ties)  # memkit keeps the score order


# -- refusals ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_missing_tensors_is_refused_with_their_names(tmp_path):
    tensors = mplus_tensors()
    gone = ["ltm_keys.1", "model.layers.0.self_attn.q_proj.lora_B.decoder_adapter.weight", "bos_embedding"]
    for name in gone:
        del tensors[name]
    folder = write_checkpoint(tmp_path / "missing", tensors, MPLUS_CONFIG)
    with pytest.raises(memkit.CheckpointError, match="3 missing tensor") as info:
        memkit.from_pretrained(folder)
    assert all(name in str(info.value) for name in gone)
    assert "unknown" not in str(info.value)


def test_a_checkpoint_with_unknown_tensors_is_refused_with_their_names(tmp_path):
    tensors = mplus_tensors()
    extra = {"model.layers.0.self_attn.value_proj.weight": torch.zeros(4, 4), "stm_ages": torch.zeros(2, 32)}
    folder = write_checkpoint(tmp_path / "unknown", {**tensors, **extra}, MPLUS_CONFIG)
    with pytest.raises(memkit.CheckpointError, match="2 unknown tensor") as info:
        memkit.from_pretrained(folder)
    assert all(name in str(info.value) for name in extra)


def test_missing_unknown_and_misshapen_tensors_are_all_listed_at_once(tmp_path):
    shutil.copytree(CHECKPOINT, tmp_path / "bad")
    weights = load_file(tmp_path / "bad" / "model.safetensors")
    del weights["new_memory_positional_emb"], weights["model.layers.1.mlp.up_proj.lora_A.default.weight"]
    weights["ltm_extra"] = torch.zeros(3)
    weights["memory"] = torch.zeros(2, 16, 64)
    save_file(weights, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(memkit.CheckpointError) as info:
        inspect_checkpoint(tmp_path / "bad")
    message = str(info.value)
    for name in ("new_memory_positional_emb", "model.layers.1.mlp.up_proj.lora_A.default.weight", "ltm_extra"):
        assert name in message
    assert "memory [2, 16, 64] (expected [2, 32, 64])" in message


def test_a_config_without_memory_settings_is_refused(tmp_path):
    config = copy.deepcopy(MPLUS_CONFIG)
    del config["num_tokens"], config["selector_hidden_dim"]
    folder = write_checkpoint(tmp_path / "noconf", mplus_tensors(), config)
    with pytest.raises(memkit.CheckpointError, match="num_tokens, .*selector_hidden_dim"):
        memkit.from_pretrained(folder)


def test_a_hub_id_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(memkit.MemkitError, match="not a local folder") as info:
        memkit.from_pretrained("YuWangX/mplus-8b")
    assert isinstance(info.value, memkit.CheckpointError) and isinstance(info.value, ValueError)
    assert "downloads nothing" in str(info.value)
    assert "huggingface-cli download YuWangX/mplus-8b" in str(info.value)


def test_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(memkit.CheckpointError, match="does not exist"):
        memkit.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(memkit.CheckpointError, match="no config.json"):
        memkit.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(MPLUS_CONFIG))
    with pytest.raises(memkit.CheckpointError, match="neither model.safetensors"):
        memkit.from_pretrained(tmp_path)


def test_bad_arguments_are_refused():
    with pytest.raises(memkit.InputError, match="fidelity"):
        memkit.from_pretrained(CHECKPOINT, fidelity="paper")
    with pytest.raises(memkit.InputError, match="dtype"):
        memkit.from_pretrained(CHECKPOINT, dtype="int8")
