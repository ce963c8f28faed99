"""Batched forward passes and decoding over every model of a fusion, one KV cache per model.

The engine owns the models (each distinct model once: a small base shared by several
pairs runs once per step), asks the solver for weights at every fused position and
applies them with :mod:`dlf_plugin.fusion`. It knows nothing of lm-eval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import transformers

from dlf_plugin.backends import LocalModel, ModelFault
from dlf_plugin.fusion import FusionInputs, dlf_loss, never_chosen
from dlf_plugin.solvers.base import DeclaredMemory, Solver, checked_solve, explain_bad_weights

def _untracked(method):
    """No autograd, and no inference mode even inside a caller's ``torch.inference_mode()``:
    the tensors a solver gets keep their modification counters, by which dlf sees a
    solver that edits its inputs (``solvers.base.checked_solve``)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)

    return run


# Bytes scoring may spend on fused rows at once (model_args fusion_memory, in MiB).
DEFAULT_FUSION_MEMORY = 1024 * 1024**2


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
class Scores:
    """Fused scoring of M positions: log-probabilities of the asked tokens and the greedy choice."""

    logprobs: torch.Tensor  # [M, J] float32, log p(target j) at each position
    greedy: torch.Tensor  # [M] the fused argmax
    weights: torch.Tensor  # [M, P]
    losses: torch.Tensor | None  # [M] the DLF objective at the weights, when asked
    pairs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from fused logits (lm-eval gen_kwargs)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


# Token ids (or masks) every model reads alike, or one tensor per prompt view.
TokensByView = torch.Tensor | Sequence[torch.Tensor]
# Called once per step with the list of rows still running and their generated ids;
# returns the rows (a subset) that must stop now.
StopCheck = Callable[[list[int], list[list[int]]], set[int]]
# Receives each decoding step's (or speculative round's) fused result and, per token emitted:
# its batch row, its row of the fused result, the token, its position in the generation, and
# whether it was a draft the fusion accepted (the last list None when not speculating).
StepObserver = Callable[[Fused, list[int], list[int], list[int], list[int], "list[bool] | None"], None]


class _Stream:
    """One prompt view during decoding: its left-padded prompt, its attention mask (made
    once, as wide as the view can grow; each pass reads a view of its first columns), the
    columns its models have read, and the position id of each row's next token."""

    def __init__(self, prompt: torch.Tensor, mask: torch.Tensor, room: int) -> None:
        batch, self.length = prompt.shape
        self.prompt = prompt
        self.room = room
        self.width = self.length + room
        self.mask = torch.zeros(batch, self.width, dtype=mask.dtype, device=prompt.device)
        self.mask[:, : self.length] = mask
        self.prompt_positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # [B, L]
        self.next = self.prompt_positions[:, -1] + 1  # [B]

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, mask, position ids) of the prompt's read."""
        return self.prompt, self.mask[:, : self.length], self.prompt_positions

    def take(self, count: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, position ids) for reading ``count`` tokens ``offset`` columns past those
        read; their columns are opened."""
        start = self.length + offset
        if start + count > self.width:  # a row that took over another's caches needs more room
            self.mask = torch.cat([self.mask, self.mask.new_zeros(len(self.mask), start + count + self.room - self.width)], dim=1)
            self.width = start + count + self.room
        self.mask[:, start : start + count] = 1
        return self.mask[:, : start + count], (self.next + offset).unsqueeze(1) + torch.arange(count, device=self.next.device)

    def commit(self, count: int, kept: torch.Tensor | None = None) -> None:
        """``count`` columns were read; per row the first ``kept`` (``[B]``, all when None)
        stay, the others are masked out for good and their positions reused."""
        if kept is None:
            self.next = self.next + count
        else:
            self.mask[:, self.length : self.length + count] = (torch.arange(count, device=kept.device) < kept.unsqueeze(1)).to(self.mask.dtype)
            self.next = self.next + kept
        self.length += count

    def take_row(self, row: int, other: _Stream, other_row: int) -> None:
        """Row ``row`` continues ``other``'s row ``other_row`` (its prompt read, nothing
        more): that row's columns become this row's last ones, its earlier ones are masked
        out for good. Needs ``other.length <= self.length`` (``grow_left``)."""
        self.mask[row, : self.length] = 0
        self.mask[row, self.length - other.length : self.length] = other.mask[other_row, : other.length]
        self.next[row] = other.next[other_row]

    def grow_left(self, columns: int) -> None:
        """``columns`` masked columns before the first."""
        self.mask = torch.cat([self.mask.new_zeros(len(self.mask), columns), self.mask], dim=1)
        self.length += columns
        self.width += columns

    def drop_left(self, columns: int) -> None:
        """The first ``columns`` columns are gone (no row sees them)."""
        self.mask = self.mask[:, columns:]
        self.length -= columns
        self.width -= columns


class _Lookup:
    """Prompt-lookup drafts for one row (``speculate`` with ``lookup``): the tokens that
    followed the earliest earlier occurrence of the row's last three tokens in its prompt and
    generation, else of its last two. Each n-gram's first occurrence is kept in a table as
    tokens arrive, so a round's lookup costs two dictionary reads, whatever the length."""

    SIZES = (3, 2)  # longest first; chosen on the toy world's dev split (README "Speculative decoding")

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self.first: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.SIZES}
        self.pooled = False  # whether the last chain came from a history
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        # The n-grams ending just before ``token`` now have a follower: ``token``'s index.
        at = len(self.tokens)
        self.tokens.append(token)
        for n, table in self.first.items():
            if at >= n:
                table.setdefault(tuple(self.tokens[at - n : at]), at)

    def chain(self, length: int, history: LookupHistory | None = None) -> list[int]:
        """Up to ``length`` tokens copied after the earliest match; empty without one. With a
        ``history``, each n-gram size looks there after the row's own context (three tokens
        here, three there, two here, two there); ``pooled`` says whether the copy came from it."""
        self.pooled = False
        for n, table in self.first.items():
            if len(self.tokens) < n:
                continue
            key = tuple(self.tokens[-n:])
            start = table.get(key)
            if start is not None:
                return self.tokens[start : start + length]
            copy = history.follow(key, length) if history is not None else []
            if copy:
                self.pooled = True
                return copy
        return []


class LookupHistory:
    """The generations of a run's earlier requests, pooled for ``lookup`` (model_args
    ``lookup_history``): where a row's own context holds no copy, the tokens that followed
    the earliest pooled occurrence of its last n tokens. Each generation is its own segment
    (no n-gram, and no copy, runs from one into the next); each n-gram's first occurrence is
    kept as generations arrive. Past ``TOKENS`` pooled tokens no more are added: the tables
    stay as they are, so the host memory they take is bounded."""

    TOKENS = 1 << 18  # at most about 86 MiB of tables (random tokens over 32,000 ids: no n-gram repeats)

    def __init__(self) -> None:
        self.segments: list[list[int]] = []
        self.size = 0
        self.first: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (segment, index after it)

    def add(self, tokens: list[int]) -> None:
        if self.size >= self.TOKENS or not tokens:
            return
        segment = len(self.segments)
        self.segments.append(list(tokens))
        self.size += len(tokens)
        for n in _Lookup.SIZES:
            for at in range(n, len(tokens)):
                self.first.setdefault(tuple(tokens[at - n : at]), (segment, at))

    def follow(self, key: tuple[int, ...], length: int) -> list[int]:
        found = self.first.get(key)
        if found is None:
            return []
        segment, at = found
        return self.segments[segment][at : at + length]


def _growing_layers(cache) -> list | None:
    """The layers of a transformers ``DynamicCache`` whose keys and values are plain
    ``[B, heads, T, D]`` tensors grown by concatenation, where a row can be replaced in
    place; None for any other cache."""
    layer_type = getattr(transformers.cache_utils, "DynamicLayer", None)
    layers = getattr(cache, "layers", None)
    if type(cache) is not transformers.DynamicCache or layer_type is None or not layers:
        return None
    if any(type(layer) is not layer_type or not layer.is_initialized for layer in layers):
        return None
    return layers


class _Rows:
    """The rows decoding together in ``generate_speculative``: per view its stream, per
    model its KV cache, per row the prompt it generates for (None once it stopped: the row
    is free), per view each row's first open column, and each row's last kept token
    (``[B, 1]``, on the device: the next round's x)."""

    def __init__(self, streams: list[_Stream], caches: dict, owner: list[int | None], start: list[list[int]], last: torch.Tensor) -> None:
        self.streams, self.caches, self.owner, self.start, self.last = streams, caches, owner, start, last

    def running(self) -> list[int]:
        return [s for s, r in enumerate(self.owner) if r is not None]

    def refillable(self) -> bool:
        """Whether a free row can take another group's row: every cache's rows are plain tensors."""
        return all(_growing_layers(cache) is not None for cache in self.caches.values())

    def take_over(self, slot: int, other: _Rows, row: int, view_of: dict[str, int]) -> None:
        """The free row ``slot`` continues ``other``'s row ``row`` (prefilled, not yet
        decoding): that row's cache columns are written at the end of this row's in every
        model's cache (all rows gaining masked columns on the left where it has more), its
        mask and positions go with them, and ``other`` gives the row up."""
        for view, (stream, theirs) in enumerate(zip(self.streams, other.streams)):
            grow = theirs.length - stream.length
            if grow > 0:
                stream.grow_left(grow)
                self.start[view] = [column + grow for column in self.start[view]]
            for name in (name for name, v in view_of.items() if v == view):
                for mine, src in zip(_growing_layers(self.caches[name]), _growing_layers(other.caches[name])):
                    for attr in ("keys", "values"):
                        tensor = getattr(mine, attr)
                        if grow > 0:
                            tensor = torch.cat([tensor.new_zeros(*tensor.shape[:2], grow, tensor.shape[3]), tensor], dim=2)
                            setattr(mine, attr, tensor)
                        tensor[slot, :, stream.length - theirs.length :] = getattr(src, attr)[row]
            stream.take_row(slot, theirs, row)
            self.start[view][slot] = stream.length - theirs.length + other.start[view][row]
        self.owner[slot], other.owner[row] = other.owner[row], None
        self.last[slot] = other.last[row]

    def drop_dead_columns(self, view_of: dict[str, int]) -> None:
        """Cut the columns left of every running row's first from the streams and caches."""
        live = self.running()
        for view, stream in enumerate(self.streams):
            dead = min((self.start[view][s] for s in live), default=0)
            if dead <= 0:
                continue
            stream.drop_left(dead)
            self.start[view] = [column - dead for column in self.start[view]]
            for name in (name for name, v in view_of.items() if v == view):
                for layer in _growing_layers(self.caches[name]):
                    layer.keys, layer.values = layer.keys[:, :, dead:], layer.values[:, :, dead:]


class FusionEngine:
    """Fused scoring and generation for one large base and a list of expert pairs.

    Args:
        models: every distinct model behind its backend, by name (the large one, small
            bases, experts); shared by every engine over the same loaded models.
        large: name of the large base in ``models``.
        pairs: the expert pairs, in the order the solver sees them.
        vocab_size: the common vocabulary V; logits beyond it are never computed.
        solver: the weight solver; ``plugin`` names the plugin it came from.
        fusion_memory: bytes that scoring may spend on fused rows at once (logits of every
            model, the solver's work, the fused log-probabilities); positions are fused in
            chunks that fit (DESIGN.md section 5).
        views: which prompt view each model reads (DESIGN.md section 7), by name: an index
            into the per-view token tensors that ``score`` and ``generate`` take; models not
            named, and every model when None, read view 0. A model read in two views appears
            twice in ``models`` under two names (one KV cache each), the same backend behind.
    """

    def __init__(
        self,
        models: dict[str, LocalModel],
        large: str,
        pairs: list[Pair],
        vocab_size: int,
        solver: Solver,
        plugin: str,
        fusion_memory: int = DEFAULT_FUSION_MEMORY,
        views: dict[str, int] | None = None,
    ) -> None:
        self.models = models
        self.large = large
        self.pairs = pairs
        self.pair_names = tuple(p.name for p in pairs)
        self.vocab_size = vocab_size
        self.solver = solver
        self.plugin = plugin
        self.fusion_memory = fusion_memory
        self.bases = list(dict.fromkeys(p.base for p in pairs))
        self.experts = list(dict.fromkeys(p.expert for p in pairs))
        self.device = models[large].device
        # Which distinct small base each pair subtracts: index into self.bases.
        pair_base = [self.bases.index(p.base) for p in pairs]
        pair_expert = [self.experts.index(p.expert) for p in pairs]
        self._pair_base = torch.tensor(pair_base, dtype=torch.long, device=self.device)
        self._pair_expert = torch.tensor(pair_expert, dtype=torch.long, device=self.device)
        self._bases_in_pair_order = pair_base == list(range(len(pairs)))
        self._experts_in_pair_order = pair_expert == list(range(len(pairs)))
        self.observer: StepObserver | None = None
        self.view_of = {name: (views or {}).get(name, 0) for name in self.forward_order}
        self.n_views = max([0, *(views or {}).values()]) + 1

    @property
    def forward_order(self) -> list[str]:
        """The models run at every step, each once."""
        return [self.large, *self.bases, *self.experts]

    @property
    def chunk_rows(self) -> int:
        """Positions fused at once when scoring: ``fusion_memory`` over one position's float32
        working set in rows of V: each distinct model's logits, the pairs' small and expert
        logits where a shared base or expert makes them copies, the solver's own
        (``Solver.working_rows``), the fused logits and their log-softmax."""
        p = len(self.pairs)
        copies = (0 if self._bases_in_pair_order else p) + (0 if self._experts_in_pair_order else p)
        rows = len(self.forward_order) + copies + self.solver.working_rows(p) + 2
        return max(1, self.fusion_memory // (4 * self.vocab_size * rows))

    # -- fusing rows ----------------------------------------------------------------------

    def _logits(self, hidden: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """float32 logits of every model from its hidden rows, written straight into the
        stacks the solver takes: the large base ``[N, V]``, the distinct small bases and
        experts ``[N, D, V]`` each; and a device-side flag per model (``[models]`` bool) set
        where a logit is NaN or infinite."""
        n = len(hidden[self.large])
        base = torch.empty(n, self.vocab_size, dtype=torch.float32, device=self.device)
        bases, experts = (torch.empty(n, len(names), self.vocab_size, dtype=torch.float32, device=self.device) for names in (self.bases, self.experts))
        slots = [(self.large, base)] + [(m, bases[:, i]) for i, m in enumerate(self.bases)]
        slots += [(m, experts[:, i]) for i, m in enumerate(self.experts)]
        # A sum is NaN or infinite where any logit is (or where finite ones overflow float32,
        # ~1e38: broken too); unlike isfinite().all() it allocates nothing the size of the logits.
        faults = torch.stack([~self.models[name].logits(hidden[name], out=out).sum().isfinite() for name, out in slots])
        return (base, bases, experts), faults

    def _inputs(self, logits: tuple[torch.Tensor, ...], row_mask: torch.Tensor) -> FusionInputs:
        """The solver's inputs from ``_logits``' stacks: each pair's small base and expert, in
        pair order."""
        base, bases, experts = logits
        if not self.pairs:
            empty = base.new_zeros(base.shape[0], 0, base.shape[1])
            return FusionInputs(base, empty, empty, row_mask)
        small = bases if self._bases_in_pair_order else bases.index_select(1, self._pair_base)  # [N, P, V]
        expert = experts if self._experts_in_pair_order else experts.index_select(1, self._pair_expert)
        return FusionInputs(base, small, expert, row_mask)

    def _fuse_rows(self, inputs: FusionInputs) -> tuple[Fused, torch.Tensor]:
        """Solve and fuse the N rows of ``_inputs``; returns the result and a device-side
        count of solver weights that break its contract (read later)."""
        base, small, expert = inputs.base_logits, inputs.small_logits, inputs.expert_logits
        if not self.pairs:
            return Fused(base, base.new_zeros(base.shape[0], 0), inputs, self.pair_names), base.new_zeros((), dtype=torch.long)
        weights, bad = checked_solve(self.solver, self.plugin, inputs)
        # z_L + sum_k w_k z_Ek - sum_k w_k z_Sk, without materialising the deltas.
        w = weights.to(base.dtype).unsqueeze(1)  # [N, 1, P]
        fused = torch.baddbmm(base.unsqueeze(1), w, expert).baddbmm_(w, small, alpha=-1).squeeze(1)
        return Fused(fused, weights, inputs, self.pair_names), bad

    def raise_faults(self, model_faults, solver_faults: int, fused: Fused | None = None) -> None:
        """Turn the flags read from the device into errors naming the model or the solver."""
        bad_models = [name for name, flag in zip(self.forward_order, model_faults) if flag]
        if bad_models:
            raise ModelFault(
                f"model(s) {', '.join(bad_models)} gave NaN or infinite logits (a broken checkpoint, or "
                "overflow in float16: try dtype=bfloat16 or float32); dlf stops rather than fuse them"
            )
        if solver_faults:
            explain_bad_weights(self.solver, self.plugin, fused.inputs, fused.weights)

    def release(self) -> None:
        """Free the solver's buffers (kept between the steps of one call, not between calls)."""
        self.solver.release()

    @contextlib.contextmanager
    def declared_solver_memory(self):
        """Within the block the solver is ``DeclaredMemory``'s stand-in: batch size auto's
        trials hold the memory it declares, on any tokens, and count nothing in its name."""
        solver = self.solver
        self.solver = DeclaredMemory(solver)
        try:
            yield
        finally:
            self.solver = solver

    # -- teacher-forced scoring -----------------------------------------------------------

    @_untracked
    def score(self, input_ids: TokensByView, positions: TokensByView, targets: torch.Tensor, losses: bool = False) -> Scores:
        """Fused log-probabilities of target tokens at selected positions of right-padded rows.

        Every model runs once over the batch; its output layer and the fusion run on
        ``chunk_rows`` positions at a time, so memory beyond the models' own activations is
        bounded by ``fusion_memory`` whatever the batch and its length.

        Args:
            input_ids: ``[B, T]``, right-padded; or one such tensor per view (widths may
                differ), each model reading its own.
            positions: ``[B, T]`` bool (on the host), True where the next-token distribution
                is needed; M True positions in all; or one per view, each row of each view
                with as many True positions as in every other view: the i-th True position
                of a row is fused across the views.
            targets: ``[M, J]`` token ids whose log-probability is wanted at each position, in
                row-major order of ``positions``; -1 pads.
            losses: also return the DLF objective at each position's weights (for traces).

        Returns:
            Scores for the M positions.
        """
        hidden, _, _ = self._hidden_at(self.forward_order, input_ids, positions, targets)
        m = len(hidden[self.large])
        targets = targets.to(self.device)
        logprobs = torch.empty(targets.shape, dtype=torch.float32, device=self.device)
        greedy = torch.empty(m, dtype=torch.long, device=self.device)
        weights = torch.empty(m, len(self.pairs), dtype=torch.float32, device=self.device)
        loss = torch.zeros(m, dtype=torch.float32, device=self.device) if losses else None
        step = self.chunk_rows
        try:
            for start in range(0, m, step):
                rows = slice(start, min(start + step, m))
                logits, faults = self._logits({name: h[rows] for name, h in hidden.items()})
                fused, bad = self._fuse_rows(self._inputs(logits, torch.ones(rows.stop - start, dtype=torch.bool, device=self.device)))
                flags = torch.cat([faults.long(), bad.view(1)]).tolist()  # one transfer per chunk
                if any(flags):
                    self.raise_faults(flags[:-1], flags[-1], fused)
                log_probs = torch.log_softmax(fused.logits, dim=-1)
                logprobs[rows] = log_probs.gather(1, targets[rows].clamp_min(0))
                greedy[rows] = fused.logits.argmax(-1)
                weights[rows] = fused.weights
                if loss is not None and self.pairs:
                    loss[rows] = dlf_loss(fused.inputs, fused.weights)
                del logits, fused, log_probs
        finally:
            self.release()
        return Scores(logprobs, greedy, weights, loss, self.pair_names)

    @_untracked
    def pair_evidence(self, input_ids: torch.Tensor, lengths: list[int], last: int = 0) -> torch.Tensor:
        """Per row and pair, log p_E(tokens) - log p_S(tokens): how much more likely the pair's
        expert finds the row's tokens than its small base (DESIGN.md section 6); ``[B, P]``.

        Rows are right-padded ``[B, T]`` with their own lengths; the row's ``last`` tokens are
        scored (0: every token after its first). Only the small models run (bodies once per
        batch, heads on chunks of ``chunk_rows`` positions).
        """
        batch, width = input_ids.shape
        positions = torch.zeros(batch, width, dtype=torch.bool)
        for row, length in enumerate(lengths):
            positions[row, max(length - 1 - last, 0) if last else 0 : max(length - 1, 0)] = True
        names = list(dict.fromkeys(self.bases + self.experts))
        hidden, rows_of, cols_of = self._hidden_at(names, input_ids, positions)
        targets = input_ids.cpu()[rows_of, cols_of + 1].to(self.device)
        owner = rows_of.to(self.device)
        totals = {name: torch.zeros(batch, dtype=torch.float32, device=self.device) for name in names}
        for start in range(0, len(owner), self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            for name in names:
                logits = self.models[name].logits(hidden[name][rows])
                picked = logits.log_softmax(-1).gather(1, targets[rows, None]).squeeze(1)
                totals[name].index_add_(0, owner[rows], picked)
        return torch.stack([totals[p.expert] - totals[p.base] for p in self.pairs], dim=1) if self.pairs else torch.zeros(batch, 0, device=self.device)

    def _hidden_at(self, names: list[str], input_ids: TokensByView, positions: TokensByView, targets: torch.Tensor | None = None):
        """Each model's last hidden states at the True ``positions`` of its view (``[B, T]``
        bool each), in row-major order, every body run once over the batch: ``({name: [M, H]},
        rows [M], cols [M])``, rows and columns those of view 0, on the host (no device sync).

        A model behind a server (``dlf_plugin.remote``) gives log-probabilities ``[M, V]``
        instead; ``targets`` (``score``'s) tell it the token after each row's last position."""
        input_ids, positions = self._by_view(input_ids), [p.cpu() for p in self._by_view(positions)]
        counts = [p.sum(1) for p in positions]
        if any(not torch.equal(c, counts[0]) for c in counts[1:]):
            raise ValueError(f"every view must ask as many positions per row as view 0; per-view counts {[c.tolist() for c in counts]}")
        picks = []  # per view: the columns kept (from the first one asked) and the flat positions
        for ids, asked in zip(input_ids, positions):
            width = ids.shape[1]
            used = asked.any(0).nonzero()
            keep = int(width - used.min()) if len(used) else 1
            picks.append((keep, asked[:, -keep:].reshape(-1).nonzero().flatten()))
        hidden = {}
        for name in names:
            view = self.view_of[name]
            keep, flat = picks[view]
            if getattr(self.models[name], "remote", False):
                last = counts[view].cumsum(0) - 1  # each row's last position, in flat order
                follow = [int(targets[i, 0]) if targets is not None and n else -1 for i, n in zip(last.tolist(), counts[view].tolist())]
                hidden[name] = self.models[name].scored_at(input_ids[view], positions[view], follow)
                continue
            states = self.models[name].hidden(input_ids[view])[:, -keep:]
            hidden[name] = states.reshape(-1, states.shape[-1]).index_select(0, flat.to(states.device))
        keep, flat = picks[0]
        return hidden, flat // keep, flat % keep + (input_ids[0].shape[1] - keep)

    def _by_view(self, tensors: TokensByView) -> list[torch.Tensor]:
        """One tensor per view: a single tensor is every view's."""
        if isinstance(tensors, torch.Tensor):
            return [tensors] * self.n_views
        if len(tensors) != self.n_views:
            raise ValueError(f"expected {self.n_views} prompt views, got {len(tensors)}")
        return list(tensors)

    # -- cached decoding ------------------------------------------------------------------

    @_untracked
    def generate(
        self,
        input_ids: TokensByView,
        attention_mask: TokensByView,
        max_new_tokens: int,
        sampling: Sampling,
        eos_token_id: int,
        pad_token_id: int,
        stop_check: StopCheck | None = None,
    ) -> torch.Tensor:
        """Fused decoding of left-padded prompts; each row stops on its own.

        A row stops at ``eos_token_id``, when ``stop_check`` says so, or after
        ``max_new_tokens``; stopped rows are filled with ``pad_token_id``. A step makes one
        device-to-host transfer: the chosen tokens (stop strings need them) together with
        the fault flags of the models and the solver.

        Args:
            input_ids: ``[B, L]`` left-padded prompts, or one per view (lengths may differ);
                every chosen token is appended to every view.
            attention_mask: ``[B, L]``, 0 on padding (one per view with views).

        Returns:
            ``[B, L + n]`` view 0's prompts followed by the n <= max_new_tokens generated tokens.
        """
        streams = self._streams(input_ids, attention_mask, max_new_tokens)
        batch, prompt_len = streams[0].prompt.shape
        caches = {name: self.models[name].new_cache(batch, streams[self.view_of[name]].width) for name in self.forward_order}
        finished = [False] * batch
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        generated: list[list[int]] = [[] for _ in range(batch)]
        out = torch.full((batch, prompt_len + max_new_tokens), pad_token_id, dtype=torch.long, device=self.device)
        out[:, :prompt_len] = streams[0].prompt
        reads = [stream.prefill() for stream in streams]
        steps = 0
        try:
            for steps in range(1, max_new_tokens + 1):
                hidden = {}
                for name in self.forward_order:
                    ids, mask, positions = reads[self.view_of[name]]
                    hidden[name] = self.models[name].hidden(ids, mask, positions, caches[name], last=1)[:, -1]
                logits, model_faults = self._logits(hidden)
                fused, bad = self._fuse_rows(self._inputs(logits, ~done))
                next_ids = choose_tokens(fused.logits, sampling)
                next_ids = torch.where(done, pad_token_id, next_ids)
                out[:, prompt_len + steps - 1] = next_ids
                # The step's one transfer: tokens, then a flag per model, then the solver's count.
                report = torch.cat([next_ids, model_faults.long(), bad.view(1)]).tolist()
                host_ids, flags = report[:batch], report[batch:]
                if any(flags):
                    self.raise_faults(flags[:-1], flags[-1], fused)
                running = [i for i in range(batch) if not finished[i]]
                for i in running:
                    generated[i].append(host_ids[i])
                if self.observer is not None:
                    self.observer(fused, running, running, [host_ids[i] for i in running], [len(generated[i]) - 1 for i in running], None)
                logits = fused = None  # this step's logits go before the next step's are made
                stopped = _stopping(running, generated, eos_token_id, max_new_tokens, stop_check)
                if stopped:
                    done |= torch.tensor([i in stopped for i in range(batch)], device=self.device)
                for i in stopped:
                    finished[i] = True
                if all(finished):
                    break
                for cache in caches.values():
                    if hasattr(cache, "finished"):  # a server's rows: stopped ones are not asked again
                        cache.finished = finished
                for view, stream in enumerate(streams):
                    if steps > 1:
                        stream.commit(1)
                    reads[view] = (next_ids.unsqueeze(1), *stream.take(1))
        finally:
            self.release()
        return out[:, : prompt_len + steps]

    def _prompts(self, input_ids: TokensByView, attention_mask: TokensByView) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each view's left-padded prompts and masks, on the device."""
        ids, masks = self._by_view(input_ids), self._by_view(attention_mask)
        if len({len(t) for t in ids}) > 1:
            raise ValueError(f"every view needs the same batch rows; got {[len(t) for t in ids]}")
        return [i.to(self.device) for i in ids], [m.to(self.device) for m in masks]

    def _streams(self, input_ids: TokensByView, attention_mask: TokensByView, room: int) -> list[_Stream]:
        """Each view's decoding state for left-padded prompts and ``room`` more tokens."""
        return [_Stream(i, m, room) for i, m in zip(*self._prompts(input_ids, attention_mask))]

    @_untracked
    def generate_speculative(
        self,
        input_ids: TokensByView,
        attention_mask: TokensByView,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        draft: int,
        stop_check: StopCheck | None = None,
        sampling: Sampling = Sampling(),
        lookup: int = 0,
        confidence: float = 0.0,
        slots: int | None = None,
        history: LookupHistory | None = None,
    ) -> torch.Tensor:
        """Fused decoding of up to ``draft`` tokens a round, the first pair's expert drafting
        (DESIGN.md section 8); greedy, the same tokens as ``generate`` (in float32: a k-token
        pass rounds otherwise than k steps); sampled, the same distribution (the
        speculative-sampling rule, ``speculative_choice``).

        A round starts from the last emitted token x, which no model has read. The drafter
        reads x, then its own choices (greedy, or sampled from its logits under ``sampling``),
        k = ``draft`` times: drafts d1..d(k-1), and its hidden states after x, d1, ..,
        d(k-1). Every other model reads [x, d1, .., d(k-1)] in one pass. The solver fuses
        those k positions per row at once (greedy, told that the positions past a draft no
        weights can make the fused choice do not matter: ``_fuse_round``). Greedy: the row
        keeps the fused greedy g1..g(j+1), j being how many drafts equal the fused choice. Sampled: d_i is kept with probability
        min(1, p_i(d_i) / q_i(d_i)) (p fused, q the drafter's, both after ``sampling``'s
        temperature, top-k and top-p) up to the first rejection, where a token is drawn from
        max(0, p_i - q_i), or after all k-1 from p_k.
        After each round the cache slots past the most tokens any row kept are cut from
        every cache (alone, every refused draft); a row's other refused drafts stay, masked
        out of attention for good, and positions continue from the tokens kept.
        With ``draft=1`` a round is a plain fused step. One device-to-host transfer a round:
        the kept tokens, the accepted counts and the fault flags.

        ``slots`` = b < the number of prompts N decodes b rows at a time and refills: the
        prompts are prefilled b at a time, in order (one pass of every model for each group
        of b, as b-row batches would be; the first group as given, each later one cut to its
        own widest prompt), and a row whose generation stops takes the next
        prefilled prompt's caches in its place before the next round, so that a round's
        pass serves b rows while prompts remain, not the slowest row of a finished batch.
        The newcomer's cache columns are written at the end of the row's (the row's older
        ones are masked out for good); columns no running row sees any more are dropped
        from the left. Caches whose layers are not transformers' plain growing ones take no
        newcomer: the next group then starts once every row has stopped (b-row batches).
        Without ``slots`` (or with b >= N) every prompt runs at once.

        ``lookup`` = n > 0 drafts from the context too (prompt lookup): a row whose prompt
        (view 0's) and generation hold an earlier occurrence of its last tokens has the up to
        n tokens that followed it as drafts (``_Lookup``, on the host: no sync). When every
        running row has such a copy, or some row has one and ``draft`` is 1, the copies
        alone draft the round: every model, the drafter included, reads x and the copies in
        one pass, and the round fuses 1 + the shortest copy's length positions (a row
        without a copy drafts placeholders). Otherwise the drafter drafts as above, a row
        with a copy feeding its copied tokens (up to k - 1) and the drafter's choices past
        them. A copied draft's proposal q is the token itself (probability 1): the rule
        keeps it with probability p(d) and is exact with it as with any proposal. The
        prompts (and their lengths, for the groups) are read to the host once, before the
        first prefill. With a ``history``, a row without a copy in its own context looks for
        one in the generations of earlier requests (``LookupHistory``); each request that
        stops adds its generation there.

        ``confidence`` = c > 0 ends a round's drafting early: where the drafter's most likely
        token at draft i has less than probability c (its softmax, greedy; q, sampled) for
        every running row without a copy there, d_i is dropped and the round is i positions
        wide: drafts it would likely lose cost no drafter call and widen no solve. Sampled,
        the stop reads q's top, not q(d_i): given the drafter's state it is the same whatever
        d_i is drawn, so a kept d_i is still drawn from q, which the rule needs (stopping on
        q(d_i) would keep likelier draws more often and skew the distribution). The check
        reads the probabilities to the host: one more transfer per drafted token.

        Returns:
            ``[N, L + n]`` as ``generate``.
        """
        if draft > 1 and not self.pairs:
            raise ValueError("speculative decoding needs an expert pair to draft with")
        drafter = self.pairs[0].expert if draft > 1 else None
        device = self.device
        ids, masks = self._prompts(input_ids, attention_mask)
        total, prompt_len = ids[0].shape
        slots = total if not slots else min(slots, total)
        room = max_new_tokens * max(draft, lookup + 1)
        # Read in one transfer: with lookup, view 0's prompts (-1 on padding); with groups,
        # each view's leading padding per prompt (a later group is cut to its own widest).
        host = [torch.where(masks[0].bool(), ids[0], -1)] if lookup else []
        if slots < total:
            host.append(torch.stack([(m.cumsum(1) == 0).sum(1) for m in masks], dim=1))  # [N, views]
        host = torch.cat(host, dim=1).tolist() if host else [[]] * total
        shown = [row[:prompt_len] for row in host] if lookup else None
        leading = [[row[-len(ids) + view] if slots < total else 0 for row in host] for view in range(len(ids))]
        generated: list[list[int]] = [[] for _ in range(total)]
        lookups: list[_Lookup | None] = [None] * total
        waiting = list(range(total))  # prompts not prefilled yet, in order
        # After the call: prefills (one large pass each: a group of ``slots`` prompts),
        # rounds (large-model passes after them), rounds drafted by lookup alone, drafts made
        # (copied ones among them, and of those the ones from the history) and accepted over
        # the running rows, tokens generated.
        self.speculation = dict(prefills=0, rounds=0, lookup_rounds=0, drafted=0, copied=0, pooled=0, accepted=0, tokens=0)

        def emit(fused: Fused, rows: _Rows, step: int, kept: list[int], counts: list[int]) -> None:
            """Append each running row's kept tokens to its prompt's generation, token by
            token as plain decoding stops, and mark the rows that stop."""
            emitted = []  # (prompt, fused row, token, position, drafted) for the observer
            for i in range(step):
                here = [s for s in rows.running() if i <= min(counts[s], step - 1)]
                for s in here:
                    r, token = rows.owner[s], kept[s * step + i]
                    generated[r].append(token)
                    if lookups[r] is not None:
                        lookups[r].append(token)
                    emitted.append((r, s * step + i, token, len(generated[r]) - 1, i < counts[s]))
                stopped = _stopping([rows.owner[s] for s in here], generated, eos_token_id, max_new_tokens, stop_check)
                for s in here:
                    if rows.owner[s] in stopped:
                        if history is not None:
                            history.add(generated[rows.owner[s]])
                        rows.owner[s] = None
            if self.observer is not None and emitted:
                self.observer(fused, *map(list, zip(*sorted(emitted))))

        def prefill() -> _Rows:
            """The next ``slots`` waiting prompts after one pass of every model, their first
            fused tokens emitted (``last``: each row's, on the device)."""
            group = waiting[:slots]
            del waiting[:slots]
            picked = torch.tensor(group, device=device)
            streams, start = [], []
            for view, (i, m) in enumerate(zip(ids, masks)):
                cut = min(leading[view][r] for r in group) if self.speculation["prefills"] else 0  # the first as given
                streams.append(_Stream(i.index_select(0, picked)[:, cut:], m.index_select(0, picked)[:, cut:], room))
                start.append([leading[view][r] - cut for r in group])
            caches = {name: self.models[name].new_cache(len(group), streams[self.view_of[name]].width, preallocated=False) for name in self.forward_order}
            hidden = {name: self.models[name].hidden(*streams[self.view_of[name]].prefill(), caches[name], last=1) for name in self.forward_order}
            fused, flags = self._fuse_round(hidden, torch.ones(len(group), dtype=torch.bool, device=device))
            first = choose_tokens(fused.logits, sampling)
            report = torch.cat([first, flags]).tolist()
            if any(report[len(group) :]):
                self.raise_faults(report[len(group) : -1], report[-1], fused)
            self.speculation["prefills"] += 1
            if lookup:
                for r in group:
                    lookups[r] = _Lookup([t for t in shown[r] if t >= 0])
            rows = _Rows(streams, caches, list(group), start, first.unsqueeze(1))
            emit(fused, rows, 1, report[: len(group)], [0] * len(group))
            return rows

        batch = pool = None
        try:
            while True:
                # Rows whose generation stopped take the next prefilled prompts: all at once
                # where every row stopped (the next group runs as a batch of its own), else
                # one by one into the caches, where they allow it.
                if batch is None or not batch.running():
                    while (pool is None or not pool.running()) and waiting:  # a group may stop at its first tokens
                        pool = prefill()
                    if pool is None or not pool.running():
                        break
                    batch, pool = pool, None
                    continue  # a row of the group may have stopped at its first token
                took = False
                while (waiting or (pool is not None and pool.running())) and None in batch.owner and batch.refillable():
                    if pool is None or not pool.running():
                        pool = prefill()
                        continue
                    batch.take_over(batch.owner.index(None), pool, pool.running()[0], self.view_of)
                    took = True
                if took:
                    batch.drop_dead_columns(self.view_of)
                streams, caches = batch.streams, batch.caches
                rows = len(batch.owner)
                live = batch.running()
                x = batch.last  # [rows, 1]: each row's last kept token, which no model has read
                # Each running row's copied drafts. Copies alone draft the round where every
                # running row has one, or where nobody else drafts (speculate 0 or 1: a row
                # without a copy feeds placeholders then, drafts the rule keeps or refuses as
                # any other); the round is as wide as the shortest copy allows.
                chains = [lookups[r].chain(lookup, history) if lookup and r is not None else [] for r in batch.owner]
                lengths = [len(chains[s]) for s in live if chains[s]]
                left = max(max_new_tokens - len(generated[batch.owner[s]]) for s in live)  # no round wider: no row keeps more
                by_lookup = bool(lengths) and (len(lengths) == len(live) or drafter is None) and left > 1
                width = min(1 + min(lengths) if by_lookup else draft, left)
                plan = torch.tensor([[int(r is not None), *(chain + [-1] * width)[: width - 1]] for r, chain in zip(batch.owner, chains)], device=device)
                running, copies = plan[:, 0].bool(), plan[:, 1:]  # [rows], [rows, width - 1] (-1: no copy)
                hidden, proposals = {}, []
                if by_lookup:
                    fed = torch.cat([x, copies.clamp_min(0)], dim=1)  # placeholders (and stopped rows): token 0
                    if sampling.do_sample:
                        proposals = [_one_hot(fed[:, i : i + 1], self.vocab_size) for i in range(1, width)]
                elif drafter is None:
                    fed = x  # a plain step
                else:
                    # Draft: the drafter reads x, d1, .., d(k-1). Its hidden state after d(k-1)
                    # is fused at the last position; no dk is drawn: the k-th fused token is
                    # kept whether it would have agreed or not.
                    feed, drafted, drafter_hidden = x, [x], []
                    own = streams[self.view_of[drafter]]
                    for i in range(width):
                        h = self.models[drafter].hidden(feed, *own.take(1, offset=i), caches[drafter])[:, -1:]
                        drafter_hidden.append(h)
                        if i < width - 1:
                            logits = self.models[drafter].logits(h[:, 0])
                            if sampling.do_sample:
                                q = sampling_probabilities(logits, sampling)
                                feed = torch.multinomial(q, 1)
                            else:
                                feed = logits.argmax(-1, keepdim=True)
                            if lookup:  # a row's copied tokens, as far as they go
                                copy = copies[:, i : i + 1]
                                feed = torch.where(copy >= 0, copy, feed)
                                if sampling.do_sample:
                                    q = torch.where(copy >= 0, _one_hot(copy.clamp_min(0), self.vocab_size), q)
                            if confidence:  # the drafter's top probability (not its draw's: see above); a copy's is 1
                                sure = (q if sampling.do_sample else logits.float().softmax(-1)).amax(-1)
                                if lookup:
                                    sure = torch.where(copies[:, i] >= 0, 1.0, sure)
                                if not bool(torch.where(running, sure, -1.0).max() >= confidence):
                                    width = i + 1  # d(i+1) dropped: the round fuses x, d1..di
                                    break
                            if sampling.do_sample:
                                proposals.append(q)
                            drafted.append(feed)
                    fed = torch.cat(drafted, dim=1)  # [rows, k]: x, d1..d(k-1)
                    hidden[drafter] = torch.cat(drafter_hidden, dim=1)
                reads = [stream.take(width) for stream in streams]
                for name in self.forward_order:
                    if name not in hidden:
                        hidden[name] = self.models[name].hidden(fed, *reads[self.view_of[name]], caches[name])
                fused, flags = self._fuse_round(hidden, running, None if sampling.do_sample else fed[:, 1:])
                self.speculation["rounds"] += 1
                self.speculation["lookup_rounds"] += by_lookup
                self.speculation["drafted"] += (width - 1) * len(live)
                self.speculation["copied"] += sum(min(len(chain), width - 1) for chain in chains)
                self.speculation["pooled"] += sum(min(len(chain), width - 1) for chain, r in zip(chains, batch.owner) if chain and lookups[r].pooled)
                tokens, accepted = _kept(fused.logits.view(rows, width, -1), fed[:, 1:], proposals, sampling)
                report = torch.cat([tokens.flatten(), accepted, flags]).tolist()
                n = tokens.numel()
                kept, counts, faults = report[:n], report[n : n + rows], report[n + rows :]
                self.speculation["accepted"] += sum(counts[s] for s in live)
                if any(faults):
                    self.raise_faults(faults[:-1], faults[-1], fused)
                # The round's columns past the most any running row kept are cut from every
                # cache (at batch 1, every refused draft); each row's others are masked for
                # good. (A stopped row's count means nothing.)
                keep = min(max(counts[s] for s in live) + 1, width)
                for stream in streams:
                    stream.commit(keep, kept=(accepted + 1).clamp_max(width))
                if keep < width:  # a negative count: tokens to remove, in every transformers release
                    for cache in caches.values():
                        cache.crop(keep - width)
                emit(fused, batch, width, kept, counts)
                fused = None  # this round's logits go before the next round's are made
                batch.last = tokens.gather(1, accepted.clamp_max(width - 1).unsqueeze(1))
        finally:
            self.release()
        self.speculation["tokens"] = sum(map(len, generated))
        out = torch.full((total, prompt_len + max(map(len, generated))), pad_token_id, dtype=torch.long)
        out[:, :prompt_len] = ids[0].cpu()
        for r, row in enumerate(generated):
            out[r, prompt_len : prompt_len + len(row)] = torch.tensor(row, dtype=torch.long)
        return out.to(device)

    def _fuse_round(self, hidden: dict[str, torch.Tensor], running: torch.Tensor, drafts: torch.Tensor | None = None) -> tuple[Fused, torch.Tensor]:
        """The fused result of every model's hidden states ``[B, k, H]`` (``B k`` rows, row-major)
        and the fault flags (per model, then the solver's count) for the round's one transfer.

        The solver is told which rows matter: those of ``running`` rows, and with greedy
        ``drafts`` ``[B, k - 1]`` only up to the first draft no weights within the solver's
        bounds make the fused argmax (``never_chosen``): the row keeps no token past it, so
        the positions after it need no solving (the adaptive ``dlf`` stops iterating them).
        """
        batch, k = next(iter(hidden.values())).shape[:2]
        logits, faults = self._logits({name: h.reshape(batch * k, -1) for name, h in hidden.items()})
        inputs = self._inputs(logits, running.repeat_interleave(k))
        if drafts is not None and self.pairs and k > 1:
            beaten = never_chosen(inputs, torch.nn.functional.pad(drafts, (0, 1)).flatten(), self.solver.bounds).view(batch, k)
            reached = torch.cat([torch.ones_like(beaten[:, :1]), beaten[:, :-1].cumsum(1) == 0], dim=1)  # no beaten draft before
            inputs = dataclasses.replace(inputs, row_mask=(reached & running.unsqueeze(1)).flatten())
        fused, bad = self._fuse_rows(inputs)
        return fused, torch.cat([faults.long(), bad.view(1)])

def _stopping(rows: list[int], generated: list[list[int]], eos_token_id: int, max_new_tokens: int, stop_check: StopCheck | None) -> set[int]:
    """The ``rows`` that stop at the token just appended to ``generated``: at EOS, at
    ``max_new_tokens``, or where ``stop_check`` finds a stop string."""
    stopped = {r for r in rows if generated[r][-1] == eos_token_id or len(generated[r]) >= max_new_tokens}
    live = [r for r in rows if r not in stopped]
    if stop_check is not None and live:
        stopped |= stop_check(live, [generated[r] for r in live])
    return stopped


def _kept(fused: torch.Tensor, drafts: torch.Tensor, proposals: list[torch.Tensor], sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """A speculative round's choice from its fused logits ``[B, k, V]`` and the k - 1 drafts
    ``[B, k - 1]``: ``([B, k] tokens, [B] j)``, the row keeping its first j + 1 tokens.
    Greedy: the fused argmax g1..gk, j the drafts equal to it before the first that is
    not; sampled: ``speculative_choice`` against the ``proposals`` ``[B, V]`` each draft
    was drawn from."""
    if sampling.do_sample:
        target = sampling_probabilities(fused.flatten(0, 1), sampling).view_as(fused)
        proposal = torch.stack(proposals, dim=1) if proposals else target[:, :0]
        return speculative_choice(drafts, proposal, target)
    tokens = fused.argmax(-1)
    return tokens, (drafts == tokens[:, :-1]).long().cumprod(1).sum(1)


def _one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, 1]`` tokens as distributions ``[B, V]`` with all their mass on the token."""
    return torch.zeros(len(tokens), vocab, device=tokens.device).scatter_(1, tokens, 1.0)


def choose_tokens(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Greedy argmax, or a sample after temperature, top-k and top-p; ``[N, V] -> [N]``."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probabilities(logits, sampling), 1).squeeze(1)


def speculative_choice(drafts: torch.Tensor, proposal: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule (Leviathan et al., 2023; Chen et al., 2023): tokens
    distributed exactly as sampling ``target`` position by position, whatever ``proposal``
    the drafts were drawn from.

    Args:
        drafts: ``[B, m]`` tokens drawn from ``proposal``.
        proposal: ``[B, m, V]`` the distributions the drafts were drawn from (q).
        target: ``[B, m + 1, V]`` the fused distributions (p) at every drafted position
            and the one after the last draft.

    Returns:
        ``([B, m + 1] tokens, [B] j)``: the row keeps its first j + 1 tokens, the drafts
        d1..dj (each kept with probability min(1, p(d) / q(d)) while none was refused) and a
        token drawn from max(0, p - q) at the first refused draft, or from p after the last.
    """
    batch, m = drafts.shape
    p_draft = target[:, :m].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_draft = proposal.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # > 0: the drafts were drawn from it
    kept = torch.rand(p_draft.shape, device=drafts.device, dtype=p_draft.dtype) * q_draft < p_draft
    accepted = kept.long().cumprod(1).sum(1)
    # Each row's last token: from p where it kept every draft, else from max(0, p - q) at the
    # draft it refused (p itself where no mass is left: p = q up to rounding, and the draft
    # was refused only by rounding).
    rows = torch.arange(batch, device=drafts.device)
    p_last = target[rows, accepted]  # [B, V]
    last = p_last
    if m:
        residual = (p_last - proposal[rows, accepted.clamp_max(m - 1)]).clamp_min_(0)
        refused = (accepted < m).unsqueeze(1) & (residual.sum(-1, keepdim=True) > 0)
        last = torch.where(refused, residual, p_last)
    fix = torch.multinomial(last, 1)
    tokens = torch.cat([drafts, fix], dim=1).scatter_(1, accepted.unsqueeze(1), fix)
    return tokens, accepted


def sampling_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution sampling draws from: softmax after temperature, top-k and top-p (0
    where a token is dropped); ``[N, V]``."""
    scores = logits / sampling.temperature  # ours: changed in place below (a V-sized row per row fewer)
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        del sorted_scores
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = probs.cumsum(-1).sub_(probs) >= sampling.top_p
        del probs
        scores.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores.softmax(-1)
