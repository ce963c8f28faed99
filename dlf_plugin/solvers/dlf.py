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

import dataclasses

import torch

from dlf_plugin.fusion import FusionInputs, TiltStats, kl_targets, logit_deltas, shifted_exp_, tilt_kls, tilt_stats
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
        self.p0, top = shifted_exp_(workspace.get("p0", self.base.shape, self.base).copy_(self.base))  # P, [N, V]
        total = self.p0.sum(-1, keepdim=True)
        self.p0.div_(total)
        self.base_lse = (top + total.log()).squeeze(-1)  # [N]
        self.base_mean = (d @ self.p0.unsqueeze(-1)).squeeze(-1)  # E_P[d_k], [N, P]
        self.centred = d.sub_(self.base_mean.unsqueeze(-1))  # dc_k = d_k - E_P[d_k], [N, P, V]

    def scratch(self, rows: int | None = None) -> torch.Tensor:
        """A reusable ``[N, P, V]`` buffer for one pass, or its first ``rows`` rows as ``[rows, V]``."""
        if rows is not None and rows > self.shape[0] * self.shape[1]:
            return self.workspace.get("scratch-points", (rows, self.shape[-1]), self.base)
        buffer = self.workspace.get("scratch", self.shape, self.base)
        return buffer if rows is None else buffer.view(-1, buffer.shape[-1])[:rows]

    @property
    def base_cumulants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Var_P[d_k] and the third central moment of d_k under P, each ``[N, P]`` (E_P[dc] = 0)."""
        if not hasattr(self, "_cumulants"):
            weighted = torch.mul(self.centred, self.p0.unsqueeze(1), out=self.scratch()).mul_(self.centred)
            var = weighted.sum(-1)
            third = weighted.mul_(self.centred).sum(-1)
            self._cumulants = (var.clamp_min(1e-30), third)
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

    def stats_at(self, rows: torch.Tensor, pairs: torch.Tensor, t: torch.Tensor) -> TiltStats:
        """Stats for the listed (row, pair) directions at weights ``t`` (repeats allowed), one pass.

        Gathers with index_select on flattened views: whole rows copied, far faster on a
        CPU than advanced indexing.
        """
        n, p, v = self.shape
        flat = rows * p + pairs
        return tilt_stats(
            self.base.index_select(0, rows),
            self.centred.view(n * p, v).index_select(0, flat),
            t,
            self.base_lse.index_select(0, rows),
            self.scratch(len(rows)),
        )

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
            return TiltStats(*(torch.where(active, x, nan) for x in dataclasses.astuple(stats)))
        rows, pairs = active.nonzero(as_tuple=True)
        part = self.stats_at(rows, pairs, t[rows, pairs])
        out = []
        for x in dataclasses.astuple(part):
            values = torch.full_like(t, float("nan"))
            values[rows, pairs] = x
            out.append(values)
        return TiltStats(*out)

def _one_hot_weights(t: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the pair with the lowest loss (first on ties) at its weight; others 0."""
    best = loss.argmin(-1, keepdim=True)  # [N, 1]
    return torch.zeros_like(t).scatter(-1, best, t.gather(-1, best))


class GridSolver(Solver):
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


class ExactSolver(Solver):
    """``dlf`` (the default): the grid's objective, solved continuously.

    Along one pair's direction the fused distribution is an exponential tilt of P, so
    f(t) and g(t) and their derivatives come from one pass over the vocabulary
    (``fusion.tilt_stats``). A safeguarded Newton iteration on the loss's derivative,
    started at t0 = sqrt((a + b) / Var_P[d]) (where f ~ g ~ t^2 Var_P[d] / 2) and kept
    inside a bracket, converges to ``tol``; the bounds are candidates too. Per row the
    pair with the lowest loss acts, as in ``dlf-grid``, whose loss it never exceeds
    up to the tolerance.

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

    def _grid(self, like: torch.Tensor) -> torch.Tensor:
        """The paper's grid within the bounds, as a tensor like ``like`` (built once)."""
        key = (like.dtype, like.device)
        if getattr(self, "_grid_key", None) != key:
            points = [x for x in GridSolver.points(self.alpha_max) if x >= self.alpha_min]
            self._grid_tensor, self._grid_key = torch.tensor(points, dtype=like.dtype, device=like.device), key
        return self._grid_tensor

    @staticmethod
    def _start(problem: _Problem, tf: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
        """Starting weight from the cumulant expansion at t = 0, no vocabulary pass.

        f ~ k2 t^2 / 2 + k3 t^3 / 3 and g ~ k2 t^2 / 2 + k3 t^3 / 6 (k_n: cumulants of d
        under P); a few scalar Newton steps minimise (f - a)^2 + (g - b)^2 on that model.
        """
        k2, k3 = problem.base_cumulants
        t = torch.sqrt((tf + tg) / k2)
        for _ in range(2):
            t2, t3 = t * t, t * t * t
            F, G = k2 * t2 / 2 + k3 * t3 / 3 - tf, k2 * t2 / 2 + k3 * t3 / 6 - tg
            df, dg = k2 * t + k3 * t2, k2 * t + k3 * t2 / 2
            grad = F * df + G * dg
            hess = df * df + dg * dg + F * (k2 + 2 * k3 * t) + G * (k2 + k3 * t)
            t = torch.where(hess > 0, (t - grad / hess).clamp(0.0, 100.0), t)
        return torch.nan_to_num(t, nan=0.0)

    def solve_pairs(self, problem: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """Best weight and reduced loss of each pair acting alone: ``([N, P], [N, P])``."""
        search = _Search(problem, self.alpha_min, self.alpha_max, self.tol)
        search.newton(self._start(problem, search.tf, search.tg).clamp(self.alpha_min, self.alpha_max), self.max_iter)
        grid = self._grid(search.lo)
        # The loss may have several local minima (peaked logits): make sure no point of the
        # paper's grid beats the answer, evaluating those the evaluated points cannot rule out.
        while True:
            candidates, pending = search.unresolved(grid, CERTIFY_PER_ROUND)
            if not bool(pending.any()):
                break
            improved = search.evaluate_points(candidates, pending)
            if bool(improved.any()):  # a better basin: polish its minimum
                step = float(grid[1] - grid[0]) if len(grid) > 1 else 0.0
                search.newton(search.best_t, self.max_iter, active=improved, radius=step)
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
        self.low, self.high = low, high
        self.lo = torch.full_like(problem.base_mean, low)
        self.hi = torch.full_like(problem.base_mean, high)
        self.ts, self.fs, self.gs, self.dgs = [], [], [], []
        self.passes = 0
        self.best_t = self.lo.clone()
        self.best_loss = torch.full_like(self.lo, float("inf"))
        if low == 0.0:  # f = g = g' = 0 at t = 0, no pass needed
            zeros = torch.zeros_like(self.lo)
            self._record(self.lo, zeros, zeros, zeros)
        else:
            self.evaluate(self.lo)

    def _record(self, t, f, g, dg):
        self.ts.append(t)
        self.fs.append(f)
        self.gs.append(g)
        self.dgs.append(dg)
        loss = (f - self.tf) ** 2 + (g - self.tg) ** 2
        improved = loss < self.best_loss
        self.best_t = torch.where(improved, t, self.best_t)
        self.best_loss = torch.where(improved, loss, self.best_loss)
        return loss, improved

    def evaluate(self, t, active=None):
        """One pass: loss, h = L'/2, h' = L''/2 and whether the best improved, at ``t [N, P]``
        (NaN for directions not ``active``)."""
        share = 1.0 if active is None else float(active.float().mean())
        self.passes += t.shape[1] * share  # passes over the vocabulary, per row
        stats = self.problem.stats_along_pairs(t, active)
        if active is not None:
            t = torch.where(active, t, torch.full_like(t, float("nan")))
        loss, improved = self._record(t, stats.forward_kl, stats.reverse_kl, stats.d_reverse)
        F, G = stats.forward_kl - self.tf, stats.reverse_kl - self.tg
        h = F * stats.d_forward + G * stats.d_reverse
        dh = stats.d_forward**2 + stats.d_reverse**2 + F * stats.dd_forward + G * stats.dd_reverse
        return loss, h, dh, improved

    def newton(self, t, max_iter, active=None, radius=None):
        """Safeguarded Newton on L' from ``t``, for the ``active`` directions (default all).

        The bracket holds the minimiser: h < 0 left of it, h >= 0 right of it. alpha_max is
        not evaluated up front: a step past it lands on it, and h there tells the rest.
        """
        active = torch.ones_like(t, dtype=torch.bool) if active is None else active
        left, right = self.lo.clone(), self.hi.clone()
        if radius is not None:
            left, right = (t - radius).clamp_min(self.low), (t + radius).clamp_max(self.high)
        top_seen = torch.zeros_like(active)
        moving = active
        for _ in range(max_iter):
            _, h, dh, _ = self.evaluate(t, None if bool(moving.all()) else moving)
            left = torch.where(h < 0, t, left)
            right = torch.where(h >= 0, t, right)
            # Newton in s = t^2, where f and g are nearly linear (both ~ s Var_P[d] / 2):
            # dL/ds = h / t, so s' = s - 2 t^2 h / (t h' - h).
            curvature = t * dh - h
            newton = (t * t - 2 * t * t * h / curvature).clamp_min(0.0).sqrt()
            top_seen |= t == self.high
            usable = (curvature > 0) & (t > 0)
            # A step within rounding noise of the bracket counts as inside (then clamped).
            inside = usable & (newton >= left - self.tol) & (newton <= right + self.tol)
            newton = torch.minimum(torch.maximum(newton, left), right)
            # Still falling, no Newton step within the bracket: try alpha_max itself first.
            to_top = ~inside & (h < 0) & ~top_seen & (right == self.high)
            target = torch.where(inside, newton, torch.where(to_top, self.hi, 0.5 * (left + right)))
            target = torch.where(moving, target, t)
            step = target - t
            t = target
            moving = step.abs() > self.tol
            if not bool(moving.any()):
                break

    def unresolved(self, grid, count: int = 1):
        """Per direction, up to ``count`` grid points whose loss the evaluated points cannot
        bound above the best loss (lowest bounds first), and which of them are real.

        g is convex and increasing (g' = E_t[dc] >= 0, g'' = Var_t >= 0) and f = t g' - g.
        For u <= x <= v evaluated: g(x) lies between every tangent and the chord u-v, g'(x)
        in [g'(u), g'(v)], hence f(x) in [x g'(u) - g_hi, x g'(v) - g_lo] (and [f(u), f(v)]);
        L(x) is at least the squared distance from (a, b) to that box.
        """
        ts, fs, gs, dgs = (torch.stack(x, dim=-1).unsqueeze(-2) for x in (self.ts, self.fs, self.gs, self.dgs))
        x = grid.view(1, 1, -1, 1)  # [1, 1, J, 1]; evaluated points: [N, P, 1, E], NaN where skipped
        inf = float("inf")
        below, above = ts <= x, ts >= x  # False for NaN
        u = torch.where(below, ts, -inf).argmax(-1, keepdim=True)  # nearest evaluated point below
        v = torch.where(above, ts, inf).argmin(-1, keepdim=True)  # and above (if any)
        has_v = above.any(-1)
        xs = x.squeeze(-1)

        def at(values, index):
            return values.expand(*below.shape).gather(-1, index).squeeze(-1)

        tu, tv = at(ts, u), at(ts, v)
        gu, gv, fu, fv = at(gs, u), at(gs, v), at(fs, u), at(fs, v)
        dgu, dgv = at(dgs, u), at(dgs, v)
        chord = gu + (gv - gu) * ((xs - tu) / (tv - tu).clamp_min(1e-30))
        g_high = torch.where(has_v, torch.where(tv > tu, chord, gv), inf)
        tangents = gs + dgs * (x - ts)
        g_low = torch.maximum(torch.where(tangents.isnan(), -inf, tangents).amax(-1), gu)
        f_low = torch.maximum(xs * dgu - g_high, fu)
        f_high = torch.where(has_v, torch.minimum(xs * dgv - g_low, fv), inf)
        a, b = self.tf.unsqueeze(-1), self.tg.unsqueeze(-1)
        bound = ((f_low - a).clamp_min(0) + (a - f_high).clamp_min(0)) ** 2 + (
            (g_low - b).clamp_min(0) + (b - g_high).clamp_min(0)
        ) ** 2
        seen = ((ts - x).abs() <= self.tol).any(-1)  # grid point already evaluated
        slack = 1e3 * torch.finfo(fs.dtype).eps * (1 + self.best_loss.unsqueeze(-1))
        open_ = ~seen & (bound < self.best_loss.unsqueeze(-1) - slack)
        count = min(count, grid.numel())
        ranked, pick = torch.where(open_, bound, inf).topk(count, dim=-1, largest=False)
        return grid[pick], ranked < inf  # [N, P, count] each

    def evaluate_points(self, t: torch.Tensor, pending: torch.Tensor) -> torch.Tensor:
        """Evaluate several points per direction in one pass over the chosen ones:
        ``t, pending [N, P, M]``; returns where the best improved, ``[N, P]``."""
        rows, pairs, slots = pending.nonzero(as_tuple=True)
        self.passes += len(rows) / pending.shape[0]
        part = self.problem.stats_at(rows, pairs, t[rows, pairs, slots])
        improved = torch.zeros_like(self.best_t, dtype=torch.bool)
        for slot in range(t.shape[-1]):
            chosen = slots == slot
            if not bool(chosen.any()):
                continue
            values = []
            for x in (t[rows, pairs, slots], part.forward_kl, part.reverse_kl, part.d_reverse):
                full = torch.full_like(self.best_t, float("nan"))
                full[rows[chosen], pairs[chosen]] = x[chosen]
                values.append(full)
            improved |= self._record(*values)[1]
        return improved


class JointSolver(Solver):
    """``dlf-joint``: all pairs' weights at once, box-constrained, on the centroid loss.

    With s = z_L + sum_k alpha_k d_k, m = logsumexp(s) - logsumexp(z_L):
        f(alpha) = alpha . E_alpha[d] - m       grad f = Cov_alpha(d) alpha
        g(alpha) = m - alpha . E_P[d]           grad g = E_alpha[d] - E_P[d]
    Starts from the exact one-pair solution (``dlf``) and takes projected
    Levenberg-Marquardt steps on the residuals (f - a, g - b), accepting a step only
    where it lowers the loss: never worse than one pair per position.

    Options: alpha_min (0), alpha_max (2.0), max_iter (4: each step costs one pass with
    P^2 V work; more steps lower the loss slowly), tol (1e-7).
    """

    name = "dlf-joint"

    def __init__(self, pair_names, *, alpha_min=0.0, alpha_max=2.0, max_iter=4, tol=1e-7):
        super().__init__(pair_names)
        self.workspace = Workspace()
        self.alpha_min, self.alpha_max = _bounds(self.name, alpha_min, alpha_max)
        self.max_iter = int(number_option(self.name, "max_iter", max_iter, 0, 1000))
        self.tol = number_option(self.name, "tol", tol, 1e-12, 1.0)
        self.bounds = (self.alpha_min, self.alpha_max)
        self._start = ExactSolver(pair_names, alpha_min=self.alpha_min, alpha_max=self.alpha_max, tol=tol)
        self.passes = 0  # softmax evaluations over the full vocabulary, per row

    def _state(self, problem: _Problem, w: torch.Tensor):
        """Loss, residuals [N, 2] and Jacobian [N, 2, P] at weights ``w [N, P]``: one pass."""
        self.passes += 1
        dc = problem.centred  # [N, P, V]
        s = torch.baddbmm(problem.base.unsqueeze(1), w.unsqueeze(1), dc).squeeze(1)  # z + sum_k w_k dc_k, [N, V]
        p, top = shifted_exp_(s)
        total = p.sum(-1, keepdim=True)
        p.div_(total)
        lse = (top + total.log()).squeeze(-1)
        weighted = torch.mul(dc, p.unsqueeze(1), out=problem.scratch())  # p dc_k, [N, P, V]
        mean = weighted.sum(-1)  # E_w[dc_k] = E_w[d_k] - E_P[d_k]
        cov = weighted @ dc.transpose(1, 2) - mean.unsqueeze(-1) * mean.unsqueeze(-2)  # [N, P, P]
        shift = lse - problem.base_lse
        f = ((w * mean).sum(-1) - shift).clamp_min(0.0)
        g = shift.clamp_min(0.0)
        residual = torch.stack([f - problem.target_f, g - problem.target_g], dim=-1)
        jacobian = torch.stack([(cov @ w.unsqueeze(-1)).squeeze(-1), mean], dim=1)
        return (residual**2).sum(-1), residual, jacobian

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        problem = _Problem(inputs, self.workspace)
        t, loss = self._start.solve_pairs(problem)
        self.passes += self._start.passes
        self._start.passes = 0
        w = _one_hot_weights(t, loss)
        if w.shape[1] < 2 or self.max_iter == 0:
            return w
        loss, residual, jacobian = self._state(problem, w)
        eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        damping = torch.full_like(loss, 1e-3)  # [N], relative to the scale of J^T J
        tiny = torch.finfo(w.dtype).tiny ** 0.5
        for _ in range(self.max_iter):
            jtj = jacobian.transpose(1, 2) @ jacobian  # [N, P, P]
            grad = (jacobian.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1)  # [N, P]
            scale = jtj.diagonal(dim1=1, dim2=2).mean(-1) + tiny  # [N]
            # J^T J has rank <= 2: the ridge keeps the system positive definite for any P.
            ridge = damping * scale
            system = jtj + ridge[:, None, None] * eye + damping[:, None, None] * torch.diag_embed(jtj.diagonal(dim1=1, dim2=2))
            step = torch.linalg.solve_ex(system, -grad.unsqueeze(-1))[0].squeeze(-1)
            step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
            trial = (w + step).clamp(self.alpha_min, self.alpha_max)
            trial_loss, trial_residual, trial_jacobian = self._state(problem, trial)
            accept = trial_loss < loss  # [N]
            moved = (trial - w).abs().amax(-1)
            w = torch.where(accept.unsqueeze(-1), trial, w)
            loss = torch.where(accept, trial_loss, loss)
            residual = torch.where(accept.unsqueeze(-1), trial_residual, residual)
            jacobian = torch.where(accept[:, None, None], trial_jacobian, jacobian)
            damping = torch.where(accept, (damping / 3).clamp_min(1e-7), damping * 4)
            if not bool((moved > self.tol).any()):
                break
        return w
