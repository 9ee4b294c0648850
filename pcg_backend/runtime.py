"""The compiled callable for one graph: pad to the bucket, run the pieces, slice back.

Per call it reads the real token count n from the graph's inputs, picks the
bucket, zero-pads every input along the token dim, publishes a
`ForwardContext`, runs the split module (captured pieces replay, split ops run
eagerly on the real n), slices each output back to n, and clones outputs that
live in graph-pool memory so that a later replay cannot overwrite them.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch

from . import context
from .buckets import Ladder, pad_dims, slice_dims
from .cudagraph import any_pool_owns
from .split import SplitResult, node_value
from .stats import STATS


def _value_getter(args_index: int, dim: int | None):
    if dim is None:
        return lambda args: int(args[args_index])
    return lambda args: args[args_index].shape[dim]


def _size_fn(expr, token, symbols):
    """A fast function (bucket, env) -> int for a dim size expression."""
    if expr == token:
        return None  # the common case: the dim *is* the token dim
    fn = sympy.lambdify([token, *symbols], expr, modules="math")
    return lambda bucket, env: int(fn(bucket, *env))


@dataclasses.dataclass
class _DimPlan:
    index: int
    dims: dict[int, object]  # dim -> None (== token) or size function


class PiecewiseRunner:
    """Calls a split graph at bucket sizes. See the module docstring."""

    def __init__(self, split: SplitResult, graph: torch.fx.Graph, ladder: Ladder, cuda_graphs: bool, off_reason: str, name: str):
        self.split = split
        self.module = split.module
        self.ladder = ladder
        self.name = name
        self.cuda_graphs = cuda_graphs
        self.off_reason = off_reason
        token = split.token_symbol
        self.token = token
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]

        # Where each symbol's value can be read from the call's arguments.
        sources: dict = {}
        for i, node in enumerate(placeholders):
            val = node_value(node)
            if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
                sources.setdefault(val.node.expr, (i, None))
        for i, node in enumerate(placeholders):
            val = node_value(node)
            if isinstance(val, torch.Tensor):
                for d, size in enumerate(val.shape):
                    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                        sources.setdefault(size.node.expr, (i, d))
        self.other_symbols = sorted((s for s in sources if s != token), key=str)
        self._env_getters = [_value_getter(*sources[s]) for s in self.other_symbols]
        self._key_getters = [_value_getter(*sources[s]) for s in split.keyed_symbols if s != token and s in sources]
        self._token_getter = _value_getter(*sources[token]) if token is not None and token in sources else None

        # Which inputs get padded, and how.
        self.pad_plan: list[_DimPlan] = []
        self.sym_plan: list[tuple[int, object]] = []
        self.unpaddable: str | None = None
        for i, node in enumerate(placeholders):
            val = node_value(node)
            if token is None:
                break
            if isinstance(val, torch.SymInt):
                if token in val.node.expr.free_symbols:
                    self.sym_plan.append((i, _size_fn(val.node.expr, token, self.other_symbols)))
            elif isinstance(val, torch.Tensor):
                dims = {
                    d: _size_fn(size.node.expr, token, self.other_symbols)
                    for d, size in enumerate(val.shape)
                    if isinstance(size, torch.SymInt) and token in size.node.expr.free_symbols
                }
                if dims:
                    if node.name in split.mutated_placeholders:
                        self.unpaddable = (
                            f"graph input {node.name} is written in place and has the token dim, so it "
                            f"cannot be replaced by a padded copy; only exact bucket sizes use CUDA graphs"
                        )
                    self.pad_plan.append(_DimPlan(i, dims))

        if token is not None and split.token_mixing_nodes and not self.unpaddable:
            self.unpaddable = (
                f"node(s) {', '.join(split.token_mixing_nodes[:3])} mix tokens outside a split op (a reduction "
                f"or index over the token dim) and would see padded rows; only exact bucket sizes use CUDA graphs"
            )

        # Which outputs get sliced back to the real size.
        output_node = next(n for n in reversed(graph.nodes) if n.op == "output")
        out_args = output_node.args[0]
        self.single_output = not isinstance(out_args, (tuple, list))
        flat = [out_args] if self.single_output else list(out_args)
        self.out_plan: list[_DimPlan] = []
        for j, out in enumerate(flat):
            val = node_value(out) if isinstance(out, torch.fx.Node) else None
            if token is not None and isinstance(val, torch.Tensor):
                dims = {
                    d: _size_fn(size.node.expr, token, self.other_symbols)
                    for d, size in enumerate(val.shape)
                    if isinstance(size, torch.SymInt) and token in size.node.expr.free_symbols
                }
                if dims:
                    self.out_plan.append(_DimPlan(j, dims))
        if self.unpaddable:
            STATS.note(f"{name}: {self.unpaddable}")

    def _context(self, args) -> tuple[context.ForwardContext, int | None]:
        if self._token_getter is None:
            key = tuple(g(args) for g in self._key_getters)
            if not self.cuda_graphs:
                return context.ForwardContext(None, None, None, self.off_reason), None
            return context.ForwardContext(None, None, ("static", *key)), None
        n = self._token_getter(args)
        bucket = self.ladder.bucket(n)
        if bucket is None:
            reason = f"token count above the largest bucket {self.ladder.largest}"
            return context.ForwardContext(n, n, None, reason), None
        if self.unpaddable and bucket != n:
            return context.ForwardContext(n, n, None, f"{self.name}: token count is not a bucket size and the graph cannot be padded"), None
        if not self.cuda_graphs:
            return context.ForwardContext(n, bucket, None, self.off_reason), bucket
        key = (bucket, *(g(args) for g in self._key_getters))
        return context.ForwardContext(n, bucket, key), bucket

    def __call__(self, *args):
        ctx, bucket = self._context(args)
        if bucket is not None and bucket != ctx.num_tokens:
            args = self._pad(list(args), bucket)
            STATS.padded_calls += 1
        with context.forward_context(ctx):
            outs = self.module(*args)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        if ctx.num_tokens is not None and ctx.padded_tokens != ctx.num_tokens:
            env = [g(args) for g in self._env_getters]
            for plan in self.out_plan:
                sizes = {d: (ctx.num_tokens if fn is None else fn(ctx.num_tokens, env)) for d, fn in plan.dims.items()}
                outs[plan.index] = slice_dims(outs[plan.index], sizes)
        for j, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and any_pool_owns(o):
                outs[j] = o.clone()
        return outs[0] if self.single_output else tuple(outs)

    def _pad(self, args: list, bucket: int) -> list:
        env = [g(args) for g in self._env_getters]
        for i, fn in self.sym_plan:
            args[i] = bucket if fn is None else fn(bucket, env)
        for plan in self.pad_plan:
            sizes = {d: (bucket if fn is None else fn(bucket, env)) for d, fn in plan.dims.items()}
            args[plan.index] = pad_dims(args[plan.index], sizes)
        return args
