"""Rewrites that keep a graph paddable: rows picked from the end, and the token count used as a value.

`padding_rule.analyse` lists both. Each rewrite reads the real token count n
from pcg's device buffer (`context.count_buffer`), which the runtime fills
before every forward of a graph that has rewrites, so one captured graph is
right for every count in its bucket:

* a row picked from the end (`x[:, -k:]`, `x[:, -1]`, `narrow`/`select` with
  an end-relative start, HF's `logits_to_keep`) becomes `index_select` at rows
  `start(n) + arange(k)`; the output keeps eager's shape;
* the token count used as a number in a pointwise op (`h * h.shape[1]`,
  `arange(n) / n`) is replaced by the same arithmetic on the device count.
  Shapes keep the bucket.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx

from .. import context
from ..analyse.fx_facts import node_value
from ..analyse.padding_rule import PaddingPlan, _normalize_index

COUNT_ATTR = "_pcg_token_count"


def _fake_mode(gm: torch.fx.GraphModule):
    for node in gm.graph.nodes:
        v = node_value(node)
        if isinstance(v, torch._subclasses.FakeTensor):
            return v.fake_mode
    return None


class _Emitter:
    """Inserts FX nodes (with fake values) that compute expressions of the device token count."""

    def __init__(self, gm: torch.fx.GraphModule, token, device: torch.device):
        self.gm = gm
        self.graph = gm.graph
        self.token = token
        self.mode = _fake_mode(gm)
        if not hasattr(gm, COUNT_ATTR):
            # A 0-dim view of the per-device buffer: the graph reads it at a fixed address.
            gm.register_buffer(COUNT_ATTR, context.count_buffer(device)[0], persistent=False)
        self.count_value = self.fake(getattr(gm, COUNT_ATTR))
        self.device = device

    def fake(self, t: torch.Tensor):
        return self.mode.from_tensor(t) if self.mode is not None else t

    def node(self, target, args, kwargs=None, op="call_function"):
        new = self.graph.create_node(op, target, tuple(args), kwargs or {})
        values = [node_value(a) if isinstance(a, torch.fx.Node) else a for a in args]
        kw = {k: node_value(v) if isinstance(v, torch.fx.Node) else v for k, v in (kwargs or {}).items()}
        if op == "get_attr":
            new.meta["example_value"] = self.count_value
        else:
            with self.mode if self.mode is not None else _null():
                new.meta["example_value"] = target(*values, **kw)
        return new

    def count(self) -> torch.fx.Node:
        return self.node(COUNT_ATTR, (), op="get_attr")

    def emit(self, expr: sympy.Expr):
        """`expr` of the token symbol as FX nodes over the device count (a Python number if constant)."""
        if expr == self.token:
            return self.count()
        if expr.is_Integer:
            return int(expr)
        if expr.is_Number:
            return float(expr)
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            combine = operator.add if isinstance(expr, sympy.Add) else operator.mul
            terms = [self.emit(a) for a in expr.args]
            # Constants first, folded, so that the device sees as few kernels as possible.
            constants = [t for t in terms if not isinstance(t, torch.fx.Node)]
            nodes = [t for t in terms if isinstance(t, torch.fx.Node)]
            acc = nodes[0]
            for t in nodes[1:]:
                acc = self.node(combine, (acc, t))
            if constants:
                folded = constants[0]
                for c in constants[1:]:
                    folded = combine(folded, c)
                acc = self.node(combine, (acc, folded))
            return acc
        if isinstance(expr, sympy.Pow):
            base, exponent = self.emit(expr.base), int(expr.exp)
            powered = self.node(operator.pow, (base, abs(exponent))) if abs(exponent) != 1 else base
            return self.node(operator.truediv, (1.0, powered)) if exponent < 0 else powered
        raise ValueError(f"pcg cannot compute {expr} on the device")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def apply(gm: torch.fx.GraphModule, plan: PaddingPlan, token, device: torch.device) -> int:
    """Apply every rewrite in `plan` to `gm` in place; returns how many were made."""
    if not plan.rewrites:
        return 0
    emitter = _Emitter(gm, token, device)
    for use in plan.counts:
        with gm.graph.inserting_before(use.node):
            value = emitter.emit(use.expr)
        if isinstance(use.position, int):
            args = list(use.node.args)
            args[use.position] = value
            use.node.args = tuple(args)
        else:
            use.node.kwargs = {**use.node.kwargs, use.position: value}
    for pick in plan.picks:
        node = pick.node
        with gm.graph.inserting_before(node):
            start = emitter.emit(pick.start)
            rows = emitter.node(torch.arange, (pick.length,), {"device": node_value(pick.source).device})
            rows = emitter.node(operator.add, (rows, start))
            picked = emitter.node(torch.index_select, (pick.source, pick.dim, rows))
        if pick.position is not None:    # getitem: the picked component becomes the whole of `picked`
            parts = _normalize_index(node.args[1], node_value(pick.source).dim())
            parts[pick.position] = slice(None) if pick.keep_dim else 0
            node.args = (picked, tuple(parts))
        elif pick.keep_dim:              # narrow: `picked` is the result
            node.replace_all_uses_with(picked)
            gm.graph.erase_node(node)
        else:                            # select
            node.args = (picked, pick.dim, 0)
            node.kwargs = {}
    gm.graph.lint()
    gm.recompile()
    return plan.rewrites
