"""How dlf shows on lm-eval's command line: a results folder named after the fusion, only
the warnings that apply, dlf's errors as their message, and where the bundled tasks are.

- lm-eval names a run's results folder after model_args ``pretrained=`` (or ``model=``,
  ``path=``...), else at random. dlf has none of those, so for ``--model dlf`` the name is
  made from the registry, the experts and the solver: ``dlf__toy__qa+fill__dlf``.
- dlf hands its large model to lm-eval's ``HFLM`` already loaded; HFLM's two warnings about
  that ("do not launch via accelerate", "already-initialized model") are about a user who
  did so, not about dlf, and are dropped. So is lm-eval's advice, once per task, that
  ``--metadata`` can reach a task's ``custom_dataset`` loader, for the tasks dlf ships
  (their loader reads its own data files and nothing else).
- A dlf error (``DLFError``: a bad registry, model_args, solver option, plugin, or a model
  giving NaN) that nothing catches prints ``dlf: error: <message>`` without a traceback;
  ``DLF_TRACEBACK=1`` brings the traceback back.
- lm-eval logs a warning and carries on (exit status 0) when it cannot write a results or
  samples file; for dlf runs that is an error, and the partly written file is removed.

Everything here is installed by ``install()`` when ``dlf_plugin.lm`` is imported (that is,
when the ``dlf`` model is asked for), and changes nothing for other models.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from pathlib import Path

from dlf_plugin.errors import DLFError
from dlf_plugin.resources import data_root

TRACEBACK_ENV = "DLF_TRACEBACK"
MODEL_NAME = "dlf"
# lm-eval's loggers whose messages dlf drops where they do not apply.
HFLM_LOGGER = "lm_eval.models.huggingface"
TASK_LOGGER = "lm_eval.api.task"
TRACKER_LOGGER = "lm_eval.loggers.evaluation_tracker"
# What lm-eval logs when it swallows a failed write, for each method that writes.
SAVE_FAILURES = {"save_results_aggregated": "Could not save results aggregated", "save_results_samples": "Could not save sample results"}

HFLM_PRELOADED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model through `pretrained`")
METADATA_ADVICE = ": Custom kwargs can be passed to `--metadata`"


class ResultsNotWritten(DLFError, OSError):
    """A results or samples file could not be written completely."""


def tasks_folder() -> Path:
    """The folder of the task configs dlf ships (``--include_path``)."""
    return data_root() / "tasks"


def tasks_main() -> None:
    """``dlf-tasks``: print the bundled task folder, for ``--include_path "$(dlf-tasks)"``."""
    print(tasks_folder())


def results_name(model_args) -> str:
    """The results folder name of a dlf run: ``dlf__<registry>__<experts>__<solver>``, plus
    ``__route-task`` or ``__route-prompt`` when asked for; ``base`` when no expert is fused."""
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    registry = str(args.get("registry") or "toy")
    if registry.endswith((".yaml", ".yml")):
        registry = Path(registry).stem
    parts = [MODEL_NAME, registry, str(args.get("experts") or "base"), str(args.get("solver") or "dlf")]
    if args.get("route") in ("task", "prompt"):
        parts.append(f"route-{args['route']}")
    return "__".join(parts)


def _name_dlf_runs() -> None:
    """Make lm-eval's tracker name ``--model dlf`` runs by ``results_name``."""
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker
    from lm_eval.utils import sanitize_model_name

    original = GeneralConfigTracker.log_experiment_args
    if getattr(original, "dlf_names_runs", False):
        return

    @functools.wraps(original)
    def log_experiment_args(self, model_source, model_args, *args, **kwargs):
        original(self, model_source, model_args, *args, **kwargs)
        if model_source == MODEL_NAME:
            self.model_name = results_name(model_args)
            self.model_name_sanitized = sanitize_model_name(self.model_name)

    log_experiment_args.dlf_names_runs = True
    GeneralConfigTracker.log_experiment_args = log_experiment_args


def _output_folder(tracker) -> Path | None:
    """Where lm-eval writes a run's results and samples files."""
    if not tracker.output_path:
        return None
    path = Path(tracker.output_path)
    return path.parent if path.suffix == ".json" else path / str(tracker.general_config_tracker.model_name_sanitized)


def _files(folder: Path | None) -> set[Path]:
    return set(folder.iterdir()) if folder is not None and folder.is_dir() else set()


class _RaiseOnFailedSave(logging.Filter):
    """Raises, from inside lm-eval's ``except`` block, when it logs that a save failed."""

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() == self.message:
            error = sys.exc_info()[1]
            raise ResultsNotWritten(f"lm-eval could not write a results file: {error!r}") from error
        return True


def _results_must_be_written() -> None:
    """For ``--model dlf`` runs, a failed results or samples write stops the run."""
    from lm_eval.loggers.evaluation_tracker import EvaluationTracker

    for method, message in SAVE_FAILURES.items():
        original = getattr(EvaluationTracker, method)
        if getattr(original, "dlf_checks_writes", False):
            continue

        @functools.wraps(original)
        def save(self, *args, _original=original, _message=message, **kwargs):
            if self.general_config_tracker.model_source != MODEL_NAME:
                return _original(self, *args, **kwargs)
            folder = _output_folder(self)
            before = _files(folder)
            logger = logging.getLogger(TRACKER_LOGGER)
            guard = _RaiseOnFailedSave(_message)
            logger.addFilter(guard)
            try:
                return _original(self, *args, **kwargs)
            except ResultsNotWritten:
                for partial in _files(folder) - before:
                    partial.unlink()
                raise
            finally:
                logger.removeFilter(guard)

        save.dlf_checks_writes = True
        setattr(EvaluationTracker, method, save)


class _Drop(logging.Filter):
    """Drops the records whose message ``drop(message)`` says."""

    def __init__(self, drop) -> None:
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.drop(record.getMessage())


@contextlib.contextmanager
def preloaded_model():
    """Around dlf's ``HFLM.__init__`` with a loaded model: HFLM's warnings about that dropped."""
    logger = logging.getLogger(HFLM_LOGGER)
    quiet = _Drop(lambda message: message.startswith(HFLM_PRELOADED))
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@functools.cache
def bundled_task_names() -> frozenset[str]:
    """The ``task:`` names of the task configs dlf ships."""
    pattern = re.compile(r"^task:\s*(\S+)\s*$", re.MULTILINE)
    return frozenset(name for path in tasks_folder().rglob("*.yaml") for name in pattern.findall(path.read_text()))


def _is_metadata_advice(message: str) -> bool:
    task, found, _ = message.partition(METADATA_ADVICE)
    return bool(found) and task in bundled_task_names()


def _excepthook(previous):
    @functools.wraps(previous)
    def hook(kind, value, traceback):
        if isinstance(value, DLFError) and not os.environ.get(TRACEBACK_ENV):
            print(f"dlf: error: {value}\n(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
            return
        previous(kind, value, traceback)

    hook.dlf_hook = True
    return hook


def install() -> None:
    """Name dlf's results folders, make failed results writes errors, drop the warnings that
    do not apply, print dlf's errors without a traceback (idempotent)."""
    _name_dlf_runs()
    _results_must_be_written()
    task_logger = logging.getLogger(TASK_LOGGER)
    if not any(isinstance(f, _Drop) for f in task_logger.filters):
        task_logger.addFilter(_Drop(_is_metadata_advice))
    if not getattr(sys.excepthook, "dlf_hook", False):
        sys.excepthook = _excepthook(sys.excepthook)
