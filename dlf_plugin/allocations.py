"""Measure the peak bytes of tensors that code allocates, on any device, the CPU included.

Scoring fuses positions in chunks sized by each solver's ``working_rows`` (rows of V
float32 per row solved, buffers kept between calls included), so that ``fusion_memory``
holds. A solver author checks the declaration the way dlf's tests check the built-in
solvers::

    with measure_allocations() as meter:
        solver.solve(inputs)
    assert meter.peak <= solver.working_rows(num_pairs) * rows * vocab * 4 + slack

Every storage that an operator returns and that none of its arguments owned is counted
from its creation until the last tensor viewing it is gone. Buffers that existed before
the block and are written into (``out=``, in place) are not counted; memory an operator
frees before it returns (its own temporaries) is not seen.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationMeter(TorchDispatchMode):
    """A dispatch mode that follows new storages: ``now`` live bytes, ``peak`` the most."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # data pointer -> [bytes, tensors viewing it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owned = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
            entry = self._live.get(pointer)
            if entry is None:
                if pointer in owned or size == 0:
                    continue
                entry = self._live[pointer] = [size, 0]
                self.now += size
                self.peak = max(self.peak, self.now)
            entry[1] += 1
            weakref.finalize(tensor, self._drop, pointer)
        return out

    def _drop(self, pointer: int) -> None:
        entry = self._live[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self._live[pointer]


@contextlib.contextmanager
def measure_allocations() -> Iterator[AllocationMeter]:
    """Follow the tensors allocated within the block; read ``peak`` (bytes) after it."""
    meter = AllocationMeter()
    with meter:
        yield meter
