"""memkit's hook specifications.

A plugin is a module (or object) with functions marked ``@memkit.hookimpl`` whose names are the hooks
below. Each hook receives the :class:`~memkit.registry.Registry` and adds parts to it; hooks return
nothing. A third-party plugin is found through the ``memkit`` entry-point group::

    [project.entry-points.memkit]
    my_retriever = "memkit_my_retriever"

Every hook is called once per plugin when memkit first needs its registry (see :mod:`memkit.plugins`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from memkit.registry import Registry

__all__ = ["hookimpl", "hookspec"]

#: Marks hook specifications (memkit's own).
hookspec = pluggy.HookspecMarker("memkit")
#: Marks hook implementations in plugins: ``@memkit.hookimpl``.
hookimpl = pluggy.HookimplMarker("memkit")


# ---------------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------------


@hookspec
def register_pools(registry: Registry) -> None:
    """Register :class:`~memkit.interfaces.MemoryPool` classes.

    Args:
        registry: call ``registry.add_pool(cls)`` for each pool class; ``cls.name`` is the name a
            recipe uses. A duplicate name or a class that is not a ``MemoryPool`` with a ``Config`` raises
            :class:`~memkit.errors.RegistrationError` naming both registrants.

    Called once per plugin; the return value is ignored. Added in memkit 0.1.
    """


@hookspec
def register_stores(registry: Registry) -> None:
    """Register :class:`~memkit.interfaces.LongTermStore` classes.

    Args:
        registry: call ``registry.add_store(cls)`` for each store class.

    Called once per plugin; the return value is ignored. Added in memkit 0.1.
    """


@hookspec
def register_retrievers(registry: Registry) -> None:
    """Register :class:`~memkit.interfaces.Retriever` classes.

    Args:
        registry: call ``registry.add_retriever(cls)`` for each retriever class.

    Called once per plugin; the return value is ignored. Added in memkit 0.1.
    """


@hookspec
def register_injectors(registry: Registry) -> None:
    """Register :class:`~memkit.interfaces.Injector` classes.

    Args:
        registry: call ``registry.add_injector(cls)`` for each injector class.

    Called once per plugin; the return value is ignored. Added in memkit 0.1.
    """


# ---------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------


@hookspec
def register_recipes(registry: Registry) -> None:
    """Register recipes by name.

    Args:
        registry: call ``registry.add_recipe(name, source)`` where ``source`` is the path of a
            recipe TOML file or a :class:`~memkit.recipe.Recipe`. ``memkit.list_recipes()`` lists them and
            ``memkit.wrap(model, recipe=name)`` uses them.

    Called once per plugin; the return value is ignored. Added in memkit 0.1.
    """
