"""The solver interface, and the checks dlf applies to every solver's answer.

Shapes (N rows: positions being scored or sequences being decoded; P pairs; V the
common vocabulary):

    inputs.base_logits    [N, V]      large base model
    inputs.small_logits   [N, P, V]   each pair's small base (a shared base repeats)
    inputs.expert_logits  [N, P, V]   each pair's expert
    inputs.row_mask       [N] bool    rows whose weights matter (others: any valid value)
    solve(inputs)      -> [N, P]      weights, within ``self.bounds``, on the logits' device
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dlf_plugin.errors import DLFError
from dlf_plugin.fusion import FusionInputs


class SolverError(DLFError, RuntimeError):
    """A solver failed or broke its contract; the message names the solver and its plugin."""


class SolverOptionError(DLFError, ValueError):
    """A solver option from model_args is unknown or invalid."""


class Solver(abc.ABC):
    """Base class of fusion solvers.

    Subclasses set ``name`` and take their options as keyword-only arguments of
    ``__init__`` (they arrive from model_args, as strings or numbers), validate them
    there and raise :class:`SolverOptionError` naming the option, and set
    ``self.bounds = (low, high)``: every weight the solver returns lies in it.
    """

    name: ClassVar[str] = ""

    def __init__(self, pair_names: Sequence[str]) -> None:
        self.pair_names = tuple(pair_names)
        self.bounds: tuple[float, float] = (0.0, math.inf)

    @classmethod
    def option_names(cls) -> list[str]:
        """The model_args keys this solver accepts."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def describe(self) -> dict[str, Any]:
        """The solver's name and resolved options, recorded in results metadata."""
        return {"name": self.name, "options": {n: getattr(self, n, None) for n in self.option_names()}}

    @abc.abstractmethod
    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        """Return the weights ``[N, P]`` for ``inputs`` (shapes in the module docstring).

        A row's weights must depend on that row alone: dlf solves rows in whatever batches
        suit it (the batch size, scoring's chunks, a speculative round's positions), and
        speculative greedy decoding equals plain decoding only if they do not move with the
        batch. Must not modify ``inputs``. Should not synchronise with the device (no ``.item()``,
        ``.tolist()``, ``bool(tensor)`` or data-dependent shapes): a decoding step makes one
        device-to-host transfer and a solver that makes more stalls it
        (``dlf_plugin.syncs.count_syncs`` counts them).
        """

    def working_rows(self, num_pairs: int) -> int:
        """Float32 rows of V per row solved that the solver holds at its peak beyond its
        inputs (buffers kept between calls included). Scoring sizes its chunks by it, so
        ``fusion_memory`` holds; the default allows two per pair and two more (deltas, a
        softmax and a fused row). A solver that needs more says so here."""
        return 2 * num_pairs + 2

    def release(self) -> None:
        """Free buffers kept between the calls of one scoring or generation run (dlf calls
        this when the run ends); the default keeps none."""


class DeclaredMemory(Solver):
    """Stands in for ``solver`` in batch size auto's trials: holds, while it solves, the
    memory ``solver`` declares for its peak (``working_rows``), and returns weights of 1
    clipped to its bounds. A trial then reaches the solver's worst case whatever tokens it
    fuses (dlf's own solvers iterate longer on some logits than on others), and leaves the
    solver's counts (uncertified positions) to the real run."""

    def __init__(self, solver: Solver) -> None:
        super().__init__(solver.pair_names)
        self.solver, self.bounds, self.name = solver, solver.bounds, solver.name

    def working_rows(self, num_pairs: int) -> int:
        return self.solver.working_rows(num_pairs)

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        rows, pairs, vocab = inputs.expert_logits.shape
        held = torch.empty(self.working_rows(pairs), rows, vocab, dtype=torch.float32, device=inputs.base_logits.device)
        weight = min(max(1.0, self.bounds[0]), self.bounds[1])
        return held.new_full((rows, pairs), weight)


def number_option(solver: str, option: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    """Parse a numeric solver option, raising SolverOptionError that names it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SolverOptionError(
            f"model_args {option}={value!r} (solver {solver!r}) is not a number"
        ) from None
    if not math.isfinite(number) or not low <= number <= high:
        raise SolverOptionError(
            f"model_args {option}={value!r} (solver {solver!r}) must be a finite number in [{low}, {high}]"
        )
    return number


def checked_solve(solver: Solver, plugin: str, inputs: FusionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``solver`` and check its answer without a device sync.

    The shape is checked at once; finiteness and bounds are counted on the device (rows
    outside ``row_mask`` excepted): the engine reads the count with its step's one transfer
    and calls :func:`explain_bad_weights` when it is not 0. No fallback.

    Returns:
        The weights ``[N, P]`` and the count of bad weights (a 0-dim long tensor).
    """
    where = _where(solver, plugin)
    versions = _versions(inputs)
    try:
        weights = solver.solve(inputs)
    except Exception as exc:
        raise SolverError(f"{where} raised {exc!r}") from exc
    changed = [name for name, before in versions.items() if _version(getattr(inputs, name)) != before]
    if changed:
        raise SolverError(
            f"{where} modified its inputs in place ({', '.join(changed)}); a solver must leave them as given "
            "(the engine fuses with them after solving): work on a copy"
        )
    rows, pairs = inputs.base_logits.shape[0], inputs.expert_logits.shape[1]
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (rows, pairs):
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise SolverError(f"{where} returned {shape}; expected a tensor of shape ({rows}, {pairs})")
    return weights, _bad_weights(solver, inputs, weights).sum()


def explain_bad_weights(solver: Solver, plugin: str, inputs: FusionInputs, weights: torch.Tensor) -> None:
    """Raise the SolverError for weights :func:`checked_solve` counted as bad."""
    bad = _bad_weights(solver, inputs, weights)
    low, high = solver.bounds
    sample = weights[bad][:3].tolist()
    raise SolverError(
        f"{_where(solver, plugin)} returned {int(bad.sum())} weight(s) that are NaN, infinite or outside "
        f"its bounds [{low}, {high}], e.g. {sample}"
    )


def _bad_weights(solver: Solver, inputs: FusionInputs, weights: torch.Tensor) -> torch.Tensor:
    """``[N, P]`` bool: weights that are NaN or infinite (in any row: masked rows are fused
    too), or out of bounds in masked-in rows."""
    low, high = solver.bounds
    outside = ((weights < low) | (weights > high)) & inputs.row_mask.unsqueeze(-1)
    return ~torch.isfinite(weights) | outside


INPUT_TENSORS = ("base_logits", "small_logits", "expert_logits", "row_mask")


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference-mode tensors, which keep none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _versions(inputs: FusionInputs) -> dict[str, int]:
    """The modification counters of the inputs a solver gets, where torch keeps them."""
    versions = {name: _version(getattr(inputs, name)) for name in INPUT_TENSORS}
    return {name: v for name, v in versions.items() if v is not None}


def _where(solver: Solver, plugin: str) -> str:
    return f"solver {solver.name!r} (plugin {plugin!r})"
