"""The `pcg` torch.compile backend: options, then split, compile the pieces, and wrap.

    torch.compile(model, backend="pcg", options={...})

Dynamo hands us one FX graph at a time. We cut it at split ops
(`split.py`), compile every non-split piece with the chosen piece compiler,
wrap each capturable piece in a `CudaGraphPiece` (`cudagraph.py`), and
return a `PiecewiseRunner` (`runtime.py`) that pads each call to its bucket.
"""

from __future__ import annotations

import logging

import torch

from . import context
from .buckets import Ladder
from .cudagraph import CudaGraphPiece, pool_for
from .options import parse_options
from .split import Kind, node_value, split_graph
from .stats import STATS, GraphRecord

log = logging.getLogger("pcg_backend")


class EagerPiece(torch.nn.Module):
    """A piece that runs without a CUDA graph; every run is counted with its reason."""

    def __init__(self, runnable, reason: str | None):
        super().__init__()
        self.runnable = runnable
        self.reason = reason

    def forward(self, *args):
        reason = self.reason
        if reason is None:
            ctx = context.current()
            reason = ctx.eager_reason if ctx is not None else "called outside a pcg forward"
        STATS.eager(reason)
        return self.runnable(*args)


def _install_hf_routing() -> None:
    import sys

    if "transformers" in sys.modules:
        from .hf import install

        install()


def _compile_piece(sub: torch.fx.GraphModule, compiler: str):
    """Compile one piece. Inductor gets the piece's fake inputs, so it keeps the symbolic token dim."""
    if compiler == "eager":
        return sub
    from torch._inductor.compile_fx import compile_fx

    example = [node_value(n) for n in sub.graph.nodes if n.op == "placeholder"]
    compiled = compile_fx(sub, example)

    def run(*args):
        return compiled(*args)

    return run


def _cuda_graphs_off_reason(opts, split) -> str | None:
    if not opts.cuda_graphs:
        return "CUDA graphs disabled by option cuda_graphs=False"
    if not split.on_cuda:
        return "CUDA graphs off: the graph runs on CPU"
    if not torch.cuda.is_available():
        return "CUDA graphs off: CUDA is not available"
    return None


def pcg_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None, **kwargs):
    """The backend callable: `torch.compile(..., backend="pcg", options=..., mode=...)` lands here."""
    if kwargs:
        raise ValueError(f"pcg backend got unexpected keyword(s) {sorted(kwargs)}; pass settings in options={{...}}")
    opts = parse_options(options, mode)
    _install_hf_routing()  # families imported since the last graph get wrapped for the next trace
    name = f"graph{STATS.graphs_compiled}"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    split = split_graph(gm)
    off_reason = _cuda_graphs_off_reason(opts, split)
    if off_reason:
        STATS.note(f"{name}: {off_reason}")
    pool = None if off_reason else pool_for(next(
        t.device for t in (node_value(n) for n in placeholders) if isinstance(t, torch.Tensor) and t.is_cuda
    ))

    capturable = 0
    notes = []
    for piece in split.pieces:
        sub = getattr(split.module, piece.name)
        if piece.kind in (Kind.SPLIT, Kind.HOST):
            continue
        if piece.kind is Kind.DYNAMIC:
            reason = f"{name}.{piece.name} runs eagerly: {piece.reason}"
            notes.append(reason)
            STATS.note(reason)
            setattr(split.module, piece.name, EagerPiece(sub, reason))
            continue
        capturable += 1
        runnable = _compile_piece(sub, opts.compiler)
        wrapper = CudaGraphPiece(runnable, f"{name}.{piece.name}", pool) if pool else EagerPiece(runnable, None)
        setattr(split.module, piece.name, wrapper)

    if split.split_op_nodes == 0:
        notes.append("no split op in this graph: it is one bucketed piece")
    padding = "off (static shapes)" if split.token_symbol is None else f"to buckets {opts.capture_sizes[0]}..{opts.largest}"
    ladder = Ladder(opts.capture_sizes)
    runner = PiecewiseRunner(split, gm.graph, ladder, off_reason is None, off_reason or "", name)
    if runner.unpaddable:
        padding = "exact bucket sizes only: " + runner.unpaddable
        notes.append(runner.unpaddable)

    STATS.graphs_compiled += 1
    STATS.pieces += len(split.pieces)
    STATS.capturable_pieces += capturable
    STATS.split_op_nodes += split.split_op_nodes
    STATS.graphs.append(GraphRecord(
        name, len(split.pieces), capturable, split.split_op_nodes,
        None if split.token_symbol is None else str(split.token_symbol), padding, notes,
    ))
    log.info("pcg: %s split into %d pieces (%d capturable, %d split ops), padding %s, compiler %s",
             name, len(split.pieces), capturable, split.split_op_nodes, padding, opts.compiler)
    return runner


from .runtime import PiecewiseRunner  # noqa: E402  (runtime imports nothing from here; kept last for reading order)

# Lets HF routing recognise a pcg trace through torch's wrappers (hf/gate.py).
pcg_backend._pcg_backend = True
