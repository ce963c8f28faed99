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
        """A reusable ``[N, P, V]`` buffer for one pass, or its first ``rows`` rows as ``[rows, V]``."""
        if rows is not None and rows > self.shape[0] * self.shape[1]:
            return self.workspace.get("scratch-points", (rows, self.shape[-1]), self.base)
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

    def _directions(self, rows: torch.Tensor, pairs: torch.Tensor):
        """Base logits, centred deltas and base logsumexp of the listed (row, pair) directions.

        Gathered with index_select on flattened views (whole rows copied, far faster on a CPU
        than advanced indexing); the base rows land in the pass's scratch, which the tilt
        then overwrites in place (one multi-megabyte tensor fewer per pass).
        """
        n, p, v = self.shape
        base = torch.index_select(self.base, 0, rows, out=self.scratch(len(rows)))
        centred = self.centred.view(n * p, v).index_select(0, rows * p + pairs)
        return base, centred, self.base_lse.index_select(0, rows)

    def stats_at(self, rows: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor) -> TiltStats:
        """Stats for the listed (row, pair) directions at weights ``t`` (repeats allowed), one pass."""
        base, centred, lse = self._directions(rows, pairs)
        return tilt_stats(base, centred, t, lse, out=base)

    def values_at(self, rows: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor):
        """(f, g, g') for the listed (row, pair) directions at weights ``t``, one first-moment pass."""
        base, centred, lse = self._directions(rows, pairs)
        return tilt_values(base, centred, t, lse, out=base)

    def stats_along_pairs(self, t: torch.Tensor, active: torch.Tensor | None = None) -> TiltStats:
        """f, g and derivatives along every pair's direction at ``t [N, P]``.

        With ``active [N, P]``, only those directions are computed when they are few (the
        others come back NaN): late iterations touch a handful of directions.
        """
        full = active is None or bool(active.all())
        if full or 2 * int(active.sum()) > active.numel():
            stats = tilt_stats(self.base.unsqueeze(1), self.centred, t, self.base_lse.unsqueeze(1), self.scratch())
            if full:
                return stats
            nan = torch.tensor(float("nan"), dtype=t.dtype, device=t.device)
            return TiltStats(*(torch.where(active, x, nan) for x in stats))
        rows, pairs = active.nonzero(as_tuple=True)
        part = torch.stack(self.stats_at(rows, pairs, t[rows, pairs]), dim=-1)  # [R, fields]
        values = t.new_full((*t.shape, part.shape[-1]), float("nan"))
        values[rows, pairs] = part
        return TiltStats(*values.unbind(-1))

def _one_hot_weights(t: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the pair with the lowest loss (first on ties) at its weight; others 0."""
    best = loss.argmin(-1, keepdim=True)  # [N, 1]
    return torch.zeros_like(t).scatter(-1, best, t.gather(-1, best))


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
        self.grid = self.points(self.alpha_max, self.step)
        self.bounds = (0.0, self.grid[-1])
        self.passes = 0  # softmax evaluations over the full vocabulary, per row

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

    Options: alpha_min (default 0), alpha_max (default 2.0), tol (default 1e-7),
    max_iter (default 30).
    """

    name = "dlf"

    def __init__(self, pair_names, *, alpha_min=0.0, alpha_max=2.0, tol=1e-7, max_iter=30):
        super().__init__(pair_names)
        self.workspace = Workspace()
        self.alpha_min, self.alpha_max = _bounds(self.name, alpha_min, alpha_max)
        self.tol = number_option(self.name, "tol", tol, 1e-12, 1.0)
        self.max_iter = int(number_option(self.name, "max_iter", max_iter, 1, 1000))
        self.bounds = (self.alpha_min, self.alpha_max)
        self.passes = 0  # softmax evaluations over the full vocabulary, per row

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

    def solve_pairs(self, problem: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """Best weight and reduced loss of each pair acting alone: ``([N, P], [N, P])``."""
        search = _Search(problem, self.alpha_min, self.alpha_max, self.tol)
        search.newton(self._start(problem, search.tf, search.tg), self.max_iter)
        grid = self._grid(search.lo)
        # The loss may have several local minima (peaked logits): make sure no point of the
        # paper's grid beats the answer, evaluating those the evaluated points cannot rule out.
        while True:
            candidates, pending, complete = search.unresolved(grid, CERTIFY_PER_ROUND)
            if not bool(pending.any()):
                break
            improved = search.evaluate_points(candidates, pending)
            if bool(improved.any()):  # a better basin: polish its minimum
                step = float(grid[1] - grid[0]) if len(grid) > 1 else 0.0
                search.newton(search.best_t, self.max_iter, active=improved, radius=step)
            elif complete:  # every open point evaluated, none better: all certified
                break
        self.passes += search.passes
        return search.best_t, search.best_loss


# Grid points certified per round: a round is one pass over the directions that need it.
CERTIFY_PER_ROUND = 4


class _Search:
    """Minimises L(t) = (f(t) - a)^2 + (g(t) - b)^2 along every pair's direction at once.

    Keeps every evaluated (t, f, g): f and g increase with t, so they bound the loss
    anywhere between evaluated points (``unresolved``).
    """

    def __init__(self, problem: _Problem, low: float, high: float, tol: float) -> None:
        self.problem = problem
        self.tf, self.tg = problem.target_f.unsqueeze(-1), problem.target_g.unsqueeze(-1)  # [N, 1]
        # Steps below this are rounding noise of the dtype, not progress (float32: ~1e-4,
        # where the loss itself changes by ~L'' 1e-8, below its own rounding).
        self.tol = max(tol, 1000 * torch.finfo(problem.base.dtype).eps)
        # A pass's own rounding of f and g, which a settled step's remainder must stay below.
        self.rounding = problem.base_lse.abs().add(1).unsqueeze(-1).mul_(4 * torch.finfo(problem.base.dtype).eps)
        self.low, self.high = low, high
        self.lo = torch.full_like(problem.base_mean, low)
        self.hi = torch.full_like(problem.base_mean, high)
        self.points = []  # (t, f, g, g') per evaluation, each [N, P, points]
        self.passes = 0
        self.best_t = self.lo.clone()
        self.best_loss = torch.full_like(self.lo, float("inf"))
        if low == 0.0:  # f = g = g' = 0 at t = 0, no pass needed
            zeros = torch.zeros_like(self.lo)
            self._record(self.lo, zeros, zeros, zeros)
        else:
            self.evaluate(self.lo)

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

    def evaluate(self, t, active=None):
        """One pass: loss, h = dL/dt / 2, its derivatives h' and h'' (the latter approximate)
        and whether the best improved, at ``t [N, P]`` (NaN for directions not ``active``)."""
        share = 1.0 if active is None else float(active.float().mean())
        self.passes += t.shape[1] * share  # passes over the vocabulary, per row
        stats = self.problem.stats_along_pairs(t, active)
        if active is not None:
            t = torch.where(active, t, torch.full_like(t, float("nan")))
        F, G, loss, improved = self._record(t, stats.forward_kl, stats.reverse_kl, stats.d_reverse)
        df, dg = stats.d_forward, stats.d_reverse
        h = torch.addcmul(F * df, G, dg)
        ddf, ddg = stats.dd_forward, stats.dd_reverse
        dh = (df * df).addcmul_(dg, dg).addcmul_(F, ddf).addcmul_(G, ddg)
        # f''' = 2 K3_t + t K4_t, with K4 under P for K4_t: a fourth moment in every pass would
        # cost more than the rounds Halley's step saves with this estimate (bench/solvers.py).
        dddf = torch.addcmul(2 * stats.ddd_reverse, t, self.problem.base_cumulants[2])
        ddh = (df * ddf).addcmul_(dg, ddg).mul_(3).addcmul_(F, dddf).addcmul_(G, stats.ddd_reverse)
        return loss, h, dh, ddh, improved, (stats, dddf)

    def settle(self, t, step, stats, dddf, candidates):
        """Where a last step is so small that a Taylor expansion from ``t`` gives f, g and g' at
        ``t + step`` as exactly as a pass would, record that point from the expansion instead
        of evaluating it: returns the ``candidates`` that settled.

        f to second order, g' to second and g to third (g''' = K3 is exact); the remainder,
        estimated as (|f'''| + |K3|) |step|^3 / 6, must stay below the rounding of a pass,
        4 eps (1 + |logsumexp(z)|). In float32 that admits steps up to ~1e-2, which most
        directions' first step is (the start is that close): their confirming pass is saved
        (tests/test_solvers.py checks the values against float64). In float64, steps of ~1e-5 only.
        """
        cube = step.abs().pow_(3).div_(6)
        remainder = torch.addcmul(dddf.abs(), stats.ddd_reverse, stats.ddd_reverse.sign()).mul_(cube)
        chosen = candidates & (remainder <= self.rounding)
        if not bool(chosen.any()):
            return chosen
        half_sq = step * step / 2
        f = stats.forward_kl + stats.d_forward * step + stats.dd_forward * half_sq
        dg = stats.d_reverse + stats.dd_reverse * step + stats.ddd_reverse * half_sq
        g = stats.reverse_kl + stats.d_reverse * step + stats.dd_reverse * half_sq + stats.ddd_reverse * half_sq * step / 3
        nan = torch.full_like(t, float("nan"))
        self._record(*(torch.where(chosen, x, nan) for x in (t + step, f, g, dg)))
        return chosen

    def newton(self, t, max_iter, active=None, radius=None):
        """Safeguarded Halley (or Newton) steps on L' from ``t``, for the ``active`` directions
        (default all).

        The bracket holds the minimiser: h < 0 left of it, h >= 0 right of it. alpha_max is
        not evaluated up front: a step past it lands on it, and h there tells the rest.
        Written with fused operations: at a few rows each operation's overhead, not the
        vocabulary pass, is what costs.
        """
        active = torch.ones_like(t, dtype=torch.bool) if active is None else active
        left, right = self.lo.clone(), self.hi.clone()
        if radius is not None:
            left, right = (t - radius).clamp_min(self.low), (t + radius).clamp_max(self.high)
        top_seen = torch.zeros_like(active)
        moving = active
        for _ in range(max_iter):
            _, h, dh, ddh, _, (stats, dddf) = self.evaluate(t, None if bool(moving.all()) else moving)
            falling = h < 0
            left = torch.where(falling, t, left)
            right = torch.where(falling, right, t)
            # Halley's method in s = t^2, where f and g are nearly linear (both ~ s Var_P[d] / 2).
            # With phi = dL/ds = h / t and c = t h' - h: phi' = c / (2 t^3) and
            # phi'' = (t^2 h'' - 3 c) / (4 t^5). Newton's step is -phi / phi' = -2 t^2 h / c;
            # Halley's divides it by 1 - phi phi'' / (2 phi'^2) = 1 - h (t^2 h'' - 3 c) / (2 c^2).
            # Cubic convergence saves the slow directions (far starts) a round or two; where
            # that divisor leaves [1/2, 4] (far from the root, or h'' lost to rounding): Newton.
            curvature = torch.addcmul(-h, t, dh)
            ratio = torch.div(h, curvature)
            divisor = torch.addcmul(curvature, t * t, ddh, value=-1 / 3).mul_(ratio).div_(curvature).mul_(1.5).add_(1)
            divisor = torch.where((divisor >= 0.5) & (divisor <= 4.0), divisor, 1.0)
            newton = (t * t).mul_(ratio.div_(divisor).mul_(-2).add_(1)).clamp_min_(0.0).sqrt_()
            top_seen |= t == self.high
            # A step within rounding noise of the bracket counts as inside (then clamped).
            inside = (curvature > 0) & (t > 0) & (newton >= left - self.tol) & (newton <= right + self.tol)
            newton = torch.clamp(newton, left, right)
            # Still falling, no Newton step within the bracket: try alpha_max itself first.
            to_top = falling & ~(inside | top_seen) & (right == self.high)
            target = torch.where(inside, newton, torch.where(to_top, self.hi, (left + right).mul_(0.5)))
            target = torch.where(moving, target, t)
            moving = (target - t).abs_() > self.tol
            moving &= ~self.settle(t, target - t, stats, dddf, moving & inside)
            t = target
            if not bool(moving.any()):
                break

    def unresolved(self, grid, count: int = 1):
        """Per direction, up to ``count`` grid points whose loss the evaluated points cannot
        bound above the best loss (lowest bounds first), which of them are real, and whether
        that was every such point.

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
        open_ = ~seen & (bound < best - 1e3 * torch.finfo(values.dtype).eps * (1 + best))
        complete = bool((open_.sum(-1) <= count).all())
        count = min(count, j)
        ranked, pick = torch.where(open_, bound, inf).topk(count, dim=-1, largest=False)
        return grid[pick], ranked < inf, complete  # [N, P, count] each, bool

    def evaluate_points(self, t: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        """Evaluate several points per direction in one pass over the chosen ones (f, g and
        g' only): ``t, pending [N, P, M]``; returns where the best improved, ``[N, P]``."""
        rows, pairs, slots = pending.nonzero(as_tuple=True)
        self.passes += len(rows) / pending.shape[0]
        chosen = t[rows, pairs, slots]
        part = torch.stack(self.problem.values_at(rows, pairs, chosen), dim=-1)  # [R, 3]
        values = t.new_full((*t.shape, 3), float("nan"))
        values[rows, pairs, slots] = part
        return self._record(torch.where(pending, t, float("nan")), *values.unbind(-1))[3]


class JointSolver(_WorkspaceSolver):
    """``dlf-joint``: all pairs' weights at once, box-constrained, on the centroid loss.

    With s = z_L + sum_k alpha_k d_k, m = logsumexp(s) - logsumexp(z_L):
        f(alpha) = alpha . E_alpha[d] - m       grad f = Cov_alpha(d) alpha
        g(alpha) = m - alpha . E_P[d]           grad g = E_alpha[d] - E_P[d]
    Starts from the exact one-pair solution (``dlf``) and takes projected
    Levenberg-Marquardt steps on the residuals (f - a, g - b), accepting a step only
    where it lowers the loss: never worse than one pair per position.

    Options: alpha_min (0), alpha_max (2.0), max_iter (4: each step costs one pass with
    P V work; more steps lower the loss slowly), tol (1e-7).
    """

    name = "dlf-joint"

    def __init__(self, pair_names, *, alpha_min=0.0, alpha_max=2.0, max_iter=4, tol=1e-7):
        super().__init__(pair_names)
        self.workspace = Workspace()
        self.alpha_min, self.alpha_max = _bounds(self.name, alpha_min, alpha_max)
        self.max_iter = int(number_option(self.name, "max_iter", max_iter, 0, 1000))
        self.tol = number_option(self.name, "tol", tol, 1e-12, 1.0)
        self.bounds = (self.alpha_min, self.alpha_max)
        self._one_pair = ExactSolver(pair_names, alpha_min=self.alpha_min, alpha_max=self.alpha_max, tol=tol)
        self.passes = 0  # softmax evaluations over the full vocabulary, per row

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
            moved = (trial - w).abs().amax(-1)
            loss = torch.where(accept, trial_loss, loss)
            accept = accept.unsqueeze(-1)
            w = torch.where(accept, trial, w)
            residual = torch.where(accept, trial_residual, residual)
            jacobian = torch.where(accept.unsqueeze(-1), trial_jacobian, jacobian)
            damping = torch.where(accept, (damping / 3).clamp_min_(1e-7), damping * 4)
            if not bool((moved > self.tol).any()):
                break
        return w
