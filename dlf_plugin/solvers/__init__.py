"""Fusion solvers: given the logits of one set of positions, choose each pair's weight.

Look solvers up by name with :func:`dlf_plugin.hooks.make_solver`; the built-in
ones are registered by :mod:`dlf_plugin.solvers.builtin` through the plugin hook.
"""
