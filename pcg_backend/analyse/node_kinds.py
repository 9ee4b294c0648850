"""The kind of every node: split op, captured, eager, or host work.

* SPLIT   - a registered split op; it is a piece of its own and runs eagerly.
* STATIC  - token-wise work whose shapes depend only on the keyed symbols
            (the token count, and e.g. the batch size); captured per bucket.
            In a graph that always runs at its exact size, cudagraph-safe
            split ops become STATIC too.
* HOST    - nothing but size arithmetic and views; runs as is, not captured.
* DYNAMIC - work whose shapes depend on another symbol (a KV length that grows
            every decode step), that mutates a graph input, that syncs with or
            copies from the host, or that touches the CPU; it runs eagerly,
            and every run is counted with its reason.
"""

from __future__ import annotations

import enum

import torch
import torch.fx

from .fx_facts import (DATA_FREE, input_roots, mutated_inputs, written_args, symbols_of, target_name, tensors_in,
                       node_value)
from ..ops.registry import is_cudagraph_safe, is_padding_safe, split_op_name


class Kind(enum.Enum):
    SPLIT = "split"
    STATIC = "static"
    DYNAMIC = "dynamic"
    HOST = "host"  # size arithmetic and views of inputs: runs as is, nothing to capture


def _reads_tensor_on_host(node) -> bool:
    """A node that turns tensor data into a Python value (`.item()`, `.tolist()`): a device sync."""
    if node.op not in ("call_method", "call_function") or target_name(node) in DATA_FREE:
        return False
    if not isinstance(node_value(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return False
    return any(isinstance(node_value(a), torch.Tensor) for a in node.all_input_nodes)


def _copies_host_to_device(node) -> bool:
    """A CUDA result made from host data: `cpu_tensor.to("cuda")`, `torch.tensor([...], device="cuda")`."""
    if not any(t.device.type == "cuda" for t in tensors_in(node_value(node))):
        return False
    if target_name(node) in ("tensor", "as_tensor", "from_numpy"):
        return True
    return any(t.device.type == "cpu" for a in node.all_input_nodes for t in tensors_in(node_value(a)))


def _hoist_to_prologue(gm: torch.fx.GraphModule, roots: dict, mutated: set[str], keyed: set) -> set:
    """Move two kinds of input-only nodes to the top of the graph, into an eager prologue piece.

    * Views of written graph inputs (`state[i]`). A captured piece reads its
      inputs from static copies, so a view it made would point at the copy,
      and a split op writing through it would never reach the caller's tensor.
    * Size reads of graph inputs with an unkeyed dynamic size (`keys.shape[-2]`
      of a growing KV cache), and arithmetic on such sizes. Inside a captured
      piece they would make that tensor a piece input, copied into a buffer of
      its capture-time size, and bake the size into the graph.

    Both cost nothing eagerly, and hoisting them keeps them from cutting a
    captured piece in two.
    """
    anchor = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            anchor = node
    hoisted: set = set()
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" or anchor is None:
            continue
        view_of_written = node in roots and roots[node] in mutated
        unkeyed_size_math = (
            node.op in ("call_function", "call_method")
            and not any(True for _ in tensors_in(node_value(node)))
            and not _reads_tensor_on_host(node)
            and bool(_foreign_symbols(node, keyed))
        )
        if not (view_of_written or unkeyed_size_math):
            continue
        if not all(a.op == "placeholder" or a in hoisted for a in node.all_input_nodes):
            continue
        anchor.append(node)
        anchor = node
        hoisted.add(node)
    return hoisted


def classify(gm: torch.fx.GraphModule, keyed: set, on_cuda: bool):
    """Return ({node: (Kind|None, reason)}, mutated placeholder names).

    Kind None means 'goes anywhere'. Whether the graph may be padded at all is
    `padding_rule`'s decision, not a node kind.
    """
    roots = input_roots(gm)
    mutated = mutated_inputs(gm)
    hoisted = _hoist_to_prologue(gm, roots, mutated, keyed)
    kinds: dict[torch.fx.Node, tuple[Kind | None, str]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        name = split_op_name(node.target) if node.op == "call_function" else None
        writes = [roots[a] for a in written_args(node) if a in roots]
        if name:
            kinds[node] = (Kind.SPLIT, name)
            continue
        if node in hoisted:
            kinds[node] = (Kind.HOST, "")
            continue
        if node in roots and roots[node] in mutated:
            kinds[node] = (Kind.DYNAMIC, f"views graph input {roots[node]}, which is written in place; "
                                         f"inside a CUDA graph the view would point at a static copy")
            continue
        value = node_value(node)
        if node.op == "get_attr" or not any(True for _ in tensors_in(value)):
            if _reads_tensor_on_host(node):
                kinds[node] = (Kind.DYNAMIC, f"{target_name(node)}() reads a tensor's value on the host, "
                                             f"a sync that a CUDA graph cannot hold")
                continue
            # SymInt arithmetic, getattr on shapes, constants: cheap host work. Math on
            # an unkeyed size stays out of captured pieces (it would be baked in).
            kinds[node] = (Kind.HOST if _foreign_symbols(node, keyed) else None, "")
            continue
        foreign = _foreign_symbols(node, keyed)
        if foreign:
            kinds[node] = (Kind.DYNAMIC, f"shape depends on dynamic size(s) {', '.join(foreign)} that are not the token count")
        elif writes:
            kinds[node] = (Kind.DYNAMIC, f"writes graph input {writes[0]} in place")
        elif on_cuda and any(t.device.type == "cpu" for t in tensors_in(value)):
            kinds[node] = (Kind.DYNAMIC, "produces a CPU tensor inside a CUDA graph")
        elif on_cuda and _copies_host_to_device(node):
            kinds[node] = (Kind.DYNAMIC, f"{target_name(node)}() copies host memory to the GPU, "
                                         f"which a CUDA graph cannot capture from pageable memory")
        else:
            kinds[node] = (Kind.STATIC, "")
    return kinds, mutated


def _foreign_symbols(node, keyed: set) -> list[str]:
    """Symbols in a node's inputs or output that captures are not keyed on (e.g. a KV length)."""
    values = [node_value(node), *(node_value(a) for a in node.all_input_nodes)]
    syms = set().union(*(symbols_of(v) for v in values))
    return sorted(str(s) for s in syms - keyed)


def _fuse_safe_split_ops(kinds: dict, keyed: set, padded: bool, token=None) -> tuple[int, int]:
    """Capture safe split ops together with their neighbours; return how many, and how many were held back.

    In a graph that always runs at its exact size (`padded=False`) nothing is
    padded, so a `cudagraph_safe` op sees exactly the rows it would see
    eagerly, and its launches can live in the graph. In a padded graph only
    `padding_safe` ops qualify: they read the real count from the device.
    Ops whose shapes move with another symbol (attention over a growing KV
    cache) stay eager either way.

    In a padded graph a split op that stays eager may return the real rows
    only (`pcg::kv_append` appends n rows, not the bucket's): a captured piece
    reading such a value would see a size it was not captured at. So a
    padding-safe op downstream of an eager split op's token-sized output
    (attention over a DynamicCache's keys) stays eager too; those are counted
    as held back, for the report.
    """
    safe = is_padding_safe if padded else is_cudagraph_safe
    fused = held_back = 0
    real_rows: set = set()   # values that may hold only the real rows of the token dim
    for node, (kind, name) in list(kinds.items()):
        reads_real_rows = padded and any(a in real_rows for a in node.all_input_nodes)
        fusable = kind is Kind.SPLIT and safe(name) and not _foreign_symbols(node, keyed)
        if fusable and not reads_real_rows:
            kinds[node] = (Kind.STATIC, "")
            fused += 1
            continue
        held_back += fusable
        if padded and (kind is Kind.SPLIT or reads_real_rows) and token in symbols_of(node_value(node)):
            real_rows.add(node)
    return fused, held_back
