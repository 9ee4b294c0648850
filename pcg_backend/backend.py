"""The `pcg` torch.compile backend: options, then split, compile the pieces, and wrap.

    torch.compile(model, backend="pcg", options={...})

Dynamo hands us one FX graph at a time. We take the arithmetic on weights
alone out of it (`rewrite/weight_prologue.py`), cut it at split ops
(`split.py`), compile every non-split piece with the chosen piece compiler,
wrap each capturable piece in a `CudaGraphPiece` (`cudagraph.py`), and
return a `PiecewiseRunner` (`runtime.py`) that pads each call to its bucket,
behind the `WeightPrologue` that keeps the hoisted arithmetic current.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from . import hf, state_slots, write_check
from .analyse.fx_facts import node_value, op_argument_names, written_inputs
from .analyse.node_kinds import Kind
from .buckets import Ladder
from .cudagraph import CudaGraphPiece, pool_for, release_pools
from .eager_pieces import EagerPiece, SplitOpPiece
from .ops import skinny_gemm
from .options import parse_backend_options
from .rewrite import aligned_linear, weight_prologue
from .rewrite.nested_regions import inline_nested_regions
from .rewrite.skinny_routing import route_skinny_linears, routed_twin
from .split import split_graph
from .stats import STATS, GraphRecord

log = logging.getLogger("pcg_backend")


def _compile_piece(sub: torch.fx.GraphModule, compiler: str):
    """Compile one piece. Inductor gets the piece's fake inputs, so it keeps the symbolic token dim."""
    if compiler == "eager":
        return sub.forward   # the generated code, without GraphModule.__call__'s wrapper frames
    from torch._inductor.compile_fx import compile_fx

    start = time.perf_counter()
    example = [node_value(n) for n in sub.graph.nodes if n.op == "placeholder"]
    compiled = compile_fx(sub, example)
    STATS.compile_seconds += time.perf_counter() - start

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


def check_one_device(gm: torch.fx.GraphModule) -> None:
    """Refuse a graph whose inputs live on more than one device, before any work is done.

    0-dim CPU tensors (Python scalars Dynamo lifted) are allowed, as eager allows them.
    """
    first = None
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        t = node_value(node)
        if not isinstance(t, torch.Tensor) or (t.dim() == 0 and t.device.type == "cpu"):
            continue
        if first is None:
            first = (node.name, t.device)
        elif t.device != first[1]:
            raise ValueError(
                f"pcg: graph inputs live on different devices: {first[0]} on {first[1]} and {node.name} on "
                f"{t.device}. pcg captures one device per graph; move the model and every input to one "
                f"device first (model.to(device), tensor.to(device))."
            )


def pcg_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None, **kwargs):
    """The backend callable: `torch.compile(..., backend="pcg", options=..., mode=...)` lands here."""
    opts = parse_backend_options(options, mode, pcg_backend, kwargs)
    hf.install(gm)  # an HF graph traced before routing was on: turn it on and make Dynamo trace again
    name = f"graph{STATS.graphs_compiled}"
    check_one_device(gm)
    inlined = inline_nested_regions(gm)   # their split ops become nodes of the graph, cut like any other
    prologue, gm = weight_prologue.hoist(gm, example_inputs)   # before the split: it adds graph inputs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    split = split_graph(gm, opts.capture_split_ops)
    off_reason = _cuda_graphs_off_reason(opts, split)
    if off_reason:
        STATS.note(f"{name}: {off_reason}")
    pool = None if off_reason else pool_for(next(
        t.device for t in (node_value(n) for n in placeholders) if isinstance(t, torch.Tensor) and t.is_cuda
    ))

    wrapped = _wrap_pieces(split, name, opts, pool)
    notes = wrapped.notes + _graph_notes(split, opts, wrapped)
    if inlined:
        notes.append(f"{inlined} subgraph call(s) (nested compile regions, wrap) inlined, so that the split ops "
                     f"inside are cut like any other")
    if prologue is not None:
        notes.append(f"{prologue.hoisted} node(s) of arithmetic on the weights alone (such as a Mamba2 mixer's "
                     f"-exp(A_log)) run outside the graph, again only when a weight changes")
    padding = "off (static shapes)" if split.token_symbol is None else f"to buckets {opts.capture_sizes[0]}..{opts.largest}"
    ladder = Ladder(opts.capture_sizes)
    runner = PiecewiseRunner(split, gm.graph, ladder, off_reason is None, off_reason or "", name, opts)
    if runner.unpaddable:
        padding = "exact bucket sizes only: " + runner.unpaddable
        notes.append(runner.unpaddable)
    _count_graph(name, split, wrapped, padding, notes, opts, pool)
    return runner if prologue is None else prologue.wrap(runner)


@dataclasses.dataclass
class _Wrapped:
    """What wrapping a split graph's pieces found, for the graph's notes and counters."""

    capturable: int = 0
    skinny: int = 0          # linears routed in the compiled pieces
    skinny_small: int = 0    # more, in the routed twins that only small buckets capture
    aligned: int = 0         # linears with misaligned output rows computed transposed
    notes: list = dataclasses.field(default_factory=list)   # one per piece that runs eagerly


def _wrap_pieces(split, name: str, opts, pool) -> _Wrapped:
    """Replace each piece of `split.module` by what runs it: a split op, an eager piece or a captured one."""
    wrapped = _Wrapped()
    for piece in split.pieces:
        sub = getattr(split.module, piece.name)
        if piece.kind is Kind.HOST:
            continue
        if piece.kind is Kind.SPLIT:
            setattr(split.module, piece.name,
                    SplitOpPiece(sub.forward, piece.split_op, written_inputs(sub), op_argument_names(sub)))
            continue
        if piece.kind is Kind.DYNAMIC:
            reason = f"{name}.{piece.name} runs eagerly: {piece.reason}"
            wrapped.notes.append(reason)
            STATS.note(reason)
            setattr(split.module, piece.name, EagerPiece(sub.forward, reason, written_inputs(sub)))
            continue
        wrapped.capturable += 1
        setattr(split.module, piece.name, _capturable_piece(sub, f"{name}.{piece.name}", split, opts, pool, wrapped))
    return wrapped


def _capturable_piece(sub: torch.fx.GraphModule, name: str, split, opts, pool, wrapped: _Wrapped):
    """Compile a capturable piece, with its linears routed to pcg::skinny_linear where they qualify.

    With CUDA graphs it runs as a `CudaGraphPiece`, else as a plain eager piece.
    """
    twin = None
    if pool and opts.skinny_gemm != "off":
        # Without a token dim (a decode step) a symbolic row count is the batch, which captures are
        # keyed on exactly: each capture then takes the kernel its batch calls for (Triton up to
        # MAX_ROWS rows, F.linear above), so such linears are routed in place. Left alone, a decode
        # graph that Dynamo had made dynamic in the batch ran every batch size on cuBLAS.
        wrapped.skinny += route_skinny_linears(sub, symbolic_rows=split.token_symbol is None)
        # A twin only where a capture can use it: a graph with a token dim (static graphs
        # never consult it) and a bucket of at most MAX_ROWS tokens.
        if (opts.skinny_gemm == "all" and split.token_symbol is not None
                and opts.capture_sizes[0] <= skinny_gemm.MAX_ROWS):
            # Made before `sub` is compiled: Inductor's passes may rewrite `sub` in place.
            twin, routed = routed_twin(sub)
            wrapped.skinny_small += routed
    # After the twin is made: it routes those linears to pcg::skinny_linear instead, for its small buckets.
    wrapped.aligned += aligned_linear.align_linear_outputs(sub)
    written = written_inputs(sub)
    # Split ops captured in the piece run inside its compiled code: their first run is checked there.
    checked = write_check.check_first_run if write_check.calls_user_split_ops(sub) else (lambda run: run)
    runnable = checked(_compile_piece(sub, opts.compiler))
    if not pool:
        return EagerPiece(runnable, None, written)
    return CudaGraphPiece(runnable, name, pool, written, write_back=split.paddable,
                          gemm_library=opts.gemm_library,
                          small_runnable=None if twin is None else checked(_compile_piece(twin, opts.compiler)),
                          small_tokens=skinny_gemm.MAX_ROWS)


def _graph_notes(split, opts, wrapped: _Wrapped) -> list[str]:
    """The report's notes on what the split and the rewrites did to this graph."""
    notes = []
    if split.fused_split_ops and split.paddable:
        notes.append(f"{split.fused_split_ops} padding-safe split op(s) captured inside pieces at every bucket "
                     f"(they read the real token count on the device)")
    elif split.fused_split_ops:
        notes.append(f"{split.fused_split_ops} cudagraph-safe split op(s) captured inside pieces: the graph "
                     f"always runs at its exact size ({split.exact_reason or 'no token dim'})")
    if split.held_back:
        notes.append(f"{split.held_back} padding-safe split op(s) run eagerly between pieces: they read rows that an "
                     f"eager split op returns at the real count (attention over a DynamicCache's keys, which "
                     f"grow by the real rows); with a static cache they are captured with the rest")
    if split.row_rewrites:
        notes.append(f"{split.row_picks} row pick(s) from the end and {split.count_values} use(s) of the token count "
                     f"as a value read the real count on the device, so the graph stays padded")
    if split.row_wise_modules:
        names = sorted({m.rsplit(" ", 1)[-1] for m in split.row_wise_modules})
        notes.append(f"{len(split.row_wise_modules)} module(s) of class {', '.join(names)} read across tokens inside but "
                     f"route each token alone (registered row-wise), so padded tokens cannot change real ones")
    if wrapped.skinny:
        notes.append(f"{wrapped.skinny} linear layer(s) in captured pieces call pcg::skinny_linear, a Triton kernel "
                     f"for at most {skinny_gemm.MAX_ROWS} rows (option skinny_gemm={opts.skinny_gemm!r})")
    if wrapped.skinny_small:
        notes.append(f"{wrapped.skinny_small} more linear layer(s) call pcg::skinny_linear in routed twins of the "
                     f"pieces, compiled a second time; buckets of at most {skinny_gemm.MAX_ROWS} tokens capture the "
                     f"twins, larger buckets and uncaptured calls run the pieces (option skinny_gemm='all')")
    if wrapped.aligned:
        notes.append(f"{wrapped.aligned} linear layer(s) whose output rows are not a multiple of "
                     f"{aligned_linear.ALIGNMENT} elements (an LM head over an odd vocabulary) are computed as "
                     f"weight times input transposed, so that cuBLAS's aligned kernels take them")
    if split.split_op_nodes == 0:
        notes.append("no split op in this graph: it is one bucketed piece")
    return notes


def _count_graph(name: str, split, wrapped: _Wrapped, padding: str, notes: list[str], opts, pool) -> None:
    """Add the graph to pcg's counters and graph records, and log one line about it."""
    STATS.graphs_compiled += 1
    STATS.pieces += len(split.pieces)
    STATS.capturable_pieces += wrapped.capturable
    STATS.split_op_nodes += split.split_op_nodes
    STATS.split_ops_in_graphs += split.fused_split_ops
    STATS.skinny_linears += wrapped.skinny
    STATS.skinny_linears_small_buckets += wrapped.skinny_small
    STATS.aligned_linears += wrapped.aligned
    STATS.graphs.append(GraphRecord(
        name, len(split.pieces), wrapped.capturable, split.split_op_nodes,
        None if split.token_symbol is None else str(split.token_symbol), padding, notes,
    ))
    log.info("pcg: %s split into %d pieces (%d capturable, %d split ops), padding %s, compiler %s, "
             "GEMM library while capturing %s, %d linear layer(s) to pcg::skinny_linear "
             "(%d more in twins for buckets of at most %d tokens)",
             name, len(split.pieces), wrapped.capturable, split.split_op_nodes, padding,
             opts.compiler, opts.gemm_library if pool else "(no CUDA graphs)", wrapped.skinny,
             wrapped.skinny_small, skinny_gemm.MAX_ROWS)


from .runtime import PiecewiseRunner  # noqa: E402  (runtime imports nothing from here; kept last for reading order)


def reset() -> None:
    """Called by `torch._dynamo.reset()`: destroy every captured graph and drop the shared pools.

    Dynamo drops its compiled code too; once the caller also drops its own
    references (and its caches, which hold state slots), `torch.cuda.empty_cache()`
    returns the pool memory.
    """
    CudaGraphPiece.release_all()
    release_pools()
    state_slots.POOL.release()


# Lets HF routing recognise a pcg trace through torch's wrappers (hf/gate.py).
pcg_backend._pcg_backend = True
# torch._dynamo.reset() calls `reset` on the backends it has cached.
pcg_backend.reset = reset
