"""Recipes: listing, loading by name or file, overrides, validation against the model."""

from __future__ import annotations

import pytest
import torch

import memkit
from memkit.recipe import load_recipe
from memkit.testing import tiny_model


def test_list_recipes_names_the_built_in_recipes():
    assert {"memoryllm", "training-free"} <= set(memkit.list_recipes())


def test_an_unknown_recipe_name_lists_the_known_ones():
    with pytest.raises(memkit.UnknownComponentError, match="memoryllm.*training-free"):
        memkit.wrap(tiny_model("llama"), "mplux")


def test_built_in_recipes_carry_the_memoryllm_8b_numbers():
    recipe = load_recipe("memoryllm")
    assert recipe.chunk_size == 512
    assert recipe.pool.options["capacity"] == 12800 and recipe.pool.options["write_size"] == 256
    assert recipe.pool.options["eviction"] == "random"
    assert recipe.injector.options["capture"] == "output"
    free = load_recipe("training-free")
    assert free.injector.options["capture"] == "input"
    assert free.pool.options["eviction"] == "fifo"


def test_overrides_merge_into_part_sections():
    mem = memkit.wrap(tiny_model("llama"), "memoryllm", chunk_size=16, pool={"capacity": 40, "write_size": 4})
    assert (mem.pool.capacity, mem.pool.write_size, mem.recipe.chunk_size) == (40, 4, 16)
    assert mem.pool.config.eviction == "random"  # kept from the recipe file


def test_an_unknown_override_names_the_valid_fields():
    with pytest.raises(memkit.RecipeError, match="unknown recipe override 'capacity'.*chunk_size"):
        memkit.wrap(tiny_model("llama"), "memoryllm", capacity=40)


@pytest.mark.parametrize(
    "overrides",
    [
        {"chunk_size": True},
        {"chunk_size": "16"},
        {"chunk_size": 16.0},
        {"pool": {"capacity": 24.0}},
        {"store": {"merge_every": "3"}},
        {"adapters": {"rank": False}},
    ],
)
def test_config_values_of_the_wrong_type_are_refused_not_coerced(overrides):
    """Strict configs: a bool, a string or a float is not taken for an int (True would have become 1)."""
    with pytest.raises(memkit.RecipeError, match="Input should be a valid integer"):
        memkit.wrap(tiny_model("llama"), "mplus", **overrides)


def test_an_int_is_accepted_where_a_float_is_wanted():
    from memkit.builtin.hnsw_store import HnswStore

    assert HnswStore.Config(capacity=10, merge_every=2, overfetch=3).overfetch == 3.0


def test_an_unknown_part_option_lists_that_parts_options():
    with pytest.raises(memkit.RecipeError, match=r"\[pool\] 'random_drop'.*capacityy.*Valid options: capacity"):
        memkit.wrap(tiny_model("llama"), "memoryllm", pool={"capacityy": 3})


def test_an_unknown_part_name_lists_the_registered_parts():
    with pytest.raises(memkit.UnknownComponentError, match="unknown pool 'lru'.*random_drop"):
        memkit.wrap(tiny_model("llama"), "memoryllm", pool={"name": "lru"})


def test_a_pool_larger_than_the_model_window_is_refused_at_wrap_time():
    model = tiny_model("llama")  # max_position_embeddings = 512
    with pytest.raises(memkit.RecipeError, match="window of 512"):
        memkit.wrap(model, "memoryllm")  # 12,800 memory vectors


def test_write_size_larger_than_capacity_is_refused():
    with pytest.raises(memkit.RecipeError, match="K must be <= N"):
        memkit.wrap(tiny_model("llama"), "memoryllm", pool={"capacity": 8, "write_size": 16})


def test_capturing_inputs_with_chunks_longer_than_k_is_refused():
    with pytest.raises(memkit.RecipeError, match="chunk_size <= pool.write_size"):
        memkit.wrap(
            tiny_model("llama"), "training-free", chunk_size=256, retrieve=0, pool={"capacity": 64, "write_size": 8}
        )


def test_a_recipe_file_and_a_recipe_object_work_like_a_name(tmp_path):
    recipe = load_recipe("memoryllm").with_overrides(
        {"name": "mine", "chunk_size": 16, "pool": {"capacity": 24, "write_size": 8}}
    )
    path = tmp_path / "mine.toml"
    path.write_text(recipe.to_toml())
    assert load_recipe(path) == recipe
    for source in (recipe, path, str(path)):
        mem = memkit.wrap(tiny_model("llama"), source)
        mem.inject(torch.arange(3, 30))
        assert mem.recipe.name == "mine" and mem.memory_size == 24


def test_bad_recipe_files_say_what_is_wrong(tmp_path):
    with pytest.raises(memkit.RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nchunk_size = [\n")
    with pytest.raises(memkit.RecipeError, match="not valid TOML"):
        load_recipe(bad)
    incomplete = tmp_path / "incomplete.toml"
    incomplete.write_text("name = 'x'\nchunk_size = 0\n")
    with pytest.raises(memkit.RecipeError, match="chunk_size.*greater than 0"):
        load_recipe(incomplete)
    with pytest.raises(memkit.RecipeError, match="pool: Field required"):
        load_recipe(incomplete)


def test_a_model_without_a_bos_token_needs_an_explicit_one_for_the_learned_bos():
    model = tiny_model("llama", bos_token_id=None)
    with pytest.raises(memkit.IncompatibleModelError, match="bos_token_id"):
        memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 24, "write_size": 8})
    mem = memkit.wrap(
        model,
        "memoryllm",
        chunk_size=16,
        pool={"capacity": 24, "write_size": 8},
        injector={"bos_token_id": 1},
    )
    assert mem.injector.bos_embedding.shape == (2, 1, 32)


def test_rope_scaling_of_the_recipe_equals_a_model_configured_with_it():
    scaling = {"rope_type": "linear", "factor": 2.0}
    plain = tiny_model("llama")
    scaled = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    scaled.load_state_dict(plain.state_dict())
    options = {"chunk_size": 16, "pool": {"capacity": 24, "write_size": 8, "seed": 0}}
    ours = memkit.wrap(plain, "memoryllm", rope_scaling=scaling, **options)
    reference = memkit.wrap(scaled, "memoryllm", **options)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for mem in (ours, reference):
            mem.inject(torch.arange(3, 40))
        assert torch.allclose(ours.pool.read(), reference.pool.read(), atol=1e-6)
        assert torch.allclose(ours(ids).logits, reference(ids).logits, atol=1e-5)
        assert not torch.allclose(ours(ids).logits, plain(ids).logits, atol=1e-3)
    # the model's own rotary module is back in place, unchanged, between calls
    assert plain.config.rope_parameters["rope_type"] == "default"
    assert ours.backbone.decoder.rotary_emb is plain.model.rotary_emb


def test_rope_scaling_stretches_the_window_the_recipe_is_checked_against():
    model = tiny_model("llama")  # a window of 512
    with pytest.raises(memkit.RecipeError, match="window of 512"):
        memkit.wrap(model, "memoryllm", chunk_size=16, pool={"capacity": 600, "write_size": 8})
    mem = memkit.wrap(
        model,
        "memoryllm",
        chunk_size=16,
        pool={"capacity": 600, "write_size": 8},
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    assert mem.pool.capacity == 600
