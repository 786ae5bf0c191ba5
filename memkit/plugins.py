"""Loading memkit's plugins.

Built-in parts are registered explicitly from :data:`DEFAULT_PLUGINS`. Third-party plugins are found
only through the ``memkit`` entry-point group of installed distributions, unless the environment
variable ``MEMKIT_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value other than ``0``.
``MEMKIT_PLUGINS_ALLOW`` (only these entry-point names) or ``MEMKIT_PLUGINS_BLOCK`` (all but these),
comma-separated, choose which entry points are loaded; a plugin left out is not even imported. The
registry is built lazily, once, the first time memkit needs it; :func:`reset` forgets it (for tests).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import threading
from typing import Any

import pluggy

from memkit import hookspecs
from memkit.errors import MemkitError, PluginError
from memkit.registry import Registry

__all__ = [
    "ALLOW_ENV",
    "BLOCK_ENV",
    "DEFAULT_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "get_plugin_manager",
    "get_registry",
    "reset",
]

#: Modules whose hooks register memkit's built-in parts and recipes.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "memkit.builtin.pool",
    "memkit.builtin.store",
    "memkit.builtin.hnsw_store",
    "memkit.builtin.injector",
    "memkit.builtin.projector_retriever",
    "memkit.builtin.attention_retriever",
    "memkit.builtin.recipes",
)
#: The entry-point group third-party plugins declare.
ENTRY_POINT_GROUP = "memkit"
#: Set to a non-empty value (other than ``0``) to skip entry-point plugins.
DISABLE_AUTOLOAD_ENV = "MEMKIT_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated entry-point names: load only these third-party plugins.
ALLOW_ENV = "MEMKIT_PLUGINS_ALLOW"
#: Comma-separated entry-point names: load every third-party plugin but these.
BLOCK_ENV = "MEMKIT_PLUGINS_BLOCK"

logger = logging.getLogger(__name__)

_HOOKS = (
    "register_pools",
    "register_stores",
    "register_retrievers",
    "register_injectors",
    "register_recipes",
)
_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
#: ``(plugin, hook)`` whose ``register_*`` hook is running while the registry is first built, else None.
_building: tuple[str, str] | None = None


def _autoload_disabled() -> bool:
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("", "0")


def _names_from_env(variable: str) -> set[str] | None:
    """The comma-separated names in ``variable``, or ``None`` when it is unset or blank.

    A value with separators but no name (``","``) is set and names nothing.
    """
    value = os.environ.get(variable, "")
    if not value.strip():
        return None
    return {name.strip() for name in value.split(",")} - {""}


def _entry_point_filter() -> tuple[set[str] | None, set[str]]:
    """``(allowed, blocked)`` entry-point names from :data:`ALLOW_ENV` and :data:`BLOCK_ENV`.

    ``allowed`` is ``None`` when every plugin not blocked may load.

    Raises:
        PluginError: both variables are set, which is ambiguous.
    """
    allowed, blocked = _names_from_env(ALLOW_ENV), _names_from_env(BLOCK_ENV)
    if allowed is not None and blocked is not None:
        raise PluginError(
            f"both {ALLOW_ENV} ({os.environ[ALLOW_ENV]!r}) and {BLOCK_ENV} ({os.environ[BLOCK_ENV]!r}) are set; "
            f"set only one: {ALLOW_ENV} loads only the plugins it names, {BLOCK_ENV} loads all but those"
        )
    return allowed, blocked or set()


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register the plugins of the ``memkit`` entry-point group that the allow or block list lets through,
    naming the culprit if one fails. A plugin left out is not imported."""
    allowed, blocked = _entry_point_filter()
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            seen.add(ep.name)
            if ep.name in blocked or (allowed is not None and ep.name not in allowed):
                why = BLOCK_ENV if ep.name in blocked else ALLOW_ENV
                logger.debug("memkit plugin %r (%s) not loaded: left out by %s", ep.name, ep.value, why)
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            dist_name = dist.metadata["Name"] if dist.metadata else "?"
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party package must say which one
                raise PluginError(
                    f"the memkit plugin {ep.name!r} ({ep.value}) from distribution {dist_name!r} failed to import: "
                    f"{exc!r}; fix or uninstall {dist_name}, set {BLOCK_ENV}={ep.name} to skip it, or set "
                    f"{DISABLE_AUTOLOAD_ENV}=1 to skip every plugin"
                ) from exc
            pm.register(plugin, name=ep.name)
    if allowed is not None and allowed - seen:
        logger.warning(
            "%s names memkit plugin(s) that no installed distribution provides: %s",
            ALLOW_ENV,
            ", ".join(sorted(allowed - seen)),
        )


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and (unless disabled) entry-point plugins."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("memkit")
            pm.add_hookspecs(hookspecs)
            for module_path in DEFAULT_PLUGINS:
                pm.register(importlib.import_module(module_path), name=module_path)
            if not _autoload_disabled():
                _load_entry_points(pm)
            try:
                pm.check_pending()
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"a memkit plugin implements an unknown hook: {exc}") from exc
            _pm = pm
        return _pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every ``register_*`` hook of every plugin of ``pm`` into a fresh :class:`Registry`.

    Each hook implementation is called on its own so that the registry knows which plugin registered
    what, and can name both registrants of a duplicate.
    """
    global _building
    registry = Registry()
    outer = _building
    try:
        for hook_name in _HOOKS:
            caller = getattr(pm.hook, hook_name)
            for impl in caller.get_hookimpls():  # in registration order
                registry.current_registrant = impl.plugin_name
                _building = (impl.plugin_name, hook_name)
                try:
                    impl.function(registry=registry)
                except MemkitError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} raised {exc!r} in its {hook_name} hook; fix or uninstall "
                        f"it, or set {DISABLE_AUTOLOAD_ENV}=1 to skip third-party plugins"
                    ) from exc
            registry.current_registrant = "<direct call>"
    finally:
        _building = outer
    return registry


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    pm = get_plugin_manager()
    with _lock:
        if _registry is None:
            if _building is not None:  # a register_* hook asked for the registry it is helping to build
                plugin, hook = _building
                raise PluginError(
                    f"plugin {plugin!r} uses memkit (e.g. memkit.load_recipe or memkit.wrap) inside its {hook} "
                    "hook, while the registry that needs is being built; a register_* hook may only call "
                    "registry.add_*: build recipes and models outside it"
                )
            _registry = build_registry(pm)
        return _registry


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object or module at run time and rebuild the registry.

    Raises :class:`~memkit.errors.RegistrationError` (and leaves nothing registered) if the plugin's
    registrations clash with what is already there.
    """
    global _registry
    pm = get_plugin_manager()
    try:
        plugin_name = pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from exc
    if plugin_name is None:
        raise PluginError(f"plugin {name or plugin!r} is blocked and was not registered")
    try:
        pm.check_pending()
        new = build_registry(pm)
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=plugin_name)
        raise PluginError(f"plugin {plugin_name!r} implements a hook memkit does not have: {exc}") from exc
    except BaseException:
        pm.unregister(name=plugin_name)
        raise
    with _lock:
        _registry = new


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin` and rebuild the registry."""
    global _registry
    pm = get_plugin_manager()
    pm.unregister(name=name)
    new = build_registry(pm)
    with _lock:
        _registry = new


def reset() -> None:
    """Forget the plugin manager and registry; the next use loads everything again."""
    global _pm, _registry
    with _lock:
        _pm = None
        _registry = None
