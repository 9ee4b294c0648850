"""Split ops inside higher-order ops: nested compile regions are inlined, the rest run eagerly.

Dynamo records some calls as a higher-order op over a subgraph of their own:
`torch.compiler.nested_compile_region` as `invoke_subgraph`, `torch.cond`,
`while_loop`, `map`, `scan`. A split op inside such a subgraph is no node of
the graph pcg cuts, so without this module it would sit inside a piece as if
it were plain arithmetic: captured in a CUDA graph it may not be safe in, and
at any token count of the piece's bucket.

* **Nested compile regions are plain calls.** `inline_nested_regions` copies
  each `invoke_subgraph`'s nodes into the graph in place of the call, with the
  same values (the subgraph's nodes keep their fake values), so its split ops
  are cut, padded and captured like any others.
* **Control flow cannot be inlined.** `nested_split_ops` finds the split ops
  left inside a higher-order op's subgraphs, at any depth; `split.py` runs
  that node eagerly and keeps the graph at exact sizes, and the report says
  why.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..ops.registry import split_op_name


def _is_hop(target) -> bool:
    return isinstance(target, torch._ops.HigherOrderOperator)


def _submodule(gm: torch.fx.GraphModule, arg) -> torch.fx.GraphModule | None:
    """The subgraph a `get_attr` argument of a higher-order op names, if it is one."""
    if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
        return None
    owner = gm
    for part in arg.target.split("."):
        owner = getattr(owner, part, None)
    return owner if isinstance(owner, torch.fx.GraphModule) else None


def _subgraphs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.GraphModule]:
    flat = []
    torch.fx.node.map_arg((node.args, node.kwargs), flat.append)
    return [sub for sub in map(lambda a: _submodule(gm, a), flat) if sub is not None]


def nested_split_ops(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[str]:
    """The split ops inside `node`'s subgraphs (and theirs), if `node` is a higher-order op; sorted names."""
    if node.op != "call_function" or not _is_hop(node.target):
        return []
    found: set[str] = set()
    for sub in _subgraphs(gm, node):
        for inner in sub.graph.nodes:
            if inner.op != "call_function":
                continue
            name = split_op_name(inner.target)
            if name:
                found.add(name)
            found.update(nested_split_ops(sub, inner))
    return sorted(found)


def _inlinable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.GraphModule | None:
    """The subgraph of an `invoke_subgraph` call that can be copied in place of it, else None.

    It must take exactly the call's operands, read no attribute of its own
    module (a nested region's subgraph lives there, not in `gm`), and be used
    only through `getitem`, as Dynamo emits it.
    """
    if node.op != "call_function" or not _is_hop(node.target) or node.target.name() != "invoke_subgraph":
        return None
    sub = _submodule(gm, node.args[0]) if node.args else None
    if sub is None or node.kwargs:
        return None
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(node.args) - 2 or any(n.op == "get_attr" for n in sub.graph.nodes):
        return None
    if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
        return None
    return sub


def inline_nested_regions(gm: torch.fx.GraphModule) -> int:
    """Replace every inlinable `invoke_subgraph` call by its subgraph's nodes; return how many calls."""
    inlined = 0
    for node in list(gm.graph.nodes):
        sub = _inlinable(gm, node)
        if sub is None:
            continue
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, node.args[2:])))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        region = node.args[0]
        gm.graph.erase_node(node)
        if not region.users:
            gm.graph.erase_node(region)
        inlined += 1
    if inlined:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return inlined
