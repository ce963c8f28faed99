"""Prompt views: the rendering of a request each model of a fusion reads (DESIGN.md section 7).

A view is fixed by two choices: whether the few-shot demonstrations are in it, and whose
chat template renders it. View 0 is the large model's: the context lm-eval built (its
``--num_fewshot`` shots, its ``--apply_chat_template``). A pair whose registry entry says
``chat_template: true`` reads its expert's own template (the expert and its small base
both); with model_args ``shots=large`` the pairs read no demonstrations. Pairs that read
what the large model reads share view 0.

lm-eval hands a model finished context strings, so the other views are rendered where
lm-eval builds them: :func:`record` wraps ``ConfigurableTask.fewshot_context`` to render
each view with lm-eval's own function for the same document, the demonstrations it drew
for the large model replayed (never drawn again), and attaches them to the request
(``Instance.dlf_views``) in ``construct_requests``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable

import jinja2

from dlf_plugin.engine import Pair
from dlf_plugin.registry import PairSpec

SHOTS = ("all", "large")
LARGE_VIEW = "large"


@dataclasses.dataclass(frozen=True)
class View:
    """One rendering of every request, and the models that read it (their engine names)."""

    name: str
    shots: bool  # the few-shot demonstrations are in it
    template: str | None  # the expert whose tokenizer's chat template renders it; None: as lm-eval rendered view 0
    models: tuple[str, ...]

    def describe(self, templates: dict[str, str], runners: dict[str, str]) -> dict:
        """What a results file records of the view."""
        text = templates.get(self.template) if self.template else None
        return {
            "name": self.name,
            "shots": self.shots,
            "chat_template": self.template,
            "chat_template_sha256": hashlib.sha256(text.encode()).hexdigest() if text else None,
            "models": [runners[m] for m in self.models],
        }


@dataclasses.dataclass(frozen=True)
class ViewPlan:
    """Which view each model reads, and the engine's pairs over the models' engine names.

    A model read in two views (a small base shared by a raw pair and a chat pair) is run
    once per view, with a cache each: its first view keeps its registry name, the others
    call it ``<model>@<view>``.
    """

    views: tuple[View, ...]
    runners: dict[str, str]  # engine name -> registry model
    view_of: dict[str, int]  # engine name -> index into views
    pairs: tuple[Pair, ...]

    @property
    def plain(self) -> bool:
        """Every model reads view 0: nothing to render."""
        return len(self.views) == 1


def plan(large: str, pairs: list[PairSpec], shots: str, templates: dict[str, str]) -> ViewPlan:
    """The views of a fusion of ``large`` with ``pairs``.

    Args:
        shots: ``all`` (every model reads view 0's demonstrations) or ``large`` (only the
            large model does).
        templates: each chat pair's expert -> its tokenizer's chat template. Pairs whose
            experts' templates are the same text share a view.
    """
    keys: list[tuple[bool, str | None]] = [(True, None)]
    names = [LARGE_VIEW]
    members: list[list[str]] = [[large]]
    owner_of_text: dict[str, str] = {}
    pair_views = []
    for p in pairs:
        template = owner_of_text.setdefault(templates[p.expert], p.expert) if p.chat_template else None
        key = (shots == "all", template)
        if key not in keys:
            keys.append(key)
            names.append(", ".join(([f"chat:{template}"] if template else []) + ([] if key[0] else ["zero-shot"])))
            members.append([])
        view = keys.index(key)
        pair_views.append(view)
        for model in (p.base, p.expert):
            if model not in members[view]:
                members[view].append(model)
    runners: dict[str, str] = {}
    view_of: dict[str, int] = {}
    for view, models in enumerate(members):
        for model in models:
            runner = model if model not in runners else f"{model}@{names[view]}"
            runners[runner] = model
            view_of[runner] = view
    engine_name = {(runners[r], v): r for r, v in view_of.items()}
    views = tuple(
        View(name, with_shots, template, tuple(r for r, v in view_of.items() if v == i))
        for i, (name, (with_shots, template)) in enumerate(zip(names, keys))
    )
    engine_pairs = tuple(
        Pair(p.name, engine_name[(p.expert, v)], engine_name[(p.base, v)]) for p, v in zip(pairs, pair_views)
    )
    return ViewPlan(views, runners, view_of, engine_pairs)


# -- rendering inside lm-eval ---------------------------------------------------------------

# view name -> (demonstrations in it, chat renderer or None for lm-eval's own rendering),
# for the views past view 0 of the model being evaluated; empty: nothing is rendered.
_RENDERERS: dict[str, tuple[bool, Callable | None]] = {}
# What the renderers are (names, shots, templates' text), stamped on every request rendered:
# requests rendered for other views (lm-eval's --cache_requests) are told apart.
_SIGNATURE: list[str] = [""]


def signature(plan: ViewPlan, templates: dict[str, str]) -> str:
    """A digest of the views past view 0: their names, shots and chat templates' text."""
    described = [(v.name, v.shots, templates.get(v.template) if v.template else None) for v in plan.views[1:]]
    return hashlib.sha256(repr(described).encode()).hexdigest()


def chat_renderer(tokenizer) -> Callable[..., str]:
    """lm-eval's ``chat_template`` callable for ``tokenizer``'s template: messages -> text.
    A template that refuses a system message gets it at the head of the first user turn."""

    def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt)
        try:
            return tokenizer.apply_chat_template(messages, **kwargs)
        except jinja2.exceptions.TemplateError:
            if not messages or messages[0]["role"] != "system":
                raise
            system, rest = messages[0], [dict(m) for m in messages[1:]]
            if rest and rest[0]["role"] == "user":
                rest[0]["content"] = system["content"] + "\n\n" + rest[0]["content"]
            return tokenizer.apply_chat_template(rest, **kwargs)

    return render


def record(renderers: dict[str, tuple[bool, Callable | None]], stamp: str = "") -> None:
    """From now on, every request an lm-eval ``ConfigurableTask`` builds carries its
    rendering in each of ``renderers``' views (``Instance.dlf_views``: view name -> context)
    and ``stamp`` (``Instance.dlf_views_signature``, from :func:`signature`)."""
    _install()
    _RENDERERS.clear()
    _RENDERERS.update(renderers)
    _SIGNATURE[0] = stamp


@functools.cache
def _install() -> None:
    from lm_eval.api.task import ConfigurableTask

    build = ConfigurableTask.fewshot_context
    construct = ConfigurableTask.construct_requests

    @functools.wraps(build)
    def fewshot_context(self, doc, num_fewshot, system_instruction=None, apply_chat_template=False,
                        fewshot_as_multiturn=False, chat_template=None, gen_prefix=None):
        common = dict(doc=doc, system_instruction=system_instruction, fewshot_as_multiturn=fewshot_as_multiturn, gen_prefix=gen_prefix)
        if not _RENDERERS:
            return build(self, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, chat_template=chat_template, **common)
        drawn = []
        sampler = getattr(self, "sampler", None) if num_fewshot > 0 else None
        if sampler is not None:
            draw = sampler.sample
            sampler.sample = lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1]
        try:
            context = build(self, num_fewshot=num_fewshot, apply_chat_template=apply_chat_template, chat_template=chat_template, **common)
            if sampler is not None:  # every view shows the demonstrations the large model got
                sampler.sample = lambda *a, **k: drawn[0]
            views = {
                name: build(
                    self,
                    num_fewshot=num_fewshot if with_shots else 0,
                    apply_chat_template=apply_chat_template if render is None else True,
                    chat_template=chat_template if render is None else render,
                    **common,
                )
                for name, (with_shots, render) in _RENDERERS.items()
            }
        finally:
            if sampler is not None:
                del sampler.sample
        self._dlf_views = (context, views)
        return context

    @functools.wraps(construct)
    def construct_requests(self, doc, ctx, **kwargs):
        made = construct(self, doc, ctx, **kwargs)
        stash = self.__dict__.pop("_dlf_views", None)
        if stash is not None and stash[0] == ctx:
            for instance in made if isinstance(made, list) else [made]:
                # A multiple-input task's ctx is a list: one context per choice.
                at = None if isinstance(ctx, str) else ctx.index(instance.arguments[0])
                instance.dlf_views = {name: text if at is None else text[at] for name, text in stash[1].items()}
                instance.dlf_views_signature = _SIGNATURE[0]
        return made

    ConfigurableTask.fewshot_context = fewshot_context
    ConfigurableTask.construct_requests = construct_requests
