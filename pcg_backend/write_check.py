"""Split ops write only what their schema declares: checked on each op's first run.

pcg pads, copies and captures tensors by what an op's schema says it writes,
so an op that writes another argument in place would corrupt state without
a sound. The first run is checked instead: every tensor argument the schema
does not mark as written must be left as it was.

* A split op that runs eagerly between pieces is checked by its piece
  (`eager_pieces.SplitOpPiece`) with version counters, which torch moves on
  each in-place write made through torch (views share their base's
  counter). A write through a raw pointer (a Triton or CUDA kernel) moves no
  counter and is not seen there.
* A split op captured inside a piece (`cudagraph_safe`, `padding_safe`)
  runs inside the piece's compiled code, where only the dispatcher sees it.
  `check_first_run` runs the piece's first call (outside a CUDA graph
  capture and pcg's host-sync probe) under a dispatch mode that checks every
  user split op the piece calls. Below the dispatch mode torch no longer
  moves version counters, so the mode compares each read-only argument's
  bytes with a copy taken before the call: this sees kernel writes too.
  pcg's own ops (namespace `pcg`) are not checked: their schemas are pcg's,
  tested in its own suite, and copying their inputs would buy nothing.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ops.registry import split_op_name


class UndeclaredWriteError(RuntimeError):
    """A split op wrote a tensor argument that its schema does not mark as written."""


def raise_if_written(op_name: str, written: list[str]) -> None:
    """Raise `UndeclaredWriteError` naming the first of `written`, the arguments the call changed."""
    for name in written:
        raise UndeclaredWriteError(
                f"split op {op_name} wrote its argument '{name}' in place, but its schema does not "
                f"declare the write. pcg pads, copies and captures tensors by what the schema says, so "
                f"this would corrupt state: add '{name}' to mutates_args in torch.library.custom_op "
                f"(or mark it Tensor(a!) in the schema)."
            )


def _read_only_arguments(func, args, kwargs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, tensor, a copy of it) for every tensor argument of `func`'s call that its schema does not write."""
    out = []
    for position, argument in enumerate(func._schema.arguments):
        if position < len(args):
            value = args[position]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        else:
            continue
        if argument.alias_info is not None and argument.alias_info.is_write:
            continue
        tensors = value if isinstance(value, (list, tuple)) else [value]
        out += [(argument.name, t, t.clone()) for t in tensors if isinstance(t, torch.Tensor)]
    return out


def _same_bytes(tensor: torch.Tensor, before: torch.Tensor) -> bool:
    # Bytes, not values: NaN equals NaN here, and -0.0 differs from 0.0.
    return torch.equal(tensor.reshape(-1).view(torch.uint8), before.reshape(-1).view(torch.uint8))


class _UserSplitOpWrites(TorchDispatchMode):
    """Checks each user split op called under it; every other op passes through."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = split_op_name(func)
        if name is None or name.startswith("pcg::"):
            return func(*args, **kwargs)
        before = _read_only_arguments(func, args, kwargs)
        out = func(*args, **kwargs)
        raise_if_written(name, [arg for arg, tensor, copy in before if not _same_bytes(tensor, copy)])
        return out


def calls_user_split_ops(gm: torch.fx.GraphModule) -> bool:
    """True if a node of `gm` calls a registered split op outside pcg's own namespace."""
    names = (split_op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return any(name is not None and not name.startswith("pcg::") for name in names)


def check_first_run(runnable):
    """`runnable`, whose first call outside a CUDA graph capture checks the user split ops it calls.

    Not inside pcg's host-sync probe either: comparing bytes reads them on the
    host. A call that raises stays unchecked, so the next call is checked again.
    """
    done = False

    def run(*args):
        nonlocal done
        if done or (torch.cuda.is_available() and (torch.cuda.is_current_stream_capturing()
                                                    or torch.cuda.get_sync_debug_mode() != 0)):
            return runnable(*args)
        with _UserSplitOpWrites():
            out = runnable(*args)
        done = True
        return out

    return run
