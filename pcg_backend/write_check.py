"""Split ops write only what their schema declares: checked on each op's first run.

pcg pads, copies and captures tensors by what an op's schema says it writes,
so an op that writes another argument in place would corrupt state without
a sound. The first run is checked instead: every tensor argument the schema
does not mark as written must be left as it was.

* A split op that runs eagerly between pieces is checked by its piece
  (`eager_pieces.SplitOpPiece`) with version counters, which torch moves on
  each in-place write made through torch. A write through a raw pointer (a
  Triton or CUDA kernel) moves no counter and is not seen there. Inference
  tensors keep no counter: their fingerprints are compared instead.
* A split op captured inside a piece (`cudagraph_safe`, `padding_safe`)
  runs inside the piece's compiled code, where only the dispatcher sees it.
  `check_first_run` runs the piece's first call (outside a CUDA graph
  capture and pcg's host-sync probe) under a dispatch mode that checks every
  user split op the piece calls. Below the dispatch mode torch no longer
  moves version counters, so the mode compares each read-only argument's
  `fingerprint` (its bytes, or above `COPY_LIMIT_BYTES` their checksum)
  before and after the call: this sees kernel writes too. pcg's own ops
  (namespace `pcg`) are not checked: their schemas are pcg's, tested in its
  own suite, and fingerprinting their inputs would buy nothing.

Either way an argument that shares storage with a declared-written one (the
same tensor passed twice, or a view of it) may change legitimately and is
not checked, nor is a tensor whose bytes cannot be read flat (sparse,
quantized, nested, meta).
"""

from __future__ import annotations

import contextlib
import threading

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


# Read-only arguments up to this size are copied whole and compared byte for byte; larger ones
# (a preallocated KV pool) by a checksum, so that the check never doubles their memory.
COPY_LIMIT_BYTES = 16 << 20
_CHECKSUM_CHUNK = 8 << 20


def _checkable(t: torch.Tensor) -> bool:
    # Layouts and dtypes whose bytes cannot be read as a flat uint8 view are left unchecked.
    return (t.layout == torch.strided and not t.is_quantized and not t.is_nested and t.device.type != "meta")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_conj().resolve_neg().reshape(-1).view(torch.uint8)


def _checksum(flat: torch.Tensor) -> torch.Tensor:
    """The bytes' sum and a position-weighted sum, in chunks that bound the temporary memory."""
    sums = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHECKSUM_CHUNK):
        chunk = flat[start:start + _CHECKSUM_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + chunk.numel(), device=flat.device) % 251 + 1
        sums += torch.stack([chunk.sum(), (chunk * weights).sum()])
    return sums


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """What `changed` compares `t` against after a call: a copy of its bytes, or their checksum."""
    flat = _bytes(t)
    return flat.clone() if flat.numel() <= COPY_LIMIT_BYTES else _checksum(flat)


def changed(t: torch.Tensor, before: torch.Tensor) -> bool:
    """True if `t`'s bytes differ from its `fingerprint` taken before (NaN equals NaN here)."""
    flat = _bytes(t)
    return not torch.equal(flat if flat.numel() <= COPY_LIMIT_BYTES else _checksum(flat), before)


def read_only_to_check(named: list[tuple[str, object]], written: list[object]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of `named` to check: tensors that share no storage with a `written` one.

    A tensor that is also written through another argument (the same tensor
    passed twice, or a view of a written one) may change legitimately.
    """
    written_storages = {w.untyped_storage().data_ptr() for w in written
                        if isinstance(w, torch.Tensor) and w.layout == torch.strided}
    return [(name, t) for name, t in named if isinstance(t, torch.Tensor) and _checkable(t)
            and t.untyped_storage().data_ptr() not in written_storages]


def _schema_arguments(func, args, kwargs) -> tuple[list[tuple[str, object]], list[object]]:
    """(read-only (name, tensor) pairs, written tensors) of a call of `func`, by its schema."""
    read_only, written = [], []
    for position, argument in enumerate(func._schema.arguments):
        if position < len(args):
            value = args[position]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        else:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if argument.alias_info is not None and argument.alias_info.is_write:
            written += values
        else:
            read_only += [(argument.name, v) for v in values]
    return read_only, written


class _UserSplitOpWrites(TorchDispatchMode):
    """Checks each user split op called under it; every other op passes through."""

    # Higher-order ops (torch.cond, ...) in an eager piece pass through too.
    supports_higher_order_operators = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = split_op_name(func)
        if name is None or name.startswith("pcg::"):
            return func(*args, **kwargs)
        before = [(arg, t, fingerprint(t)) for arg, t in read_only_to_check(*_schema_arguments(func, args, kwargs))]
        out = func(*args, **kwargs)
        raise_if_written(name, [arg for arg, t, print_ in before if changed(t, print_)])
        return out


_probe = threading.local()


@contextlib.contextmanager
def probing():
    """While pcg's host-sync probe runs a piece: its checks wait for a run outside the probe."""
    _probe.active = True
    try:
        yield
    finally:
        _probe.active = False


def calls_user_split_ops(gm: torch.fx.GraphModule) -> bool:
    """True if a node of `gm` calls a registered split op outside pcg's own namespace."""
    names = (split_op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")
    return any(name is not None and not name.startswith("pcg::") for name in names)


def check_first_run(runnable):
    """`runnable`, whose first call outside a CUDA graph capture checks the user split ops it calls.

    Not inside pcg's host-sync probe either (`probing`): the comparison reads
    on the host. A call that raises stays unchecked, so the next call is
    checked again.
    """
    done = False

    def run(*args):
        nonlocal done
        if done or getattr(_probe, "active", False) or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return runnable(*args)
        with _UserSplitOpWrites():
            out = runnable(*args)
        done = True
        return out

    return run
