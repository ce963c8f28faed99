"""Independent brute-force fusion: no cache, one row at a time, every prefix run from scratch, float64.

Shares no code with dlf's engine; only the models and the weights' definition.
"""

from __future__ import annotations

import torch


def _last_logits(model, tokens: list[int], vocab: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=False).logits[0, -1, :vocab]
    return out.double()


def next_token_probabilities(model, tokens: list[int], vocab: int) -> torch.Tensor:
    """One model's softmax over the first ``vocab`` tokens after ``tokens``; float64 ``[V]``."""
    return torch.softmax(_last_logits(model, tokens, vocab), 0)


def fused_logits(models: dict, large: str, pairs: list[tuple[str, str, float]], tokens: list[int], vocab: int, pair_tokens=None) -> torch.Tensor:
    """z_L + sum_k w_k (z_Ek - z_Sk) for the next token after ``tokens``; float64 ``[V]``.

    ``pairs`` holds (expert name, base name, weight). With prompt views, pair k's expert and
    base read ``pair_tokens[k]`` instead of ``tokens``.
    """
    fused = _last_logits(models[large], tokens, vocab)
    for k, (expert, base, weight) in enumerate(pairs):
        own = tokens if pair_tokens is None else pair_tokens[k]
        fused = fused + weight * (_last_logits(models[expert], own, vocab) - _last_logits(models[base], own, vocab))
    return fused


def continuation_logprob(models, large, pairs, context: list[int], continuation: list[int], vocab: int, pair_contexts=None, weights=None) -> tuple[float, bool]:
    """log p(continuation | context) under the fused model, and whether it is the fused greedy
    choice; with views, pair k reads ``pair_contexts[k]`` followed by the same continuation.
    ``weights``, if given, holds each continuation position's weights (one per pair, as a
    dynamic solver chose them) in place of the pairs' own."""
    total, greedy = 0.0, True
    tokens = list(context)
    own = None if pair_contexts is None else [list(c) for c in pair_contexts]
    for i, token in enumerate(continuation):
        here = pairs if weights is None else [(expert, base, w) for (expert, base, _), w in zip(pairs, weights[i], strict=True)]
        log_probs = torch.log_softmax(fused_logits(models, large, here, tokens, vocab, own), dim=-1)
        total += float(log_probs[token])
        greedy &= int(log_probs.argmax()) == token
        tokens.append(token)
        for c in own or []:
            c.append(token)
    return total, greedy


def greedy_tokens(models, large, pairs, prompt: list[int], vocab: int, max_new: int, eos: int, pair_prompts=None) -> list[int]:
    """Greedy fused decoding, recomputing every prefix; with views, pair k reads
    ``pair_prompts[k]`` followed by the same generated tokens."""
    tokens, out = list(prompt), []
    own = None if pair_prompts is None else [list(c) for c in pair_prompts]
    for _ in range(max_new):
        token = int(fused_logits(models, large, pairs, tokens, vocab, own).argmax())
        out.append(token)
        if token == eos:
            break
        tokens.append(token)
        for c in own or []:
            c.append(token)
    return out


def chosen_somewhere(base: torch.Tensor, small: torch.Tensor, expert: torch.Tensor, tokens: torch.Tensor, bounds, points: int) -> torch.Tensor:
    """``[N]``: whether each row's token is the argmax of z_L + sum_k w_k (z_Ek - z_Sk) at some
    point of a grid of ``points`` weights per pair over ``bounds`` (``base [N, V]``, ``small``
    and ``expert`` ``[N, P, V]``), in float64."""
    axis = torch.linspace(*bounds, points, dtype=torch.float64)
    grid = torch.cartesian_prod(*[axis] * small.shape[1]).view(-1, small.shape[1])  # [G, P]
    fused = base.double().unsqueeze(1) + torch.einsum("gp,npv->ngv", grid, (expert - small).double())  # [N, G, V]
    return (fused.argmax(-1) == tokens.unsqueeze(1)).any(-1)
