"""Sending the linear layers of captured pieces to `pcg::skinny_linear`.

A captured piece replays the kernels chosen while it was captured. In a
decode step (1 row per sequence) or a one-token prefill, a linear layer is a
matrix-vector product, and cuBLAS leaves 5-20 % of the memory bandwidth
unused there (`ops/skinny_gemm.py`). This pass rewrites each `F.linear` node
of such a piece to `pcg::skinny_linear` when its row count is static and at
most MAX_ROWS and its weight has at least MIN_COLUMNS output columns in bf16
or fp16.

In a graph without a token dim (a decode step) a symbolic row count is the
batch, on which captures are keyed exactly: such linears are routed in place
(`symbolic_rows`), and each capture gets the kernel its batch calls for,
since the op itself sends more than MAX_ROWS rows to `F.linear`.

Graphs whose token count is symbolic (padded prefill graphs) need more care.
Routing such a piece in place helped its small buckets (a 16-token prefill
of the benchmark model went from 9.73 to 9.00 ms on the H100) but slowed the
calls above the largest bucket, which run the same compiled piece without
graphs (2048 tokens: 68.1 to 72.6 ms; docs/benchmarks.md).
So `routed_twin` leaves the piece as it is and returns a routed copy; the
backend compiles both, and the copy serves only the captures at buckets of
at most MAX_ROWS tokens (`cudagraph.CudaGraphPiece`). Larger buckets and
uncaptured calls run the unrouted piece.

Option `skinny_gemm`: `"all"` (the default) routes static graphs and
decode graphs in place and padded ones through twins. On the H100 a
16-token prefill then took 9.03 ms (1.53x the weight-read floor) and a 2048-token one 66.63 ms
(1.25x faster than eager); the price is a second compile of each padded
piece (first call 65.3 s with Inductor, 48.8 s before). `"static"` makes no
twins (static graphs and decode graphs only), `"off"` routes nothing.

Where a routed linear's only reader is a relu whose only reader squares it
(NemotronH's MLP), the pass hands the op `activation="relu2"` and erases
both nodes (`_fuse_activation`): the kernel applies them as it stores, one
kernel fewer per MLP layer. `FUSIONS` counts these.

Only captured pieces are rewritten (the backend calls this for them alone):
in a piece that runs eagerly the op's extra dispatch would be host time on
every call, and those pieces are host-bound.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

from ..analyse.fx_facts import node_value
from ..ops import skinny_gemm

# Fusions made by the pass, per kind, process-wide (tests and the benchmark read them).
FUSIONS = {"relu2": 0}

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
HALF_TYPES = (torch.bfloat16, torch.float16)


def _operands(node: torch.fx.Node):
    """(input, weight, bias) of a linear node, whether passed by position or keyword."""
    names = ("input", "weight", "bias")
    values = list(node.args) + [None] * (3 - len(node.args))
    for i, name in enumerate(names):
        if name in node.kwargs:
            values[i] = node.kwargs[name]
    return values


def _few_rows(x: torch.Tensor, symbolic_rows: bool) -> bool:
    """A static row count of at most MAX_ROWS, or (with `symbolic_rows`) a symbolic one whose static
    factors stay within MAX_ROWS: (B, 1, H) or (1, T, H), not (B, 512, H), which never has few rows."""
    sizes = x.shape[:-1]
    static = math.prod(s for s in sizes if not isinstance(s, torch.SymInt))
    if any(isinstance(s, torch.SymInt) for s in sizes):
        return symbolic_rows and static <= skinny_gemm.MAX_ROWS
    return static <= skinny_gemm.MAX_ROWS


def route_skinny_linears(gm: torch.fx.GraphModule, symbolic_rows: bool = False) -> int:
    """Rewrite eligible `F.linear` nodes of `gm` to `pcg::skinny_linear`; returns how many.
    With `symbolic_rows`, linears whose row count is symbolic are rewritten too."""
    routed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, w, b = _operands(node)
        xv, wv = node_value(x), node_value(w)
        if not (isinstance(xv, torch.Tensor) and isinstance(wv, torch.Tensor)):
            continue
        if wv.dim() != 2 or wv.dtype not in HALF_TYPES or xv.dtype != wv.dtype:
            continue
        columns = wv.shape[0]
        if isinstance(columns, torch.SymInt) or columns < skinny_gemm.MIN_COLUMNS or not _few_rows(xv, symbolic_rows):
            continue
        node.target = torch.ops.pcg.skinny_linear.default
        node.args = (x, w, b)
        node.kwargs = {}
        routed += 1
        if _fuse_activation(gm, node):
            FUSIONS["relu2"] += 1
    if routed:
        gm.recompile()
    return routed


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _erase_unused(gm: torch.fx.GraphModule, nodes) -> None:
    """Erase `nodes` (readers first) where nothing reads them any more."""
    for node in nodes:
        if not node.users:
            gm.graph.erase_node(node)


RELU_TARGETS = (torch.relu, torch.nn.functional.relu)


def _is_square(node: torch.fx.Node, of: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target is torch.square:
        return node.args == (of,) and not node.kwargs
    if node.op == "call_function" and node.target in (torch.pow, operator.pow):
        return node.args == (of, 2) and not node.kwargs
    return node.op == "call_method" and node.target == "pow" and node.args == (of, 2) and not node.kwargs


def _fuse_activation(gm: torch.fx.GraphModule, linear: torch.fx.Node) -> bool:
    """`square(relu(skinny_linear(x, W, b)))`, each the only reader of the one before, becomes
    `skinny_linear(x, W, b, "relu2")` (NemotronH's MLP): the kernel squares as it stores."""
    relu = _only_user(linear)
    if (relu is None or relu.op != "call_function" or relu.target not in RELU_TARGETS or relu.args != (linear,)
            or relu.kwargs.get("inplace", False)):
        return False
    square = _only_user(relu)
    if square is None or not _is_square(square, relu):
        return False
    linear.args = (*linear.args[:3], "relu2")
    square.replace_all_uses_with(linear)
    _erase_unused(gm, [square, relu])
    return True


def routed_twin(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule | None, int]:
    """A copy of `gm` whose linears with a symbolic row count are routed too, and how many
    more linears it routes than `gm`; (None, 0) if none is eligible. `gm` is not changed.
    The copy shares `gm`'s submodules, attributes and node metadata (fake values included)."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen   # the same calling convention as the piece it stands in for
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        copies[node] = graph.node_copy(node, copies.__getitem__)   # meta is copied shallowly
    twin = torch.fx.GraphModule(gm, graph)
    routed = route_skinny_linears(twin, symbolic_rows=True)
    return (twin, routed) if routed else (None, 0)
