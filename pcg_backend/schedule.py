"""Moving nodes so that a graph falls into fewer, larger pieces.

Pieces form from runs of nodes of one kind, in graph order. Dynamo's order
follows the model's Python code, which interleaves work that must run eagerly
with work that can be captured. In an HF decode step the attention mask is
built over the growing KV length (eager) from small static pieces (`arange`,
`new_ones`), and attention layers allocate their output between two split
ops. Each such interleaving costs a graph launch or an eager piece per step.
Two moves remove them, neither of which changes what any node computes:

* `hoist_uncapturable_inputs`: eager work that reads only graph inputs moves
  to the top, with the input-only nodes it needs, into one eager prologue.
* `pull_allocations_up`: a tensor allocation that sits alone between split
  ops moves up to the nearest captured node below its inputs, so it joins
  that piece instead of forming a piece of its own.

The prologue does not stay at the very top: it sinks to the last piece
boundary before its first consumer, so the GPU starts on captured work while
the host runs the prologue.

`launch_chunks` then cuts long captured runs for the opposite reason. A CUDA
graph starts on the GPU only once `cudaGraphLaunch` returns, and that call
costs about a microsecond of host time per kernel (0.2 ms for the first
decode piece of the 9B model, 1.4 ms for its whole-model 1-token prefill, on
an H100), while the GPU waits. A small first piece starts the GPU at once;
each later piece is launched while the GPU runs the one before it.
"""

from __future__ import annotations

import torch.fx

from .fx_facts import DATA_FREE, VIEW_NAMES, target_name, written_args
from .node_kinds import Kind

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
    """Move DYNAMIC nodes that depend only on graph inputs, and their input-only ancestors, to the top.

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


def launch_chunks(gm: torch.fx.GraphModule, kinds: dict, head: int, growth: int = 4) -> set:
    """The nodes where a captured run is cut so that the GPU starts early (see the module docstring).

    Walking captured runs in graph order, the first piece holds at most
    `head` compute nodes and each next one at most `growth` times the one
    before; a run that fits its budget is not cut. Each cut goes where the
    fewest tensors cross it (a layer boundary, where only the hidden state
    does), among the points that fill the budget at least half. `head` 0
    turns this off.
    """
    if head <= 0:
        return set()
    order = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    starts: set = set()
    budget = head
    for run in _captured_runs(order, kinds):
        work = [_is_compute(n, kinds) for n in run]
        i = 0
        while sum(work[i:]) > budget:
            cut = _best_cut(run, work, i, budget, position)
            if cut is None:
                break
            starts.add(run[cut])
            i, budget = cut, budget * growth
        if any(work[i:]):
            budget *= growth
    return starts


def _captured_runs(order: list, kinds: dict) -> list[list]:
    runs, current = [], []
    for node in order:
        if node.op in ("placeholder", "output"):
            continue
        if kinds.get(node, (None,))[0] in (Kind.STATIC, None):
            current.append(node)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _is_compute(node, kinds) -> bool:
    """A node that launches work: a captured op making a tensor, not a view or a metadata read."""
    if kinds.get(node, (None,))[0] is not Kind.STATIC or target_name(node) in VIEW_NAMES | DATA_FREE:
        return False
    return isinstance(node.meta.get("example_value", node.meta.get("val")), torch.Tensor)


def _best_cut(run: list, work: list, start: int, budget: int, position: dict) -> int | None:
    """Index in `run` to start the next piece at, for a piece beginning at `start`."""
    live = 0
    dying: dict[int, int] = {}
    done = 0
    best, best_crossing = None, None
    for j in range(start, len(run)):
        node = run[j]
        # Tensors made in this piece and still needed at `node` or later cross a cut before `node`.
        live -= dying.pop(position[node] - 1, 0) if j > start else 0
        if done >= budget / 2 and j > start and work[j] and (best_crossing is None or live <= best_crossing):
            best, best_crossing = j, live
        if done + work[j] > budget:
            break
        done += work[j]
        last_use = max((position[u] for u in node.users), default=-1)
        if last_use > position[node] and isinstance(node.meta.get("example_value", node.meta.get("val")),
                                                     torch.Tensor):
            live += 1
            dying[last_use] = dying.get(last_use, 0) + 1
    if best is None or sum(work[best:]) == 0:
        return None
    return best


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
