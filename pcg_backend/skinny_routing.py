"""Sending the linear layers of captured pieces to `pcg::skinny_linear`.

A captured piece replays the kernels chosen while it was captured, so what
runs at replay is decided once per bucket. In a decode step (1 row per
sequence) or a short prefill a linear layer is a matrix-vector product, and
cuBLAS leaves 10-15 % of the memory bandwidth unused there
(`ops/skinny_gemm.py`). This pass rewrites each `F.linear` node of a piece
whose rows *can* be few (a static count of at most MAX_ROWS, or a symbolic
one, as in a padded prefill graph) and whose weight has at least MIN_COLUMNS
output columns in bf16 or fp16. At run time the op picks the Triton kernel
for at most MAX_ROWS rows and `F.linear` otherwise, so large buckets capture
the same cuBLAS GEMMs as before.

Only captured pieces are rewritten (the backend calls this for them alone):
in a piece that runs eagerly the op's extra dispatch would be host time on
every call, and those pieces are host-bound.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from .fx_facts import node_value
from .ops import skinny_gemm

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


def _may_have_few_rows(x: torch.Tensor) -> bool:
    sizes = x.shape[:-1]
    if any(isinstance(s, torch.SymInt) for s in sizes):
        return True   # a padded graph: decided per bucket at capture
    return math.prod(sizes) <= skinny_gemm.MAX_ROWS


def route_skinny_linears(gm: torch.fx.GraphModule) -> int:
    """Rewrite eligible `F.linear` nodes of `gm` to `pcg::skinny_linear`; returns how many."""
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
        if isinstance(columns, torch.SymInt) or columns < skinny_gemm.MIN_COLUMNS or not _may_have_few_rows(xv):
            continue
        node.target = torch.ops.pcg.skinny_linear.default
        node.args = (x, w, b)
        node.kwargs = {}
        routed += 1
    if routed:
        gm.recompile()
    return routed
