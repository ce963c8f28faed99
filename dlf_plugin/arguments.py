"""Checks of model_args and of lm-eval requests, made before any work on them.

model_args arrive from lm-eval's parser as strings, integers or booleans; each is checked
when the model is built, before any weights load, and a bad one is a ``RegistryError``
naming the argument. A request that cannot be run is a ``RequestError`` naming it (task,
document id, request index) before any request of its call runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dlf_plugin.errors import DLFError
from dlf_plugin.registry import RegistryError

BOOLEAN_ARGS = ("add_bos_token", "truncation", "logits_cache")


class RequestError(DLFError, ValueError):
    """A request lm-eval passed cannot be run; the message names it."""


def whole_number(key: str, value: Any, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` (given as one, or as its digits)."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        number = minimum - 1
    if isinstance(value, bool) or number < minimum or str(number) != str(value).strip():
        kind = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise RegistryError(f"model_args {key}={value!r} must be {kind}")
    return number


def fraction(key: str, value: Any) -> float:
    """A number in [0, 1) (given as one, or as its digits)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = -1.0
    if isinstance(value, bool) or not 0.0 <= number < 1.0:
        raise RegistryError(f"model_args {key}={value!r} must be a number in [0, 1)")
    return number


def boolean(key: str, value: Any) -> bool:
    """True or False (lm-eval's parser turns ``true``/``false`` into booleans)."""
    if not isinstance(value, bool):
        raise RegistryError(f"model_args {key}={value!r} must be True or False")
    return value


def check_hflm_args(args: dict) -> None:
    """The batching and prompt arguments dlf passes to lm-eval's HFLM."""
    batch = args.get("batch_size")
    if batch is not None and not (isinstance(batch, str) and (batch == "auto" or batch.startswith("auto:"))):
        whole_number("batch_size", batch)
    if isinstance(batch, str) and batch.startswith("auto:"):
        whole_number("batch_size (the N of auto:N)", batch.split(":", 1)[1])
    for key in ("max_batch_size", "max_length"):
        if args.get(key) is not None:
            whole_number(key, args[key])
    for key in BOOLEAN_ARGS:
        if key in args:
            boolean(key, args[key])
    prefix = args.get("prefix_token_id")
    if prefix is not None and (isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0):
        raise RegistryError(f"model_args prefix_token_id={prefix!r} must be a token id (a whole number >= 0)")


def check_placement(placement: str | None) -> None:
    """``auto`` or a device torch knows (``cpu``, ``cuda:1``, ``mps``)."""
    if placement in (None, "auto"):
        return
    try:
        torch.device(str(placement))
    except (RuntimeError, ValueError):
        raise RegistryError(
            f"model_args placement={placement!r} is not a device (cpu, cuda, cuda:1, ...) nor auto"
        ) from None


def check_trace_path(trace: str | None) -> None:
    """The trace file can be created: its folder exists (or can be made) and is writable."""
    if not trace:
        return
    path = Path(trace).expanduser()
    if path.is_dir():
        raise RegistryError(f"model_args trace={trace!r} is a directory; give a file path (e.g. trace.jsonl)")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if folder is None or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise RegistryError(f"model_args trace={trace!r}: {folder or path.parent} is not a writable folder")


def split_experts(value: Any, available: list[str]) -> list[str]:
    """``a+b`` -> ``["a", "b"]``; ``all`` -> every pair; empty -> none. An empty name between
    separators (``a++b``, ``+``) is an error, not skipped."""
    if value is None or not str(value).strip():
        return []
    if value == "all":
        return available
    names = [name.strip() for name in str(value).split("+")]
    if not all(names):
        raise RegistryError(f"model_args experts={value!r} has an empty pair name; join names with single '+' signs")
    return names


def describe(request, index: int) -> str:
    """How an error names a request: its task, document id and index in the call."""
    task = getattr(request, "task_name", None) or "?"
    doc = getattr(request, "doc_id", None)
    return f"request {index} (task {task}, doc_id {doc if doc is not None else '?'})"


def check_loglikelihood_requests(requests) -> None:
    """Each (context, continuation) pair: strings, with a continuation to score."""
    for index, request in enumerate(requests):
        args = request.args
        if len(args) != 2 or not all(isinstance(a, str) for a in args):
            raise RequestError(f"{describe(request, index)}: expected (context, continuation) strings, got {args!r:.200}")
        if not args[1]:
            raise RequestError(f"{describe(request, index)}: the continuation is empty, there is nothing to score")


def check_rolling_requests(requests) -> None:
    for index, request in enumerate(requests):
        if not isinstance(request.args[0], str) or not request.args[0]:
            raise RequestError(f"{describe(request, index)}: loglikelihood_rolling needs a non-empty text, got {request.args[0]!r:.200}")


def check_generation_requests(requests) -> None:
    """Each (context, gen_kwargs): a string and generation arguments dlf can honour."""
    for index, request in enumerate(requests):
        where = describe(request, index)
        context, kwargs = request.args
        if not isinstance(context, str) or not isinstance(kwargs, dict):
            raise RequestError(f"{where}: expected (context string, gen_kwargs dict), got {request.args!r:.200}")
        until = kwargs.get("until")
        if until is not None and not isinstance(until, str) and not (isinstance(until, list) and all(isinstance(u, str) for u in until)):
            raise RequestError(f"{where}: gen_kwargs until={until!r} must be a string or a list of strings")
        _gen_number(where, kwargs, "max_gen_toks", int, low=1)
        _gen_number(where, kwargs, "top_k", int, low=0)
        _gen_number(where, kwargs, "temperature", float, low=0.0)
        top_p = _gen_number(where, kwargs, "top_p", float, low=0.0)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise RequestError(f"{where}: gen_kwargs top_p={top_p} must be in (0, 1]")
        if "do_sample" in kwargs and not isinstance(kwargs["do_sample"], bool):
            raise RequestError(f"{where}: gen_kwargs do_sample={kwargs['do_sample']!r} must be true or false")


def _gen_number(where: str, kwargs: dict, key: str, kind: type, low: float):
    value = kwargs.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"{where}: gen_kwargs {key}={value!r} must be a {'whole ' if kind is int else ''}number")
    if not value >= low:
        raise RequestError(f"{where}: gen_kwargs {key}={value!r} must be at least {low}")
    return kind(value)
