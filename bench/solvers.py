"""Solver cost at a Llama-sized vocabulary on CPU, every solver side by side in one run.

    python bench/solvers.py [--vocab 32000] [--repeats 5]

Per configuration (rows x pairs) it prints each solver's time per position and the
number of softmax evaluations over the full vocabulary it made per row (a row is a
position), next to dlf-grid (the paper's 21-point search), and the rows the fixed
schedule left uncertified, then checks the targets (default schedules):
    dlf       at 1 pair  <= 0.5 x dlf-grid's time
    dlf-joint at 4 pairs <= 1.0 x dlf-grid's time
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dlf_plugin.fusion import FusionInputs, dlf_loss
from dlf_plugin.solvers.dlf import ExactSolver, GridSolver, JointSolver
from dlf_plugin.solvers.static import StaticSolver
from dlf_plugin.tiny_models import peaked_fusion_inputs

# (label, class, options): dlf and dlf-joint with the default schedule (adaptive on a CPU),
# and dlf with the fixed, sync-free schedule that accelerators use.
SOLVERS = (
    ("static", StaticSolver, {}),
    ("dlf-grid", GridSolver, {}),
    ("dlf", ExactSolver, {}),
    ("dlf-fixed", ExactSolver, {"schedule": "fixed"}),
    ("dlf-joint", JointSolver, {}),
)


def measure(inputs: FusionInputs, repeats: int) -> dict[str, tuple[float, float, float, int]]:
    """Per solver: (seconds per position, vocabulary passes per position and row, mean loss,
    rows left uncertified).

    The solvers take turns within every repeat, so drifts of the machine hit all alike;
    each keeps its buffers between calls, as during decoding.
    """
    names = [f"pair{k}" for k in range(inputs.num_pairs)]
    solvers = {label: cls(names, **options) for label, cls, options in SOLVERS}
    times = {label: [] for label in solvers}
    passes = {}
    with torch.inference_mode():
        losses = {label: float(dlf_loss(inputs, s.solve(inputs)).mean()) for label, s in solvers.items()}  # warm-up
        uncertified = {label: int(getattr(s, "uncertified", 0)) for label, s in solvers.items()}
        for _ in range(repeats):
            for label, solver in solvers.items():
                solver.passes = 0
                start = time.perf_counter()
                solver.solve(inputs)
                times[label].append(time.perf_counter() - start)
                passes[label] = getattr(solver, "passes", 0)
    rows = inputs.base_logits.shape[0]
    return {
        label: (statistics.median(times[label]) / rows, passes[label], losses[label], uncertified[label])
        for label in solvers
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary {args.vocab}, float32, CPU")
    print(f"{'rows':>4} {'pairs':>5} {'solver':>10} {'ms/position':>12} {'vocab passes':>13} {'x dlf-grid':>11} {'mean loss':>11} {'uncertified':>11}")
    ratios = {}
    for rows in (1, 32):
        for pairs in (1, 4):
            inputs = peaked_fusion_inputs(rows, pairs, args.vocab, seed=rows * 10 + pairs)
            results = measure(inputs, args.repeats)
            grid_time = results["dlf-grid"][0]
            for name, (seconds, passes, loss, uncertified) in results.items():
                ratios[(rows, pairs, name)] = seconds / grid_time
                print(f"{rows:>4} {pairs:>5} {name:>10} {seconds * 1e3:>12.3f} {passes:>13.1f} {seconds / grid_time:>11.2f} {loss:>11.3e} {uncertified:>11}")
    failures = 0
    for rows in (1, 32):
        for name, pairs, goal in (("dlf", 1, 0.5), ("dlf-joint", 4, 1.0)):
            value = ratios[(rows, pairs, name)]
            ok = value <= goal
            failures += not ok
            print(f"target {name}_vs_grid_{pairs}pair_{rows}rows: {value:.2f} (goal <= {goal}) {'PASS' if ok else 'FAIL'}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
