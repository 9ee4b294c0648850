"""What an FX node reads, writes and aliases: the facts every later pass relies on.

Values come from Dynamo's fake `example_value` metadata. Writes come from op
schemas (`Tensor(a!)`) and from the trailing-underscore convention of
in-place methods; aliases follow view ops back to the graph input they view.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_symbols

# Methods/functions that return a view of their first argument: a mutation
# through the view is a mutation of the graph input it came from.
VIEW_NAMES = {
    "view", "reshape", "transpose", "permute", "select", "narrow", "unsqueeze", "squeeze",
    "expand", "t", "flatten", "unflatten", "split", "chunk", "as_strided", "detach",
    "__getitem__", "getitem", "view_as", "expand_as", "unbind", "movedim", "contiguous",
}


# Ops that read only the metadata (dtype, device) of a tensor argument, never its rows.
DATA_FREE = {"new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided", "size", "dim", "stride",
              "sym_size", "sym_stride", "sym_numel", "numel", "sym_storage_offset", "storage_offset", "len"}


_OPERATOR_IN_PLACE = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul", "iconcat"}


def node_value(node):
    return node.meta.get("example_value", node.meta.get("val"))


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


def symbols_of(value) -> set[sympy.Symbol]:
    try:
        return set(free_symbols(value))
    except Exception:
        return set()


def target_name(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def written_args(node) -> list[torch.fx.Node]:
    """FX nodes this node writes in place (conservatively, from names and schemas)."""
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_") and node.args:
            return [node.args[0]] if isinstance(node.args[0], torch.fx.Node) else []
        return []
    if node.op != "call_function":
        return []
    if node.target is operator.setitem:
        return [node.args[0]]
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        # `operator.and_` is `a & b`, not in place: only the `i*` functions write.
        return [node.args[0]] if node.target.__name__ in _OPERATOR_IN_PLACE else []
    op_args = op_arguments(node)
    if op_args:
        return [val for arg, val in op_args
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(val, torch.fx.Node)]
    name = target_name(node)
    if name.endswith("_") and not name.startswith("_") and node.args and isinstance(node.args[0], torch.fx.Node):
        return [node.args[0]]
    return []


def op_arguments(node):
    """(schema argument, value) pairs of a call to an OpOverload; empty for anything else."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    return [(arg, node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
            for i, arg in enumerate(target._schema.arguments)]


def placeholder_index(sub: torch.fx.GraphModule) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(n for n in sub.graph.nodes if n.op == "placeholder")}


def op_argument_names(sub: torch.fx.GraphModule) -> dict[int, str]:
    """Piece input index -> the schema name of the op argument it feeds (for error messages)."""
    index = placeholder_index(sub)
    names: dict[int, str] = {}
    for node in sub.graph.nodes:
        for arg, val in op_arguments(node):
            if isinstance(val, torch.fx.Node) and val.name in index:
                names.setdefault(index[val.name], arg.name)
    return names


def written_inputs(sub: torch.fx.GraphModule) -> dict[int, str]:
    """Inputs of a piece that it writes in place: placeholder index -> the argument's name.

    Used for the up-front capture forwards, which must not touch model state:
    those inputs are replaced by private copies there.
    """
    roots = input_roots(sub)
    index = placeholder_index(sub)
    names = op_argument_names(sub)
    out: dict[int, str] = {}
    for node in sub.graph.nodes:
        for arg in written_args(node):
            if arg in roots:
                i = index[roots[arg]]
                out.setdefault(i, names.get(i, roots[arg]))
    return out


def input_roots(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Map every node that aliases a graph input (through views) to that input's name."""
    roots: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            roots[node] = node.name
        elif node.op in ("call_method", "call_function") and node.args:
            first = node.args[0]
            if isinstance(first, torch.fx.Node) and first in roots and target_name(node) in VIEW_NAMES:
                roots[node] = roots[first]
    return roots


def mutated_inputs(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the graph inputs that some node writes in place (through views too)."""
    roots = input_roots(gm)
    return {roots[a] for node in gm.graph.nodes for a in written_args(node) if a in roots}


def created_state_outputs(gm: torch.fx.GraphModule, is_state_writer) -> list[int]:
    """Positions of graph outputs that the graph allocated and a state writer wrote in place.

    These are model state the graph created (HF allocates a cache's Mamba
    states, or a static cache's KV rows, lazily inside the first forward):
    the runtime hands them to `state_slots.POOL`. `is_state_writer(node)`
    says which nodes count (the split ops); tensors that alias a graph input
    are the caller's and are never returned in a slot.
    """
    roots = input_roots(gm)
    written = {a for node in gm.graph.nodes if is_state_writer(node)
               for a in written_args(node) if a not in roots}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = output.args[0]
    flat = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return [j for j, out in enumerate(flat) if isinstance(out, torch.fx.Node) and out in written]
