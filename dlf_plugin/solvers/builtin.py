"""dlf's own solvers, registered through the same hook as third-party ones."""

from dlf_plugin.hookspecs import hookimpl
from dlf_plugin.solvers.dlf import ExactSolver, GridSolver, JointSolver
from dlf_plugin.solvers.static import StaticSolver


@hookimpl
def register_solvers(register):
    for solver in (StaticSolver, GridSolver, ExactSolver, JointSolver):
        register(solver)
