"""The math of logit fusion on tensors (DESIGN.md section 1). No model code; torch only.

Notation, per row (a position being scored, or a sequence being decoded):

    z_L, z_Sk, z_Ek   logits of the large base, pair k's small base and expert
    P = softmax(z_L)  Q_k = softmax(z_Sk)  R_k = softmax(z_Ek)
    d_k = z_Ek - z_Sk
    fused(alpha) = z_L + sum_k alpha_k d_k          P~ = softmax(fused(alpha))
    targets a_k = KL(R_k || Q_k), b_k = KL(Q_k || R_k)
    loss(alpha) = sum_k (KL(P~ || P) - a_k)^2 + (KL(P || P~) - b_k)^2
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

# A logit difference is clamped to this size: an expert that forbids a token (-inf)
# must not turn the moments of the tilt into NaN.
MAX_DELTA = 1.0e4


@dataclasses.dataclass(frozen=True)
class FusionInputs:
    """What a solver sees for N rows and P pairs (shapes in dlf_plugin.solvers.base)."""

    base_logits: torch.Tensor  # [N, V]
    small_logits: torch.Tensor  # [N, P, V]
    expert_logits: torch.Tensor  # [N, P, V]
    row_mask: torch.Tensor  # [N] bool

    @property
    def num_pairs(self) -> int:
        return self.expert_logits.shape[1]

    def deltas(self) -> torch.Tensor:
        """d_k = z_Ek - z_Sk, ``[N, P, V]``, non-finite entries made finite."""
        return logit_deltas(self.small_logits, self.expert_logits)


def softmax_lse(logits: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the last dim into ``out`` (``out=logits`` for in place; a new tensor when
    None), and logsumexp ``[...]``.

    torch's softmax kernel has its own vectorised exp, several times faster on CPUs than
    torch.exp (here 210 us against 350-500 us for 32 x 32,000 floats, the latter slower
    still on deeply negative arguments). logsumexp needs no second exp: the largest
    probability is exp(max - logsumexp), at least 1/V, so
    logsumexp = max - log(largest probability) to float precision.
    """
    top = logits.amax(-1)
    probs = torch.softmax(logits, -1) if out is None else torch.softmax(logits, -1, out=out)
    return probs, top - probs.amax(-1).log_()


def logit_deltas(small_logits: torch.Tensor, expert_logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """d = z_E - z_S (into ``out`` if given), with NaN set to 0 and values clamped to +-1e4."""
    d = torch.sub(expert_logits, small_logits, out=out)
    return torch.nan_to_num_(d, nan=0.0, posinf=MAX_DELTA, neginf=-MAX_DELTA).clamp_(-MAX_DELTA, MAX_DELTA)


def lse_and_mean(logits: torch.Tensor, values: torch.Tensor, scratch: torch.Tensor | None = None):
    """logsumexp(logits) and E_softmax(logits)[values] over the last dim (working in ``scratch``)."""
    probs, lse = softmax_lse(logits, out=scratch)
    return lse, probs.mul_(values).sum(-1)


def fuse(base_logits: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fused = z_L + sum_k w_k d_k.  ``[N, V] + [N, P, V] x [N, P] -> [N, V]``."""
    if deltas.shape[1] == 0:
        return base_logits
    return base_logits + torch.einsum("np,npv->nv", weights.to(deltas.dtype), deltas)


def never_chosen(inputs: FusionInputs, tokens: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """``[N]`` bool: rows where ``tokens`` ``[N]`` cannot be the fused argmax for any
    weights in ``bounds`` (every pair's weight in [low, high]).

    Sufficient, not necessary: some one other token's fused logit exceeds the token's for
    every such weight vector. fused_v - fused_d = (z_v - z_d) + sum_k w_k c_k with
    c_k = d_kv - d_kd (d_k the pair's expert minus small logits) is smallest at
    w_k = high where c_k < 0 and at low where c_k > 0, so the token is beaten there if it
    is beaten at that corner. A margin of a few float32 roundings of the row's largest
    terms keeps a tie within rounding of the fused sum from counting. Unbounded weights
    (a bound infinite): never."""
    low, high = bounds
    n = inputs.base_logits.shape[0]
    if not (math.isfinite(low) and math.isfinite(high)) or inputs.num_pairs == 0:
        return torch.zeros(n, dtype=torch.bool, device=inputs.base_logits.device)
    picked = tokens.view(n, 1)
    gap = inputs.base_logits - inputs.base_logits.gather(1, picked)  # z_v - z_d
    scale = inputs.base_logits.abs().amax(-1)
    for k in range(inputs.num_pairs):
        small, expert = inputs.small_logits[:, k], inputs.expert_logits[:, k]
        c = torch.sub(expert, small)
        c.sub_(c.gather(1, picked))
        gap.add_(c.clamp_min(0.0), alpha=low).add_(c.clamp_max_(0.0), alpha=high)
        scale.add_(expert.abs().amax(-1).add_(small.abs().amax(-1)), alpha=max(abs(low), abs(high)))
    margin = scale.add_(1.0).mul_(64 * torch.finfo(torch.float32).eps)
    return (gap > margin.unsqueeze(1)).any(-1)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) over the last dimension."""
    log_p = torch.log_softmax(p_logits, dim=-1)
    log_q = torch.log_softmax(q_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def kl_targets(
    small_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    deltas: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, a_k = KL(R_k || Q_k) and b_k = KL(Q_k || R_k); each ``[N, P]``.

    From the deltas d = z_E - z_S (``logit_deltas``, computed when not given):
    a = E_R[d] - (lse z_E - lse z_S) and b = (lse z_E - lse z_S) - E_Q[d].
    """
    if deltas is None:
        deltas = logit_deltas(small_logits, expert_logits)
    lse_small, mean_small = lse_and_mean(small_logits, deltas, scratch)
    lse_expert, mean_expert = lse_and_mean(expert_logits, deltas, scratch)
    shift = lse_expert - lse_small
    return (mean_expert - shift).clamp_min(0.0), (shift - mean_small).clamp_min(0.0)


def fusion_kls(base_logits: torch.Tensor, fused_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(P~ || P), KL(P || P~)) for fused logits against the base; each ``[N]``."""
    return kl_divergence(fused_logits, base_logits), kl_divergence(base_logits, fused_logits)


def centroid_loss(forward_kl: torch.Tensor, reverse_kl: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k (KL(P~||P) - a_k)^2 + (KL(P||P~) - b_k)^2 for ``[..]`` KLs and ``[.., P]`` targets."""
    return ((forward_kl.unsqueeze(-1) - a) ** 2 + (reverse_kl.unsqueeze(-1) - b) ** 2).sum(-1)


def dlf_loss(inputs: FusionInputs, weights: torch.Tensor) -> torch.Tensor:
    """The DLF objective at ``weights`` ``[N, P]``, computed directly; ``[N]``."""
    a, b = kl_targets(inputs.small_logits, inputs.expert_logits)
    fused = fuse(inputs.base_logits, inputs.deltas(), weights)
    return centroid_loss(*fusion_kls(inputs.base_logits, fused), a, b)


def tilt_moments(base_logits, centred, t, order: int, out=None):
    """One pass over the vocabulary: logsumexp(z + t dc) and E_t[dc^j], j = 1 .. order.

    Args:
        base_logits: z, ``[..., V]``, broadcastable against ``centred``.
        centred: dc, ``[..., V]``.
        t: ``[...]``.
        order: highest moment.
        out: optional scratch of the broadcast shape ``[..., V]``, overwritten (reused across
            passes: fresh multi-megabyte tensors cost page faults on every pass).

    Returns:
        (lse ``[...]``, [E_t[dc], ..., E_t[dc^order]], each ``[...]``).
    """
    tilted = torch.addcmul(base_logits, t.unsqueeze(-1), centred, out=out)
    probs, lse = softmax_lse(tilted, out=tilted)
    # In place: p dc, p dc^2, ... without a tensor of powers.
    moments = [probs.mul_(centred).sum(-1) for _ in range(order)]
    return lse, moments


class TiltStats(NamedTuple):
    """f, g and their derivatives along one direction d at weights t (DESIGN.md section 1).

    P~_t = softmax(z + t d) is an exponential tilt of P. With dc = d - E_P[d] and
    M(t) = logsumexp(z + t dc) - logsumexp(z):
        f(t) = KL(P~_t || P) = t E_t[dc] - M(t)     f'(t) = t Var_t[d]
        g(t) = KL(P || P~_t) = M(t)                 g'(t) = E_t[dc] = E_t[d] - E_P[d]
        f''(t) = Var_t[d] + t K3_t[d]               g''(t) = Var_t[d]
                                                    g'''(t) = K3_t[d]
    where K3 is the third cumulant of d under P~_t (the third central moment;
    d/dt K_n = K_n+1, so f'''(t) = 2 K3_t + t K4_t would need a fourth moment).
    """

    forward_kl: torch.Tensor  # f(t)
    reverse_kl: torch.Tensor  # g(t)
    d_forward: torch.Tensor  # f'(t)
    d_reverse: torch.Tensor  # g'(t)
    dd_forward: torch.Tensor  # f''(t)
    dd_reverse: torch.Tensor  # g''(t)
    ddd_reverse: torch.Tensor  # g'''(t) = K3_t


def _tilt_kls(lse, m1, t, base_lse) -> tuple[torch.Tensor, torch.Tensor]:
    """f(t) = t E_t[dc] - M(t) and g(t) = M(t), with M(t) = lse - base_lse (``lse`` consumed)."""
    shift = lse.sub_(base_lse)
    return torch.addcmul(-shift, t, m1).clamp_min_(0.0), shift.clamp_min(0.0)


def tilt_stats(base_logits, centred, t, base_lse, out=None) -> TiltStats:
    """f, g and their derivatives (``TiltStats``) at ``t`` from one pass."""
    lse, (m1, m2, m3) = tilt_moments(base_logits, centred, t, 3, out)
    var = torch.addcmul(m2, m1, m1, value=-1).clamp_min_(0.0)
    third = torch.addcmul(m3, m1, torch.addcmul(3 * m2, m1, m1, value=-2), value=-1)  # m3 - 3 m1 m2 + 2 m1^3
    forward, reverse = _tilt_kls(lse, m1, t, base_lse)
    return TiltStats(
        forward_kl=forward,
        reverse_kl=reverse,
        d_forward=t * var,
        d_reverse=m1,
        dd_forward=torch.addcmul(var, t, third),
        dd_reverse=var,
        ddd_reverse=third,
    )


def tilt_values(base_logits, centred, t, base_lse, out=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f(t), g(t), g'(t)) from one pass with the first moment only."""
    lse, (m1,) = tilt_moments(base_logits, centred, t, 1, out)
    return (*_tilt_kls(lse, m1, t, base_lse), m1)


def tilt_kls(base_logits, centred, t, base_lse, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(t), g(t)) only, from one pass."""
    return tilt_values(base_logits, centred, t, base_lse, out)[:2]
