"""Batched forward passes and decoding over every model of a fusion, one KV cache per model.

The engine owns the models (each distinct model once: a small base shared by several
pairs runs once per step), asks the solver for weights at every fused position and
applies them with :mod:`dlf_plugin.fusion`. It knows nothing of lm-eval.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import torch
import transformers

from dlf_plugin.fusion import MAX_DELTA, FusionInputs
from dlf_plugin.solvers.base import Solver, checked_solve


@dataclasses.dataclass(frozen=True)
class Pair:
    """An expert pair as the engine sees it: model names."""

    name: str
    expert: str
    base: str


@dataclasses.dataclass(frozen=True)
class Fused:
    """Fused logits for N rows, with the weights that produced them and the pairs they weigh."""

    logits: torch.Tensor  # [N, V] float32
    weights: torch.Tensor  # [N, P]
    inputs: FusionInputs
    pairs: tuple[str, ...]  # the P pairs' names, in the weights' column order


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from fused logits (lm-eval gen_kwargs)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


# Called once per step with the list of rows still running and their generated ids;
# returns the rows (a subset) that must stop now.
StopCheck = Callable[[list[int], list[list[int]]], set[int]]
# Receives each decoding step's fused result, the rows still running ([B] bool) and the chosen tokens ([B]).
StepObserver = Callable[[Fused, torch.Tensor, torch.Tensor], None]


class FusionEngine:
    """Fused scoring and generation for one large base and a list of expert pairs.

    Args:
        models: every distinct model, by name (the large one, small bases, experts).
        large: name of the large base in ``models``.
        pairs: the expert pairs, in the order the solver sees them.
        vocab_size: the common vocabulary V; logits beyond it are dropped.
        solver: the weight solver; ``plugin`` names the plugin it came from.
    """

    def __init__(
        self,
        models: dict[str, transformers.PreTrainedModel],
        large: str,
        pairs: list[Pair],
        vocab_size: int,
        solver: Solver,
        plugin: str,
    ) -> None:
        self.models = models
        self.large = large
        self.pairs = pairs
        self.pair_names = tuple(p.name for p in pairs)
        self.vocab_size = vocab_size
        self.solver = solver
        self.plugin = plugin
        self.bases = list(dict.fromkeys(p.base for p in pairs))
        self.experts = list(dict.fromkeys(p.expert for p in pairs))
        self.device = _model_device(models[large])
        # Which distinct small base each pair subtracts: index into self.bases.
        self._pair_base = torch.tensor([self.bases.index(p.base) for p in pairs], dtype=torch.long, device=self.device)
        self._pair_expert = torch.tensor([self.experts.index(p.expert) for p in pairs], dtype=torch.long, device=self.device)
        self._bases_in_pair_order = self._pair_base.tolist() == list(range(len(pairs)))
        self._experts_in_pair_order = self._pair_expert.tolist() == list(range(len(pairs)))
        self._keeps = {name: "logits_to_keep" in inspect.signature(m.forward).parameters for name, m in models.items()}
        self.observer: StepObserver | None = None

    @property
    def forward_order(self) -> list[str]:
        """The models run at every step, each once."""
        return [self.large, *self.bases, *self.experts]

    # -- one forward pass of every model ------------------------------------------------

    def _forward(self, name, input_ids, keep, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        """Logits of the last ``keep`` positions of one model, on the fusion device, float32, ``[B, keep, V]``."""
        model = self.models[name]
        device = _model_device(model)
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device)
            kwargs["position_ids"] = position_ids.to(device)
        if cache is not None:
            kwargs["past_key_values"] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        if self._keeps[name]:
            kwargs["logits_to_keep"] = keep
        logits = model(input_ids.to(device), **kwargs).logits[:, -keep:, : self.vocab_size]
        logits = logits.to(self.device, torch.float32)
        # A model may forbid tokens with -inf; keep every logit finite so that weighted sums
        # (0 x -inf) and differences (-inf - -inf) stay numbers.
        return torch.nan_to_num_(logits, nan=0.0, posinf=MAX_DELTA, neginf=-MAX_DELTA)

    def _fuse_rows(self, base: torch.Tensor, smalls: list[torch.Tensor], experts: list[torch.Tensor], row_mask: torch.Tensor) -> Fused:
        """Solve and fuse N rows: ``base [N, V]``, each small/expert ``[N, V]``."""
        n, v = base.shape
        if not self.pairs:
            return Fused(base, base.new_zeros(n, 0), FusionInputs(base, base.new_zeros(n, 0, v), base.new_zeros(n, 0, v), row_mask), self.pair_names)
        small = _by_pair(smalls, self._pair_base, self._bases_in_pair_order)  # [N, P, V]
        expert = _by_pair(experts, self._pair_expert, self._experts_in_pair_order)  # [N, P, V]
        inputs = FusionInputs(base, small, expert, row_mask)
        weights = checked_solve(self.solver, self.plugin, inputs)
        # z_L + sum_k w_k z_Ek - sum_k w_k z_Sk, without materialising the deltas.
        w = weights.to(base.dtype).unsqueeze(1)  # [N, 1, P]
        fused = torch.baddbmm(base.unsqueeze(1), w, expert).baddbmm_(w, small, alpha=-1).squeeze(1)
        return Fused(fused, weights, inputs, self.pair_names)

    # -- teacher-forced scoring -----------------------------------------------------------

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, positions: torch.Tensor) -> Fused:
        """Fused logits at selected positions of right-padded rows.

        Args:
            input_ids: ``[B, T]``, right-padded.
            positions: ``[B, T]`` bool, True where the next-token distribution is needed;
                all True positions lie in the last ``keep`` columns, where ``keep`` is
                computed from the mask.

        Returns:
            Fused with ``logits [M, V]`` for the M True positions in row-major order.
        """
        cols = positions.any(0).nonzero()
        keep = int(input_ids.shape[1] - cols.min()) if len(cols) else 1
        mask = positions[:, -keep:].to(self.device)
        logits = {name: self._forward(name, input_ids, keep)[mask] for name in self.forward_order}
        return self._fuse_rows(
            logits[self.large],
            [logits[b] for b in self.bases],
            [logits[e] for e in self.experts],
            torch.ones(int(mask.sum()), dtype=torch.bool, device=self.device),
        )

    # -- cached decoding ------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        sampling: Sampling,
        eos_token_id: int,
        pad_token_id: int,
        stop_check: StopCheck | None = None,
    ) -> torch.Tensor:
        """Fused decoding of left-padded prompts; each row stops on its own.

        A row stops at ``eos_token_id``, when ``stop_check`` says so, or after
        ``max_new_tokens``; stopped rows are filled with ``pad_token_id``.

        Args:
            input_ids: ``[B, L]`` left-padded prompts.
            attention_mask: ``[B, L]``, 0 on padding.

        Returns:
            ``[B, L + n]`` prompts followed by the n <= max_new_tokens generated tokens.
        """
        batch = input_ids.shape[0]
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        caches = {name: transformers.DynamicCache() for name in self.forward_order}
        step_ids, step_mask, step_pos = input_ids.to(self.device), attention_mask, position_ids
        finished = [False] * batch
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        out = [input_ids.to(self.device)]
        for _ in range(max_new_tokens):
            logits = {
                name: self._forward(name, step_ids, 1, step_mask, step_pos, caches[name])[:, -1]
                for name in self.forward_order
            }
            fused = self._fuse_rows(
                logits[self.large], [logits[b] for b in self.bases], [logits[e] for e in self.experts], ~done
            )
            next_ids = choose_tokens(fused.logits, sampling)
            next_ids = torch.where(done, torch.full_like(next_ids, pad_token_id), next_ids)
            if self.observer is not None:
                self.observer(fused, ~done, next_ids)
            out.append(next_ids.unsqueeze(1))
            host_ids = next_ids.tolist()  # one host sync per step: stop strings need the tokens
            running = [i for i in range(batch) if not finished[i]]
            stopped = set()
            for i in running:
                generated[i].append(host_ids[i])
                if host_ids[i] == eos_token_id:
                    stopped.add(i)
            if stop_check is not None:
                live = [i for i in running if i not in stopped]
                stopped |= stop_check(live, [generated[i] for i in live])
            if stopped:
                for i in stopped:
                    finished[i] = True
                done = torch.tensor(finished, device=self.device)
            if all(finished):
                break
            step_ids = next_ids.unsqueeze(1)
            step_mask = torch.cat([step_mask, step_mask.new_ones(batch, 1)], dim=1)
            step_pos = step_pos[:, -1:] + 1
        return torch.cat(out, dim=1)


def choose_tokens(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Greedy argmax, or a sample after temperature, top-k and top-p; ``[N, V] -> [N]``."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    scores = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1).squeeze(1)


def _by_pair(logits: list[torch.Tensor], index: torch.Tensor, identity: bool) -> torch.Tensor:
    """Stack distinct models' logits ``[N, V]`` into ``[N, P, V]`` in pair order (one copy)."""
    stacked = torch.stack(logits, dim=1)
    return stacked if identity else stacked.index_select(1, index)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device
