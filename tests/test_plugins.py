"""The plugin system: built-ins, run-time plugins, malformed and clashing registrations, entry points.

Every test that changes the plugin manager starts and ends with :func:`memkit.plugins.reset` (through
the ``fresh_registry`` fixture of :mod:`memkit.testing.plugin`, or explicitly).
"""

from __future__ import annotations

import inspect
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, Field

import memkit
from memkit import hookspecs, plugins
from memkit.backbone import Backbone
from memkit.builtin.injector import KVInjector
from memkit.builtin.pool import RandomDropPool
from memkit.cache import LayerKV
from memkit.config import MemkitConfig
from memkit.interfaces import Injector, LongTermStore, MemoryPool, MemoryPrefix, Retriever, StoreEntries
from memkit.recipe import PartSpec, Recipe
from memkit.registry import Registry
from memkit.testing import tiny_model

PARTS = ("pool", "store", "retriever", "injector")


# ---------------------------------------------------------------------------------------------------
# minimal valid parts (every abstract method implemented, trivially)
# ---------------------------------------------------------------------------------------------------


class _PoolBody(MemoryPool):
    """A concrete pool without ``name`` or ``Config``: the base of the valid and malformed pools."""

    @property
    def capacity(self) -> int:
        return 4

    @property
    def write_size(self) -> int:
        return 1

    @property
    def size(self) -> int:
        return 0

    @property
    def version(self) -> int:
        return 0

    def read(self) -> torch.Tensor:
        return torch.zeros(self.num_layers, 0, self.hidden_size)

    def ages(self) -> torch.Tensor:
        return torch.zeros(self.num_layers, 0, dtype=torch.long)

    def sources(self) -> torch.Tensor:
        return torch.zeros(self.num_layers, 0, dtype=torch.long)

    def write(self, vectors: torch.Tensor, source: int) -> memkit.Evicted:
        return memkit.Evicted(vectors[:, :0], self.ages(), self.sources())

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class ListPool(_PoolBody):
    name = "test-list-pool"

    class Config(MemkitConfig):
        capacity: int = Field(4, description="vectors held per layer", gt=0)


class NullStore(LongTermStore):
    name = "test-null-store"

    class Config(MemkitConfig):
        capacity: int = Field(8, description="entries held per layer", gt=0)

    def add(self, layer: int, entries: StoreEntries) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    @property
    def capacity(self) -> int:
        return self.config.capacity

    def size(self, layer: int) -> int:
        return 0

    def staged(self, layer: int) -> int:
        return 0

    def evicted(self, layer: int) -> int:
        return 0

    def entries(self, layer: int) -> StoreEntries:
        empty = torch.zeros(0, dtype=torch.long)
        return StoreEntries(torch.zeros(0, self.hidden_size), torch.zeros(0, self.key_size), empty, empty)

    def candidates(self, layer: int, queries: torch.Tensor, k: int) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)

    def get(self, layer: int, ids: torch.Tensor) -> StoreEntries:
        return self.entries(layer)

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class NewestRetriever(Retriever):
    name = "test-newest"

    class Config(MemkitConfig):
        key_size: int = Field(8, description="width of the stored keys", gt=0)

    @property
    def key_size(self) -> int:
        return self.config.key_size

    def keys(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.new_zeros(vectors.shape[0], self.key_size)

    def select(self, layer: int, hidden: torch.Tensor, store: LongTermStore, k: int) -> torch.Tensor:
        n = store.size(layer)
        return torch.arange(max(n - k, 0), n)


class NullInjector(Injector):
    name = "test-null-injector"

    class Config(MemkitConfig):
        pass

    def prefix(self, memory: torch.Tensor, gap: int = 0) -> MemoryPrefix:
        return MemoryPrefix(layer_kv=[], length=0)

    def layer_kv(self, layer: int, vectors: torch.Tensor, position_ids: torch.Tensor) -> LayerKV:
        empty = vectors.new_zeros(1, 1, 0, 1)
        return empty, empty

    def capture(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return memory.new_zeros(memory.shape[0], self.write_size, memory.shape[2])


def a_recipe(name: str = "test-recipe") -> Recipe:
    return Recipe(
        name=name,
        chunk_size=8,
        pool=PartSpec(name="random_drop", capacity=4, write_size=2),
        injector=PartSpec(name="kv"),
    )


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


class _Plugin:
    """A plugin object; compared by identity (pluggy refuses to register an equal object twice)."""


def make_plugin(**hooks: Callable[..., None]) -> _Plugin:
    """A plugin object whose attributes are the given functions, marked as memkit hook implementations."""
    plugin = _Plugin()
    for name, fn in hooks.items():
        setattr(plugin, name, memkit.hookimpl(fn))
    return plugin


@contextmanager
def plugged(plugin: Any, name: str) -> Iterator[Registry]:
    """Register ``plugin`` as ``name`` for the duration of the block; yields the rebuilt registry."""
    plugins.register_plugin(plugin, name=name)
    try:
        yield plugins.get_registry()
    finally:
        plugins.unregister_plugin(name)


def contents(registry: Registry) -> dict[str, dict[str, tuple[object, str]]]:
    """Everything a registry holds: per kind, name -> (class or recipe source, registrant)."""
    out = {
        kind: {n: (registry.get(kind, n), registry.registrant(kind, n)) for n in registry.names(kind)} for kind in PARTS
    }
    out["recipe"] = {n: (registry.recipe_source(n), registry.registrant("recipe", n)) for n in registry.names("recipe")}
    return out


def is_registered(name: str) -> bool:
    return plugins.get_plugin_manager().has_plugin(name)


# ---------------------------------------------------------------------------------------------------
# built-ins
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "registrant", "value"),
    [
        ("pool", "random_drop", "memkit.builtin.pool", RandomDropPool),
        ("injector", "kv", "memkit.builtin.injector", KVInjector),
        ("recipe", "memoryllm", "memkit.builtin.recipes", "memoryllm.toml"),
        ("recipe", "training-free", "memkit.builtin.recipes", "training-free.toml"),
    ],
)
def test_builtin_is_registered_and_attributed_to_its_default_plugin_module(
    fresh_registry: Registry, kind: str, name: str, registrant: str, value: object
) -> None:
    assert registrant in plugins.DEFAULT_PLUGINS
    assert name in fresh_registry.names(kind)
    assert fresh_registry.registrant(kind, name) == registrant
    if kind == "recipe":
        source = fresh_registry.recipe_source(name)
        assert isinstance(source, Path) and source.name == value and source.is_file()
        assert name in memkit.list_recipes()
    else:
        assert fresh_registry.get(kind, name) is value


def test_with_autoload_disabled_every_registration_comes_from_a_default_plugin(
    monkeypatch: pytest.MonkeyPatch, fresh_registry: Registry
) -> None:
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins.reset()
    registry = plugins.get_registry()
    registrants = {registrant for table in contents(registry).values() for _, registrant in table.values()}
    assert registrants == set(plugins.DEFAULT_PLUGINS)
    assert {"attention", "projector"} <= set(registry.names("retriever"))


# ---------------------------------------------------------------------------------------------------
# run-time plugins
# ---------------------------------------------------------------------------------------------------


def test_runtime_plugin_adds_parts_and_recipe_until_it_is_unregistered(fresh_registry: Registry) -> None:
    recipe = a_recipe()

    def register_pools(registry: Registry) -> None:
        registry.add_pool(ListPool)

    def register_injectors(registry: Registry) -> None:
        registry.add_injector(NullInjector)

    def register_recipes(registry: Registry) -> None:
        registry.add_recipe("test-recipe", recipe)

    plugin = make_plugin(
        register_pools=register_pools, register_injectors=register_injectors, register_recipes=register_recipes
    )
    before = contents(plugins.get_registry())
    with plugged(plugin, "test-runtime-plugin") as registry:
        assert registry is plugins.get_registry()
        assert registry.get("pool", "test-list-pool") is ListPool
        assert registry.get("injector", "test-null-injector") is NullInjector
        assert registry.recipe_source("test-recipe") is recipe
        assert "test-recipe" in memkit.list_recipes()
        for kind, name in [("pool", "test-list-pool"), ("injector", "test-null-injector"), ("recipe", "test-recipe")]:
            assert registry.registrant(kind, name) == "test-runtime-plugin"
        assert registry.get("pool", "random_drop") is RandomDropPool  # built-ins stay
    registry = plugins.get_registry()
    assert not is_registered("test-runtime-plugin")
    assert contents(registry) == before
    with pytest.raises(memkit.UnknownComponentError):
        registry.get("pool", "test-list-pool")
    with pytest.raises(memkit.UnknownComponentError):
        registry.recipe_source("test-recipe")


def test_runtime_plugin_can_be_a_module(fresh_registry: Registry) -> None:
    module = types.ModuleType("memkit_test_module_plugin")

    def register_stores(registry: Registry) -> None:
        registry.add_store(NullStore)

    module.register_stores = memkit.hookimpl(register_stores)  # type: ignore[attr-defined]
    with plugged(module, "memkit_test_module_plugin") as registry:
        assert registry.get("store", "test-null-store") is NullStore
        assert registry.registrant("store", "test-null-store") == "memkit_test_module_plugin"
    assert "test-null-store" not in plugins.get_registry().names("store")


class _ClashingPool(RandomDropPool):
    name = "random_drop"


class _ClashingInjector(KVInjector):
    name = "kv"


@pytest.mark.parametrize(
    ("hook", "register", "kind", "name", "owner"),
    [
        ("register_pools", lambda r: r.add_pool(_ClashingPool), "pool", "random_drop", "memkit.builtin.pool"),
        (
            "register_injectors",
            lambda r: r.add_injector(_ClashingInjector),
            "injector",
            "kv",
            "memkit.builtin.injector",
        ),
        (
            "register_recipes",
            lambda r: r.add_recipe("memoryllm", a_recipe("memoryllm")),
            "recipe",
            "memoryllm",
            "memkit.builtin.recipes",
        ),
    ],
)
def test_duplicate_name_names_both_registrants_and_leaves_the_registry_as_it_was(
    fresh_registry: Registry, hook: str, register: Callable[[Registry], None], kind: str, name: str, owner: str
) -> None:
    before = contents(plugins.get_registry())
    plugin = make_plugin(**{hook: lambda registry: register(registry)})
    try:
        with pytest.raises(memkit.RegistrationError) as info:
            plugins.register_plugin(plugin, name="clashing-plugin")
        message = str(info.value)
        assert owner in message and "clashing-plugin" in message
        assert repr(name) in message and "twice" in message
        assert not is_registered("clashing-plugin")
        assert contents(plugins.get_registry()) == before
        assert plugins.get_registry().registrant(kind, name) == owner
        # The name is free again: the failed plugin left nothing behind in the plugin manager.
        with plugged(make_plugin(), "clashing-plugin"):
            assert is_registered("clashing-plugin")
    finally:
        plugins.unregister_plugin("clashing-plugin")


def test_duplicate_between_two_runtime_plugins_names_both_and_keeps_the_first(fresh_registry: Registry) -> None:
    def register_pools(registry: Registry) -> None:
        registry.add_pool(ListPool)

    with plugged(make_plugin(register_pools=register_pools), "first-plugin"):
        before = contents(plugins.get_registry())
        with pytest.raises(memkit.RegistrationError) as info:
            plugins.register_plugin(make_plugin(register_pools=register_pools), name="second-plugin")
        assert "first-plugin" in str(info.value) and "second-plugin" in str(info.value)
        assert f"{ListPool.__module__}.{ListPool.__qualname__}" in str(info.value)
        assert not is_registered("second-plugin")
        registry = plugins.get_registry()
        assert contents(registry) == before
        assert registry.registrant("pool", "test-list-pool") == "first-plugin"


# ---------------------------------------------------------------------------------------------------
# malformed registrations
# ---------------------------------------------------------------------------------------------------


class NotAPool:
    name = "test-not-a-pool"

    class Config(MemkitConfig):
        pass


class NamelessPool(_PoolBody):
    class Config(MemkitConfig):
        pass


class NonStringNamePool(_PoolBody):
    name = 5  # type: ignore[assignment]

    class Config(MemkitConfig):
        pass


def _named_pool(name: str) -> type[MemoryPool]:
    return type("NamedPool", (_PoolBody,), {"name": name, "Config": ListPool.Config})


class ConfiglessPool(_PoolBody):
    name = "test-configless"


class PydanticConfigPool(_PoolBody):
    name = "test-pydantic-config"

    class Config(BaseModel):  # a pydantic model, but not a MemkitConfig
        pass


class AbstractPool(MemoryPool):
    name = "test-abstract-pool"

    class Config(MemkitConfig):
        pass

    def reset(self) -> None:
        pass


class AbstractRetriever(Retriever):
    name = "test-abstract-retriever"

    class Config(MemkitConfig):
        pass


MALFORMED: list[tuple[str, str, Callable[[Registry], None], str]] = [
    ("pool-not-a-subclass", "register_pools", lambda r: r.add_pool(NotAPool), "not a subclass of memkit.MemoryPool"),
    (
        "pool-as-retriever",
        "register_retrievers",
        lambda r: r.add_retriever(ListPool),
        "not a subclass of memkit.Retriever",
    ),
    (
        "instance-not-class",
        "register_stores",
        lambda r: r.add_store(NullStore.Config()),
        "not a subclass of memkit.LongTermStore",
    ),
    (
        "injector-is-a-pool",
        "register_injectors",
        lambda r: r.add_injector(ListPool),
        "not a subclass of memkit.Injector",
    ),
    ("no-name", "register_pools", lambda r: r.add_pool(NamelessPool), "without a `name`"),
    ("non-string-name", "register_pools", lambda r: r.add_pool(NonStringNamePool), "without a `name`"),
    ("uppercase-name", "register_pools", lambda r: r.add_pool(_named_pool("TestPool")), "names are lowercase"),
    ("space-in-name", "register_pools", lambda r: r.add_pool(_named_pool("test pool")), "names are lowercase"),
    ("digit-first-name", "register_pools", lambda r: r.add_pool(_named_pool("9pool")), "names are lowercase"),
    ("empty-name", "register_pools", lambda r: r.add_pool(_named_pool("")), "names are lowercase"),
    ("no-config", "register_pools", lambda r: r.add_pool(ConfiglessPool), "without a nested `Config`"),
    ("config-not-memkit", "register_pools", lambda r: r.add_pool(PydanticConfigPool), "memkit.MemkitConfig"),
    ("abstract-pool", "register_pools", lambda r: r.add_pool(AbstractPool), "abstract: implement"),
    ("abstract-retriever", "register_retrievers", lambda r: r.add_retriever(AbstractRetriever), "abstract: implement"),
    (
        "recipe-dict",
        "register_recipes",
        lambda r: r.add_recipe("test-r", {"name": "x"}),  # type: ignore[arg-type]
        "give a path to a .toml recipe file or a memkit.Recipe",
    ),
    (
        "recipe-int",
        "register_recipes",
        lambda r: r.add_recipe("test-r", 42),  # type: ignore[arg-type]
        "give a path to a .toml recipe file or a memkit.Recipe",
    ),
    ("recipe-yaml-path", "register_recipes", lambda r: r.add_recipe("test-r", "recipe.yaml"), "not a .toml file"),
    ("recipe-bad-name", "register_recipes", lambda r: r.add_recipe("Test Recipe", a_recipe()), "names are lowercase"),
]


@pytest.mark.parametrize(
    ("hook", "register", "fragment"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_registration_raises_registration_error_naming_the_registrant(
    fresh_registry: Registry, hook: str, register: Callable[[Registry], None], fragment: str
) -> None:
    before = contents(plugins.get_registry())
    plugin = make_plugin(**{hook: lambda registry: register(registry)})
    try:
        with pytest.raises(memkit.RegistrationError) as info:
            plugins.register_plugin(plugin, name="malformed-plugin")
        assert "'malformed-plugin'" in str(info.value)
        assert fragment in str(info.value)
        assert isinstance(info.value, memkit.PluginError) and isinstance(info.value, ValueError)
        assert not is_registered("malformed-plugin")
        assert contents(plugins.get_registry()) == before
    finally:
        plugins.unregister_plugin("malformed-plugin")


def test_abstract_part_error_lists_the_missing_methods(fresh_registry: Registry) -> None:
    plugin = make_plugin(register_pools=lambda registry: registry.add_pool(AbstractPool))
    with pytest.raises(memkit.RegistrationError) as info:
        plugins.register_plugin(plugin, name="abstract-plugin")
    for method in ("write", "read", "capacity", "load_state_dict"):
        assert method in str(info.value)
    assert "reset" not in str(info.value).split("implement", 1)[1]


def test_registration_outside_a_hook_is_attributed_to_a_direct_call() -> None:
    registry = Registry()
    with pytest.raises(memkit.RegistrationError, match="<direct call>"):
        registry.add_pool(NotAPool)  # type: ignore[arg-type]
    registry.add_pool(ListPool)
    assert registry.registrant("pool", "test-list-pool") == "<direct call>"


# ---------------------------------------------------------------------------------------------------
# misbehaving hooks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", sorted(plugins._HOOKS))
def test_hook_raising_a_foreign_exception_becomes_plugin_error_naming_the_plugin(
    fresh_registry: Registry, hook: str
) -> None:
    boom = KeyError("boom")

    def raising(registry: Registry) -> None:
        raise boom

    before = contents(plugins.get_registry())
    with pytest.raises(memkit.PluginError) as info:
        plugins.register_plugin(make_plugin(**{hook: raising}), name="raising-plugin")
    assert type(info.value) is memkit.PluginError
    assert "'raising-plugin'" in str(info.value) and hook in str(info.value) and "boom" in str(info.value)
    assert info.value.__cause__ is boom
    assert not is_registered("raising-plugin")
    assert contents(plugins.get_registry()) == before


def test_hook_raising_a_memkit_error_propagates_it_unchanged(fresh_registry: Registry) -> None:
    error = memkit.RecipeError("bad recipe inside a plugin")

    def raising(registry: Registry) -> None:
        raise error

    with pytest.raises(memkit.RecipeError) as info:
        plugins.register_plugin(make_plugin(register_recipes=raising), name="raising-plugin")
    assert info.value is error
    assert not is_registered("raising-plugin")


# ---------------------------------------------------------------------------------------------------
# looking up
# ---------------------------------------------------------------------------------------------------


def test_get_of_an_unknown_name_raises_unknown_component_error_listing_registered_names(
    fresh_registry: Registry,
) -> None:
    def register_pools(registry: Registry) -> None:
        registry.add_pool(ListPool)

    with plugged(make_plugin(register_pools=register_pools), "lookup-plugin") as registry:
        with pytest.raises(memkit.UnknownComponentError) as info:
            registry.get("pool", "no-such-pool")
        message = str(info.value)
        assert "'no-such-pool'" in message and "random_drop, test-list-pool" in message
        assert isinstance(info.value, LookupError)
        with pytest.raises(memkit.UnknownComponentError, match="registered stores: exact, hnsw"):
            registry.get("store", "no-such-store")
        with pytest.raises(memkit.UnknownComponentError) as info:
            registry.recipe_source("no-such-recipe")
        assert "memoryllm" in str(info.value) and "training-free" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# entry-point discovery (a fake installed distribution on sys.path)
# ---------------------------------------------------------------------------------------------------

EP_GOOD = """
    import memkit
    from memkit.builtin.pool import RandomDropPool


    class FakeEntryPointPool(RandomDropPool):
        name = "fake-ep-pool"


    @memkit.hookimpl
    def register_pools(registry):
        registry.add_pool(FakeEntryPointPool)
"""


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], str]]:
    """Installs ``write(entry_point_name, module_source)`` -> module name: a package plus its dist-info."""
    written: list[str] = []

    def write(entry_point: str, source: str) -> str:
        module = f"memkit_fake_{entry_point}_{len(written)}"
        package = tmp_path / module
        package.mkdir()
        (package / "__init__.py").write_text(textwrap.dedent(source))
        dist_info = tmp_path / f"{module}-0.1.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        (dist_info / "entry_points.txt").write_text(f"[memkit]\n{entry_point} = {module}\n")
        written.append(module)
        return module

    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    try:
        yield write
    finally:
        plugins.reset()
        for module in written:
            sys.modules.pop(module, None)


def test_entry_point_plugin_is_registered_unless_autoload_is_disabled(
    fake_distribution: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = fake_distribution("fake_ep", EP_GOOD)

    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins.reset()
    assert "fake-ep-pool" not in plugins.get_registry().names("pool")
    assert not is_registered("fake_ep") and module not in sys.modules

    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV)
    plugins.reset()
    registry = plugins.get_registry()
    assert "fake-ep-pool" in registry.names("pool")
    assert registry.registrant("pool", "fake-ep-pool") == "fake_ep"  # the entry point's name
    assert registry.get("pool", "fake-ep-pool").__module__ == module
    assert registry.get("pool", "random_drop") is RandomDropPool

    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "0")  # "0" does not disable
    plugins.reset()
    assert "fake-ep-pool" in plugins.get_registry().names("pool")

    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins.reset()
    assert "fake-ep-pool" not in plugins.get_registry().names("pool")


def test_entry_point_plugin_clashing_with_a_builtin_names_both_registrants(
    fake_distribution: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution("clash_ep", EP_GOOD.replace('"fake-ep-pool"', '"random_drop"'))
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reset()
    with pytest.raises(memkit.RegistrationError) as info:
        plugins.get_registry()
    assert "memkit.builtin.pool" in str(info.value) and "clash_ep" in str(info.value)


def test_entry_point_plugin_with_an_unknown_hook_raises_plugin_error(
    fake_distribution: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution("typo_ep", "import memkit\n\n@memkit.hookimpl\ndef register_pool(registry):\n    pass\n")
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reset()
    with pytest.raises(memkit.PluginError, match="unknown hook") as info:
        plugins.get_registry()
    assert "register_pool" in str(info.value)


def test_entry_point_plugin_that_fails_to_import_raises_plugin_error_and_can_be_skipped(
    fake_distribution: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution("broken_ep", "raise RuntimeError('broken at import')\n")
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reset()
    with pytest.raises(memkit.PluginError) as info:
        plugins.get_registry()
    assert "broken at import" in str(info.value) and plugins.DISABLE_AUTOLOAD_ENV in str(info.value)
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins.reset()
    assert plugins.get_registry().get("pool", "random_drop") is RandomDropPool


def test_entry_point_plugin_that_fails_to_import_is_named_in_the_error(
    fake_distribution: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = fake_distribution("broken_ep", "raise RuntimeError('broken at import')\n")
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reset()
    with pytest.raises(memkit.PluginError) as info:
        plugins.get_registry()
    assert "'broken_ep'" in str(info.value), "the error must name the entry point"
    assert repr(module) in str(info.value), "the error must name the distribution"
    assert isinstance(info.value.__cause__, RuntimeError)


# ---------------------------------------------------------------------------------------------------
# one test per hook
# ---------------------------------------------------------------------------------------------------


def _check_hook(hook: str, register: Callable[[Registry], None], kind: str, name: str) -> Registry:
    with plugged(make_plugin(**{hook: register}), f"{hook}-plugin") as registry:
        assert name in registry.names(kind)
        assert registry.registrant(kind, name) == f"{hook}-plugin"
        found = registry.recipe_source(name) if kind == "recipe" else registry.get(kind, name)
    assert name not in plugins.get_registry().names(kind)
    return found  # type: ignore[return-value]


def test_hook_register_pools(fresh_registry: Registry) -> None:
    cls = _check_hook("register_pools", lambda registry: registry.add_pool(ListPool), "pool", "test-list-pool")
    assert cls is ListPool
    pool = cls(cls.Config(), num_layers=2, hidden_size=3, device=torch.device("cpu"), dtype=torch.float32)
    assert pool.read().shape == (2, 0, 3)


def test_hook_register_stores(fresh_registry: Registry) -> None:
    cls = _check_hook("register_stores", lambda registry: registry.add_store(NullStore), "store", "test-null-store")
    assert cls is NullStore
    store = cls(cls.Config(), num_layers=2, hidden_size=3, key_size=4)
    assert len(store.get(0, torch.zeros(0, dtype=torch.long))) == 0


def test_hook_register_retrievers(fresh_registry: Registry) -> None:
    cls = _check_hook(
        "register_retrievers", lambda registry: registry.add_retriever(NewestRetriever), "retriever", "test-newest"
    )
    assert cls is NewestRetriever
    retriever = cls(cls.Config(), backbone=Backbone(tiny_model("llama")))
    assert retriever.keys(0, torch.zeros(5, 32)).shape == (5, 8)


def test_hook_register_injectors(fresh_registry: Registry) -> None:
    cls = _check_hook(
        "register_injectors", lambda registry: registry.add_injector(NullInjector), "injector", "test-null-injector"
    )
    assert cls is NullInjector
    injector = cls(cls.Config(), backbone=None, write_size=2)  # type: ignore[arg-type]
    assert injector.prefix(torch.zeros(2, 0, 3)).length == 0


def test_hook_register_recipes(fresh_registry: Registry, tmp_path: Path) -> None:
    recipe = a_recipe("test-object-recipe")
    found = _check_hook(
        "register_recipes",
        lambda registry: registry.add_recipe("test-object-recipe", recipe),
        "recipe",
        "test-object-recipe",
    )
    assert found is recipe
    path = tmp_path / "file.toml"
    path.write_text(a_recipe("test-file-recipe").to_toml())
    found = _check_hook(
        "register_recipes",
        lambda registry: registry.add_recipe("test-file-recipe", str(path)),
        "recipe",
        "test-file-recipe",
    )
    assert found == path


def test_every_hook_has_a_test() -> None:
    specs = sorted(
        name for name, value in vars(hookspecs).items() if inspect.isfunction(value) and hasattr(value, "memkit_spec")
    )
    assert specs, "found no hook specifications in memkit.hookspecs"
    tests = {name for name, value in globals().items() if inspect.isfunction(value)}
    missing = [name for name in specs if f"test_hook_{name}" not in tests]
    assert not missing, f"hooks without a test_hook_<name> test: {missing}"


class _TypoHook:
    @memkit.hookimpl
    def register_widgets(self, registry):  # not a memkit hook
        pass


class _BadSignature:
    @memkit.hookimpl
    def register_pools(self, registry, extra):  # an argument the hook does not have
        pass


@pytest.mark.parametrize(
    ("plugin", "name", "match"),
    [
        (_TypoHook(), "typo", "register_widgets"),
        (_BadSignature(), "bad-signature", "extra"),
        (object(), "memkit.builtin.pool", "memkit.builtin.pool"),
    ],
)
def test_register_plugin_refuses_unknown_hooks_bad_signatures_and_taken_names(fresh_registry, plugin, name, match):
    before = memkit.plugins.get_registry().names("pool")
    with pytest.raises(memkit.PluginError, match=match):
        memkit.plugins.register_plugin(plugin, name=name)
    assert memkit.plugins.get_plugin_manager().get_plugin(name) is not plugin
    assert memkit.plugins.get_registry().names("pool") == before


def test_a_plugin_that_uses_memkit_inside_its_register_hook_is_named_not_a_recursion_error(
    fake_distribution: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = """
    import memkit

    @memkit.hookimpl
    def register_recipes(registry):
        memkit.load_recipe("memoryllm")  # needs the registry being built
    """
    fake_distribution("eager_ep", source)
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reset()
    with pytest.raises(memkit.PluginError, match=r"'eager_ep' uses memkit .* inside its register_recipes hook"):
        plugins.get_registry()
    assert plugins._building is None  # nothing stuck: the next build starts clean
