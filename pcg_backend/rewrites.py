"""Rewriting token-dim selections that padding would break into padding-safe split ops.

A slice `h[:, -k:]` over the token dim reads the last k rows, which on a
padded call are padding. Left as is, it makes the whole graph run at exact
bucket sizes only (`token_dim.exact_size_reason`), so an HF `generate`
prefill of any prompt length that is not a bucket ran without CUDA graphs.
Replaced by `pcg::last_rows`, which counts from the real end, the graph can
be padded like any other.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from .fx_facts import node_value, symbols_of
from .ops import rows  # noqa: F401  (registers pcg::last_rows)


def _last_rows_slice(node: torch.fx.Node, token) -> tuple[int, int] | None:
    """(k, dim) if `node` is `x[..., -k:, ...]` over the token dim with plain `:` elsewhere and k rows out."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    source, index = node.args
    value, out = (node_value(source) if isinstance(source, torch.fx.Node) else None), node_value(node)
    if not isinstance(value, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > value.dim() or not all(isinstance(i, slice) for i in index):
        return None
    picked = None
    for dim, part in enumerate(index):
        if part == slice(None):
            continue
        size = value.shape[dim]
        k = -part.start if isinstance(part.start, int) else None
        if (picked is not None or part.stop is not None or part.step not in (None, 1) or k is None or k <= 0
                or not isinstance(size, torch.SymInt) or size.node.expr != token or out.shape[dim] != k):
            return None
        picked = (k, dim)
    return picked


def rewrite_last_rows(gm: torch.fx.GraphModule, token) -> int:
    """Replace every `x[:, -k:]` over the token dim with `pcg::last_rows`; return how many."""
    if token is None:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        picked = _last_rows_slice(node, token)
        if picked is None or token not in symbols_of(node_value(node.args[0])):
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.ops.pcg.last_rows.default, (node.args[0], *picked))
        new.meta = dict(node.meta)
        # A fresh tensor, unlike the slice (a view whose strides and offset carry the token symbol).
        fresh = node_value(node).new_empty(node_value(node).shape)
        for key in ("example_value", "val"):
            if key in new.meta:
                new.meta[key] = fresh
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count
