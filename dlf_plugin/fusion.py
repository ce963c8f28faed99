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

import torch

# A logit difference is clamped to this size: an expert that forbids a token (-inf)
# must not turn the moments of the tilt into NaN.
_MAX_DELTA = 1.0e4


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


def logit_deltas(small_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """d = z_E - z_S, with NaN set to 0 and infinities clamped to +-1e4."""
    d = expert_logits - small_logits
    return torch.nan_to_num(d, nan=0.0).clamp_(-_MAX_DELTA, _MAX_DELTA)


def fuse(base_logits: torch.Tensor, deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fused = z_L + sum_k w_k d_k.  ``[N, V] + [N, P, V] x [N, P] -> [N, V]``."""
    if deltas.shape[1] == 0:
        return base_logits
    return base_logits + torch.einsum("np,npv->nv", weights.to(deltas.dtype), deltas)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) over the last dimension."""
    log_p = torch.log_softmax(p_logits, dim=-1)
    log_q = torch.log_softmax(q_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def kl_targets(small_logits: torch.Tensor, expert_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, a_k = KL(R_k || Q_k) and b_k = KL(Q_k || R_k); each ``[N, P]``."""
    return kl_divergence(expert_logits, small_logits), kl_divergence(small_logits, expert_logits)


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


@dataclasses.dataclass(frozen=True)
class TiltStats:
    """Moments of the tilt P~_t = softmax(z + t d) along one direction d, at weights t.

    Along one direction P~_t is an exponential tilt of P, so with m(t) = log E_P[exp(t d)]:
        f(t) = KL(P~_t || P) = t E_t[d] - m(t)      f'(t) = t Var_t[d]
        g(t) = KL(P || P~_t) = m(t) - t E_P[d]      g'(t) = E_t[d] - E_P[d]
        f''(t) = Var_t[d] + t K3_t[d]                g''(t) = Var_t[d]
    where K3 is the third central moment.
    """

    forward_kl: torch.Tensor  # f(t)
    reverse_kl: torch.Tensor  # g(t)
    d_forward: torch.Tensor  # f'(t)
    d_reverse: torch.Tensor  # g'(t)
    dd_forward: torch.Tensor  # f''(t)
    dd_reverse: torch.Tensor  # g''(t)


def tilt_stats(
    base_logits: torch.Tensor,
    deltas: torch.Tensor,
    t: torch.Tensor,
    base_lse: torch.Tensor,
    base_mean: torch.Tensor,
) -> TiltStats:
    """One pass over the vocabulary: f, g and their first two derivatives at ``t``.

    Args:
        base_logits: z, ``[..., V]`` (broadcastable against ``deltas``).
        deltas: d, ``[..., V]``.
        t: weights, ``[...]``.
        base_lse: logsumexp(z), ``[...]``.
        base_mean: E_P[d], ``[...]``.
    """
    tilted = base_logits + t.unsqueeze(-1) * deltas
    lse = torch.logsumexp(tilted, dim=-1)
    p = torch.exp(tilted - lse.unsqueeze(-1))
    mean = (p * deltas).sum(-1)
    centred = deltas - mean.unsqueeze(-1)
    sq = centred * centred
    var = (p * sq).sum(-1).clamp_min(0.0)
    third = (p * sq * centred).sum(-1)
    m = lse - base_lse
    return TiltStats(
        forward_kl=(t * mean - m).clamp_min(0.0),
        reverse_kl=(m - t * base_mean).clamp_min(0.0),
        d_forward=t * var,
        d_reverse=mean - base_mean,
        dd_forward=var + t * third,
        dd_reverse=var,
    )


def tilt_kls(base_logits: torch.Tensor, deltas: torch.Tensor, t: torch.Tensor, base_lse: torch.Tensor, base_mean: torch.Tensor):
    """(f(t), g(t)) only: one logsumexp and one weighted sum over the vocabulary."""
    tilted = base_logits + t.unsqueeze(-1) * deltas
    lse = torch.logsumexp(tilted, dim=-1)
    mean = (torch.exp(tilted - lse.unsqueeze(-1)) * deltas).sum(-1)
    m = lse - base_lse
    return (t * mean - m).clamp_min(0.0), (m - t * base_mean).clamp_min(0.0)
