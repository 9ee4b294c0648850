"""Cutting a Dynamo FX graph into pieces at split-op nodes.

`token_dim.py` finds the token symbol, `node_kinds.py` gives every node a
kind; consecutive nodes of one kind form a piece. Piece ids grow with node
order, so `split_module(keep_original_order=True)` keeps the original order,
which matters because graphs mutate tensors (KV and SSM state).
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from .fx_facts import symbols_of, tensors_in, node_value
from .node_kinds import Kind, _fuse_safe_split_ops, classify
from .schedule import drop_unused_size_arithmetic, hoist_uncapturable_inputs, pull_allocations_up
from .token_dim import exact_size_reason, find_token_symbol


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
    exact_reason: str | None   # why only exact bucket sizes may use CUDA graphs, if so
    fused_split_ops: int       # safe split ops captured inside pieces

    @property
    def paddable(self) -> bool:
        """Calls are padded to buckets (the graph has a token dim and nothing forbids padding it)."""
        return self.token_symbol is not None and not self.exact_reason

    @property
    def needs_device_count(self) -> bool:
        """Padding-safe split ops run inside this padded graph's pieces and read the count on the device."""
        return self.paddable and self.fused_split_ops > 0


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


def graph_device_is_cuda(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for t in tensors_in(node_value(node)):
                if t.device.type == "cuda":
                    return True
    return False


def split_graph(gm: torch.fx.GraphModule, capture_split_ops: bool = True) -> SplitResult:
    """Cut `gm` at split ops and at changes of node kind, keeping the original order."""
    on_cuda = graph_device_is_cuda(gm)
    token, keyed = find_token_symbol(gm)
    kinds, mutated, mixing = classify(gm, keyed, token, on_cuda)
    split_nodes = sum(1 for k, _ in kinds.values() if k is Kind.SPLIT)
    exact_reason = exact_size_reason(gm, token, mutated, mixing)
    fused = 0
    if capture_split_ops:
        fused = _fuse_safe_split_ops(kinds, keyed, padded=token is not None and not exact_reason)
    drop_unused_size_arithmetic(gm, kinds)
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
    return SplitResult(split, pieces, token, sorted(keyed, key=str), split_nodes, on_cuda, exact_reason, fused)
