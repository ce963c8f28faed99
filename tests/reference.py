"""Independent brute-force fusion: no cache, one row at a time, every prefix run from scratch, float64.

Shares no code with dlf's engine; only the models and the weights' definition.
"""

from __future__ import annotations

import torch


def _last_logits(model, tokens: list[int], vocab: int) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=False).logits[0, -1, :vocab]
    return out.double()


def fused_logits(models: dict, large: str, pairs: list[tuple[str, str, float]], tokens: list[int], vocab: int) -> torch.Tensor:
    """z_L + sum_k w_k (z_Ek - z_Sk) for the next token after ``tokens``; float64 ``[V]``.

    ``pairs`` holds (expert name, base name, weight).
    """
    fused = _last_logits(models[large], tokens, vocab)
    for expert, base, weight in pairs:
        fused = fused + weight * (_last_logits(models[expert], tokens, vocab) - _last_logits(models[base], tokens, vocab))
    return fused


def continuation_logprob(models, large, pairs, context: list[int], continuation: list[int], vocab: int) -> tuple[float, bool]:
    """log p(continuation | context) under the fused model, and whether it is the fused greedy choice."""
    total, greedy = 0.0, True
    tokens = list(context)
    for token in continuation:
        log_probs = torch.log_softmax(fused_logits(models, large, pairs, tokens, vocab), dim=-1)
        total += float(log_probs[token])
        greedy &= int(log_probs.argmax()) == token
        tokens.append(token)
    return total, greedy


def greedy_tokens(models, large, pairs, prompt: list[int], vocab: int, max_new: int, eos: int) -> list[int]:
    """Greedy fused decoding, recomputing every prefix."""
    tokens, out = list(prompt), []
    for _ in range(max_new):
        token = int(fused_logits(models, large, pairs, tokens, vocab).argmax())
        out.append(token)
        if token == eos:
            break
        tokens.append(token)
    return out
