"""The plugin manager: loads dlf's own plugins and third-party ones, lazily and once; and
``make_solver``, which builds a registered solver by name.

Set ``DLF_TRACE_HOOKS=1`` to log every hook call.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import pluggy

from dlf_plugin import hookspecs
from dlf_plugin.errors import DLFError
from dlf_plugin.solvers.base import Solver, SolverError, SolverOptionError

ENTRY_POINT_GROUP = "dlf_plugin"
DEFAULT_PLUGINS = ("dlf_plugin.solvers.builtin",)

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None
_solvers: dict[str, tuple[type, str]] | None = None


class PluginError(DLFError, RuntimeError):
    """A plugin broke a hook's contract (duplicate name, wrong type)."""


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    with _lock:
        if _pm is None:
            import importlib

            pm = pluggy.PluginManager("dlf")
            pm.add_hookspecs(hookspecs)
            for module_name in DEFAULT_PLUGINS:
                pm.register(importlib.import_module(module_name), name=module_name)
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            pm.check_pending()
            if os.environ.get("DLF_TRACE_HOOKS"):
                pm.trace.root.setwriter(logger.info)
                pm.enable_tracing()
            _pm = pm
        return _pm


def get_solvers() -> dict[str, tuple[type, str]]:
    """Every registered solver: ``{name: (solver class, plugin name)}``."""
    global _solvers
    if _solvers is None:
        _solvers = collect_solvers(get_plugin_manager())
    return _solvers


def collect_solvers(pm: pluggy.PluginManager) -> dict[str, tuple[type, str]]:
    """Call ``register_solvers`` on every plugin of ``pm`` and check what they register."""
    found: dict[str, tuple[type, str]] = {}
    impls = pm.hook.register_solvers.get_hookimpls()  # registration order: built-ins first
    for impl in impls:
        plugin_name = impl.plugin_name

        def register(solver_cls, _plugin=plugin_name):
            if not (isinstance(solver_cls, type) and issubclass(solver_cls, Solver)):
                raise PluginError(
                    f"plugin {_plugin!r} registered {solver_cls!r}, which is not a subclass of "
                    "dlf_plugin.solvers.base.Solver"
                )
            name = getattr(solver_cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered {solver_cls.__name__} without a name")
            if name in found:
                raise PluginError(
                    f"solver name {name!r} is registered twice: by plugin {found[name][1]!r} "
                    f"({found[name][0].__name__}) and by plugin {_plugin!r} ({solver_cls.__name__}); "
                    "uninstall one or rename its solver"
                )
            found[name] = (solver_cls, _plugin)

        # Through the plugin manager (one plugin at a time, so that each registration is
        # credited to its plugin): pluggy's tracing (DLF_TRACE_HOOKS=1) and monitoring see it.
        others = [other.plugin for other in impls if other.plugin is not impl.plugin]
        pm.subset_hook_caller("register_solvers", remove_plugins=others)(register=register)
    return found


def reset_solvers() -> None:
    """Collect the solvers again on next use (after registering or removing a plugin)."""
    global _solvers
    _solvers = None


def reset() -> None:
    """Forget the loaded plugins (tests use it around in-process plugins)."""
    global _pm, _solvers
    with _lock:
        _pm, _solvers = None, None


def make_solver(
    name: str, pair_names: Sequence[str], options: dict[str, Any], other_keys: Sequence[str] = ()
) -> tuple[Solver, str]:
    """Build the solver registered as ``name`` with ``options``; returns it and its plugin name.

    ``other_keys`` are the caller's own argument names, listed beside the solver's options
    when an option is unknown.

    Raises:
        SolverOptionError: unknown solver name, unknown option or invalid value.
    """
    solvers = get_solvers()
    if name not in solvers:
        raise SolverOptionError(
            f"model_args solver={name!r} is not a registered solver; choose one of: "
            f"{', '.join(sorted(solvers))} (third-party solvers come from installed plugins)"
        )
    cls, plugin = solvers[name]
    accepted = cls.option_names()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        ours = f"dlf accepts {', '.join(other_keys)}, and " if other_keys else ""
        raise SolverOptionError(
            f"model_args: unknown key(s) {', '.join(unknown)}; {ours}solver {name!r} accepts "
            f"{', '.join(accepted) or 'no options'} (plugin {plugin!r})"
        )
    try:
        solver = cls(pair_names, **options)
    except SolverOptionError:
        raise
    except Exception as exc:
        raise SolverError(f"solver {name!r} (plugin {plugin!r}) failed to start: {exc!r}") from exc
    _check_started(solver, name, plugin)
    return solver, plugin


def _check_started(solver: Solver, name: str, plugin: str) -> None:
    """A solver must have run ``Solver.__init__`` and hold bounds that are numbers, low <= high."""
    where = f"solver {name!r} (plugin {plugin!r})"
    if not hasattr(solver, "pair_names"):
        raise SolverError(f"{where}: {type(solver).__name__}.__init__ never called Solver.__init__ (add super().__init__(pair_names))")
    bounds = getattr(solver, "bounds", None)
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise SolverError(f"{where}: bounds must be two numbers (low, high), got {bounds!r}") from None
    if math.isnan(low) or math.isnan(high) or low > high:
        raise SolverError(f"{where}: bounds must be numbers with low <= high, got {bounds!r}")
