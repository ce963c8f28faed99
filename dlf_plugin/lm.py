"""The lm-eval model ``dlf``: a large base model fused with expert pairs at every token.

Tokenisation, request batching, chat templates and stop-string post-processing are
lm-eval's own (``HFLM``, around the large model); the model calls are the fusion
engine's: scoring runs every model once per batch and fuses only the continuation
positions; generation keeps one KV cache per model.
"""

from __future__ import annotations

import collections
import datetime
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM, normalize_gen_kwargs
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import clear_torch_cache
from lm_eval.utils import simple_parse_args_string
from accelerate import find_executable_batch_size
from tqdm import tqdm

import dlf_plugin
from dlf_plugin import arguments, console, loading, views
from dlf_plugin.backends import LocalModel
from dlf_plugin.engine import DEFAULT_FUSION_MEMORY, FusionEngine, LookupHistory, Sampling
from dlf_plugin.errors import DLFError
from dlf_plugin.fusion import FusionInputs, dlf_loss
from dlf_plugin.hooks import make_solver
from dlf_plugin.registry import DTYPES, RegistryError, load_registry
from dlf_plugin.remote import RemoteModel
from dlf_plugin.trace import TraceWriter

logger = logging.getLogger(__name__)
console.install()

# model_args that dlf itself reads (everything else goes to the solver) and HFLM's
# that dlf passes through.
DLF_ARGS = ("registry", "experts", "solver", "dtype", "trace", "placement", "route", "route_tokens", "fusion_memory", "speculate", "lookup", "lookup_history", "draft_confidence", "shots")
ROUTES = ("none", "task", "prompt")
# Speculating at batch size b > 1, lm-eval's chunks hold this many batches of requests, which
# the b rows of one generate call decode, refilling: a call's last rows drain once per chunk,
# and lm-eval's progress bar and its request cache (--use_cache) advance once per chunk.
REFILL_GROUPS = 8
PASSED_TO_HFLM = ("batch_size", "max_batch_size", "max_length", "add_bos_token", "prefix_token_id", "truncation", "logits_cache")
GEN_KWARGS = ("do_sample", "temperature", "top_p", "top_k")
# route=prompt: the prompt's last tokens whose likelihood ratio picks the pair (0: the whole
# prompt). Chosen on the toy world's dev kingdoms: the last token (the format's closing
# label, "Answer:") routed 74% of the seen tasks' prompts to their own pair, the whole
# prompt 33% (the kingdom's name, which no expert was tuned on, drowns the format).
ROUTE_TOKENS = 1
# lm-eval's Collator repeats a logits tensor for requests sharing a row; dlf passes none.
NO_LOGITS = torch.empty(1, 1, 0)


class DLFLM(HFLM):
    """Dynamic Logit Fusion as an lm-eval model.

    Args:
        registry: path to a registry YAML, or a shipped registry's name (default ``toy``).
        experts: pair names joined by ``+`` (``gsm8k+triviaqa``), ``all``, ``auto``
            (``all`` with ``route=task``), or empty for the large base alone.
        route: ``none`` (every request fused with every chosen pair), ``prompt``: each request
            fused with the one chosen pair whose expert finds its prompt likeliest relative to
            the pair's small base (no task labels; DESIGN.md section 6), or ``task``: each
            request fused with those of the chosen pairs whose registry ``tasks`` list its
            lm-eval task; a task none of them lists gets them all (the paper's unseen tasks).
        solver: a registered solver's name (default ``dlf``).
        dtype: overrides every model's registry dtype (auto, float32, float16, bfloat16).
        trace: path of a JSONL file receiving the per-token weights of every generation
            (under data parallelism, process r > 0 writes ``<stem>.rank<r><suffix>`` beside it).
        placement: overrides every model's registry placement: a device (``cuda:1``,
            ``cpu``) or ``auto`` (``device_map=auto``).
        route_tokens: route=prompt: how many of the prompt's last tokens decide (default 1; 0:
            the whole prompt).
        fusion_memory: MiB that scoring spends on fused positions at once (default 1024);
            positions are fused in chunks that fit, whatever the batch and its length.
        speculate: generation makes up to this many tokens a round: the first chosen pair's
            expert drafts one fewer, every model reads them in one pass, and the fused tokens
            are kept up to the first draft the fusion refuses (greedy: the same tokens, up to a
            16-bit dtype's rounding (README); sampled: the same distribution, by the
            speculative-sampling rule; fewer large-model passes; DESIGN.md section 8); 0
            (default) or 1 decode plainly.
        lookup: speculative rounds also draft from the context (prompt lookup): a row whose
            prompt and generation already hold its last three (else two) tokens drafts up to
            this many of the tokens that followed their earliest occurrence, instead of the
            expert's choices; a round where every row has such a copy runs no drafter at all.
            The same tokens or distribution as without; 0 (default): off. With speculate 0 or
            1, only copies are drafted.
        lookup_history: with lookup, a row whose own context holds no copy looks for one in
            the generations of the run's earlier requests (True/False; default False): the
            same tokens or distribution, more copies where a task's answers repeat one
            another's wording. Up to 2^18 pooled tokens, on the host.
        draft_confidence: with speculate k > 1, the expert stops drafting a round where its
            most likely next token has less than this probability in every running row, so a
            round is only as wide as its likely drafts; the same tokens or distribution as
            without. A number in [0, 1); 0 (default): always k - 1 drafts. One more sync per
            drafted token.
        shots: who reads the few-shot demonstrations of ``--num_fewshot``: ``all`` (default)
            or ``large`` (the large model only; the pairs read the zero-shot prompt). With
            ``large``, or a pair whose registry entry says ``chat_template: true`` (its expert
            and small base read the expert's chat template), each model reads its own
            rendering of a request (a prompt view, DESIGN.md section 7).
        device: from ``--device``: the device of models the registry places nowhere.
        **kwargs: HFLM batching options (batch_size, max_length, ...) and the solver's options.
    """

    def __init__(
        self,
        registry: str | None = None,
        experts: str = "",
        solver: str = "dlf",
        dtype: str | None = None,
        trace: str | None = None,
        placement: str | None = None,
        route: str | None = "none",
        fusion_memory: int | str = DEFAULT_FUSION_MEMORY // 1024**2,
        route_tokens: int | str = ROUTE_TOKENS,
        speculate: int | str = 0,
        lookup: int | str = 0,
        lookup_history: bool | str = False,
        draft_confidence: float | str = 0.0,
        shots: str = "all",
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        hflm_args = {k: kwargs.pop(k) for k in PASSED_TO_HFLM if k in kwargs}
        self.registry = load_registry(registry)
        route = "none" if route is None else route  # lm-eval's model_args parser turns "none" into None
        if route not in ROUTES:
            raise RegistryError(f"model_args route={route!r} is not one of {', '.join(ROUTES)}")
        self.route = "task" if experts == "auto" and route == "none" else route
        self.routed = self.route != "none"
        experts = "all" if experts == "auto" else experts
        names = arguments.split_experts(experts, list(self.registry.pairs))
        pair_specs = self.registry.select(names)
        solver_obj, plugin = make_solver(str(solver), [p.name for p in pair_specs], kwargs, DLF_ARGS + PASSED_TO_HFLM)
        self._solver_args = (str(solver), kwargs)
        if dtype is not None and dtype not in DTYPES:
            raise RegistryError(f"model_args dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        memory = arguments.whole_number("fusion_memory", fusion_memory) * 1024**2
        self.route_tokens = arguments.whole_number("route_tokens", route_tokens, minimum=0)
        self.speculate = arguments.whole_number("speculate", speculate, minimum=0)
        if self.speculate > 1 and not pair_specs:
            raise RegistryError("model_args speculate needs at least one expert pair: the first pair's expert drafts")
        self.lookup = arguments.whole_number("lookup", lookup, minimum=0)
        if self.lookup and not pair_specs:
            raise RegistryError("model_args lookup drafts for speculative decoding, which needs at least one expert pair")
        if arguments.boolean("lookup_history", lookup_history) and not self.lookup:
            raise RegistryError("model_args lookup_history pools copies for lookup's drafts: set lookup=n (e.g. 4), or drop lookup_history")
        self.lookup_history = LookupHistory() if lookup_history else None
        self.draft_confidence = arguments.fraction("draft_confidence", draft_confidence)
        if self.draft_confidence and self.speculate < 2:
            raise RegistryError(
                f"model_args draft_confidence={self.draft_confidence:g} stops the expert's drafts, which it makes only with "
                "speculate=k > 1: set speculate, or drop draft_confidence"
            )
        if shots not in views.SHOTS:
            raise RegistryError(f"model_args shots={shots!r} is not one of {', '.join(views.SHOTS)}")
        self.shots = shots
        if self.route == "prompt" and (shots != "all" or any(p.chat_template for p in pair_specs)):
            raise RegistryError(
                "model_args route=prompt reads one prompt for every pair; it cannot be combined with shots=large or "
                "chat_template pairs (prompt views): use route=task, or choose pairs without chat_template"
            )
        arguments.check_hflm_args(hflm_args)
        arguments.check_placement(placement)
        accelerator = _data_parallel()
        if accelerator is not None:
            if placement is not None:
                raise RegistryError(
                    f"model_args placement={placement!r} under data parallelism ({accelerator.num_processes} processes): "
                    "each process places every model on its own device; drop placement"
                )
            placement = str(accelerator.device)
            if trace:  # one trace per process: trace.jsonl, trace.rank1.jsonl, ...
                path = Path(trace)
                trace = str(path.with_name(f"{path.stem}.rank{accelerator.process_index}{path.suffix}")) if accelerator.process_index else trace
        arguments.check_trace_path(trace)

        served = self.registry.models[self.registry.large].server is not None
        if served and not pair_specs:
            raise RegistryError(
                f"the large model {self.registry.large} is behind a server and no expert pair is chosen: there is "
                "nothing to fuse (lm-eval's own local-completions model evaluates a server alone); name pairs in experts"
            )
        if served and (self.speculate > 1 or self.lookup):
            given = f"speculate={self.speculate}" if self.speculate > 1 else f"lookup={self.lookup}"
            raise RegistryError(
                f"model_args {given}: the large model {self.registry.large} is behind a server, which "
                "would have to score the drafted tokens by echo at every step; drop speculate and lookup"
            )
        specs = self.registry.models_for(pair_specs)
        loading.check_sources(specs, self.registry.path)
        placements = {s.name: loading.resolve_placement(s, placement, self.registry, device) for s in specs if s.server is None}
        for name, (model_device, _) in placements.items():
            loading.check_device(name, model_device, str(self.registry.path))
        tokenizers = loading.load_tokenizers(specs, self.registry.path)
        loading.check_vocabularies(tokenizers, self.registry.large, self.registry.path)
        loading.check_output_vocabularies(specs, len(tokenizers[self.registry.large]), self.registry.path)
        templates = loading.chat_templates(pair_specs, tokenizers, self.registry)
        self.views = views.plan(self.registry.large, pair_specs, shots, templates)
        self._templates = templates
        self._views_signature = views.signature(self.views, templates)
        views.record({
            v.name: (v.shots, views.chat_renderer(tokenizers[v.template]) if v.template else None)
            for v in self.views.views[1:]
        }, self._views_signature)
        self._view_texts: dict[str, dict] = {}  # context -> view name -> text, for the call running
        self._boundary_differs = [0] * len(self.views.views)

        client = server = None
        if served:  # asked now: a server that is down fails the run before any weights load
            client, server = loading.connect(self.registry.models[self.registry.large], tokenizers[self.registry.large])
        loaded = {s.name: loading.load_model(s, *placements[s.name], dtype or s.dtype, self.registry.path) for s in specs if s.server is None}
        # HFLM wants a model object; behind a server, the first small one stands in (and sets the device).
        placed = next(iter(loaded.values())).model if server is not None else loaded[self.registry.large].model
        if server is not None:
            loaded = {self.registry.large: server, **loaded}
        self.loaded = loaded
        tokenizer = tokenizers[self.registry.large]
        with console.preloaded_model():
            super().__init__(pretrained=placed, tokenizer=tokenizer, **hflm_args)
        if accelerator is not None:  # lm-eval shards the requests by rank and gathers on rank 0
            self.accelerator = accelerator
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        vocab = min([len(tokenizer)] + [loading.output_vocab_size(m.model) for m in loaded.values() if m.model is not None])
        large_device = next(placed.parameters()).device
        backends = {name: LocalModel(name, m.model, vocab, large_device) for name, m in loaded.items() if m.model is not None}
        if client is not None:
            client.vocab_size = vocab
            backends[self.registry.large] = RemoteModel(client, large_device)
        probe = torch.tensor([tokenizer.encode("dlf checks each output layer")[:8]])
        for backend in backends.values():
            backend.check_head(probe)
        self.contexts = {name: b.context_length(tokenizers[name]) for name, b in backends.items()}
        self.pair_specs = pair_specs
        self.engine = FusionEngine(
            models={runner: backends[model] for runner, model in self.views.runners.items()},
            large=self.registry.large,
            pairs=list(self.views.pairs),
            vocab_size=vocab,
            solver=solver_obj,
            plugin=plugin,
            fusion_memory=memory,
            views=self.views.view_of,
        )
        self._chosen = tuple(p.name for p in pair_specs)
        self._engines = {self._chosen: self.engine}
        # route=task: task -> the pairs its requests were fused with; route=prompt: task -> pair -> requests.
        self.routes: dict[str, Any] = {}
        self._chat_template_applied = False
        self._chat_checked = False
        self.tracer = TraceWriter(trace, self.tok_decode) if trace else None
        self._ignored_gen_kwargs: set[str] = set()  # warned about once
        self._widest_generation: tuple[int, int, Sampling] | None = None  # batch_size auto's generation trial
        self._speculation = collections.Counter()  # the engines' speculation counts, summed over generate calls
        self._slots: int | None = None  # speculating at batch_size b > 1: b rows that refill

    # -- construction from lm-eval's model_args ---------------------------------------------

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        _reject_model_args(simple_parse_args_string(arg_string or ""), additional_config)
        return super().create_from_arg_string(arg_string, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        _reject_model_args(arg_dict, additional_config)
        return super().create_from_arg_obj(arg_dict, additional_config)

    # -- context ------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        """The usable context: model_args ``max_length`` if given, else the shortest of every
        fused model's own (config, else tokenizer): every model sees every token."""
        if self._max_length:
            return self._max_length
        known = [n for n in self.contexts.values() if n]
        return min(known) if known else self._DEFAULT_MAX_LENGTH

    @property
    def round_width(self) -> int:
        """The most positions a decoding step (a speculative round) reads per row, and so the
        most cache slots a generated token can take: 1 decoding plainly; k with
        ``speculate=k``, n + 1 with ``lookup=n``, whichever is more."""
        return max(self.speculate, self.lookup + 1)

    # -- prompt format ----------------------------------------------------------------------

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        self._chat_template_applied = True
        return super().apply_chat_template(chat_history, add_generation_prompt)

    # -- lm-eval's --use_cache -------------------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """lm-eval's ``CachingLM`` hands its cache here before any request: claim it for this
        configuration, or refuse one filled under another (lm-eval keys cached answers by
        request alone, so another configuration's answers would come back as this one's)."""
        db = getattr(cache_hook, "dbdict", None)
        if db is not None:
            _claim_cache(db, self.cache_identity())
        super().set_cache_hook(cache_hook)

    def cache_identity(self) -> dict:
        """Everything that changes a cached answer: dlf's version, the registry's bytes, each
        model's source, revision, weights' hash and dtype, the pairs and routing, the solver
        and its options, and how prompts are cut (max_length, BOS)."""
        keep = ("source", "resolved_revision", "content_sha256", "dtype", "server")
        return {
            "dlf_version": dlf_plugin.__version__,
            "registry_sha256": self.registry.sha256,
            "large": self.registry.large,
            "models": {name: {k: m.provenance.get(k) for k in keep} for name, m in sorted(self.loaded.items())},
            "pairs": [[p.name, p.expert, p.base] for p in self.pair_specs],
            "route": self.route,
            "route_tokens": self.route_tokens if self.route == "prompt" else None,
            "views": [v.describe(self._templates, self.views.runners) for v in self.views.views],
            "solver": {**self.engine.solver.describe(), "plugin": self.engine.plugin},
            "max_length": self.max_length,
            "add_bos_token": self.add_bos_token,
        }

    def _check_prompt_format(self) -> None:
        """Warn once when lm-eval applies the large model's chat template (``--apply_chat_template``)
        and pairs without one of their own (registry ``chat_template: false``) read it too."""
        if self._chat_checked or not self._chat_template_applied:
            return
        self._chat_checked = True
        raw = [p.name for p in self.pair_specs if not p.chat_template]
        if raw:
            logger.warning(
                "dlf: this run applies the large model's chat template (--apply_chat_template), and expert pairs %s "
                "of %s (chat_template: false) read it too; drop --apply_chat_template, or set chat_template: true "
                "for pairs whose experts have a template of their own", ", ".join(raw), self.registry.path,
            )

    def _take_views(self, requests) -> None:
        """Per context, its rendering in every view past view 0, from the requests lm-eval
        built (``views.record``); a request without them is refused before any request runs."""
        self._view_texts = {}
        if self.views.plain:
            return
        names = [v.name for v in self.views.views[1:]]
        for index, request in enumerate(requests):
            texts = getattr(request, "dlf_views", None)
            stamp = getattr(request, "dlf_views_signature", self._views_signature)  # by hand: unstamped
            if stamp != self._views_signature:
                raise arguments.RequestError(
                    f"{arguments.describe(request, index)} was rendered for other prompt views (another chat template, "
                    "shots setting or pairs; lm-eval's --cache_requests keeps requests across runs): rebuild them "
                    "with --cache_requests refresh"
                )
            if not isinstance(texts, dict) or any(n not in texts for n in names):
                raise arguments.RequestError(
                    f"{arguments.describe(request, index)} carries no rendering for prompt view(s) {', '.join(names)} "
                    "(model_args shots=large, or a chat_template pair): dlf renders them as lm-eval's tasks build their "
                    "requests; requests made by hand, or loaded by --cache_requests from a run without dlf, have none "
                    "(rebuild them: --cache_requests refresh)"
                )
            self._view_texts[request.args[0]] = texts

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        arguments.check_loglikelihood_requests(requests)
        self._check_prompt_format()
        self._take_views(requests)
        return self._routed(requests, lambda group: super(DLFLM, self).loglikelihood(group, disable_tqdm=disable_tqdm))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        arguments.check_rolling_requests(requests)
        self._check_prompt_format()
        return self._routed(requests, lambda group: super(DLFLM, self).loglikelihood_rolling(group, disable_tqdm=disable_tqdm))

    def generate_until(self, requests, disable_tqdm: bool = False):
        arguments.check_generation_requests(requests)
        self._check_prompt_format()
        self._take_views(requests)

        def run(group):
            if self.batch_size == "auto":
                self._widest_generation = self._widest(group)  # what the trial must fit
            if self.round_width == 1 or len(group) < 2:
                return super(DLFLM, self).generate_until(group, disable_tqdm=disable_tqdm)
            # Speculative rows finish at different rounds: lm-eval hands up to REFILL_GROUPS
            # batches' worth of requests with the same gen_kwargs to one generate call, whose
            # batch_size rows refill (FusionEngine.generate_speculative's slots); auto's trial
            # holds the next group's prompts beside a batch, as a refilling call does.
            chosen = self.batch_size_per_gpu
            rows = self._detect_batch_size() if chosen == "auto" else chosen
            self._slots = rows if 1 < rows < len(group) else None
            self.batch_size_per_gpu = min(len(group), rows * REFILL_GROUPS) if self._slots else rows
            try:
                return super(DLFLM, self).generate_until(group, disable_tqdm=disable_tqdm)
            finally:
                self.batch_size_per_gpu, self._slots = chosen, None

        return self._routed(requests, run)

    def _widest(self, requests) -> tuple[int, int, Sampling]:
        """What a generation of ``requests`` needs most of, for batch_size auto's trial: the
        row whose KV caches can grow longest (its context tokens as lm-eval cuts them, and its
        max_gen_toks) and the costliest way any of them samples."""
        rows, sampled, top_k, top_p = [], False, 0, 1.0
        for request in requests:
            context, kwargs = request.args
            kwargs = normalize_gen_kwargs(kwargs, self.max_gen_toks)
            new = kwargs["max_gen_toks"]
            # Each prompt view is cut to max_length - new; a view may be longer than lm-eval's.
            context = min(len(self.tok_encode(context)), self.max_length - new) if self.views.plain else self.max_length - new
            rows.append((context, new))
            sampling = _sampling(kwargs, warned=set(kwargs))  # unknown kwargs are warned about in the run
            sampled |= sampling.do_sample
            top_k, top_p = max(top_k, sampling.top_k), min(top_p, sampling.top_p)
        context, new = max(rows, key=lambda row: row[0] + row[1] * self.round_width)
        return context, new, Sampling(do_sample=sampled, top_k=top_k if sampled else 0, top_p=top_p if sampled else 1.0)

    # -- route=task: each task's own pairs ------------------------------------------------

    def pairs_for(self, task: str | None) -> tuple[str, ...]:
        """route=task: the chosen pairs whose registry ``tasks`` list ``task``, in the order
        chosen; all of them when none does."""
        return tuple(p.name for p in self.pair_specs if task in p.tasks) or self._chosen

    def _routed(self, requests, run):
        """``run`` over ``requests``; with route=task, once per set of pairs, each request
        fused with its task's pairs, results back in request order."""
        if not self.routed:
            return run(requests)
        groups: dict[tuple[str, ...], list[int]] = {}
        chosen = self._pairs_by_prompt(requests) if self.route == "prompt" else None
        for i, request in enumerate(requests):
            task = str(getattr(request, "task_name", None))
            if chosen is None:
                names = self.pairs_for(task)
                self.routes[task] = list(names)
            else:
                names = (chosen[i],)
                counts = self.routes.setdefault(task, {})
                counts[chosen[i]] = counts.get(chosen[i], 0) + 1
            groups.setdefault(names, []).append(i)
        results: list[Any] = [None] * len(requests)
        try:
            for names, rows in groups.items():
                self.engine = self._engine_for(names)
                for i, result in zip(rows, run([requests[i] for i in rows]), strict=True):
                    results[i] = result
        finally:
            self.engine = self._engines[self._chosen]
        return results

    def _pairs_by_prompt(self, requests) -> list[str]:
        """route=prompt: per request, the chosen pair with the largest prompt evidence
        ``log p_E(prompt) - log p_S(prompt)`` (each distinct prompt scored once, in batches)."""
        contexts = list(dict.fromkeys(r.args[0] for r in requests))
        batch = self.batch_size if isinstance(self.batch_size, int) else 16
        best = {}
        for start in range(0, len(contexts), batch):
            group = contexts[start : start + batch]
            encoded = [self.tok_encode(c)[-self.max_length :] or [self.prefix_token_id] for c in group]
            ids = torch.full((len(group), max(map(len, encoded))), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            for row, tokens in enumerate(encoded):
                ids[row, : len(tokens)] = torch.tensor(tokens)
            evidence = self.engine.pair_evidence(ids, [len(t) for t in encoded], last=self.route_tokens)
            for context, pair in zip(group, evidence.argmax(1).tolist()):
                best[context] = self._chosen[pair]
        return [best[r.args[0]] for r in requests]

    def _engine_for(self, names: tuple[str, ...]) -> FusionEngine:
        """An engine over the loaded models that fuses only the pairs ``names`` (built once)."""
        if names not in self._engines:
            solver_name, options = self._solver_args
            solver_obj, plugin = make_solver(solver_name, list(names), options)
            every = self._engines[self._chosen]
            self._engines[names] = FusionEngine(
                models=every.models,
                large=every.large,
                pairs=[p for p in every.pairs if p.name in names],
                vocab_size=every.vocab_size,
                solver=solver_obj,
                plugin=plugin,
                fusion_memory=every.fusion_memory,
                views=every.view_of,
            )
        return self._engines[names]

    # -- scoring --------------------------------------------------------------------------

    def _model_call(self, inps, attn_mask=None, labels=None):
        raise NotImplementedError("dlf scores through its fusion engine, never through the large model alone")

    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """``--batch_size auto``: the largest batch whose real work fits, found by trying it
        (accelerate's ``find_executable_batch_size``, as lm-eval's own detection: smaller
        batches after each out-of-memory error).

        Scoring tries the longest request's shape with its continuation fused (chunked, as
        every batch is). Generation (lm-eval asks with no requests) prefills prompts as long
        as the widest request's KV caches can grow and makes a fused step on them (a
        speculative round of k positions): a generation's memory is mostly its caches, which
        scoring never keeps.
        """
        if requests:
            _, context, continuation = requests[pos]
            width = len((context + continuation)[-(self.max_length + 1) :][:-1])
            fused = min(len(continuation), width)

            def trial(batch_size: int) -> None:
                ids = torch.full((batch_size, width), self.prefix_token_id, dtype=torch.long)
                positions = torch.zeros((batch_size, width), dtype=torch.bool)
                positions[:, width - fused :] = True
                self.engine.score(ids, positions, torch.zeros(batch_size * fused, 1, dtype=torch.long))
        else:
            trial = self._generation_trial

        @find_executable_batch_size(starting_batch_size=self.max_batch_size)
        def attempt(batch_size: int) -> int:
            with self.engine.declared_solver_memory():
                trial(batch_size)
            return batch_size

        try:
            batch_size = attempt()
        except RuntimeError as exc:
            if "No executable batch size found" not in str(exc):
                raise
            batch_size = 1
        clear_torch_cache()
        return batch_size

    def _generation_trial(self, batch_size: int) -> None:
        """A step (a speculative round) after the prefill's, from prompts whose caches end as
        long as the widest request's can grow: its context and max_gen_toks new tokens, times
        k with ``speculate=k`` (a round takes k cache slots per row and at worst keeps one;
        n + 1 with ``lookup=n`` where that is more); speculating, the next group's prompts
        prefilled while those caches live (rows that refill hold them).
        Nothing of a step outlives it but the caches, so the last step is the largest. Left
        padding keeps positions within max_length."""
        context, new, sampling = self._widest_generation or (self.max_length - self.max_gen_toks, self.max_gen_toks, Sampling())
        k = self.round_width
        read = 2 if k == 1 else k  # slots after the prompt: a plain cache holds both tokens, a round reads k
        prompt = max(1, context + new * k - read)
        shown = max(1, min(prompt, context + new - read))  # prompt tokens not padding
        ids = torch.full((batch_size, prompt), self.prefix_token_id, dtype=torch.long)
        mask = torch.ones_like(ids)
        mask[:, : prompt - shown] = 0
        common = dict(eos_token_id=-1, pad_token_id=self.prefix_token_id, sampling=sampling)
        if k == 1:
            self.engine.generate(ids, mask, max_new_tokens=2, **common)
        else:
            # Room for a whole round after the prefill's token (a round is never wider than the
            # tokens left), and a stop after it. Then, as rows that refill hold it while those
            # caches live, the next group's prompts (the widest context) are prefilled.
            def after_one_round(rows, made):
                return {r for r, tokens in zip(rows, made) if len(tokens) > 1}

            waiting = torch.full_like(ids, self.prefix_token_id)
            waiting_mask = torch.zeros_like(mask)
            waiting_mask[:, prompt - max(1, min(prompt, context)) :] = 1
            self.engine.generate_speculative(torch.cat([ids, waiting]), torch.cat([mask, waiting_mask]), max_new_tokens=1 + k, draft=k,
                                             stop_check=after_one_round, slots=batch_size, **common)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Score (context, continuation) token pairs, fusing at continuation positions only."""

        def sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(
            requests,
            sort_fn=sort_key,
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        auto = self.batch_size == "auto"
        batch_size = override_bs if auto and override_bs else (0 if auto else self.batch_size)
        batch_fn = self._batch_scheduler if auto and not override_bs and len(re_ord) else None
        if batch_fn is not None:
            self.batch_sizes = {}
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests (dlf)")
        results = []
        for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
            rows, spans, targets = [], [], []
            view_rows: list[list[list[int]]] = [[] for _ in self.views.views]
            for strings, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                    raise ValueError("dlf: every request needs a context and a continuation no longer than max_length")
                for view, view_context in enumerate(self._view_contexts(strings, context_enc, continuation_enc)):
                    view_rows[view].append((view_context + continuation_enc)[-(self.max_length + 1) :][:-1])
                row = view_rows[0][-1]
                rows.append(row)
                spans.append((len(row) - len(continuation_enc), len(row)))
            # With logits_cache, requests sharing a context and differing only in a one-token
            # continuation share a row: each position is asked for every such token.
            # Their continuations end at the same token position: align each to the span's end.
            groups = [list(re_ord.get_cache(req_str=r, cxt_toks=c, cont_toks=x, logits=NO_LOGITS)) for r, c, x in chunk]
            for group, (start, end) in zip(groups, spans):
                span = end - start
                for i in range(span):
                    targets.append([toks[i - span + len(toks)] if i >= span - len(toks) else -1 for _, toks, _ in group])
            input_ids, positions = [], []  # per view: right-padded rows, their continuation positions
            for rows_v in view_rows:
                width = max(len(r) for r in rows_v)
                ids = torch.full((len(rows_v), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                asked = torch.zeros((len(rows_v), width), dtype=torch.bool)
                for i, (row, (start, end)) in enumerate(zip(rows_v, spans)):
                    ids[i, : len(row)] = torch.tensor(row)
                    asked[i, len(row) - (end - start) : len(row)] = True
                input_ids.append(ids)
                positions.append(asked)
            most = max(len(t) for t in targets)
            target_ids = torch.tensor([t + [-1] * (most - len(t)) for t in targets], dtype=torch.long)
            if len(input_ids) == 1:  # no views: every model reads the same rows
                input_ids, positions = input_ids[0], positions[0]
            scores = self.engine.score(input_ids, positions, target_ids, losses=self.tracer is not None)
            if self.tracer is not None:
                self._trace_scores(chunk, scores)
            logprobs, greedy = scores.logprobs.cpu(), scores.greedy.cpu()
            offset = 0
            for group, (_, _, continuation), (start, end) in zip(groups, chunk, spans):
                span = slice(offset, offset + end - start)
                offset += end - start
                for j, (request_str, cont_toks, _) in enumerate(group):
                    tail = slice(span.stop - len(cont_toks), span.stop)
                    is_greedy = greedy[tail].tolist() == list(cont_toks)
                    answer = (float(logprobs[tail, j].double().sum()), is_greedy)
                    results.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(results)

    def _view_contexts(self, strings, context_enc: list[int], continuation_enc: list[int]) -> list[list[int]]:
        """A scoring request's context tokens in every view (view 0: lm-eval's).

        The continuation is tokenised once, after view 0's context, and every view's context
        is followed by those same tokens, so that position i of the continuation is fused
        across the views. A view whose own tokenisation of its text and the continuation
        splits the boundary otherwise is counted (``boundary_differs`` in the results) and
        still reads the same continuation tokens. Rolling windows (no strings) and runs
        without views read view 0 everywhere.
        """
        if self.views.plain or strings is None:
            return [context_enc] * len(self.views.views)
        context, continuation = strings
        texts = self._view_texts[context]
        kept = context.rstrip()
        moved = context[len(kept) :]  # lm-eval moves a context's trailing whitespace into the continuation
        out = [context_enc]
        for index, view in enumerate(self.views.views[1:], start=1):
            text = texts[view.name]
            if moved and text.endswith(moved):
                text = text[: len(text) - len(moved)]
            tokens = self.tok_encode(text) or [self.prefix_token_id]
            if self.tok_encode(text + moved + continuation) != tokens + list(continuation_enc):
                self._boundary_differs[index] += 1
            out.append(tokens)
        return out

    def _trace_scores(self, chunk, scores) -> None:
        ids = self.tracer.new_requests(len(chunk))
        requests, positions, tokens, prompts = [], [], [], []
        for request, (strings, _, continuation) in zip(ids, chunk):
            requests += [request] * len(continuation)
            positions += list(range(len(continuation)))
            tokens += list(continuation)
            prompts += [strings[0] if strings else None] + [None] * (len(continuation) - 1)
        self.tracer.write("score", requests, positions, tokens, scores.weights, scores.losses, scores.pairs, prompts)

    # -- generation -----------------------------------------------------------------------

    def tok_batch_encode(self, strings, padding_side: str = "left", left_truncate_len=None, truncation: bool = False):
        """lm-eval's batch encoding of generation contexts; the strings are kept for
        ``_model_generate`` to render the batch in every prompt view."""
        self._batch_contexts = list(strings)
        return super().tok_batch_encode(strings, padding_side=padding_side, left_truncate_len=left_truncate_len, truncation=truncation)

    def _generation_views(self, context, attention_mask, room: int):
        """The batch's left-padded prompts in every view (view 0: lm-eval's), each cut to the
        context lm-eval leaves for ``room`` new tokens."""
        if self.views.plain:
            return context, attention_mask
        contexts = self._batch_contexts
        ids, masks = [context], [attention_mask]
        for view in self.views.views[1:]:
            texts = [self._view_texts[c][view.name] for c in contexts]
            encoded, mask = HFLM.tok_batch_encode(self, texts, left_truncate_len=self.max_length - room, truncation=self.truncation)
            ids.append(encoded.to(context.device))
            masks.append(mask.to(context.device))
        return ids, masks

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        attention_mask = generation_kwargs.pop("attention_mask")
        sampling = _sampling(generation_kwargs, self._ignored_gen_kwargs)
        stop_strings = [s for s in stop if s]
        longest = max((len(s) for s in stop_strings), default=0)

        def stop_check(rows, generated):
            if not stop_strings:
                return set()
            return {
                row
                for row, ids in zip(rows, generated)
                if any(s in self.tokenizer.decode(ids[-(longest + 4) :]) for s in stop_strings)
            }

        if self.tracer is not None:
            ids = self.tracer.new_requests(context.shape[0])

            prompts = [self.tok_decode(row[mask.bool()].tolist()) for row, mask in zip(context, attention_mask)]

            def observe(fused, rows, fused_rows, tokens, positions, drafted):
                # Tracing reads more than the step's one transfer: it is for inspection, not speed.
                picked = torch.tensor(fused_rows, device=fused.weights.device)
                weights = fused.weights.index_select(0, picked)
                losses = None
                if fused.pairs:
                    inputs = fused.inputs
                    chosen = FusionInputs(*(t.index_select(0, picked) for t in (inputs.base_logits, inputs.small_logits, inputs.expert_logits, inputs.row_mask)))
                    losses = dlf_loss(chosen, weights)
                first = [prompts[r] if p == 0 else None for r, p in zip(rows, positions)]
                self.tracer.write("generate", [ids[r] for r in rows], positions, tokens, weights, losses, fused.pairs, first, drafted)

            self.engine.observer = observe
        new_tokens = max_length - context.shape[1]
        context, attention_mask = self._generation_views(context, attention_mask, new_tokens)
        common = dict(
            max_new_tokens=new_tokens,
            eos_token_id=self.eot_token_id,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id,
            stop_check=stop_check,
        )
        try:
            if self.round_width == 1:
                return self.engine.generate(context, attention_mask, sampling=sampling, **common)
            out = self.engine.generate_speculative(context, attention_mask, draft=max(self.speculate, 1), lookup=self.lookup, confidence=self.draft_confidence, sampling=sampling, slots=self._slots, history=self.lookup_history, **common)
            self._speculation.update(self.engine.speculation, calls=1)
            return out
        finally:
            self.engine.observer = None

    # -- results metadata -----------------------------------------------------------------

    def get_model_info(self) -> dict:
        """What a results file records: registry, models with revisions, pairs, solver, versions."""
        large = self.loaded[self.registry.large]
        return {
            "model_num_parameters": large.provenance["num_parameters"],
            "model_dtype": large.provenance["dtype"],
            "model_revision": large.provenance["resolved_revision"] or large.spec.revision,
            "model_sha": large.provenance.get("content_sha256") or large.provenance["resolved_revision"] or "",
            "dlf": {
                "dlf_version": dlf_plugin.__version__,
                "registry": {
                    "name": self.registry.name,
                    "path": str(self.registry.path),
                    "sha256": self.registry.sha256,
                },
                "large": self.registry.large,
                "models": {name: m.provenance for name, m in self.loaded.items()},
                "pairs": [
                    {"name": p.name, "expert": p.expert, "base": p.base, "tasks": list(p.tasks), "chat_template": p.chat_template}
                    for p in self.pair_specs
                ],
                "route": self.route,
                **({"route_tokens": self.route_tokens} if self.route == "prompt" else {}),
                **({"speculate": self.speculate} if self.speculate > 1 else {}),
                **({"lookup": self.lookup} if self.lookup else {}),
                **({"lookup_history": True} if self.lookup_history is not None else {}),
                **({"draft_confidence": self.draft_confidence} if self.draft_confidence else {}),
                **({"speculation": self._speculation_report()} if self.round_width > 1 else {}),
                "shots": self.shots,
                "views": self._describe_views(),
                **({"routes": dict(self.routes)} if self.routed else {}),
                "solver": {**self.engine.solver.describe(), "plugin": self.engine.plugin, **self._uncertified()},
                "versions": {pkg: _version(pkg) for pkg in ("torch", "transformers", "lm_eval", "pluggy")},
            },
        }


    def _describe_views(self) -> list[dict]:
        """Each prompt view, who reads it, and how many scored requests' boundary with the
        continuation its own tokenisation splits otherwise (warned about if any)."""
        described = []
        for view, differs in zip(self.views.views, self._boundary_differs):
            described.append({**view.describe(self._templates, self.views.runners), "boundary_differs": differs})
            if differs:
                logger.warning(
                    "dlf: in prompt view %r, %d scored request(s) tokenise the boundary between context and "
                    "continuation otherwise than view 0; they read view 0's continuation tokens after their own "
                    "context tokens", view.name, differs,
                )
        return described

    def _speculation_report(self) -> dict:
        """What speculative decoding did over the run's generations: ``calls`` (generate calls),
        ``prefills`` (the large model's passes over prompts: one per call, or per group of
        batch_size prompts where rows refill), ``rounds`` (its passes after them),
        ``lookup_rounds`` (rounds drafted by copies alone), ``drafted`` (drafts made for running
        rows, ``copied`` of them from the context, ``pooled`` of those from ``lookup_history``), ``accepted`` (those the fusion kept, up to
        each row's first refusal; a row's stop may then cut some off), ``tokens`` generated, and
        ``acceptance`` = accepted / drafted."""
        counts = {key: self._speculation[key] for key in ("calls", "prefills", "rounds", "lookup_rounds", "drafted", "copied", "pooled", "accepted", "tokens")}
        return {**counts, "acceptance": counts["accepted"] / counts["drafted"] if counts["drafted"] else None}

    def _uncertified(self) -> dict:
        """Fused positions that the exact solver's fixed (sync-free) schedule left uncertified,
        over every engine of the run: read from the device once, here; warned about if any."""
        counts = [getattr(e.solver, "uncertified", None) for e in self._engines.values()]
        counts = [int(c) for c in counts if c is not None]
        if not counts:
            return {}
        total = sum(counts)
        if total:
            logger.warning(
                "dlf: %d fused position(s) were solved by the fixed (sync-free) schedule without certification: "
                "their DLF loss may exceed dlf-grid's; solver option schedule=adaptive certifies every position", total,
            )
        return {"uncertified_positions": total}


# The key under which a --use_cache database records the configuration that filled it
# (lm-eval's own keys are sha256 hex digests).
CACHE_IDENTITY_KEY = "dlf:configuration"


class CacheMismatch(DLFError, ValueError):
    """An lm-eval cache was filled under another configuration."""


def _claim_cache(db, identity: dict) -> None:
    """Record ``identity`` in an empty cache; accept a cache recorded with the same one;
    refuse any other, naming what differs."""
    def canonical(value) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    mine = canonical(identity)
    where = getattr(db, "filename", "the cache")
    stored = db.get(CACHE_IDENTITY_KEY)
    if stored is None:
        if len(db):
            raise CacheMismatch(
                f"--use_cache {where} holds answers from another model or an older dlf (no dlf configuration "
                "recorded); lm-eval keys cached answers by request alone, so they would be taken for this run's. "
                "Pass another --use_cache path, or delete that file"
            )
        db[CACHE_IDENTITY_KEY] = mine
        return
    if stored != mine:
        theirs = json.loads(stored)
        differ = sorted(k for k in set(theirs) | set(identity) if canonical(theirs.get(k)) != canonical(identity.get(k)))
        raise CacheMismatch(
            f"--use_cache {where} was filled by a different dlf configuration (differs in: {', '.join(differ)}); "
            "lm-eval keys cached answers by request alone, so that configuration's answers would be taken for this "
            "run's. Pass another --use_cache path per configuration, or delete that file"
        )


def _data_parallel():
    """The process group when launched as one of several processes (``accelerate launch``,
    ``torchrun``): an ``accelerate.Accelerator`` on this process's device; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator, InitProcessGroupKwargs

    # Without a GPU, accelerate joins the processes only when told to use the CPU (gloo).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=24))])
    return accelerator if accelerator.num_processes > 1 else None


def _reject_model_args(args: dict, additional: dict | None) -> None:
    """model_args that lm-eval would pass on twice or dlf does not take, named before any model loads."""
    if "device" in args:
        raise RegistryError(
            "model_args: 'device' is not a dlf model argument; use model_args placement=<device or auto> "
            "for every model, or set device/device_map per model in the registry (--device applies "
            "where neither says)"
        )
    # lm-eval's command line always passes --batch_size (1 unless given) beside model_args.
    twice = sorted(k for k, v in (additional or {}).items() if k in args and v is not None)
    if twice:
        raise RegistryError(
            "model_args: " + ", ".join(f"{k}={args[k]} is also given by lm-eval as {additional[k]} (--{k})" for k in twice)
            + "; give it once, as " + " ".join(f"--{k} {args[k]}" for k in twice) + " on the command line"
        )


def _sampling(kwargs: dict, warned: set[str]) -> Sampling:
    """lm-eval's gen_kwargs as dlf's Sampling; kwargs dlf does not implement are warned about
    once each (``warned`` keeps those already named)."""
    unknown = sorted(k for k in kwargs if k not in GEN_KWARGS and k not in warned)
    if unknown:
        warned.update(unknown)
        logger.warning("dlf: ignoring generation kwargs it does not implement: %s", ", ".join(unknown))
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = bool(kwargs.get("do_sample", False)) and temperature > 0
    top_p = float(kwargs.get("top_p") if kwargs.get("top_p") is not None else 1.0)
    top_k = int(kwargs.get("top_k") or 0)  # values checked with the requests (arguments.py)
    return Sampling(do_sample=do_sample, temperature=temperature if do_sample else 1.0, top_p=top_p, top_k=top_k)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None
