"""The solver plugin system: in-process plugins, contract checks, and the hook meta-tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from dlf_plugin import hooks, hookspecs
from dlf_plugin.hookspecs import hookimpl
from dlf_plugin.lm import DLFLM
from dlf_plugin.solvers.base import Solver, SolverError, SolverOptionError

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "example_solver_plugin"))
import dlf_example_solver  # noqa: E402


class Registering:
    """An in-process plugin registering the given solver classes."""

    def __init__(self, *classes):
        self.classes = classes

    @hookimpl
    def register_solvers(self, register):
        for cls in self.classes:
            register(cls)


@pytest.fixture
def plugin():
    """Register in-process plugins by name; unregister them in ``finally``."""
    added = []

    def add(name, *classes):
        pm = hooks.get_plugin_manager()
        pm.register(Registering(*classes), name=name)
        hooks.reset_solvers()
        added.append(name)

    try:
        yield add
    finally:
        pm = hooks.get_plugin_manager()
        for name in added:
            pm.unregister(name=name)
        hooks.reset_solvers()


def make_solver_class(name, answer):
    class Custom(Solver):
        def __init__(self, pair_names):
            super().__init__(pair_names)
            self.bounds = (0.0, 2.0)

        def solve(self, inputs):
            return answer(inputs)

    Custom.name = name
    return Custom


REQUESTS = [Instance("loglikelihood", None, ("The river", " Tesh flows"), 0), Instance("loglikelihood", None, ("Lorem", " ipsum dolor"), 1)]


def test_builtin_solvers_register_through_the_hook():
    solvers = hooks.get_solvers()
    assert {"static", "dlf-grid", "dlf", "dlf-joint"} <= set(solvers)
    assert {solvers[n][1] for n in ("static", "dlf-grid", "dlf", "dlf-joint")} == {"dlf_plugin.solvers.builtin"}
    pm = hooks.get_plugin_manager()
    assert pm.get_plugin("dlf_plugin.solvers.builtin") is not None
    assert hooks.get_plugin_manager() is pm  # loaded once


def test_in_process_plugin_is_used_by_the_model(tiny_world, plugin):
    plugin("inline", dlf_example_solver.AgreementSolver)
    ours = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="example-agreement", scale=0.5)
    assert ours.engine.plugin == "inline"
    seen = []
    ours.engine.solver.solve = (lambda f: lambda inputs: seen.append(f(inputs)) or seen[-1])(ours.engine.solver.solve)
    result = ours.loglikelihood(REQUESTS)
    # The same weights through the static solver's per-pair path give the same numbers.
    weights = torch.cat(seen)
    assert weights.shape[1] == 2 and bool((weights > 0).all()) and bool((weights <= 0.5).all())
    assert len({round(float(w), 6) for w in weights[:, 0]}) > 1  # dynamic: varies by position
    static = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", weight=0.0)
    assert [r[0] for r in result] != pytest.approx([r[0] for r in static.loglikelihood(REQUESTS)])


def test_name_registered_twice_names_both_plugins(plugin):
    plugin("clashing", make_solver_class("static", lambda inputs: None))
    with pytest.raises(hooks.PluginError, match=r"'static' is registered twice: by plugin 'dlf_plugin.solvers.builtin' .* and by plugin 'clashing'"):
        hooks.get_solvers()


def test_registering_a_non_solver_is_an_error(plugin):
    plugin("odd", dict)
    with pytest.raises(hooks.PluginError, match=r"plugin 'odd' registered .* not a subclass of"):
        hooks.get_solvers()


@pytest.mark.parametrize(
    "answer,message",
    [
        (lambda i: (_ for _ in ()).throw(RuntimeError("boom")), r"solver 'bad' \(plugin 'faulty'\) raised RuntimeError\('boom'\)"),
        (lambda i: torch.zeros(3), r"solver 'bad' \(plugin 'faulty'\) returned \(3,\); expected a tensor of shape \(\d+, 1\)"),
        (lambda i: torch.full((i.base_logits.shape[0], 1), float("nan")), r"solver 'bad' \(plugin 'faulty'\) returned \d+ weight\(s\) that are NaN"),
        (lambda i: torch.full((i.base_logits.shape[0], 1), float("inf")), r"NaN, infinite or outside its bounds \[0.0, 2.0\]"),
        (lambda i: torch.full((i.base_logits.shape[0], 1), 3.0), r"outside its bounds \[0.0, 2.0\], e.g. \[3.0"),
        (lambda i: [[1.0]], r"returned list; expected a tensor"),
    ],
)
def test_solver_contract_violations_fail_loudly(tiny_world, plugin, answer, message):
    plugin("faulty", make_solver_class("bad", answer))
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1", solver="bad")
    with pytest.raises(SolverError, match=message):
        lm.loglikelihood(REQUESTS)
    with pytest.raises(SolverError, match=message):
        lm.generate_until([Instance("generate_until", None, ("The", {"until": ["\n"], "max_gen_toks": 3}), 0)])


@pytest.mark.parametrize("inference_mode", [False, True])
def test_a_solver_that_edits_its_inputs_is_stopped(tiny_world, plugin, inference_mode):
    """Also when the caller runs in torch.inference_mode (whose tensors keep no modification
    counters: the engine leaves that mode)."""

    def answer(inputs):
        inputs.expert_logits.mul_(2.0)  # would change the fused logits after solving
        return torch.ones(inputs.base_logits.shape[0], 1)

    plugin("faulty", make_solver_class("bad", answer))
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1", solver="bad")
    with torch.inference_mode(inference_mode):
        with pytest.raises(SolverError, match=r"solver 'bad' \(plugin 'faulty'\) modified its inputs in place \(expert_logits\)"):
            lm.loglikelihood(REQUESTS)


def test_nan_weights_in_masked_rows_are_errors_too():
    from dlf_plugin.fusion import FusionInputs
    from dlf_plugin.solvers.base import checked_solve, explain_bad_weights

    base = torch.randn(3, 10)
    inputs = FusionInputs(base, torch.randn(3, 1, 10), torch.randn(3, 1, 10), torch.tensor([True, False, True]))
    solver = make_solver_class("masked-nan", lambda i: torch.tensor([[1.0], [float("nan")], [1.0]]))(["a"])
    weights, bad = checked_solve(solver, "faulty", inputs)
    assert int(bad) == 1
    with pytest.raises(SolverError, match=r"returned 1 weight\(s\) that are NaN"):
        explain_bad_weights(solver, "faulty", inputs, weights)
    # Out of bounds in a masked row (a finished sequence) is no error.
    solver = make_solver_class("masked-big", lambda i: torch.tensor([[1.0], [7.0], [1.0]]))(["a"])
    assert int(checked_solve(solver, "faulty", inputs)[1]) == 0


class NoInit(Solver):
    name = "no-init"

    def __init__(self, pair_names):
        self.bounds = (0.0, 1.0)

    def solve(self, inputs):
        return torch.zeros(inputs.base_logits.shape[0], len(self.pair_names))


class NanBounds(NoInit):
    name = "nan-bounds"

    def __init__(self, pair_names):
        Solver.__init__(self, pair_names)
        self.bounds = (0.0, float("nan"))


@pytest.mark.parametrize(
    "cls,message",
    [
        (NoInit, r"solver 'no-init' \(plugin 'faulty'\): NoInit.__init__ never called Solver.__init__"),
        (NanBounds, r"solver 'nan-bounds' \(plugin 'faulty'\): bounds must be numbers with low <= high, got \(0.0, nan\)"),
    ],
)
def test_a_solver_that_starts_broken_is_refused_before_models_load(tiny_world, plugin, monkeypatch, cls, message):
    from dlf_plugin import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model loaded before the error"))
    plugin("faulty", cls)
    with pytest.raises(SolverError, match=message):
        DLFLM(registry=str(tiny_world["registry"]), experts="a1", solver=cls.name)


@pytest.mark.parametrize(
    "solver,options,message",
    [
        ("dlf", {"alpha_max": "-1"}, r"alpha_max='-1' \(solver 'dlf'\) must be a finite number in \[0.0, 100.0\]"),
        ("dlf", {"alpha_min": 1.5, "alpha_max": 1.0}, r"alpha_max=1.0 \(solver 'dlf'\) must exceed alpha_min=1.5"),
        ("dlf-grid", {"step": "fine"}, r"step='fine' \(solver 'dlf-grid'\) is not a number"),
        ("dlf-grid", {"step": "1e-6"}, r"alpha_max=2.0, step='1e-6' \(solver 'dlf-grid'\) make a grid of 2,000,001 points.*at most 1,000"),
        ("dlf-joint", {"weight": 1.0}, r"unknown key\(s\) weight; .*solver 'dlf-joint' accepts alpha_min, alpha_max, max_iter, tol"),
    ],
)
def test_solver_options_checked_when_the_model_is_built(tiny_world, monkeypatch, solver, options, message):
    from dlf_plugin import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model loaded before the error"))
    with pytest.raises(SolverOptionError, match=message):
        DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2", solver=solver, **options)


def test_solver_options_reach_the_solver(tiny_world):
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2", solver="dlf", alpha_max=1.5)
    assert lm.engine.solver.bounds == (0.0, 1.5)
    assert lm.get_model_info()["dlf"]["solver"]["options"]["alpha_max"] == 1.5


def test_hook_tracing_env_var(monkeypatch, caplog):
    import logging

    monkeypatch.setenv("DLF_TRACE_HOOKS", "1")
    hooks.reset()
    try:
        with caplog.at_level(logging.INFO, logger="dlf_plugin.hooks"):
            hooks.get_solvers()  # what a real run does
        calls = [r.getMessage() for r in caplog.records if r.getMessage().strip().startswith("register_solvers [hook]")]
        implementing = hooks.get_plugin_manager().hook.register_solvers.get_hookimpls()
        assert len(calls) == len(implementing) >= 1  # one traced call per plugin
    finally:
        hooks.reset()


def declared_hooks() -> list[str]:
    return [n for n in dir(hookspecs) if callable(getattr(hookspecs, n)) and hasattr(getattr(hookspecs, n), "dlf_spec")]


def test_every_hook_has_a_test_and_readme_documentation():
    import inspect

    names = declared_hooks()
    assert names == ["register_solvers"]
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Writing a solver plugin", 1)[1].split("\n## ", 1)[0]
    own = inspect.getsource(test_every_hook_has_a_test_and_readme_documentation)
    tests = "".join(p.read_text() for p in (REPO / "tests").rglob("*.py")).replace(own, "")
    for name in names:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({params})`" in section, f"hook {name} is not documented in README's plugin section"
        assert f"def {name}(" in tests, f"hook {name} has no implementation under test"
