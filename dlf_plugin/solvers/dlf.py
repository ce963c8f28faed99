"""The DLF solvers: the paper's grid search, the exact continuous solver, and the joint one.

All three minimise the same objective (DESIGN.md section 1). With targets
a_k = KL(R_k||Q_k), b_k = KL(Q_k||R_k) and their means a, b over the K pairs,

    loss(alpha) = sum_k (KL(P~||P) - a_k)^2 + (KL(P||P~) - b_k)^2
                = K [(KL(P~||P) - a)^2 + (KL(P||P~) - b)^2] + const,

so every solver works on the reduced loss (f - a)^2 + (g - b)^2, with
f = KL(P~||P) and g = KL(P||P~). ``dlf-grid`` and ``dlf`` let one pair act per
position (alpha = t e_k, best k and t); ``dlf-joint`` moves all weights at once.
Everything is batched over rows (and pairs): no Python loop over rows or vocabulary.
"""

from __future__ import annotations

import itertools
import math

import torch

from dlf_plugin.fusion import FusionInputs, TiltStats, kl_targets, logit_deltas, softmax_lse, tilt_kls, tilt_stats, tilt_values
from dlf_plugin.solvers.base import Solver, SolverOptionError, number_option


def _bounds(name: str, alpha_min, alpha_max) -> tuple[float, float]:
    low = number_option(name, "alpha_min", alpha_min, 0.0, 100.0)
    high = number_option(name, "alpha_max", alpha_max, 0.0, 100.0)
    if high <= low:
        raise SolverOptionError(f"model_args alpha_max={alpha_max!r} (solver {name!r}) must exceed alpha_min={alpha_min!r}")
    return low, high


class Workspace:
    """Buffers kept between solves, by name.

    Decoding calls a solver with the same shapes at every step; fresh multi-megabyte
    tensors would cost page faults on every call on a CPU.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer

    def clear(self) -> None:
        self._buffers.clear()


class _WorkspaceSolver(Solver):
    """A solver that keeps a Workspace between the calls of one run, freed by ``release``."""

    def release(self) -> None:
        self.workspace.clear()


class _Problem:
    """The per-row quantities every DLF solver needs, computed once: ``[N, ...]`` tensors."""

    def __init__(self, inputs: FusionInputs, workspace: Workspace | None = None) -> None:
        workspace = workspace or Workspace()
        self.workspace = workspace
        self.base = inputs.base_logits  # [N, V]
        self.row_mask = inputs.row_mask  # [N] rows whose weights matter
        small, expert = inputs.small_logits, inputs.expert_logits  # [N, P, V]
        self.shape = tuple(expert.shape)
        d = logit_deltas(small, expert, out=workspace.get("deltas", expert.shape, expert))
        a, b = kl_targets(small, expert, deltas=d, scratch=self.scratch())  # [N, P] each
        self.target_f, self.target_g = a.mean(-1), b.mean(-1)  # [N]: the centroid's targets
        self.p0, self.base_lse = softmax_lse(self.base, out=workspace.get("p0", self.base.shape, self.base))  # P [N, V], [N]
        # E_P[d_k] by an elementwise product and a sum: a batched matrix-vector product
        # takes a slow path on CPUs (20x at 32 rows here).
        self.base_mean = torch.mul(d, self.p0.unsqueeze(1), out=self.scratch()).sum(-1)  # [N, P]
        self.centred = d.sub_(self.base_mean.unsqueeze(-1))  # dc_k = d_k - E_P[d_k], [N, P, V]

    def scratch(self, rows: int | None = None) -> torch.Tensor:
        """A reusable ``[N, P, V]`` buffer for one pass, or its first ``rows`` (at most N P) rows as ``[rows, V]``."""
        buffer = self.workspace.get("scratch", self.shape, self.base)
        return buffer if rows is None else buffer.view(-1, buffer.shape[-1])[:rows]

    @property
    def base_cumulants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The second, third and fourth cumulants of d_k under P, each ``[N, P]`` (E_P[dc] = 0)."""
        if not hasattr(self, "_cumulants"):
            weighted = torch.mul(self.centred, self.p0.unsqueeze(1), out=self.scratch()).mul_(self.centred)
            var = weighted.sum(-1)
            third = weighted.mul_(self.centred).sum(-1)
            fourth = weighted.mul_(self.centred).sum(-1)
            self._cumulants = (var.clamp_min(1e-30), third, torch.addcmul(fourth, var, var, value=-3))
        return self._cumulants

    def reduced_loss(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(f - a)^2 + (g - b)^2, broadcasting ``[N]`` targets over trailing pair dims."""
        tf, tg = self.target_f, self.target_g
        while tf.dim() < f.dim():
            tf, tg = tf.unsqueeze(-1), tg.unsqueeze(-1)
        return (f - tf) ** 2 + (g - tg) ** 2

    def along_pairs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f and g of alpha = t_k e_k for every pair k at once: ``t [N, P] -> ([N, P], [N, P])``."""
        return tilt_kls(self.base.unsqueeze(1), self.centred, t, self.base_lse.unsqueeze(1), self.scratch())

    def _per_direction(self, tilt, rows: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """``tilt(base, centred, t, lse, out=base)`` over the listed (row, pair) directions at
        weights ``t`` (repeats allowed), in pieces of at most N P directions.

        Each piece's base rows and centred deltas are gathered with index_select into two
        reusable ``[N P, V]`` buffers (whole rows copied, far faster on a CPU than advanced
        indexing); the tilt overwrites the base rows in place. The working set stays 2 N P
        rows of V however many directions are asked (the adaptive schedule asks up to
        ``ADAPTIVE_POINTS`` per direction), or 2 ``ADAPTIVE_POINTS`` rows where N P is smaller.
        """
        n, p, v = self.shape
        flat = self.centred.view(n * p, v)
        # At least a direction's certification points at once: a row or two (decoding) would
        # otherwise pay a pass's fixed cost per point.
        size = max(n * p, ADAPTIVE_POINTS)
        pieces = []
        for start in range(0, len(rows), size):
            r, k = rows[start : start + size], pairs[start : start + size]
            into = self.scratch(len(r)) if len(r) <= n * p else self.workspace.get("scratch-points", (size, v), self.base)[: len(r)]
            base = torch.index_select(self.base, 0, r, out=into)
            centred = self.workspace.get("gathered", (size, v), self.base)[: len(r)]
            torch.index_select(flat, 0, r * p + k, out=centred)
            pieces.append(tilt(base, centred, t[start : start + size], self.base_lse.index_select(0, r), out=base))
        return [torch.cat(parts) for parts in zip(*pieces)] if len(pieces) > 1 else list(pieces[0])

    def stats_at(self, rows: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor) -> TiltStats:
        """Stats for the listed (row, pair) directions at weights ``t``."""
        return TiltStats(*self._per_direction(tilt_stats, rows, pairs, t))

    def values_at(self, rows: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor):
        """(f, g, g') for the listed (row, pair) directions at weights ``t``, first moments only."""
        return tuple(self._per_direction(tilt_values, rows, pairs, t))

    def stats_along_pairs(self, t: torch.Tensor) -> TiltStats:
        """f, g and derivatives along every pair's direction at ``t [N, P]``, one pass."""
        return tilt_stats(self.base.unsqueeze(1), self.centred, t, self.base_lse.unsqueeze(1), self.scratch())


def _one_hot_weights(t: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the pair with the lowest loss (first on ties) at its weight; others 0."""
    best = loss.argmin(-1, keepdim=True)  # [N, 1]
    return torch.zeros_like(t).scatter(-1, best, t.gather(-1, best))


# dlf-grid's points at most: each costs a pass over the vocabulary per pair and position.
MAX_GRID_POINTS = 1000


class GridSolver(_WorkspaceSolver):
    """``dlf-grid``: the paper as written.

    At every position, alpha = t e_k for t in {0, step, ..., alpha_max} and every pair
    k; keeps the (k, t) of lowest loss (ties: smaller t, then earlier pair), fresh at
    every position. One logsumexp pass per grid point and pair.

    Options: alpha_max (default 2.0), step (default 0.1).
    """

    name = "dlf-grid"

    def __init__(self, pair_names, *, alpha_max=2.0, step=0.1):
        super().__init__(pair_names)
        self.workspace = Workspace()
        self.alpha_max = number_option(self.name, "alpha_max", alpha_max, 0.0, 100.0)
        self.step = number_option(self.name, "step", step, 1e-6, 100.0)
        if self.alpha_max / self.step > MAX_GRID_POINTS:
            raise SolverOptionError(
                f"model_args alpha_max={alpha_max!r}, step={step!r} (solver {self.name!r}) make a grid of "
                f"{int(self.alpha_max / self.step) + 1:,} points, each a pass over the vocabulary per pair and "
                f"position; at most {MAX_GRID_POINTS:,} (the paper's grid has 21)"
            )
        self.grid = self.points(self.alpha_max, self.step)
        self.bounds = (0.0, self.grid[-1])
        self.passes = 0  # softmax evaluations over the full vocabulary, per row

    def working_rows(self, num_pairs: int) -> int:
        return 2 * num_pairs + 1  # _Problem's deltas and scratch [N, P, V], P [N, V]

    @staticmethod
    def points(alpha_max: float, step: float = 0.1) -> list[float]:
        """{0, step, ..., alpha_max}: the paper's 21 points by default."""
        return [i * step for i in range(int(round(alpha_max / step)) + 1)]

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        problem = _Problem(inputs, self.workspace)
        n = problem.base_mean.shape[0]
        zeros = problem.base_mean.new_zeros(n)
        best_loss = problem.reduced_loss(zeros, zeros)  # t = 0: f = g = 0
        best_t = problem.base_mean.new_zeros(n)
        best_k = torch.zeros(n, dtype=torch.long, device=best_t.device)
        for value in self.grid[1:]:
            t = torch.full_like(problem.base_mean, value)
            loss = problem.reduced_loss(*problem.along_pairs(t))  # [N, P]
            self.passes += t.shape[1]
            pair_loss, pair = loss.min(-1)
            better = pair_loss < best_loss
            best_loss = torch.where(better, pair_loss, best_loss)
            best_k = torch.where(better, pair, best_k)
            best_t = torch.where(better, torch.full_like(best_t, value), best_t)
        weights = torch.zeros_like(problem.base_mean)
        return weights.scatter(-1, best_k.unsqueeze(-1), best_t.unsqueeze(-1))


class ExactSolver(_WorkspaceSolver):
    """``dlf`` (the default): the grid's objective, solved continuously.

    Along one pair's direction the fused distribution is an exponential tilt of P, so
    f(t) and g(t) and their derivatives come from one pass over the vocabulary
    (``fusion.tilt_stats``). A safeguarded Halley iteration on the loss's derivative
    (Newton's where the third derivative does not help), started at the minimiser of a
    fourth-order cumulant model of f and g (no pass) and kept inside a bracket, converges
    to ``tol``; the bounds are candidates too. Then no point of the paper's grid may do
    better: those the evaluated points cannot rule out are evaluated. Per row the pair
    with the lowest loss acts, as in ``dlf-grid``, whose loss it never exceeds.

    Two schedules (option ``schedule``). ``adaptive`` stops each loop on values read
    from the device: Halley until no direction moves, certification until every grid
    point is ruled out, so the loss is never above ``dlf-grid``'s. ``fixed`` runs a fixed
    number of rounds of fixed shapes and never syncs (a GPU step can be queued ahead,
    captured or compiled); where its Halley rounds converge and its certification rounds
    rule every grid point out, the same guarantees hold. ``uncertified_rows`` marks, on
    the device, the rows where they did not (``uncertified`` counts those in ``row_mask``
    over calls). ``auto`` (default): adaptive on a CPU, where reading a value back costs
    nothing, fixed elsewhere.

    Options: alpha_min (default 0), alpha_max (default 2.0), tol (default 1e-7),
    max_iter (Halley rounds; default 30 adaptive, 8 fixed), schedule (default auto).
    """

    name = "dlf"

    def __init__(self, pair_names, *, alpha_min=0.0, alpha_max=2.0, tol=1e-7, max_iter=None, schedule="auto"):
        super().__init__(pair_names)
        self.workspace = Workspace()
        self.alpha_min, self.alpha_max = _bounds(self.name, alpha_min, alpha_max)
        self.tol = number_option(self.name, "tol", tol, 1e-12, 1.0)
        self.max_iter = None if max_iter is None else int(number_option(self.name, "max_iter", max_iter, 1, 1000))
        if schedule not in SCHEDULES:
            raise SolverOptionError(f"model_args schedule={schedule!r} (solver {self.name!r}) must be one of {', '.join(SCHEDULES)}")
        self.schedule = schedule
        self.bounds = (self.alpha_min, self.alpha_max)
        self.passes = 0  # softmax evaluations over the full vocabulary, per row
        self.uncertified = 0  # rows left uncertified by the fixed schedule (a device tensor once solving)
        self.uncertified_rows = None  # [N] bool, the last solve's

    def working_rows(self, num_pairs: int) -> int:
        # _Problem's deltas, scratch and gathered directions [N, P, V], P [N, V]; and for the
        # search's bounds ([N, P, 21, E], E points kept, which grows with P: the fixed schedule
        # certifies 2 P points a row and round) one row, and P^2 / 64 more, at V >= 32,000
        # (measured there with 8 Halley rounds: 51.8 rows at 16 pairs, 106.4 at 32).
        return 3 * num_pairs + 2 + num_pairs * num_pairs // 64

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        problem = _Problem(inputs, self.workspace)
        t, loss = self.solve_pairs(problem)
        return _one_hot_weights(t, loss)

    def _constant(self, name: str, like: torch.Tensor, build):
        """``build(dtype, device)``, made once per dtype and device and kept under ``name``."""
        key = (name, like.dtype, like.device)
        cache = self.__dict__.setdefault("_constants", {})
        if key not in cache:
            cache[key] = build(like.dtype, like.device)
        return cache[key]

    def _grid(self, like: torch.Tensor) -> torch.Tensor:
        """The paper's grid within the bounds, as a tensor like ``like``."""
        def build(dtype, device):
            points = [x for x in GridSolver.points(self.alpha_max) if x >= self.alpha_min]
            return torch.tensor(points, dtype=dtype, device=device)

        return self._constant("grid", like, build)

    def _model_points(self, dtype: torch.dtype, device: torch.device):
        """t at 201 points of the bounds and the powers of t the start's model needs."""
        t = torch.linspace(self.alpha_min, self.alpha_max, 201, dtype=dtype, device=device)
        t2 = t * t
        return t, t2 / 2, t2 * t / 6, t2 * t / 3, t2 * t2 / 24, t2 * t2 / 8

    def _start(self, problem: _Problem, tf: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        """Starting weight from the cumulant expansion at t = 0, no vocabulary pass.

        g(t) = logsumexp(z + t dc) - logsumexp(z) ~ k2 t^2 / 2 + k3 t^3 / 6 + k4 t^4 / 24 and
        f = t g' - g ~ k2 t^2 / 2 + k3 t^3 / 3 + k4 t^4 / 8 (k_n: cumulants of d under P); the
        start is the minimiser of (f - a)^2 + (g - b)^2 on that model among 201 points of the
        bounds (a search, not Newton: the quartic model may have several minima). The fourth
        cumulant saves a round in most directions against a cubic model (bench/solvers.py).
        """
        k2, k3, k4 = (k.unsqueeze(-1) for k in problem.base_cumulants)
        t, half, sixth, third, g4, f4 = self._constant("model", k2, self._model_points)
        common = k2 * half
        F = torch.addcmul(common, k3, third).addcmul_(k4, f4).sub_(tf.unsqueeze(-1))
        G = torch.addcmul(common, k3, sixth).addcmul_(k4, g4).sub_(tg.unsqueeze(-1))
        best = F.mul_(F).addcmul_(G, G).nan_to_num_(nan=float("inf")).argmin(-1)
        return t[best]

    def adaptive(self, device: torch.device) -> bool:
        """Whether to stop early on values read from the device (``schedule``)."""
        return self.schedule == "adaptive" or (self.schedule == "auto" and device.type == "cpu")

    def solve_pairs(self, problem: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """Best weight and reduced loss of each pair acting alone: ``([N, P], [N, P])``.

        Halley rounds over every direction, then rounds that each evaluate the grid points
        the evaluated ones cannot rule out (lowest bound first) and polish, near the best
        grid point, the directions where one did better. Adaptive: until nothing moves and
        no point is open. Fixed: ``max_iter`` Halley rounds, ``CERTIFY_ROUNDS`` rounds of a
        fixed number of points and directions per row, no device sync. Either way a row's
        answer does not depend on the other rows solved with it (the batch size, a
        speculative round's extra positions, finished rows still in the batch).
        """
        adaptive = self.adaptive(problem.base.device)
        search = _Search(problem, self.alpha_min, self.alpha_max, self.tol, adaptive)
        n, p = search.lo.shape
        rounds = self.max_iter or (ADAPTIVE_ROUNDS if adaptive else FIXED_ROUNDS)
        search.halley(self._start(problem, search.tf, search.tg), search.lo, search.hi, rounds)
        grid = self._grid(search.lo)
        radius = 0.1  # the paper grid's spacing: a better grid point's basin lies within it
        points = max(1, math.ceil(CERTIFY_POINTS * p))
        directions = max(1, math.ceil(POLISH_DIRECTIONS * p))
        for _ in itertools.count() if adaptive else range(CERTIFY_ROUNDS):
            gain = search.certify(grid, points)
            if gain is None:  # adaptive: every grid point ruled out
                break
            search.polish(gain, directions, radius, rounds if adaptive else POLISH_ROUNDS)
        if not adaptive:
            # Rows where a direction still moved after its last round, or a grid point might
            # still beat the answer: kept on the device, read by whoever asks; counted where
            # the weights matter (not rows that stopped generating).
            doubtful = search.moving.view(n, p) | search.open_points(grid).any(-1)
            self.uncertified_rows = doubtful.any(-1)
            self.uncertified = self.uncertified + (self.uncertified_rows & problem.row_mask).sum()
        self.passes += search.passes
        return search.best_t, search.best_loss


# Schedules. Adaptive: at most this many Halley rounds per direction, grid points certified
# per direction and round. Fixed: Halley rounds; certification rounds, with the grid points
# evaluated and the directions polished per row and round as multiples of the pairs
# (rounded up); Halley rounds per polish. Chosen on peaked logits (peaked_fusion_inputs,
# 57 rows, seeds 200-205, V = 8,000): 3 Halley rounds reach the adaptive loss to 1e-8;
# with these budgets 3 / 0 / 2 of 342 rows stay uncertified at 1 / 2 / 4 pairs (certified
# ones within 3.2e-7 of the adaptive loss), at 9.0 / 8.0 / 7.5 passes per direction against
# the grid's 20; on seeds 300-305, 1 / 4 / 1. One grid point per direction and row, the
# same total as the budget once shared over the batch, left 21 / 32 / 27 of 342 rows
# uncertified (seeds 300-305), as a batch of one row did before: a shared budget made
# weights depend on the other rows, and a row alone had little to spend.
# Halley rounds raised from 3 to 8 on the toy world's dev decoding (40 questions a task, 32
# tokens each, the adaptive schedule's positions): the real models' logits need more rounds
# than the peaked ones. Uncertified positions at 3 / 4 / 5 / 6 / 8 rounds: one pair, 23 /
# 15 / 9 / 6 / 4% (mean of the four tasks); four pairs (experts=all, toy_qa and toy_table), 68
# / 53 / 36 / 21 / 9%, where the fused argmax differed from the adaptive schedule's at 3.9 /
# 2.7 / 1.4 / 0.6 / 0.4% of positions. Per direction 5 more passes (14 / 13 / 12.5 on the
# peaked logits above, where nothing else changes).
ADAPTIVE_ROUNDS = 30
ADAPTIVE_POINTS = 4  # grid points certified per direction and round
FIXED_ROUNDS = 8
CERTIFY_ROUNDS = 2
CERTIFY_POINTS = 2.0
POLISH_DIRECTIONS = 0.125
POLISH_ROUNDS = 1
SCHEDULES = ("auto", "adaptive", "fixed")


class _Search:
    """Minimises L(t) = (f(t) - a)^2 + (g(t) - b)^2 along every pair's direction at once.

    Keeps every evaluated (t, f, g): f and g increase with t, so they bound the loss
    anywhere between evaluated points (``_bounds``). Every shape is fixed in advance:
    no step depends on a value read back from the device.
    """

    def __init__(self, problem: _Problem, low: float, high: float, tol: float, adaptive: bool) -> None:
        self.problem = problem
        self.adaptive = adaptive
        self.tf, self.tg = problem.target_f.unsqueeze(-1), problem.target_g.unsqueeze(-1)  # [N, 1]
        # Steps below this are rounding noise of the dtype, not progress (float32: ~1e-4,
        # where the loss itself changes by ~L'' 1e-8, below its own rounding).
        self.tol = max(tol, 1000 * torch.finfo(problem.base.dtype).eps)
        # A pass's own rounding of f and g, which a settled step's remainder must stay below.
        self.rounding = problem.base_lse.abs().add(1).unsqueeze(-1).mul_(4 * torch.finfo(problem.base.dtype).eps)
        self.low, self.high = low, high
        n, p = problem.base_mean.shape
        self.lo = problem.base_mean.new_full((n, p), low)
        self.hi = problem.base_mean.new_full((n, p), high)
        self.points: list[tuple[torch.Tensor, ...]] = []
        self.passes = 0.0
        self.best_t = self.lo.clone()
        self.best_loss = torch.full_like(self.lo, float("inf"))
        self.moving = torch.zeros(n * p, dtype=torch.bool, device=self.lo.device)  # not converged
        # Adaptive: only the directions of rows whose weights matter are iterated and
        # certified past the first pass; the others keep a valid weight they were evaluated at.
        self.relevant = problem.row_mask.repeat_interleave(p) if adaptive else torch.ones_like(self.moving)
        if low == 0.0:  # f = g = g' = 0 at t = 0, no pass needed
            zeros = torch.zeros_like(self.lo)
            self._record(self.lo, zeros, zeros, zeros)
        else:
            stats = problem.stats_along_pairs(self.lo)
            self.passes += p
            self._record(self.lo, stats.forward_kl, stats.reverse_kl, stats.d_reverse)

    def _record(self, t, f, g, dg):
        """Keep evaluated points, ``[N, P]`` or several per direction ``[N, P, M]`` (NaN where
        none); returns F = f - a, G = g - b, the loss and where the best improved."""
        several = t.dim() == 3
        self.points.append(tuple(x if several else x.unsqueeze(-1) for x in (t, f, g, dg)))
        tf, tg = (self.tf.unsqueeze(-1), self.tg.unsqueeze(-1)) if several else (self.tf, self.tg)
        F, G = f - tf, g - tg
        loss = torch.addcmul(F * F, G, G)
        if several:  # the best of each direction's points
            lowest, which = loss.nan_to_num(nan=float("inf")).min(-1, keepdim=True)
            t, loss = t.gather(-1, which).squeeze(-1), lowest.squeeze(-1)
        improved = loss < self.best_loss
        self.best_t = torch.where(improved, t, self.best_t)
        self.best_loss = torch.where(improved, loss, self.best_loss)
        return F, G, loss, improved

    def _scatter(self, pick: torch.Tensor, *values: torch.Tensor, per_direction: int = 0) -> list[torch.Tensor]:
        """Values at flat indices ``pick`` (distinct) of ``[N, P]`` (or ``[N, P, per_direction]``),
        NaN elsewhere."""
        n, p = self.lo.shape
        shape = (n, p, per_direction) if per_direction else (n, p)
        return [v.new_full((math.prod(shape),), float("nan")).index_copy_(0, pick, v).view(shape) for v in values]

    def halley(self, t, left, right, rounds: int, pick: torch.Tensor | None = None) -> None:
        """Safeguarded Halley (or Newton) steps on L' from ``t`` within [left, right] (all
        ``[N, P]``), for every direction (``pick`` None) or the flat directions ``pick``.

        The bracket holds the minimiser: h < 0 left of it, h >= 0 right of it. alpha_max is
        not evaluated up front: a step past it lands on it, and h there tells the rest. A
        step small enough is recorded from a Taylor expansion instead of a pass
        (``_settle``); a direction stops moving then, or when its step falls below ``tol``.
        Fixed schedule: ``rounds`` rounds over the chosen directions. Adaptive: after the
        first round, only the directions still moving, until none does.
        """
        n, p = self.lo.shape
        first = pick
        if pick is None:
            moving = self.relevant.clone()
        else:
            moving = torch.zeros(n * p, dtype=torch.bool, device=t.device).index_fill_(0, pick, True)
        # Updated out of place only: recorded points may be views of the state.
        state = [x.reshape(-1) for x in (t, left, right)] + [moving, torch.zeros_like(moving)]
        for round_ in range(rounds):
            if self.adaptive and round_ > 0:
                still = state[3].nonzero().flatten()
                if len(still) == 0:
                    break
                pick = None if 2 * len(still) > n * p else still
            if pick is None:
                self.passes += p
                values = [x.view(n, p) for x in state]
                stats = self.problem.stats_along_pairs(values[0])
                constants = (self.tf, self.tg, self.problem.base_cumulants[2], self.rounding)
                record = self._record
            else:
                self.passes += len(pick) / n
                values = [x[pick] for x in state]
                rows, pairs = pick // p, pick % p
                stats = self.problem.stats_at(rows, pairs, values[0])
                constants = (self.tf.view(-1)[rows], self.tg.view(-1)[rows], self.problem.base_cumulants[2].reshape(-1)[pick], self.rounding.view(-1)[rows])

                def record(*x, pick=pick):
                    return self._record(*self._scatter(pick, *x))

            values = self._step(*values, stats, *constants, record)
            if pick is None:
                state = [x.reshape(-1) for x in values]
            else:
                state = [full.index_put((pick,), new) for full, new in zip(state, values)]
        if not self.adaptive:  # directions this run left moving, for the uncertified rows
            ran = torch.zeros_like(self.moving)
            ran[slice(None) if first is None else first] = True
            self.moving = torch.where(ran, state[3], self.moving)

    def _step(self, t, left, right, moving, top_seen, stats, tf, tg, k4, rounding, record):
        """One Halley round from the pass ``stats`` at ``t``; returns the new
        (t, left, right, moving, top_seen)."""
        record(t, stats.forward_kl, stats.reverse_kl, stats.d_reverse)
        F, G = stats.forward_kl - tf, stats.reverse_kl - tg
        df, dg = stats.d_forward, stats.d_reverse
        h = torch.addcmul(F * df, G, dg)
        ddf, ddg = stats.dd_forward, stats.dd_reverse
        dh = (df * df).addcmul_(dg, dg).addcmul_(F, ddf).addcmul_(G, ddg)
        # f''' = 2 K3_t + t K4_t, with K4 under P for K4_t: a fourth moment in every pass would
        # cost more than the rounds Halley's step saves with this estimate (bench/solvers.py).
        dddf = torch.addcmul(2 * stats.ddd_reverse, t, k4)
        ddh = (df * ddf).addcmul_(dg, ddg).mul_(3).addcmul_(F, dddf).addcmul_(G, stats.ddd_reverse)
        falling = h < 0
        left = torch.where(falling, t, left)
        right = torch.where(falling, right, t)
        # Halley's method in s = t^2, where f and g are nearly linear (both ~ s Var_P[d] / 2).
        # With phi = dL/ds = h / t and c = t h' - h: phi' = c / (2 t^3) and
        # phi'' = (t^2 h'' - 3 c) / (4 t^5). Newton's step is -phi / phi' = -2 t^2 h / c;
        # Halley's divides it by 1 - phi phi'' / (2 phi'^2) = 1 - h (t^2 h'' - 3 c) / (2 c^2).
        # Where that divisor leaves [1/2, 4] (far from the root, or h'' lost to rounding): Newton.
        curvature = torch.addcmul(-h, t, dh)
        ratio = torch.div(h, curvature)
        divisor = torch.addcmul(curvature, t * t, ddh, value=-1 / 3).mul_(ratio).div_(curvature).mul_(1.5).add_(1)
        divisor = torch.where((divisor >= 0.5) & (divisor <= 4.0), divisor, 1.0)
        newton = (t * t).mul_(ratio.div_(divisor).mul_(-2).add_(1)).clamp_min_(0.0).sqrt_()
        top_seen = top_seen | (t == self.high)
        # A step within rounding noise of the bracket counts as inside (then clamped).
        inside = (curvature > 0) & (t > 0) & (newton >= left - self.tol) & (newton <= right + self.tol)
        newton = torch.clamp(newton, left, right)
        # Still falling, no Newton step within the bracket: try alpha_max itself first.
        to_top = falling & ~(inside | top_seen) & (right == self.high)
        target = torch.where(inside, newton, torch.where(to_top, self.high, (left + right).mul_(0.5)))
        target = torch.where(moving, target, t)
        moving = moving & ((target - t).abs() > self.tol)
        moving = moving & ~self._settle(t, target - t, stats, dddf, moving & inside, rounding, record)
        return target, left, right, moving, top_seen

    def _settle(self, t, step, stats, dddf, candidates, rounding, record) -> torch.Tensor:
        """Where a last step is so small that a Taylor expansion from ``t`` gives f, g and g' at
        ``t + step`` as exactly as a pass would, record that point from the expansion;
        returns where it did.

        f to second order, g' to second and g to third (g''' = K3 is exact); the remainder,
        estimated as (|f'''| + |K3|) |step|^3 / 6, must stay below the rounding of a pass,
        4 eps (1 + |logsumexp(z)|). In float32 that admits steps up to ~1e-2, which most
        directions' last step is (tests/test_solvers.py checks the values against float64).
        In float64, steps of ~1e-5 only.
        """
        cube = step.abs().pow_(3).div_(6)
        remainder = torch.addcmul(dddf.abs(), stats.ddd_reverse, stats.ddd_reverse.sign()).mul_(cube)
        chosen = candidates & (remainder <= rounding)
        half_sq = step * step / 2
        f = stats.forward_kl + stats.d_forward * step + stats.dd_forward * half_sq
        dg = stats.d_reverse + stats.dd_reverse * step + stats.ddd_reverse * half_sq
        g = stats.reverse_kl + stats.d_reverse * step + stats.dd_reverse * half_sq + stats.ddd_reverse * half_sq * step / 3
        nan = torch.full_like(t, float("nan"))
        record(*(torch.where(chosen, x, nan) for x in (t + step, f, g, dg)))
        return chosen

    def _bounds(self, grid):
        """Per direction and grid point, a lower bound of the loss there from the evaluated
        points, and whether the point is still open (not evaluated, bound below the best):
        ``([N, P, J], [N, P, J] bool)``.

        g is convex and increasing (g' = E_t[dc] >= 0, g'' = Var_t >= 0) and f = t g' - g.
        For u <= x <= v evaluated: g(x) lies between every tangent and the chord u-v, g'(x)
        in [g'(u), g'(v)], hence f(x) in [x g'(u) - g_hi, x g'(v) - g_lo] (and [f(u), f(v)]);
        L(x) is at least the squared distance from (a, b) to that box.
        """
        inf = float("inf")
        # [N, P, 4, E]: t, f, g, g' of every evaluated point, NaN where one was skipped.
        values = torch.stack([torch.cat(x, dim=-1) for x in zip(*self.points)], dim=-2)
        ts, gs, dgs = values[..., 0, :].unsqueeze(-2), values[..., 2, :].unsqueeze(-2), values[..., 3, :].unsqueeze(-2)
        x = grid.view(1, 1, -1, 1)  # [1, 1, J, 1]; evaluated points: [N, P, 1, E]
        below, above = ts <= x, ts >= x  # False for NaN
        u = torch.where(below, ts, -inf).argmax(-1)  # nearest evaluated point below, [N, P, J]
        v = torch.where(above, ts, inf).argmin(-1)  # and above (if any)
        has_v = above.any(-1)
        j = grid.numel()
        index = torch.cat([u, v], dim=-1).unsqueeze(-2).expand(*values.shape[:-2], 4, 2 * j)
        (tu, fu, gu, dgu), (tv, fv, gv, dgv) = (part.unbind(-2) for part in values.gather(-1, index).split(j, dim=-1))
        xs = x.squeeze(-1)
        chord = torch.addcmul(gu, gv - gu, (xs - tu).div_((tv - tu).clamp_min_(1e-30)))  # = g(u) when x = u
        g_high = torch.where(has_v, chord, inf)
        g_low = torch.maximum(torch.addcmul(gs, dgs, x - ts).nan_to_num_(nan=-inf).amax(-1), gu)
        f_low = torch.maximum(torch.addcmul(-g_high, xs, dgu), fu)
        f_high = torch.where(has_v, torch.minimum(torch.addcmul(-g_low, xs, dgv), fv), inf)
        a, b = self.tf.unsqueeze(-1), self.tg.unsqueeze(-1)
        # Squared distance from (a, b) to the box (clamping a into [f_low, f_high], b likewise).
        da = torch.maximum(torch.minimum(a, f_high), f_low).sub_(a)
        db = torch.maximum(torch.minimum(b, g_high), g_low).sub_(b)
        bound = da.mul_(da).addcmul_(db, db)
        seen = ((ts - x).abs_() <= self.tol).any(-1)  # grid point already evaluated
        best = self.best_loss.unsqueeze(-1)
        open_ = ~seen & (bound < best - self._loss_rounding(best))
        return bound, open_

    def _loss_rounding(self, loss: torch.Tensor) -> torch.Tensor:
        """How far rounding may move a loss ``[N, P, ...]`` computed from f and g: each is off
        by up to ``rounding`` (delta), so (f - a)^2 + (g - b)^2 by up to 2 delta (|F| + |G|) +
        2 delta^2 <= 2 delta sqrt(2 L) + 2 delta^2; taken as 8 delta (sqrt(L) + delta), about
        three times that, plus the sum's own rounding. Near the optimum L is tiny (1e-7 on the toy world), far below any
        margin fixed in absolute terms: one of 1e3 eps (1e-4 in float32) closed every grid
        point wherever the best loss was under it, and certified rows dlf-grid beats."""
        delta = self.rounding.view(-1, *([1] * (loss.dim() - 1)))
        return loss.sqrt().add_(delta).mul_(delta).mul_(8).add_(loss, alpha=64 * torch.finfo(loss.dtype).eps)

    def open_points(self, grid) -> torch.Tensor:
        """``[N, P, J]`` bool: grid points that might still beat the answer."""
        return self._bounds(grid)[1]

    def certify(self, grid, budget: int) -> torch.Tensor | None:
        """Evaluate open grid points, lowest bound first, in one pass (f, g and g' only);
        returns how much each direction's best loss fell, ``[N, P]``, or None (adaptive
        schedule) when no point is open.

        Adaptive: up to ``ADAPTIVE_POINTS`` per direction. Fixed: the ``budget`` lowest of
        each row (over its directions); where fewer are open, the rest of the pass evaluates
        closed ones, which only adds information.
        """
        n, p = self.lo.shape
        bound, open_ = self._bounds(grid)
        open_ &= self.relevant.view(n, p, 1)
        j = grid.numel()
        scores = torch.where(open_, bound, float("inf"))
        # The points are kept as [N, P, k], k per direction (the k-th of a direction's picks,
        # or of its row's with the fixed schedule), not on the grid's J columns: the bounds'
        # [N, P, J, E] work grows with E, the points kept.
        if self.adaptive:  # the few lowest bounds of each direction: each evaluation may rule out the rest
            k = min(ADAPTIVE_POINTS, j)
            ranked, column = scores.topk(k, dim=-1, largest=False)  # [N, P, k]
            chosen = ranked < float("inf")
            pick = (torch.arange(n * p, device=column.device).view(n, p, 1) * j + column)[chosen]
            if len(pick) == 0:
                return None
            slots = torch.arange(n * p * k, device=column.device)[chosen.view(-1)]
        else:
            k = min(budget, p * j)
            pick = _per_row(scores.view(n, p * j), budget, largest=False)  # row by row, k each
            slots = pick // j * k + torch.arange(k, device=pick.device).repeat(n)
        direction, column = pick // j, pick % j
        t = grid[column]
        f, g, dg = self.problem.values_at(direction // p, direction % p, t)
        self.passes += len(pick) / n
        before = self.best_loss
        self._record(*self._scatter(slots, t, f, g, dg, per_direction=k))
        return before - self.best_loss

    def polish(self, gain, budget: int, radius: float, rounds: int) -> None:
        """Halley within ``radius`` of the best point for the directions whose best fell in
        ``certify`` (a better basin found on the grid): all of them (adaptive), or the
        ``budget`` of each row that fell the most (fixed)."""
        n, p = self.lo.shape
        if self.adaptive:
            pick = (gain > 0).view(-1).nonzero().flatten()
            if len(pick) == 0:
                return
        else:
            pick = _per_row(gain, budget, largest=True)
        t = self.best_t
        self.halley(t, (t - radius).clamp_min(self.low), (t + radius).clamp_max(self.high), rounds, pick)


def _per_row(scores: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Flat indices into ``scores [N, C]`` of each row's ``count`` largest (or smallest)."""
    n, c = scores.shape
    column = scores.topk(min(count, c), dim=-1, largest=largest).indices
    return column.add_(torch.arange(n, device=column.device).unsqueeze(1) * c).flatten()


class JointSolver(_WorkspaceSolver):
    """``dlf-joint``: all pairs' weights at once, box-constrained, on the centroid loss.

    With s = z_L + sum_k alpha_k d_k, m = logsumexp(s) - logsumexp(z_L):
        f(alpha) = alpha . E_alpha[d] - m       grad f = Cov_alpha(d) alpha
        g(alpha) = m - alpha . E_P[d]           grad g = E_alpha[d] - E_P[d]
    Starts from the exact one-pair solution (``dlf``) and takes projected
    Levenberg-Marquardt steps on the residuals (f - a, g - b), accepting a step only
    where it lowers the loss: never worse than one pair per position.

    Options: alpha_min (0), alpha_max (2.0), max_iter (4 steps, always all of them: each
    costs one pass with P V work; more steps lower the loss slowly), tol (1e-7, for the
    one-pair start).
    """

    name = "dlf-joint"

    def __init__(self, pair_names, *, alpha_min=0.0, alpha_max=2.0, max_iter=4, tol=1e-7, schedule="auto"):
        super().__init__(pair_names)
        self.workspace = Workspace()
        self.alpha_min, self.alpha_max = _bounds(self.name, alpha_min, alpha_max)
        self.max_iter = int(number_option(self.name, "max_iter", max_iter, 0, 1000))
        self.tol = number_option(self.name, "tol", tol, 1e-12, 1.0)
        self.bounds = (self.alpha_min, self.alpha_max)
        self._one_pair = ExactSolver(pair_names, alpha_min=self.alpha_min, alpha_max=self.alpha_max, tol=tol, schedule=schedule)
        self.schedule = schedule
        self.passes = 0  # softmax evaluations over the full vocabulary, per row

    @property
    def uncertified(self):
        """Rows the one-pair start's fixed schedule left uncertified (see ``dlf``)."""
        return self._one_pair.uncertified

    def working_rows(self, num_pairs: int) -> int:
        return 3 * num_pairs + 3  # the one-pair start's, the fused row and its offset [N, V]

    def _state(self, problem: _Problem, w: torch.Tensor):
        """Loss, residuals [N, 2] and Jacobian [N, 2, P] at weights ``w [N, P]``: one pass."""
        self.passes += 1
        dc = problem.centred  # [N, P, V]
        offset = torch.bmm(w.unsqueeze(1), dc).squeeze(1)  # u = sum_k w_k dc_k, [N, V]
        fused = torch.add(problem.base, offset, out=problem.workspace.get("fused", problem.base.shape, problem.base))
        p, lse = softmax_lse(fused, out=fused)  # P~ = softmax(z + u)
        weighted = torch.mul(dc, p.unsqueeze(1), out=problem.scratch())  # p dc_k, [N, P, V]
        mean = weighted.sum(-1)  # E_w[dc_k] = E_w[d_k] - E_P[d_k]
        # grad f = Cov_w(d) w = Cov_w(dc_k, u): no P x P covariance needed.
        mean_u = (w * mean).sum(-1)  # E_w[u]
        cov_w = weighted.mul_(offset.unsqueeze(1)).sum(-1).sub_(mean * mean_u.unsqueeze(-1))
        shift = lse - problem.base_lse
        f = (mean_u - shift).clamp_min(0.0)
        g = shift.clamp_min(0.0)
        residual = torch.stack([f - problem.target_f, g - problem.target_g], dim=-1)
        jacobian = torch.stack([cov_w, mean], dim=1)
        return (residual**2).sum(-1), residual, jacobian

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        problem = _Problem(inputs, self.workspace)
        t, loss = self._one_pair.solve_pairs(problem)
        self.passes += self._one_pair.passes
        self._one_pair.passes = 0
        w = _one_hot_weights(t, loss)
        if w.shape[1] < 2 or self.max_iter == 0:
            return w
        loss, residual, jacobian = self._state(problem, w)
        damping = torch.full_like(loss, 1e-3).unsqueeze(-1)  # [N, 1], relative to the scale of J^T J
        tiny = torch.finfo(w.dtype).tiny ** 0.5
        for _ in range(self.max_iter):
            jt = jacobian.transpose(1, 2)
            jtj = jt @ jacobian  # [N, P, P]
            grad = (jt @ residual.unsqueeze(-1)).squeeze(-1)  # [N, P]
            diagonal = jtj.diagonal(dim1=1, dim2=2)  # [N, P]
            # Marquardt's damping of the diagonal plus a ridge at its mean: J^T J has rank <= 2,
            # the ridge keeps the system positive definite for any P.
            ridge = diagonal.mean(-1, keepdim=True).add_(tiny)
            system = jtj + torch.diag_embed(diagonal.add(ridge).mul_(damping))
            step = torch.linalg.solve_ex(system, -grad.unsqueeze(-1))[0].squeeze(-1)
            step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
            trial = (w + step).clamp(self.alpha_min, self.alpha_max)
            trial_loss, trial_residual, trial_jacobian = self._state(problem, trial)
            accept = trial_loss < loss  # [N]
            loss = torch.where(accept, trial_loss, loss)
            accept = accept.unsqueeze(-1)
            w = torch.where(accept, trial, w)
            residual = torch.where(accept, trial_residual, residual)
            jacobian = torch.where(accept.unsqueeze(-1), trial_jacobian, jacobian)
            damping = torch.where(accept, (damping / 3).clamp_min_(1e-7), damping * 4)
        return w
