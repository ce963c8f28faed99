"""Count the places where code makes the host wait for the device (a "sync").

On a GPU, ``.item()``, ``bool(tensor)``, ``.tolist()``, boolean-mask indexing and other
operations whose result size depends on the data stall the host until the device has
caught up; a decoding step that makes none but its one transfer can be queued ahead, and
captured (CUDA graphs) or compiled. ``count_syncs`` finds them on any device, the CPU
included, so that a test without a GPU can hold the engine and the solvers to it::

    with count_syncs() as syncs:
        solver.solve(inputs)
    assert syncs.total == 0, syncs.calls

Solver authors can use it the same way on their own ``solve``.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that read a value back to the host, or whose output shape depends on the data.
SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.allclose.default,
}


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts synchronising operators by name (``calls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS and func is not aten.nonzero_static.default:
            self.calls[str(func.overloadpacket.__name__)] += 1
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            # Indexing with a boolean mask needs the mask's count of True values first.
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.calls["boolean_mask_index"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """Count syncs within the block: synchronising operators, plus every ``Tensor.tolist``,
    ``Tensor.numpy`` and ``Tensor.cpu`` of a tensor not already on the CPU (those copy to
    the host without dispatching a synchronising operator). On a CPU every ``tolist`` and
    ``numpy`` counts, since the same line would sync on a GPU."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

    def wrap(name):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if name != "cpu" or self.device.type != "cpu":
                counter.calls[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
