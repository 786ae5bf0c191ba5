"""The typed registry that plugins fill through the ``register_*`` hooks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from memkit.config import MemkitConfig
from memkit.errors import RegistrationError, UnknownComponentError
from memkit.interfaces import Injector, LongTermStore, MemoryPool, Retriever

if TYPE_CHECKING:
    from memkit.recipe import Recipe

__all__ = ["Registry"]

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass(frozen=True)
class _Entry(Generic[T]):
    value: T
    registrant: str


class Registry:
    """Named parts and recipes, each remembered with the plugin that registered it.

    Names are lowercase (``[a-z][a-z0-9_.-]*``) and unique per kind. Registering a name twice, or
    something that is not the right kind of class, raises :class:`~memkit.errors.RegistrationError`
    with the names of the registrants.
    """

    KINDS: ClassVar[dict[str, type]] = {
        "pool": MemoryPool,
        "store": LongTermStore,
        "retriever": Retriever,
        "injector": Injector,
    }

    def __init__(self) -> None:
        self._parts: dict[str, dict[str, _Entry[type]]] = {kind: {} for kind in self.KINDS}
        self._recipes: dict[str, _Entry[Path | Recipe]] = {}
        #: The plugin whose hook is running; set by :mod:`memkit.plugins`.
        self.current_registrant = "<direct call>"

    # -- adding -----------------------------------------------------------------------------------

    def add_pool(self, cls: type[MemoryPool]) -> None:
        """Register a :class:`~memkit.interfaces.MemoryPool` subclass under ``cls.name``."""
        self._add_part("pool", cls)

    def add_store(self, cls: type[LongTermStore]) -> None:
        """Register a :class:`~memkit.interfaces.LongTermStore` subclass under ``cls.name``."""
        self._add_part("store", cls)

    def add_retriever(self, cls: type[Retriever]) -> None:
        """Register a :class:`~memkit.interfaces.Retriever` subclass under ``cls.name``."""
        self._add_part("retriever", cls)

    def add_injector(self, cls: type[Injector]) -> None:
        """Register a :class:`~memkit.interfaces.Injector` subclass under ``cls.name``."""
        self._add_part("injector", cls)

    def add_recipe(self, name: str, source: str | Path | Recipe) -> None:
        """Register a recipe: a TOML file path or a :class:`~memkit.recipe.Recipe` object."""
        from memkit.recipe import Recipe

        who = self.current_registrant
        self._check_name("recipe", name, who)
        if isinstance(source, (str, Path)):
            source = Path(source)
            if source.suffix != ".toml":
                raise RegistrationError(
                    f"plugin {who!r} registered recipe {name!r} from {source}, which is not a .toml file"
                )
        elif not isinstance(source, Recipe):
            raise RegistrationError(
                f"plugin {who!r} registered recipe {name!r} as a {type(source).__name__}; "
                "give a path to a .toml recipe file or a memkit.Recipe"
            )
        if name in self._recipes:
            raise RegistrationError(
                f"recipe {name!r} is registered twice: by plugin {self._recipes[name].registrant!r} and by "
                f"plugin {who!r}; rename one of them or uninstall one plugin"
            )
        self._recipes[name] = _Entry(source, who)

    def _add_part(self, kind: str, cls: Any) -> None:
        who = self.current_registrant
        base = self.KINDS[kind]
        if not isinstance(cls, type) or not issubclass(cls, base):
            raise RegistrationError(
                f"plugin {who!r} registered {cls!r} as a {kind}, but it is not a subclass of memkit.{base.__name__}"
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str):
            raise RegistrationError(
                f"plugin {who!r} registered {kind} {cls.__qualname__} without a `name` "
                "class attribute; set name = '...'"
            )
        self._check_name(kind, name, who)
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, MemkitConfig)):
            raise RegistrationError(
                f"plugin {who!r} registered {kind} {name!r} ({cls.__qualname__}) without a nested `Config` "
                "class deriving from memkit.MemkitConfig"
            )
        abstract = getattr(cls, "__abstractmethods__", None)
        if abstract:
            missing = ", ".join(sorted(abstract))
            raise RegistrationError(
                f"plugin {who!r} registered {kind} {name!r} ({cls.__qualname__}), which is abstract: "
                f"implement {missing}"
            )
        table = self._parts[kind]
        if name in table:
            old = table[name]
            raise RegistrationError(
                f"{kind} {name!r} is registered twice: by plugin {old.registrant!r} "
                f"({old.value.__module__}.{old.value.__qualname__}) and by plugin {who!r} "
                f"({cls.__module__}.{cls.__qualname__}); rename one of them or uninstall one plugin"
            )
        table[name] = _Entry(cls, who)

    @staticmethod
    def _check_name(kind: str, name: object, who: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise RegistrationError(
                f"plugin {who!r} registered a {kind} named {name!r}; names are lowercase letters, digits, "
                "'_', '-' and '.', starting with a letter"
            )

    # -- looking up -------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Any:
        """The class registered as ``name`` for ``kind`` (``pool``, ``store``, ``retriever``, ``injector``)."""
        table = self._parts[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise UnknownComponentError(
                f"unknown {kind} {name!r}; registered {kind}s: {known}. "
                f"If it comes from a plugin, install it (pip install memkit-{name}) and check that "
                "MEMKIT_DISABLE_PLUGIN_AUTOLOAD is not set"
            )
        return table[name].value

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind``, or for recipes with ``kind="recipe"``."""
        if kind == "recipe":
            return sorted(self._recipes)
        return sorted(self._parts[kind])

    def registrant(self, kind: str, name: str) -> str:
        """The plugin that registered ``name``."""
        if kind == "recipe":
            return self._recipes[name].registrant
        return self._parts[kind][name].registrant

    def recipe_source(self, name: str) -> Path | Recipe:
        """The file or object registered as recipe ``name``."""
        if name not in self._recipes:
            known = ", ".join(sorted(self._recipes)) or "none"
            raise UnknownComponentError(
                f"unknown recipe {name!r}; known recipes: {known}. Pass one of these names, a path to a "
                ".toml recipe file, or a memkit.Recipe"
            )
        return self._recipes[name].value
