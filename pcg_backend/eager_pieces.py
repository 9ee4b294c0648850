"""Pieces that run without a CUDA graph: split ops, and pieces that cannot be captured.

Both kinds share one duty during the up-front capture (`runtime.py`): those
forwards run at every bucket on the caller's real inputs, and their results
are thrown away, so a piece that writes a graph input in place (a split op's
state write, a KV-cache `index_copy_`) gets a private copy of that input
instead. Model state is therefore exactly what the caller's own forwards made it.

A split op is also checked on its first call: an argument its schema does not
declare as written must not change (`write_check.py`). pcg relies on the
schema to know what it may pad, copy or capture, so an undeclared write is an
error, not a warning.
"""

from __future__ import annotations

import torch

from . import context
from .stats import STATS
from .write_check import UndeclaredWriteError, changed, fingerprint, raise_if_written, read_only_to_check

__all__ = ["EagerPiece", "SplitOpPiece", "UndeclaredWriteError", "private_copies"]


def private_copies(args: tuple, written) -> tuple:
    """`args` with a clone in place of every tensor at an index in `written`."""
    args = list(args)
    for i in written:
        if isinstance(args[i], torch.Tensor):
            args[i] = args[i].clone()
    return tuple(args)


class EagerPiece(torch.nn.Module):
    """A piece that runs without a CUDA graph; every run is counted with its reason."""

    def __init__(self, runnable, reason: str | None, written: dict[int, str] | None = None):
        super().__init__()
        self.runnable = runnable
        self.reason = reason
        self.written = written or {}

    def forward(self, *args):
        ctx = context.current()
        if ctx is not None and ctx.warmup:
            args = private_copies(args, self.written)
        else:
            reason = self.reason
            if reason is None:
                reason = ctx.eager_reason if ctx is not None else "called outside a pcg forward"
            STATS.eager(reason)
        with context.piece_running():
            return self.runnable(*args)

    # Called once per piece per forward: skip nn.Module.__call__'s hook machinery.
    __call__ = forward


class SplitOpPiece(torch.nn.Module):
    """A split op's piece: runs eagerly on the real kernels, and is checked once for undeclared writes."""

    def __init__(self, runnable, op_name: str, written: dict[int, str], arg_names: dict[int, str]):
        super().__init__()
        self.runnable = runnable
        self.op_name = op_name
        self.written = written
        self.arg_names = arg_names
        self.checked = False

    def forward(self, *args):
        ctx = context.current()
        if ctx is not None and ctx.warmup:
            args = private_copies(args, self.written)
        if self.checked:
            return self.runnable(*args)
        read_only = read_only_to_check([(self.arg_names.get(i, f"input {i}"), a) for i, a in enumerate(args)
                                        if i not in self.written], [args[i] for i in self.written])
        # Version counters where torch keeps them (no copy, no sync); inference tensors keep none.
        before = [(name, t, fingerprint(t) if t.is_inference() else t._version) for name, t in read_only]
        out = self.runnable(*args)
        raise_if_written(self.op_name, [name for name, t, seen in before
                                        if (changed(t, seen) if t.is_inference() else t._version != seen)])
        self.checked = True
        return out

    # Called once per piece per forward: skip nn.Module.__call__'s hook machinery.
    __call__ = forward
