"""Which dim of a graph is the token count, and whether the graph may be padded along it.

The token dim is the row dim (dim -2) of each split op's first argument: `S`
in `(B, S, H)`, `T` in `(T, H)`. A graph whose split ops all see a static row
dim (a decode step, `(B, 1, H)`) has no token dim: its other symbols are keyed
exactly, since the per-sequence state they index cannot be padded.
"""

from __future__ import annotations

import collections

import sympy
import torch
import torch.fx

from .fx_facts import node_value, symbols_of, written_args
from ..ops.registry import split_op_name


def _row_symbol(shape):
    """The symbol of the row dim: the one before the features (dim -2), or dim 0 of a 1-D tensor.

    Only that dim: in a decode step (B, 1, H) the batch B is symbolic but it is
    not a token count. Padding it would mean padding the per-sequence state
    that split ops read, so B is keyed exactly instead.
    """
    if len(shape) == 0:
        return None
    dim = shape[-2] if len(shape) >= 2 else shape[0]
    if isinstance(dim, torch.SymInt) and isinstance(dim.node.expr, sympy.Symbol):
        return dim.node.expr
    return None


def find_token_symbol(gm: torch.fx.GraphModule):
    """Pick the symbol to pad and the symbols captures are keyed on.

    The token dim is the innermost symbolic non-feature dim of each split op's
    first tensor argument (its activation, features last): S in (B, S, H), T
    in (T, H). Other symbols of
    that activation (a dynamic batch) are keyed exactly, and so are those of
    the state a split op writes. Symbols that reach neither (a KV length)
    make their nodes DYNAMIC.
    """
    votes: collections.Counter = collections.Counter()
    keyed: set = set()
    has_split_ops = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and split_op_name(node.target):
            has_split_ops = True
            first = next((a for a in node.args if isinstance(a, torch.fx.Node)
                          and isinstance(node_value(a), torch.Tensor)), None)
            if first is None:
                continue
            row = _row_symbol(node_value(first).shape)
            if row is not None:
                votes[row] += 1
            keyed |= symbols_of(node_value(first))
            # State the op writes (SSM and conv state) is per sequence: Dynamo gives
            # its batch dim a symbol of its own, which is as stable as the batch.
            for written in written_args(node):
                keyed |= symbols_of(node_value(written))
    if votes:
        return votes.most_common(1)[0][0], keyed
    if has_split_ops:
        # Split ops with static activations (a decode step): nothing to pad, and
        # any symbol in the graph (a KV length) is not a token count.
        return None, keyed
    # No split op with a dynamic activation: use the first dynamic graph input.
    all_syms: set = set()
    token = None
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node_value(node)
        if isinstance(val, torch.Tensor) and not isinstance(val, torch.nn.Parameter):
            all_syms |= symbols_of(val)
            if token is None:
                token = _row_symbol(val.shape)
    return token, all_syms


def _input_hints(gm: torch.fx.GraphModule) -> dict:
    """symbol -> its value when traced, for every plain symbol in a graph input's sizes (or a size input)."""
    hints: dict = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node_value(node)
        sizes = list(val.shape) if isinstance(val, torch.Tensor) else [val] if isinstance(val, torch.SymInt) else []
        for size in sizes:
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol) and size.node.has_hint():
                hints[size.node.expr] = size.node.hint
    return hints


def token_aliases(gm: torch.fx.GraphModule, token, keyed: set) -> set:
    """Other symbols of graph inputs that equal the token count when traced and meet it: padded along with it.

    Dynamo may give one length two symbols (HF's 2-D attention mask gets its own
    beside the input ids', and the graph slices the mask to the ids' length).
    Left apart, the mask's symbol would keep every node that meets it eager.
    pcg treats such a symbol as the token count, and the runtime checks on
    every call that it still is; a call where it is not runs at its exact size,
    with that reason counted. Equal values alone are not enough: a state of
    two rows traced with two tokens is not a token dim, and no node relates it
    to one.
    """
    if token is None:
        return set()
    hints = _input_hints(gm)
    if token not in hints:
        return set()
    candidates = {sym for sym, hint in hints.items() if sym != token and sym not in keyed and hint == hints[token]}
    aliases: set = set()
    for node in gm.graph.nodes:
        if not candidates - aliases or node.op not in ("call_function", "call_method") or split_op_name(node.target):
            continue
        syms: set = set()
        for value in (node_value(node), *(node_value(a) for a in node.all_input_nodes)):
            syms |= symbols_of(value)
        if token in syms:
            aliases |= candidates & syms
    return aliases


def written_input_reason(gm: torch.fx.GraphModule, token, mutated: set[str]) -> str | None:
    """Why a graph that writes an input along the token dim in place cannot be padded (None if it does not)."""
    if token is None:
        return None
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in mutated and token in symbols_of(node_value(node)):
            return (f"graph input {node.name} is written in place and has the token dim, so it "
                    f"cannot be replaced by a padded copy")
    return None
