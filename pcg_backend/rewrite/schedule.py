"""Moving nodes so that a graph falls into fewer, larger pieces.

Pieces form from runs of nodes of one kind, in graph order. Dynamo's order
follows the model's Python code, which interleaves work that must run eagerly
with work that can be captured. In an HF decode step the attention mask is
built over the growing KV length (eager) from small static pieces (`arange`,
`new_ones`), and attention layers allocate their output between two split
ops. Each such interleaving costs a graph launch or an eager piece per step.
Three moves remove them, none of which changes what any node computes:

* `drop_dead_host_work`: size arithmetic whose result nothing reads
  (Dynamo keeps a decode step's `numel()` of a KV tensor and a few `sym_sum`s
  that way) is removed, instead of forming a host piece that the runtime
  calls before the first graph launch of every step; so is a tensor built
  from Python data that nothing reads (a host-to-device copy on the GPU,
  which would run as an eager piece of its own).

* `hoist_uncapturable_inputs`: eager work that reads only graph inputs moves
  to the top, with the input-only nodes it needs, into one eager prologue.
* `pull_allocations_up`: a tensor allocation that sits alone between split
  ops moves up to the nearest captured node below its inputs, so it joins
  that piece instead of forming a piece of its own.

The prologue does not stay at the very top: it sinks to the last piece
boundary before its first consumer, so the GPU starts on captured work while
the host runs the prologue.
"""

from __future__ import annotations

import torch.fx

from ..analyse.fx_facts import DATA_FREE, VIEW_NAMES, node_value, target_name, tensors_in, written_args
from ..analyse.node_kinds import Kind

# Ops that create a tensor from sizes and metadata only: moving them earlier cannot change a value.
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
               "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full"}

_EAGER_PROLOGUE = "input-only work in the eager prologue, feeding nodes that cannot be captured"


def _last_placeholder(gm: torch.fx.GraphModule):
    last = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            last = node
    return last


def _written_roots(gm: torch.fx.GraphModule) -> tuple[dict, set]:
    """(node -> the node it is a view of, or itself; the roots that some node writes in place)."""
    root: dict = {}
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        is_view = node.op in ("call_method", "call_function") and target_name(node) in VIEW_NAMES
        root[node] = root.get(first, first) if is_view and isinstance(first, torch.fx.Node) else node
    written = {root.get(a, a) for node in gm.graph.nodes for a in written_args(node)}
    return root, written


def hoist_uncapturable_inputs(gm: torch.fx.GraphModule, kinds: dict) -> int:
    """Gather DYNAMIC nodes that depend only on graph inputs, and their input-only ancestors, into one block.

    The block goes to the top, then sinks to the last piece boundary before
    its first consumer (`_sink`).

    Only pure nodes move: nothing that writes, and nothing that reads a tensor
    written in place anywhere in the graph (a graph input, or a buffer a split
    op fills), since it must see the value at its original position. Returns
    how many nodes moved.
    """
    anchor = _last_placeholder(gm)
    if anchor is None:
        return 0
    # Nodes already at the top (placed there by node_kinds' prologue) keep their place.
    while anchor.next is not None and anchor.next.op != "output" and kinds.get(anchor.next, (None,))[0] is Kind.HOST:
        anchor = anchor.next
    root, written = _written_roots(gm)
    input_only: set = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node not in kinds:
            continue
        if kinds[node][0] is Kind.SPLIT or written_args(node):
            continue
        if any(root.get(a, a) in written and target_name(node) not in DATA_FREE for a in node.all_input_nodes):
            continue
        if all(a.op == "placeholder" or a in input_only for a in node.all_input_nodes):
            input_only.add(node)
    wanted: set = set()
    stack = [n for n in input_only if kinds[n][0] is Kind.DYNAMIC]
    while stack:
        node = stack.pop()
        if node in wanted:
            continue
        wanted.add(node)
        stack.extend(a for a in node.all_input_nodes if a in input_only)
    if not wanted:
        return 0
    # Captured-kind nodes that move along are named by the reason of the first node they serve.
    first_reason = next(kinds[n][1] for n in gm.graph.nodes if n in wanted and kinds[n][0] is Kind.DYNAMIC)
    moved = 0
    block = []
    for node in list(gm.graph.nodes):
        if node not in wanted:
            continue
        if kinds[node][0] is Kind.STATIC:
            kinds[node] = (Kind.DYNAMIC, f"{first_reason} ({_EAGER_PROLOGUE})")
        if anchor.next is not node:
            anchor.append(node)
            moved += 1
        anchor = node
        block.append(node)
    return moved + _sink(block, kinds)


def _sink(block: list, kinds: dict) -> int:
    """Move a contiguous block of input-only nodes down to the last piece boundary before its first consumer."""
    members = set(block)
    users = {u for n in block for u in n.users if u not in members}
    if not users:
        return 0
    first = next(n for n in block[0].graph.nodes if n in users)

    def captured(n):
        return n not in members and n.op not in ("placeholder", "output") and kinds.get(n, (None,))[0] in (
            Kind.STATIC, None)

    # Never inside a captured run: that would cut it in two.
    target = first
    while captured(target) and captured(target.prev):
        target = target.prev
    if target.prev is block[-1]:
        return 0
    for node in block:
        target.prepend(node)
    return len(block)


def pull_allocations_up(gm: torch.fx.GraphModule, kinds: dict) -> int:
    """Move a captured allocation (`q.new_empty(...)`) that sits alone between split ops up into a captured run.

    It goes right after a STATIC node between its latest input and itself,
    so it never lands inside an eager or split run. Returns how many moved.
    """
    def kind(n):
        return kinds.get(n, (None,))[0]

    moved = 0
    for node in list(gm.graph.nodes):
        if kind(node) is not Kind.STATIC or target_name(node) not in ALLOCATIONS:
            continue
        if kind(node.prev) is Kind.STATIC or kind(node.next) is Kind.STATIC:
            continue   # already part of a captured run
        inputs = set(node.all_input_nodes)
        target = None
        cursor = node.prev
        # Walking up, the first input met is the latest one; nothing may move above it.
        while cursor.op not in ("placeholder", "root"):
            if kind(cursor) is Kind.STATIC:
                target = cursor
                break
            if cursor in inputs:
                break
            cursor = cursor.prev
        if target is None:
            continue
        target.append(node)
        moved += 1
    return moved


# Tensor constructors from Python data: pure, and where they run on the GPU a host-to-device copy
# that splits the graph. HF's DynamicCache layers start from `torch.tensor([])`, which the attention
# adapter replaces, leaving the traced constructor without users.
_PURE_CONSTRUCTORS = (torch.tensor, torch.as_tensor, torch.scalar_tensor)


def drop_dead_host_work(gm: torch.fx.GraphModule, kinds: dict) -> int:
    """Remove nodes that compute no tensor (or only construct one from Python data), have no side
    effect and have no users; returns how many.

    Runtime asserts (`_assert_scalar` and the like) are impure in FX's sense
    and stay. Removing a node can leave its inputs unused, so this walks the
    graph backwards once.
    """
    dropped = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op not in ("call_function", "call_method") or node.users or node.is_impure() or node not in kinds:
            continue
        size_arithmetic = (kinds[node][0] in (Kind.HOST, None)
                           and not any(True for _ in tensors_in(node_value(node))))
        if size_arithmetic or (node.op == "call_function" and node.target in _PURE_CONSTRUCTORS):
            gm.graph.erase_node(node)
            del kinds[node]
            dropped += 1
    return dropped
