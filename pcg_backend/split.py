"""Cutting a Dynamo FX graph into pieces at split-op nodes.

Each node gets a kind:

* SPLIT   - a registered split op; it is a piece of its own and runs eagerly.
* STATIC  - token-wise work whose shapes depend only on the keyed symbols
            (the token count, and e.g. the batch size); captured per bucket.
* HOST    - nothing but SymInt arithmetic; runs as is.
* DYNAMIC - work whose shapes depend on another symbol (a KV length that grows
            every decode step), that mutates a graph input, or that touches
            the CPU; it runs eagerly, and every run is counted with its reason.

Consecutive nodes of one kind form a piece. Piece ids grow with node order,
so `split_module(keep_original_order=True)` keeps the original order, which
matters because graphs mutate tensors (KV and SSM state).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import operator

import sympy
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.fx.passes.split_module import split_module

from .ops.registry import is_cudagraph_safe, split_op_name


class Kind(enum.Enum):
    SPLIT = "split"
    STATIC = "static"
    DYNAMIC = "dynamic"
    HOST = "host"  # only SymInt arithmetic between two split ops: nothing to capture


# Methods/functions that return a view of their first argument: a mutation
# through the view is a mutation of the graph input it came from.
_VIEW_NAMES = {
    "view", "reshape", "transpose", "permute", "select", "narrow", "unsqueeze", "squeeze",
    "expand", "t", "flatten", "unflatten", "split", "chunk", "as_strided", "detach",
    "__getitem__", "getitem", "view_as", "expand_as", "unbind", "movedim", "contiguous",
}


# Ops that read only the metadata (dtype, device) of a tensor argument, never its rows.
_DATA_FREE = {"new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided", "size", "dim", "stride",
              "sym_size", "sym_stride", "sym_numel", "numel", "sym_storage_offset", "storage_offset", "len"}


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
    mutated_placeholders: set[str]
    split_op_nodes: int
    on_cuda: bool
    token_mixing_nodes: list[str]
    exact_reason: str | None = None   # why only exact bucket sizes may use CUDA graphs, if so
    fused_split_ops: int = 0          # cudagraph-safe split ops captured inside pieces


def node_value(node):
    return node.meta.get("example_value", node.meta.get("val"))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _symbols(value) -> set[sympy.Symbol]:
    try:
        return set(free_symbols(value))
    except Exception:
        return set()


def _target_name(node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def _mutated_args(node) -> list[torch.fx.Node]:
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
    op_args = _op_arguments(node)
    if op_args:
        return [val for arg, val in op_args
                if arg.alias_info is not None and arg.alias_info.is_write and isinstance(val, torch.fx.Node)]
    name = _target_name(node)
    if name.endswith("_") and not name.startswith("_") and node.args and isinstance(node.args[0], torch.fx.Node):
        return [node.args[0]]
    return []


def _op_arguments(node):
    """(schema argument, value) pairs of a call to an OpOverload; empty for anything else."""
    target = node.target
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return []
    return [(arg, node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
            for i, arg in enumerate(target._schema.arguments)]


def _placeholder_index(sub: torch.fx.GraphModule) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(n for n in sub.graph.nodes if n.op == "placeholder")}


def op_argument_names(sub: torch.fx.GraphModule) -> dict[int, str]:
    """Piece input index -> the schema name of the op argument it feeds (for error messages)."""
    index = _placeholder_index(sub)
    names: dict[int, str] = {}
    for node in sub.graph.nodes:
        for arg, val in _op_arguments(node):
            if isinstance(val, torch.fx.Node) and val.name in index:
                names.setdefault(index[val.name], arg.name)
    return names


def written_inputs(sub: torch.fx.GraphModule) -> dict[int, str]:
    """Inputs of a piece that it writes in place: placeholder index -> the argument's name.

    Used for the up-front capture forwards, which must not touch model state:
    those inputs are replaced by private copies there.
    """
    roots = _input_roots(sub)
    index = _placeholder_index(sub)
    names = op_argument_names(sub)
    out: dict[int, str] = {}
    for node in sub.graph.nodes:
        for arg in _mutated_args(node):
            if arg in roots:
                i = index[roots[arg]]
                out.setdefault(i, names.get(i, roots[arg]))
    return out


def _input_roots(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Map every node that aliases a graph input (through views) to that input's name."""
    roots: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            roots[node] = node.name
        elif node.op in ("call_method", "call_function") and node.args:
            first = node.args[0]
            if isinstance(first, torch.fx.Node) and first in roots and _target_name(node) in _VIEW_NAMES:
                roots[node] = roots[first]
    return roots


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
    that activation (a dynamic batch) are keyed exactly. Symbols that never
    reach a split op's activation (a KV length) make their nodes DYNAMIC.
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
            keyed |= _symbols(node_value(first))
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
            all_syms |= _symbols(val)
            if token is None:
                token = _row_symbol(val.shape)
    return token, all_syms


def _reads_tensor_on_host(node) -> bool:
    """A node that turns tensor data into a Python value (`.item()`, `.tolist()`): a device sync."""
    if node.op not in ("call_method", "call_function") or _target_name(node) in _DATA_FREE:
        return False
    if not isinstance(node_value(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return False
    return any(isinstance(node_value(a), torch.Tensor) for a in node.all_input_nodes)


def _copies_host_to_device(node) -> bool:
    """A CUDA result made from host data: `cpu_tensor.to("cuda")`, `torch.tensor([...], device="cuda")`."""
    if not any(t.device.type == "cuda" for t in _tensors(node_value(node))):
        return False
    if _target_name(node) in ("tensor", "as_tensor", "from_numpy"):
        return True
    return any(t.device.type == "cpu" for a in node.all_input_nodes for t in _tensors(node_value(a)))


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
            and not any(True for _ in _tensors(node_value(node)))
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


def classify(gm: torch.fx.GraphModule, keyed: set, token, on_cuda: bool):
    """Return ({node: (Kind|None, reason)}, mutated placeholder names, token-mixing node names).

    Kind None means 'goes anywhere'. A token-mixing node outside a split op
    (a sum over tokens, `h[:, -1]`) would see the padded rows, so its graph
    must not be padded; the runtime turns padding off for it.
    """
    roots = _input_roots(gm)
    mutated = {roots[a] for node in gm.graph.nodes for a in _mutated_args(node) if a in roots}
    hoisted = _hoist_to_prologue(gm, roots, mutated, keyed)
    kinds: dict[torch.fx.Node, tuple[Kind | None, str]] = {}
    mixing: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        name = split_op_name(node.target) if node.op == "call_function" else None
        writes = [roots[a] for a in _mutated_args(node) if a in roots]
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
        if node.op == "get_attr" or not any(True for _ in _tensors(value)):
            if _reads_tensor_on_host(node):
                kinds[node] = (Kind.DYNAMIC, f"{_target_name(node)}() reads a tensor's value on the host, "
                                             f"a sync that a CUDA graph cannot hold")
                continue
            # SymInt arithmetic, getattr on shapes, constants: cheap host work. Math on
            # an unkeyed size stays out of captured pieces (it would be baked in).
            kinds[node] = (Kind.HOST if _foreign_symbols(node, keyed) else None, "")
            continue
        out_syms = _symbols(value)
        for arg in node.all_input_nodes:
            arg_val = node_value(arg)
            if (token is not None and token in _symbols(arg_val) and token not in out_syms
                    and isinstance(arg_val, torch.Tensor) and _target_name(node) not in _DATA_FREE):
                mixing.append(node.name)
        foreign = _foreign_symbols(node, keyed)
        if foreign:
            kinds[node] = (Kind.DYNAMIC, f"shape depends on dynamic size(s) {', '.join(foreign)} that are not the token count")
        elif writes:
            kinds[node] = (Kind.DYNAMIC, f"writes graph input {writes[0]} in place")
        elif on_cuda and any(t.device.type == "cpu" for t in _tensors(value)):
            kinds[node] = (Kind.DYNAMIC, "produces a CPU tensor inside a CUDA graph")
        elif on_cuda and _copies_host_to_device(node):
            kinds[node] = (Kind.DYNAMIC, f"{_target_name(node)}() copies host memory to the GPU, "
                                         f"which a CUDA graph cannot capture from pageable memory")
        else:
            kinds[node] = (Kind.STATIC, "")
    return kinds, mutated, mixing


def _foreign_symbols(node, keyed: set) -> list[str]:
    """Symbols in a node's inputs or output that captures are not keyed on (e.g. a KV length)."""
    syms = _symbols(node_value(node))
    for arg in node.all_input_nodes:
        syms |= _symbols(node_value(arg))
    return sorted(str(s) for s in syms - keyed)


def exact_size_reason(gm: torch.fx.GraphModule, token, mutated: set[str], mixing: list[str]) -> str | None:
    """Why this graph must run at exact bucket sizes (never padded), or None if it can be padded."""
    if token is None:
        return None
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in mutated and token in _symbols(node_value(node)):
            return (f"graph input {node.name} is written in place and has the token dim, so it "
                    f"cannot be replaced by a padded copy; only exact bucket sizes use CUDA graphs")
    if mixing:
        return (f"node(s) {', '.join(mixing[:3])} mix tokens outside a split op (a reduction "
                f"or index over the token dim) and would see padded rows; only exact bucket sizes use CUDA graphs")
    return None


def _fuse_safe_split_ops(kinds: dict, keyed: set) -> int:
    """In a graph that always runs at its exact size, capture cudagraph-safe split ops with their neighbours.

    Nothing is padded there, so the op sees exactly the rows it would see
    eagerly, and its launches can live in the graph. Ops whose shapes move
    with another symbol (attention over a growing KV cache) stay eager.
    """
    fused = 0
    for node, (kind, name) in list(kinds.items()):
        if kind is Kind.SPLIT and is_cudagraph_safe(name) and not _foreign_symbols(node, keyed):
            kinds[node] = (Kind.STATIC, "")
            fused += 1
    return fused


def _refuse_unkeyed_inputs(piece: PieceInfo, sub: torch.fx.GraphModule, keyed: set) -> None:
    """A captured piece must not take an input whose size moves with an unkeyed symbol.

    Its static copy would have the capture-time size. The prologue hoisting
    avoids the common case; this catches the rest and runs the piece eagerly.
    """
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            foreign = sorted(str(x) for x in _symbols(node_value(node)) - keyed)
            if foreign:
                piece.kind = Kind.DYNAMIC
                piece.reason = f"input {node.name} has dynamic size(s) {', '.join(foreign)} that are not the token count"
                return


def graph_device_is_cuda(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for t in _tensors(node_value(node)):
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
    if capture_split_ops and (token is None or exact_reason):
        fused = _fuse_safe_split_ops(kinds, keyed)

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
    return SplitResult(split, pieces, token, sorted(keyed, key=str), mutated, split_nodes, on_cuda, mixing,
                       exact_reason, fused)
