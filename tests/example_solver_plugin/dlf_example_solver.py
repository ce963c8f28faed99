"""A third-party dlf solver: ``example-agreement``.

Each pair's weight is ``scale`` times the probability the expert gives to the large
base model's top token: experts that agree with the large model are trusted more.
"""

import torch

from dlf_plugin.hookspecs import hookimpl
from dlf_plugin.solvers.base import Solver, number_option


class AgreementSolver(Solver):
    name = "example-agreement"

    def __init__(self, pair_names, *, scale=1.0):
        super().__init__(pair_names)
        self.scale = number_option(self.name, "scale", scale, 0.0, 10.0)
        self.bounds = (0.0, self.scale)

    def solve(self, inputs):
        top = inputs.base_logits.argmax(-1)  # [N]
        probs = torch.softmax(inputs.expert_logits, dim=-1)  # [N, P, V]
        index = top[:, None, None].expand(-1, probs.shape[1], 1)
        return self.scale * probs.gather(-1, index).squeeze(-1)


@hookimpl
def register_solvers(register):
    register(AgreementSolver)
