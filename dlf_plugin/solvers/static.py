"""``static``: fixed weights (proxy-tuning / EFT when every weight is 1.0)."""

from __future__ import annotations

import math

import torch

from dlf_plugin.fusion import FusionInputs
from dlf_plugin.solvers.base import Solver, SolverOptionError, number_option


class StaticSolver(Solver):
    """alpha_k = w_k at every position: fused = z_L + sum_k w_k (z_Ek - z_Sk).

    Options (model_args):
        weight: the weight of every pair (default 1.0), a finite number >= 0.
        weights: per-pair weights as ``pair:w+pair:w``; pairs not named keep ``weight``.
    """

    name = "static"

    def __init__(self, pair_names, *, weight=1.0, weights=None):
        super().__init__(pair_names)
        self.weight = number_option(self.name, "weight", weight, 0.0, math.inf)
        per_pair = {name: self.weight for name in self.pair_names}
        self.weights = weights
        for item in str(weights).split("+") if weights not in (None, "") else []:
            pair, sep, value = item.partition(":")
            if not sep or pair not in per_pair:
                raise SolverOptionError(
                    f"model_args weights={weights!r}: {item!r} must be <pair>:<weight> with <pair> one of "
                    f"the chosen experts ({', '.join(self.pair_names) or 'none'})"
                )
            per_pair[pair] = number_option(self.name, f"weights ({pair})", value, 0.0, math.inf)
        self._values = [per_pair[name] for name in self.pair_names]
        self.bounds = (0.0, math.inf)

    def working_rows(self, num_pairs: int) -> int:
        return 0  # a row of P weights

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        row = torch.tensor(self._values, dtype=inputs.base_logits.dtype, device=inputs.base_logits.device)
        return row.expand(inputs.base_logits.shape[0], -1)
