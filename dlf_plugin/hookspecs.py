"""The hooks a dlf plugin may implement. This module only declares them.

A plugin is a module or object with functions marked ``@dlf_plugin.hookspecs.hookimpl``,
named after a hook below. Third-party plugins are found through the entry-point group
``dlf_plugin`` (see README, "Writing a solver plugin"); dlf's own solvers register
through the very same hook.
"""

import pluggy

hookspec = pluggy.HookspecMarker("dlf")
hookimpl = pluggy.HookimplMarker("dlf")


@hookspec
def register_solvers(register):
    """Register fusion solvers.

    Called once per process, the first time a solver is looked up, for every
    plugin (collected, not firstresult).

    Args:
        register: ``register(solver_class)``; call it once per solver. The class
            subclasses :class:`dlf_plugin.solvers.base.Solver` and sets a unique
            ``name``. A name registered by two plugins is an error naming both.
    """
