"""Cutting a Dynamo FX graph into pieces at split-op nodes.

The analyses in `analyse/` read the graph: `token_dim.py` finds the token
symbol, `padding_rule.py` decides whether the graph may be padded,
`node_kinds.py` gives every node a kind. The rewrites in `rewrite/` change
no value: `row_rewrites.py` keeps a paddable graph paddable, `schedule.py`
moves nodes so that fewer pieces form. Consecutive nodes of one kind form a
piece. Piece ids grow with node order, so
`split_module(keep_original_order=True)` keeps the original order, which
matters because graphs mutate tensors (KV and SSM state).
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from .analyse import padding_rule
from .analyse.fx_facts import created_state_outputs, mutated_inputs, node_value, symbols_of, tensors_in
from .analyse.node_kinds import Kind, _fuse_safe_split_ops, classify
from .analyse.token_dim import find_token_symbol, token_aliases, written_input_reason
from .ops.registry import split_op_name
from .rewrite import row_rewrites
from .rewrite.attention_keys import mark_attention_over_new_rows
from .rewrite.nested_regions import nested_split_ops
from .rewrite.schedule import drop_dead_host_work, hoist_uncapturable_inputs, pull_allocations_up


@dataclasses.dataclass
class PieceInfo:
    """One piece of a split graph."""

    name: str
    kind: Kind
    reason: str = ""
    split_op: str | None = None


@dataclasses.dataclass
class SplitResult:
    """A split graph, plus what the runtime needs to pad its inputs and slice its outputs."""

    module: torch.fx.GraphModule
    pieces: list[PieceInfo]
    token_symbol: sympy.Symbol | None
    keyed_symbols: list[sympy.Symbol]
    split_op_nodes: int
    on_cuda: bool
    device: torch.device       # where the graph runs: the device-count buffer lives there
    exact_reason: str | None   # why only exact bucket sizes may use CUDA graphs, if so
    fused_split_ops: int       # safe split ops captured inside pieces
    aliases: set = dataclasses.field(default_factory=set)   # symbols padded as the token count (`token_aliases`)
    row_picks: int = 0         # rows picked from the end, now gathers at the real count (`rewrite/row_rewrites.py`)
    count_values: int = 0      # uses of the token count as a value, rewritten to read the device count
    row_wise_modules: list = dataclasses.field(default_factory=list)   # trusted as row-wise (`analyse/padding_rule.py`)
    state_outputs: list = dataclasses.field(default_factory=list)   # outputs that are state the graph created
    held_back: int = 0         # padding-safe split ops left eager: they read rows an eager split op returned

    @property
    def row_rewrites(self) -> int:
        return self.row_picks + self.count_values

    @property
    def paddable(self) -> bool:
        """Calls are padded to buckets (the graph has a token dim and nothing forbids padding it)."""
        return self.token_symbol is not None and not self.exact_reason

    @property
    def needs_device_count(self) -> bool:
        """Nodes of this padded graph read the real count on the device: fused split ops, or row rewrites."""
        return self.paddable and (self.fused_split_ops > 0 or self.row_rewrites > 0)


def _refuse_unkeyed_inputs(piece: PieceInfo, sub: torch.fx.GraphModule, keyed: set) -> None:
    """A captured piece must not take an input whose size moves with an unkeyed symbol.

    Its static copy would have the capture-time size. The prologue hoisting
    avoids the common case; this catches the rest and runs the piece eagerly.
    """
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            foreign = sorted(str(x) for x in symbols_of(node_value(node)) - keyed)
            if foreign:
                piece.kind = Kind.DYNAMIC
                piece.reason = f"input {node.name} has dynamic size(s) {', '.join(foreign)} that are not the token count"
                return


def graph_device(gm: torch.fx.GraphModule) -> torch.device:
    """The device of the graph's GPU inputs, else of its first tensor input (a 0-dim CPU scalar never picks it)."""
    devices = [t.device for n in gm.graph.nodes if n.op == "placeholder" for t in tensors_in(node_value(n))]
    return next((d for d in devices if d.type == "cuda"), devices[0] if devices else torch.device("cpu"))


def split_graph(gm: torch.fx.GraphModule, capture_split_ops: bool = True) -> SplitResult:
    """Cut `gm` at split ops and at changes of node kind, keeping the original order."""
    device = graph_device(gm)
    on_cuda = device.type == "cuda"
    mark_attention_over_new_rows(gm)
    state_outputs = created_state_outputs(
        gm, lambda node: node.op == "call_function" and split_op_name(node.target) is not None)
    token, keyed = find_token_symbol(gm)
    aliases = token_aliases(gm, token, keyed)
    exact_reason = written_input_reason(gm, token, mutated_inputs(gm))
    # Split ops inside control flow (after nested compile regions were inlined): not cut, so not padded.
    nested = {node: f"{node.target.name()} at node {node.name} holds split op(s) {', '.join(names)} in its "
                    f"subgraph, where pcg cannot cut them out"
              for node in gm.graph.nodes if (names := nested_split_ops(gm, node))}
    if nested and not exact_reason:
        exact_reason = next(iter(nested.values())) + " or hand them the real token count"
    picks = counts = 0
    row_wise: list = []
    if token is not None and not exact_reason:
        plan = padding_rule.analyse(gm, token, aliases, keyed)
        exact_reason = plan.reason
        if not exact_reason:
            row_rewrites.apply(gm, plan, token, device)
            picks, counts, row_wise = len(plan.picks), len(plan.counts), plan.row_wise_modules
    # Aliases are padded with the token count, so their sizes never key a capture.
    keyed = keyed | aliases
    kinds, mutated = classify(gm, keyed, on_cuda)
    for node, held in nested.items():
        kinds[node] = (Kind.DYNAMIC, held + "; it runs without a CUDA graph")
    split_nodes = sum(1 for k, _ in kinds.values() if k is Kind.SPLIT)
    fused = held_back = 0
    if capture_split_ops:
        fused, held_back = _fuse_safe_split_ops(kinds, keyed, padded=token is not None and not exact_reason,
                                                token=token)
    drop_dead_host_work(gm, kinds)
    hoist_uncapturable_inputs(gm, kinds)
    pull_allocations_up(gm, kinds)

    piece_of: dict[torch.fx.Node, int] = {}
    pieces: list[PieceInfo] = []
    current: Kind | None = None
    force_new = True
    for node in gm.graph.nodes:
        if node not in kinds:
            continue
        kind, reason = kinds[node]
        if kind is Kind.SPLIT:
            pieces.append(PieceInfo(f"submod_{len(pieces)}", Kind.SPLIT, split_op=reason))
            force_new = True
        elif force_new or (kind is not None and current is not None and kind is not current):
            pieces.append(PieceInfo(f"submod_{len(pieces)}", kind or Kind.HOST, reason))
            force_new = False
            current = kind
        elif kind is not None and current is None:
            pieces[-1].kind, pieces[-1].reason = kind, reason
            current = kind
        if kind is Kind.DYNAMIC and not pieces[-1].reason:
            pieces[-1].reason = reason
        piece_of[node] = len(pieces) - 1
        if kind is Kind.SPLIT:
            current = None

    if not pieces:
        # A graph with no compute nodes (pure pass-through): one empty static piece.
        pieces.append(PieceInfo("submod_0", Kind.STATIC))
    split = split_module(gm, None, lambda n: piece_of.get(n, 0), keep_original_order=True)
    present = {name for name, _ in split.named_children()}
    pieces = [p for p in pieces if p.name in present]
    for piece in pieces:
        if piece.kind is Kind.STATIC:
            _refuse_unkeyed_inputs(piece, getattr(split, piece.name), keyed)
    return SplitResult(split, pieces, token, sorted(keyed - aliases, key=str), split_nodes, on_cuda, device, exact_reason,
                       fused, aliases, picks, counts, row_wise, state_outputs, held_back)
