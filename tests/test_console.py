"""What a user sees of dlf in-process: results folder names, warnings once and only where
they apply, dlf's errors without a traceback (the ``lm_eval`` command: tests/test_install.py)."""

from __future__ import annotations

import logging
import sys

import pytest
from lm_eval.api.instance import Instance
from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

from dlf_plugin import console
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import RegistryError
from dlf_plugin.solvers.base import SolverOptionError


def test_results_folder_name_from_registry_experts_and_solver():
    assert console.results_name("registry=/a/b/paper-v2.yaml,experts=gsm8k-7b+triviaqa-7b,solver=dlf-joint") == "dlf__paper-v2__gsm8k-7b+triviaqa-7b__dlf-joint"
    assert console.results_name("experts=auto") == "dlf__toy__auto__dlf"
    assert console.results_name({"registry": "paper", "route": "task", "experts": "a+b"}) == "dlf__paper__a+b__dlf__route-task"
    assert console.results_name("") == "dlf__toy__base__dlf"
    # Through lm-eval's tracker: dlf runs only; every other model keeps lm-eval's naming.
    tracker = GeneralConfigTracker()
    tracker.log_experiment_args("dlf", "registry=toy,experts=qa+fill,solver=static", None, None, False)
    assert (tracker.model_name, tracker.model_name_sanitized) == ("dlf__toy__qa+fill__static",) * 2
    tracker.log_experiment_args("hf", "pretrained=org/model,dtype=float32", None, None, False)
    assert (tracker.model_name, tracker.model_name_sanitized) == ("org/model", "org__model")


def test_each_warning_once_and_none_from_dlfs_own_use_of_hflm(tiny_world, caplog):
    with caplog.at_level(logging.WARNING):
        lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1", solver="static", batch_size=1)
        assert not [r for r in caplog.records if r.name.startswith("lm_eval.models")], [r.getMessage() for r in caplog.records]
        # Two batches (batch size 1), each with a generation kwarg dlf does not implement.
        kwargs = {"until": ["\n"], "max_gen_toks": 2, "repetition_penalty": 1.2}
        lm.generate_until([Instance("generate_until", None, (p, dict(kwargs)), i) for i, p in enumerate(["The river", "A king"])])
    ignored = [r.getMessage() for r in caplog.records if "ignoring generation kwargs" in r.getMessage()]
    assert ignored == ["dlf: ignoring generation kwargs it does not implement: repetition_penalty"]


def test_lm_evals_metadata_advice_dropped_for_dlfs_tasks_only(caplog):
    logger = logging.getLogger(console.TASK_LOGGER)
    with caplog.at_level(logging.WARNING, logger=console.TASK_LOGGER):
        for task in ("toy_qa", "dlf_gsm8k_offline", "someone_elses_task"):
            logger.warning(f"{task}: Custom kwargs can be passed to `--metadata` in console (as json string) or to the TaskManager.")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["someone_elses_task"]


def test_dlf_errors_print_their_message_without_a_traceback(capsys, monkeypatch):
    seen = []
    hook = console._excepthook(lambda *args: seen.append(args[0]))
    monkeypatch.delenv(console.TRACEBACK_ENV, raising=False)
    for error in (RegistryError("reg.yaml: pairs.x.expert is missing"), SolverOptionError("model_args weight=-1 ...")):
        try:
            raise error
        except Exception:
            hook(*sys.exc_info())
    err = capsys.readouterr().err
    assert err.count("dlf: error: ") == 2 and "reg.yaml: pairs.x.expert is missing" in err and "Traceback" not in err
    assert seen == []
    # Other errors, and dlf's with DLF_TRACEBACK=1, go to the previous hook (Python's traceback).
    hook(KeyError, KeyError("x"), None)
    monkeypatch.setenv(console.TRACEBACK_ENV, "1")
    hook(RegistryError, RegistryError("r"), None)
    assert seen == [KeyError, RegistryError]
    assert sys.excepthook.dlf_hook  # installed by importing dlf_plugin.lm


def test_a_cache_serves_only_the_configuration_that_filled_it(tiny_world, tmp_path):
    """lm-eval's CachingLM keys answers by request alone: dlf claims the cache for its
    configuration and refuses it to any other, in either direction."""
    from lm_eval.api.model import CachingLM

    from dlf_plugin.lm import CacheMismatch

    registry = str(tiny_world["registry"])
    static = DLFLM(registry=registry, experts="a1", solver="static", weight=0.5)
    base = DLFLM(registry=registry, experts="")
    request = [Instance("loglikelihood", None, ("The river", " Tesh"), 0)]
    for first, second, differ in ((static, base, "models, pairs, solver, views"), (base, static, "models, pairs, solver, views")):
        path = str(tmp_path / f"{first.engine.solver.name}-{len(first.pair_specs)}.db")
        [answer] = CachingLM(first, path).loglikelihood(request)
        assert CachingLM(first, path).loglikelihood(request) == [answer]  # the same configuration: served
        try:
            CachingLM(second, path)
        except CacheMismatch as error:
            assert f"--use_cache {path} was filled by a different dlf configuration (differs in: {differ})" in str(error)
        else:
            raise AssertionError("a cache filled by another configuration was accepted")
    # Options count: another weight is another configuration.
    other = DLFLM(registry=registry, experts="a1", solver="static", weight=0.25)
    with pytest.raises(CacheMismatch, match=r"differs in: solver\)"):
        CachingLM(other, str(tmp_path / "static-1.db"))
    # A cache that another model filled (no configuration recorded) is refused too.
    from sqlitedict import SqliteDict

    foreign = str(tmp_path / "foreign.db")
    with SqliteDict(foreign, autocommit=True) as db:
        db["0" * 64] = (-1.0, True)
    with pytest.raises(CacheMismatch, match="holds answers from another model or an older dlf"):
        CachingLM(static, foreign)


def test_a_results_file_that_cannot_be_written_completely_stops_the_run(tmp_path):
    """lm-eval logs a failed write and exits 0; for dlf runs it is an error and no partial
    file stays. The write is cut short by a file size limit (as a full disk would)."""
    import resource
    import signal

    from lm_eval.loggers.evaluation_tracker import EvaluationTracker

    results = {"results": {"toy_qa": {"exact_match,strip": 0.5}}, "config": {"padding": "x" * 200_000}}

    def save(model_source):
        tracker = EvaluationTracker(output_path=str(tmp_path / model_source))
        tracker.general_config_tracker.log_experiment_args(model_source, "experts=qa", None, None, False)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limits[1]))
        try:
            tracker.save_results_aggregated(results=dict(results), samples=None)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)
        return list((tmp_path / model_source).rglob("results_*.json"))

    with pytest.raises(console.ResultsNotWritten, match=r"lm-eval could not write a results file: OSError\(27, 'File too large'\)"):
        save("dlf")
    assert list((tmp_path / "dlf").rglob("results_*.json")) == []
    # Another model keeps lm-eval's behaviour: a warning and a partial file (what dlf prevents).
    [partial] = save("hf")
    assert 0 < partial.stat().st_size <= 50_000
