"""Registers the lm-eval model name ``dlf`` whenever ``lm_eval.models`` is imported.

lm-eval 0.4.13 reads no plugin entry points, so a plain ``pip install`` of dlf could
not make ``lm_eval --model dlf`` work. The installed ``dlf_plugin.pth`` imports this
module at interpreter start-up; it adds an import hook, imports nothing heavy, and
once lm-eval's built-in models are registered (never before: lm-eval only fills an
empty registry) adds ``dlf`` as a lazy placeholder, so ``dlf_plugin.lm`` (torch,
transformers) is imported only when the dlf model is actually asked for.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET_MODULE = "lm_eval.models"
MODEL_NAME = "dlf"
MODEL_TARGET = "dlf_plugin.lm:DLFLM"


def register_with_lm_eval() -> None:
    """Add ``dlf`` to lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``lm_eval.models``, then registers dlf."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        register_with_lm_eval()

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Put the import hook in place, or register at once if lm-eval's models are loaded already."""
    if TARGET_MODULE in sys.modules:
        register_with_lm_eval()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
