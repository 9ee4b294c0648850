"""Split ops inside higher-order ops: nested compile regions are inlined, the rest run eagerly.

Dynamo records some calls as a higher-order op over a subgraph of their own:
`torch.compiler.nested_compile_region` as `invoke_subgraph`, `torch.cond`,
`while_loop`, `map`, `scan`. A split op inside such a subgraph is no node of
the graph pcg cuts, so without this module it would sit inside a piece as if
it were plain arithmetic: captured in a CUDA graph it may not be safe in, and
at any token count of the piece's bucket.

* **Nested compile regions are plain calls.** `inline_nested_regions` copies
  each `invoke_subgraph`'s (and `wrap`'s) nodes into the graph in place of
  the call, with the same values (the subgraph's nodes keep their fake
  values), regions inside regions too, so their split ops are cut, padded
  and captured like any others.
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


# Higher-order ops that are plain calls of their subgraph, and where their operands start.
_CALLS = {"invoke_subgraph": 2, "wrap": 1}


def _inlinable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.fx.GraphModule, tuple] | None:
    """The subgraph and operands of a plain call (`invoke_subgraph`, `wrap`) that can be copied in place of
    it, else None: the subgraph takes exactly the operands, and the call is used only through `getitem`,
    as Dynamo emits it."""
    if node.op != "call_function" or not _is_hop(node.target) or node.target.name() not in _CALLS:
        return None
    sub = _submodule(gm, node.args[0]) if node.args else None
    if sub is None or node.kwargs:
        return None
    operands = node.args[_CALLS[node.target.name()]:]
    if len([n for n in sub.graph.nodes if n.op == "placeholder"]) != len(operands):
        return None
    if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
        return None
    return sub, operands


def _fresh_attribute(gm: torch.fx.GraphModule, target: str) -> str:
    base = "inlined_" + target.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _copy_in(gm: torch.fx.GraphModule, node: torch.fx.Node, sub: torch.fx.GraphModule, operands) -> tuple:
    """Copy `sub`'s nodes before `node`, reading `operands`; return what its output maps to.

    A `get_attr` inside `sub` (an inner region, a `cond`'s branches) names an
    attribute of `sub`: the module is registered on `gm` under a new name, so
    the copied node reads the same module. An inner region copied in is
    inlined in turn by the caller's next pass.
    """
    values: dict[torch.fx.Node, object] = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    values.update(zip(placeholders, operands))
    result = None
    with gm.graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                result = torch.fx.node.map_arg(inner.args[0], values.__getitem__)
                continue
            copied = gm.graph.node_copy(inner, values.__getitem__)
            if inner.op == "get_attr":
                owner = sub
                for part in inner.target.split("."):
                    owner = getattr(owner, part)
                copied.target = _fresh_attribute(gm, inner.target)
                setattr(gm, copied.target, owner)
            values[inner] = copied
    return result if isinstance(result, (tuple, list)) else (result,)


def inline_nested_regions(gm: torch.fx.GraphModule) -> int:
    """Replace every plain call of a subgraph (`invoke_subgraph`, `wrap`) by its nodes, regions inside
    regions included; return how many calls were inlined."""
    inlined = 0
    erased_targets: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            found = _inlinable(gm, node)
            if found is None:
                continue
            outputs = _copy_in(gm, node, *found)
            for user in list(node.users):
                user.replace_all_uses_with(outputs[user.args[1]])
                gm.graph.erase_node(user)
            region = node.args[0]
            gm.graph.erase_node(node)
            if not region.users:
                erased_targets.add(region.target)
                gm.graph.erase_node(region)
            inlined += 1
            changed = True
    if inlined:
        # Only the subgraphs no node reads any more: a module that an untouched `cond` reads stays.
        still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target in erased_targets - still_read:
            gm.delete_submodule(target)
        gm.recompile()
    return inlined
