"""The compiled callable for one graph: pad to the bucket, run the pieces, slice back.

Capture policy (option `capture`): with "upfront" (the default), the first
call of a paddable graph captures every bucket before it returns, largest
bucket first, so that each smaller capture reuses the pool memory the larger
one left free (docs/design.md, "Memory"); each of those forwards runs on the
caller's inputs padded or cut to the bucket, with `warmup` set in the context
so that no model state is written (split ops get private copies of what they
write, `eager_pieces.py`). Graphs that only run at exact sizes (no
token dim, or inputs written in place along it) capture lazily, one key at a
time, since pcg cannot make inputs of other sizes for them.

Per call it reads the real token count n from the graph's inputs, picks the
bucket (above the ladder, an overflow bucket: captured on its first call, and
given up for a key whose capture failed there), zero-pads every input along the token dim, publishes a
`ForwardContext`, runs the split module (captured pieces replay, split ops run
eagerly on the real n), slices each output back to n, and clones outputs that
live in graph-pool memory (so that a later replay cannot overwrite them) or
were cut to n (so that they leave dense, as eager's do), in grouped copies.
"""

from __future__ import annotations

import dataclasses
import time

import sympy
import torch
from tqdm.auto import tqdm

from . import context, state_slots
from .analyse.fx_facts import node_value
from .batched_copy import clone_all
from .buckets import Ladder, fit_dims, pad_dims, slice_dims
from .cudagraph import CudaGraphPiece, any_pool_owns, begin_forward
from .options import PcgOptions
from .split import SplitResult
from .stats import STATS


def _value_getter(args_index: int, dim: int | None):
    if dim is None:
        return lambda args: int(args[args_index])
    return lambda args: args[args_index].shape[dim]


def _value_fn(expr, token, symbols, aliases=(), cast=int):
    """(count, env) -> the value of an expression of the token count (aliases of the token read as the token)."""
    fn = sympy.lambdify([token, *symbols], expr.xreplace({a: token for a in aliases}), modules="math")
    return lambda count, env: cast(fn(count, *env))


def _size_fn(expr, token, symbols, aliases=()):
    """A fast function (bucket, env) -> int for a dim size expression; None when the dim *is* the token dim."""
    if expr.xreplace({a: token for a in aliases}) == token:
        return None  # the common case
    return _value_fn(expr, token, symbols, aliases)


def _lower_bound(placeholders, token) -> int:
    """The smallest value Dynamo lets the token symbol take (2 unless the user marked otherwise)."""
    for node in placeholders:
        val = node_value(node)
        sizes = val.shape if isinstance(val, torch.Tensor) else [val]
        for size in sizes:
            if isinstance(size, torch.SymInt) and size.node.expr == token:
                value_range = size.node.shape_env.var_to_range.get(token)
                return int(value_range.lower) if value_range is not None else 2
    return 2


def _symbol_sources(placeholders) -> dict:
    """Where each symbol's value can be read from a call's arguments: symbol -> (arg index, dim or None).

    A size passed as an argument of its own wins over a tensor dim that has it.
    """
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
    return sources


@dataclasses.dataclass
class _DimPlan:
    index: int
    dims: dict[int, object]  # dim -> None (== token) or size function


class PiecewiseRunner:
    """Calls a split graph at bucket sizes. See the module docstring."""

    def __init__(self, split: SplitResult, graph: torch.fx.Graph, ladder: Ladder, cuda_graphs: bool,
                 off_reason: str, name: str, opts: PcgOptions):
        self.split = split
        # Coarse buckets above the ladder, captured on first use (not up front: each holds graph memory
        # for its size, and most processes never see such calls). Not on a GPU without CUDA graphs,
        # where padding would only cost; on CPU they pad, so that the CPU tests run the padded path.
        use_overflow = bool(opts.overflow_sizes) and (cuda_graphs or not split.on_cuda)
        self.overflow = Ladder(opts.overflow_sizes) if use_overflow else None
        self._overflow_off: dict[tuple, str] = {}   # key (without the bucket) -> why its overflow capture failed
        self.progress = opts.progress
        self.module = split.module
        # The generated forward itself: GraphModule.__call__ adds three more Python
        # frames that each re-pack the several hundred arguments of an HF graph.
        self._forward = split.module.forward
        self.ladder = ladder
        self.name = name
        self.cuda_graphs = cuda_graphs
        self.off_reason = off_reason
        token = split.token_symbol
        self.token = token
        self._token_symbols = {token, *split.aliases}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]

        sources = _symbol_sources(placeholders)
        self.aliases = split.aliases
        self.other_symbols = sorted((s for s in sources if s != token and s not in self.aliases), key=str)
        # Aliases of the token count (`token_dim.token_aliases`) must equal it on every call that pads.
        self._alias_getters = [_value_getter(*sources[a]) for a in sorted(self.aliases, key=str) if a in sources]
        self._env_getters = [_value_getter(*sources[s]) for s in self.other_symbols]
        self._key_getters = [_value_getter(*sources[s]) for s in split.keyed_symbols if s != token and s in sources]
        self._token_getter = _value_getter(*sources[token]) if token is not None and token in sources else None

        self.pad_plan, self.sym_plan = self._input_plans(placeholders)
        self.unpaddable = split.exact_reason
        # Padding-safe split ops inside pieces, and row rewrites, read the real count from this buffer.
        self.count = context.count_buffer(split.device) if split.needs_device_count else None
        self.single_output, self.out_plan, self.value_out_plan = self._output_plan(graph)
        self._state_positions = frozenset(split.state_outputs)
        self._cut_positions = frozenset(plan.index for plan in self.out_plan)   # outputs a padded call cuts
        if self.unpaddable:
            STATS.note(f"{name}: {self.unpaddable}")

        self.upfront = (opts.capture == "upfront" and cuda_graphs and self._token_getter is not None
                        and not self.unpaddable)
        self._captured_keys: set[tuple] = set()
        self._seen_keys: set[tuple] = set()   # capture keys that have had a forward (cudagraph.begin_forward)
        self._param_index: int | None = None
        # Dynamo gives a token count of 1 its own static graph, so a dynamic
        # graph never sees sizes below its symbol's lower bound.
        lowest = _lower_bound(placeholders, token) if self.upfront else 2
        self.upfront_sizes = sorted((b for b in ladder.sizes if b >= lowest), reverse=True)

    def _input_plans(self, placeholders) -> tuple[list[_DimPlan], list[tuple[int, object]]]:
        """Which inputs get padded, and how: the tensors' token dims, and the size inputs that follow the token."""
        pad_plan: list[_DimPlan] = []
        sym_plan: list[tuple[int, object]] = []
        for i, node in enumerate(placeholders):
            val = node_value(node)
            if self.token is None:
                break
            if isinstance(val, torch.SymInt):
                if val.node.expr.free_symbols & self._token_symbols:
                    sym_plan.append((i, _size_fn(val.node.expr, self.token, self.other_symbols, self.aliases)))
            elif isinstance(val, torch.Tensor):
                dims = self._token_dims(val)
                if dims:
                    pad_plan.append(_DimPlan(i, dims))
        return pad_plan, sym_plan

    def _output_plan(self, graph: torch.fx.Graph) -> tuple[bool, list[_DimPlan], list[tuple[int, object]]]:
        """Whether the graph returns a single value; which outputs get sliced back to the real size; and
        which outputs are numbers of the token count (`x.shape[0] * 2`), recomputed from the real count."""
        output_node = next(n for n in reversed(graph.nodes) if n.op == "output")
        out_args = output_node.args[0]
        single_output = not isinstance(out_args, (tuple, list))
        flat = [out_args] if single_output else list(out_args)
        out_plan: list[_DimPlan] = []
        value_plan: list[tuple[int, object]] = []
        for j, out in enumerate(flat):
            val = node_value(out) if isinstance(out, torch.fx.Node) else None
            if self.token is None:
                continue
            if isinstance(val, torch.Tensor):
                dims = self._token_dims(val)
                if dims:
                    out_plan.append(_DimPlan(j, dims))
            elif isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                expr = val.node.expr
                if expr.free_symbols & self._token_symbols:
                    cast = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(val)]
                    value_plan.append((j, _value_fn(expr, self.token, self.other_symbols, self.aliases, cast)))
        return single_output, out_plan, value_plan

    def _context(self, args) -> tuple[context.ForwardContext, int | None]:
        if self._token_getter is None:
            key = tuple(g(args) for g in self._key_getters)
            if not self.cuda_graphs:
                return context.ForwardContext(None, None, None, self.off_reason), None
            return context.ForwardContext(None, None, ("static", *key)), None
        n = self._token_getter(args)
        # Filled once per forward; row rewrites read it on every call, fused split ops only when passed it.
        published = self._publish_count(n)
        if any(g(args) != n for g in self._alias_getters):
            return context.ForwardContext(n, n, None, f"{self.name}: a size that equalled the token count when "
                                                      f"traced (e.g. an attention mask's length) differs from it"), None
        bucket = self.ladder.bucket(n)
        if bucket is None:
            overflow, reason = self._overflow_bucket(n, args)
            if overflow is not None:
                key = (overflow, *(g(args) for g in self._key_getters)) if self.cuda_graphs else None
                return context.ForwardContext(n, overflow, key, "" if key else self.off_reason,
                                              device_count=published, overflow_refusals=[]), overflow
            # Nothing is padded or captured: split ops slice on the host, which skips
            # the padded path's masking (about 11 ms of `where` and `cat` at 2048
            # tokens on the 9B model). Without CUDA graphs at all (CPU) the device
            # count is still published, so that the path the graphs use is the one tested.
            count = published if not self.cuda_graphs else None
            return context.ForwardContext(n, n, None, reason, device_count=count), None
        count = published
        if self.unpaddable and bucket != n:
            return context.ForwardContext(n, n, None, f"{self.name}: token count is not a bucket size and the graph cannot be padded"), None
        if not self.cuda_graphs:
            return context.ForwardContext(n, bucket, None, self.off_reason, device_count=count), bucket
        key = (bucket, *(g(args) for g in self._key_getters))
        return context.ForwardContext(n, bucket, key, device_count=count), bucket

    def _overflow_bucket(self, n: int, args) -> tuple[int | None, str]:
        """The overflow bucket for `n` tokens above the ladder, or (None, why the call runs at `n` without graphs).

        None above the overflow buckets, for a graph that cannot be padded, and
        for a key (e.g. a batch size) where a piece could not be captured at an
        overflow bucket before.
        """
        reason = f"token count above the largest bucket {self.ladder.largest}"
        if self.overflow is None or self.unpaddable:
            return None, reason
        bucket = self.overflow.bucket(n)
        if bucket is None:
            return None, f"token count above the largest overflow bucket {self.overflow.largest}"
        if self._overflow_off:
            rest = tuple(g(args) for g in self._key_getters)
            if rest in self._overflow_off:
                return None, f"{reason}; overflow buckets off for key {rest}: {self._overflow_off[rest]}"
        return bucket, ""

    def _publish_count(self, n: int) -> torch.Tensor | None:
        # fill_ launches one tiny kernel, ordered on the stream before this forward's replays.
        if self.count is None:
            return None
        self.count.fill_(n)
        return self.count

    def __call__(self, *args):
        if self.upfront:
            rest = tuple(g(args) for g in self._key_getters)
            # Keyed on the weights' address too: a second model that shares this
            # compiled code gets its own up-front capture (see CudaGraphPiece.entries).
            weights = self._weights_address(args)
            if (rest, weights) not in self._captured_keys:
                self._captured_keys.add((rest, weights))
                self._capture_every_bucket(args, rest)
        ctx, bucket = self._context(args)
        if ctx.overflow_refusals is not None:
            STATS.overflow_calls += 1
        if bucket is not None and bucket != ctx.num_tokens:
            args = self._pad(list(args), bucket)
            STATS.padded_calls += 1
        if ctx.capture_key is not None:
            self._begin_forward(ctx.capture_key)
        with context.forward_context(ctx):
            outs = self._forward(*args)
        if ctx.overflow_refusals:
            rest = ctx.capture_key[1:]   # refusals come from captures, so there is a key: (bucket, *rest)
            self._overflow_off[rest] = ctx.overflow_refusals[0]
            STATS.note(f"{self.name}: no more overflow buckets for key {rest}, calls above the largest bucket "
                       f"{self.ladder.largest} run unpadded without CUDA graphs: {ctx.overflow_refusals[0]}")
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        cut = ()
        if ctx.num_tokens is not None and ctx.padded_tokens != ctx.num_tokens:
            cut = self._cut_positions
            env = [g(args) for g in self._env_getters]
            for plan in self.out_plan:
                sizes = {d: (ctx.num_tokens if fn is None else fn(ctx.num_tokens, env)) for d, fn in plan.dims.items()}
                outs[plan.index] = slice_dims(outs[plan.index], sizes)
            for j, fn in self.value_out_plan:
                outs[j] = fn(ctx.num_tokens, env)
        if self.split.state_outputs:
            self._lend_state_slots(outs)
        # Copied: outputs in graph memory (a later replay overwrites it), and cut views, which
        # leave dense as eager's would (a view keeps the bucket's strides, and a cache that kept
        # one, such as a new DynamicCache's keys, would fail the decode graph's stride guards).
        # One grouped copy, not one per output: a forward that creates its cache returns every
        # state and every layer's keys.
        copied = [j for j, o in enumerate(outs) if j not in self._state_positions and isinstance(o, torch.Tensor)
                  and (any_pool_owns(o) or (j in cut and not o.is_contiguous()))]
        if copied:
            for j, clone in zip(copied, clone_all([outs[j] for j in copied])):
                outs[j] = clone
        if ctx.overflow_refusals:
            # Never replayed again: the graphs the other pieces captured for this key. Dropped after
            # the outputs left graph memory.
            for piece in self.module.children():
                if isinstance(piece, CudaGraphPiece):
                    piece.entries.pop(ctx.capture_key, None)
        return outs[0] if self.single_output else tuple(outs)

    def _lend_state_slots(self, outs: list) -> None:
        """Hand the model state this forward created to pcg's slots, so its address is the one decode graphs know.

        A graph returns a state tensor once per place the cache keeps it; each
        distinct tensor gets one slot, and every position that returned it gets its handle.
        """
        distinct: dict[int, torch.Tensor] = {}
        for j in self.split.state_outputs:
            distinct.setdefault(id(outs[j]), outs[j])
        handles = dict(zip(distinct, state_slots.POOL.lend(list(distinct.values()))))
        for j in self.split.state_outputs:
            outs[j] = handles[id(outs[j])]

    def _begin_forward(self, key: tuple) -> None:
        late = key in self._seen_keys
        if not late:
            self._seen_keys.add(key)
        begin_forward(late)

    def _token_dims(self, value: torch.Tensor) -> dict:
        """dim -> size function (None: the token count itself) for every dim that grows with tokens."""
        return {
            d: _size_fn(size.node.expr, self.token, self.other_symbols, self.aliases)
            for d, size in enumerate(value.shape)
            if isinstance(size, torch.SymInt) and size.node.expr.free_symbols & self._token_symbols
        }

    def _weights_address(self, args) -> int | None:
        if self._param_index is None:
            self._param_index = next((i for i, a in enumerate(args) if isinstance(a, torch.nn.Parameter)), -1)
        return args[self._param_index].data_ptr() if self._param_index >= 0 else None

    def _pad(self, args: list, bucket: int, resize=None) -> list:
        resize = resize or pad_dims
        env = [g(args) for g in self._env_getters]
        for i, fn in self.sym_plan:
            args[i] = bucket if fn is None else fn(bucket, env)
        for plan in self.pad_plan:
            sizes = {d: (bucket if fn is None else fn(bucket, env)) for d, fn in plan.dims.items()}
            args[plan.index] = resize(args[plan.index], sizes)
        return args

    def _capture_every_bucket(self, args, rest: tuple) -> None:
        """Capture all buckets for one key, largest first, on the caller's inputs fitted to each bucket."""
        start = time.perf_counter()
        captured, memory = STATS.cuda_graphs_captured, STATS.graph_memory_bytes
        bar = tqdm(self.upfront_sizes, desc=f"pcg: capturing {self.name}", unit="bucket",
                   disable=not self.progress, leave=False)
        n = self._token_getter(args)
        for bucket in bar:
            fitted = self._pad(list(args), bucket, resize=fit_dims)
            # Split ops see the caller's own real count (cut to the bucket), so
            # their work is what a real call would do: e.g. a static KV cache
            # is never asked to hold more rows than the caller's call writes.
            real = min(n, bucket)
            ctx = context.ForwardContext(real, bucket, (bucket, *rest), warmup=True,
                                         device_count=self._publish_count(real))
            self._begin_forward(ctx.capture_key)
            with context.forward_context(ctx):
                self.module(*fitted)
        if self.cuda_graphs:
            torch.cuda.synchronize()
        graphs = STATS.cuda_graphs_captured - captured
        pieces = sum(isinstance(m, CudaGraphPiece) for m in self.module.children())
        summary = (
            f"{self.name}: captured {graphs} CUDA graphs ({pieces} piece{'' if pieces == 1 else 's'} x "
            f"{len(self.upfront_sizes)} buckets "
            f"{self.upfront_sizes[-1]}..{self.upfront_sizes[0]}, largest first"
            f"{', key ' + str(rest) if rest else ''}) in {time.perf_counter() - start:.1f} s, "
            f"{(STATS.graph_memory_bytes - memory) / 2**20:.0f} MiB of graph memory"
        )
        STATS.note(summary)
        STATS.capture_summaries.append(summary)
        if self.progress:
            tqdm.write(f"pcg: {summary}")
