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

from dlf_plugin.fusion import FusionInputs, kl_targets, tilt_kls, tilt_stats
from dlf_plugin.solvers.base import Solver, SolverOptionError, number_option


def _bounds(name: str, alpha_min, alpha_max) -> tuple[float, float]:
    low = number_option(name, "alpha_min", alpha_min, 0.0, 100.0)
    high = number_option(name, "alpha_max", alpha_max, 0.0, 100.0)
    if high <= low:
        raise SolverOptionError(f"model_args alpha_max={alpha_max!r} (solver {name!r}) must exceed alpha_min={alpha_min!r}")
    return low, high


class _Problem:
    """The per-row quantities every DLF solver needs, computed once: ``[N, ...]`` tensors."""

    def __init__(self, inputs: FusionInputs) -> None:
        self.base = inputs.base_logits  # [N, V]
        self.deltas = inputs.deltas()  # [N, P, V]
        a, b = kl_targets(inputs.small_logits, inputs.expert_logits)  # [N, P] each
        self.target_f = a.mean(-1)  # [N]
        self.target_g = b.mean(-1)  # [N]
        self.base_lse = torch.logsumexp(self.base, dim=-1)  # [N]
        p0 = torch.softmax(self.base, dim=-1)
        self.base_mean = torch.einsum("nv,npv->np", p0, self.deltas)  # E_P[d_k], [N, P]
        centred = self.deltas - self.base_mean.unsqueeze(-1)
        self.base_var = torch.einsum("nv,npv->np", p0, centred * centred)  # Var_P[d_k], [N, P]

    def reduced_loss(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(f - a)^2 + (g - b)^2, broadcasting ``[N]`` targets over trailing pair dims."""
        tf, tg = self.target_f, self.target_g
        while tf.dim() < f.dim():
            tf, tg = tf.unsqueeze(-1), tg.unsqueeze(-1)
        return (f - tf) ** 2 + (g - tg) ** 2

    def along_pairs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f and g of alpha = t_k e_k for every pair k at once: ``t [N, P] -> ([N, P], [N, P])``."""
        return tilt_kls(self.base.unsqueeze(1), self.deltas, t, self.base_lse.unsqueeze(1), self.base_mean)


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
        self.alpha_max = number_option(self.name, "alpha_max", alpha_max, 0.0, 100.0)
        self.step = number_option(self.name, "step", step, 1e-6, 100.0)
        points = int(round(self.alpha_max / self.step))
        self.grid = [i * self.step for i in range(points + 1)]
        self.bounds = (0.0, self.grid[-1])
        self.passes = 0

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        problem = _Problem(inputs)
        n = problem.base_mean.shape[0]
        zeros = problem.base_mean.new_zeros(n)
        best_loss = problem.reduced_loss(zeros, zeros)  # t = 0: f = g = 0
        best_t = problem.base_mean.new_zeros(n)
        best_k = torch.zeros(n, dtype=torch.long, device=best_t.device)
        for value in self.grid[1:]:
            t = torch.full_like(problem.base_mean, value)
            loss = problem.reduced_loss(*problem.along_pairs(t))  # [N, P]
            self.passes += 1
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
        self.alpha_min, self.alpha_max = _bounds(self.name, alpha_min, alpha_max)
        self.tol = number_option(self.name, "tol", tol, 1e-12, 1.0)
        self.max_iter = int(number_option(self.name, "max_iter", max_iter, 1, 1000))
        self.bounds = (self.alpha_min, self.alpha_max)
        self.passes = 0

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        problem = _Problem(inputs)
        t, loss = self.solve_pairs(problem)
        return _one_hot_weights(t, loss)

    def solve_pairs(self, problem: _Problem) -> tuple[torch.Tensor, torch.Tensor]:
        """Best weight and reduced loss of each pair acting alone: ``([N, P], [N, P])``."""
        low, high = self.alpha_min, self.alpha_max
        base, deltas = problem.base.unsqueeze(1), problem.deltas
        lse, mean0 = problem.base_lse.unsqueeze(1), problem.base_mean
        tf, tg = problem.target_f.unsqueeze(-1), problem.target_g.unsqueeze(-1)

        def derivative(stats):
            """h = L'/2 and h' = L''/2 for L = (f - a)^2 + (g - b)^2."""
            F, G = stats.forward_kl - tf, stats.reverse_kl - tg
            h = F * stats.d_forward + G * stats.d_reverse
            dh = stats.d_forward**2 + stats.d_reverse**2 + F * stats.dd_forward + G * stats.dd_reverse
            return h, dh

        def at(value):
            self.passes += 1
            return tilt_stats(base, deltas, value, lse, mean0)

        lo = torch.full_like(mean0, low)
        hi = torch.full_like(mean0, high)
        hi_stats = at(hi)
        loss_hi = problem.reduced_loss(hi_stats.forward_kl, hi_stats.reverse_kl)
        if low == 0.0:
            loss_lo = problem.reduced_loss(torch.zeros_like(lo), torch.zeros_like(lo))
        else:
            lo_stats = at(lo)
            loss_lo = problem.reduced_loss(lo_stats.forward_kl, lo_stats.reverse_kl)

        t = torch.sqrt((tf + tg) / problem.base_var.clamp_min(1e-30)).clamp(low, high)
        left, right = lo.clone(), hi.clone()
        # Still falling at alpha_max: the bound is the answer, no iteration needed.
        falling = derivative(hi_stats)[0] <= 0
        t = torch.where(falling, hi, t)
        left = torch.where(falling, hi, left)
        for _ in range(self.max_iter):
            h, dh = derivative(at(t))
            left = torch.where(h < 0, t, left)
            right = torch.where(h >= 0, t, right)
            newton = t - h / dh
            ok = (dh > 0) & (newton >= left) & (newton <= right)
            step = torch.where(ok, newton, 0.5 * (left + right)) - t
            t = t + step
            if not bool((step.abs() > self.tol).any()):
                break
        self.passes += 1
        loss_t = problem.reduced_loss(*tilt_kls(base, deltas, t, lse, mean0))
        # Bounds as candidates: the loss may still fall at alpha_max, or rise from alpha_min.
        candidates = torch.stack([t, lo, hi])  # [3, N, P]
        losses = torch.stack([loss_t, loss_lo, loss_hi])
        pick = losses.argmin(0, keepdim=True)
        return candidates.gather(0, pick)[0], losses.gather(0, pick)[0]


class JointSolver(Solver):
    """``dlf-joint``: all pairs' weights at once, box-constrained, on the centroid loss.

    With s = z_L + sum_k alpha_k d_k, m = logsumexp(s) - logsumexp(z_L):
        f(alpha) = alpha . E_alpha[d] - m       grad f = Cov_alpha(d) alpha
        g(alpha) = m - alpha . E_P[d]           grad g = E_alpha[d] - E_P[d]
    Starts from the exact one-pair solution (``dlf``) and takes projected
    Levenberg-Marquardt steps on the residuals (f - a, g - b), accepting a step only
    where it lowers the loss: never worse than one pair per position.

    Options: alpha_min (0), alpha_max (2.0), max_iter (20), tol (1e-7).
    """

    name = "dlf-joint"

    def __init__(self, pair_names, *, alpha_min=0.0, alpha_max=2.0, max_iter=20, tol=1e-7):
        super().__init__(pair_names)
        self.alpha_min, self.alpha_max = _bounds(self.name, alpha_min, alpha_max)
        self.max_iter = int(number_option(self.name, "max_iter", max_iter, 0, 1000))
        self.tol = number_option(self.name, "tol", tol, 1e-12, 1.0)
        self.bounds = (self.alpha_min, self.alpha_max)
        self._start = ExactSolver(pair_names, alpha_min=self.alpha_min, alpha_max=self.alpha_max, tol=tol)
        self.passes = 0

    def _state(self, problem: _Problem, w: torch.Tensor):
        """Loss, residuals [N, 2] and Jacobian [N, 2, P] at weights ``w [N, P]``: one pass."""
        self.passes += 1
        s = problem.base + torch.einsum("np,npv->nv", w, problem.deltas)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        mean = torch.einsum("nv,npv->np", p, problem.deltas)
        centred = problem.deltas - mean.unsqueeze(-1)
        cov = torch.einsum("npv,nv,nqv->npq", centred, p, centred)
        m = lse - problem.base_lse
        f = ((w * mean).sum(-1) - m).clamp_min(0.0)
        g = (m - (w * problem.base_mean).sum(-1)).clamp_min(0.0)
        residual = torch.stack([f - problem.target_f, g - problem.target_g], dim=-1)
        jacobian = torch.stack([torch.einsum("npq,nq->np", cov, w), mean - problem.base_mean], dim=1)
        return (residual**2).sum(-1), residual, jacobian

    def solve(self, inputs: FusionInputs) -> torch.Tensor:
        problem = _Problem(inputs)
        t, loss = self._start.solve_pairs(problem)
        self.passes += self._start.passes
        self._start.passes = 0
        w = _one_hot_weights(t, loss)
        if w.shape[1] < 2 or self.max_iter == 0:
            return w
        loss, residual, jacobian = self._state(problem, w)
        eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        jtj = jacobian.transpose(1, 2) @ jacobian
        damping = 1e-3 * jtj.diagonal(dim1=1, dim2=2).mean(-1) + 1e-12  # [N]
        for _ in range(self.max_iter):
            jtj = jacobian.transpose(1, 2) @ jacobian  # [N, P, P]
            grad = (jacobian.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1)  # [N, P]
            system = jtj + damping[:, None, None] * (eye + torch.diag_embed(jtj.diagonal(dim1=1, dim2=2)))
            step = torch.linalg.solve(system, -grad.unsqueeze(-1)).squeeze(-1)
            trial = (w + step).clamp(self.alpha_min, self.alpha_max)
            trial_loss, trial_residual, trial_jacobian = self._state(problem, trial)
            accept = trial_loss < loss  # [N]
            moved = (trial - w).abs().amax(-1)
            w = torch.where(accept.unsqueeze(-1), trial, w)
            loss = torch.where(accept, trial_loss, loss)
            residual = torch.where(accept.unsqueeze(-1), trial_residual, residual)
            jacobian = torch.where(accept[:, None, None], trial_jacobian, jacobian)
            damping = torch.where(accept, damping / 3, damping * 4)
            if not bool((moved > self.tol).any()):
                break
        return w
