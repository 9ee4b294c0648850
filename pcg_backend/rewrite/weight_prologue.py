"""Arithmetic on the weights alone, taken out of the graph and computed only when a weight changes.

Every HF Mamba2 mixer computes `A = -torch.exp(self.A_log.float())` on each
forward. Traced, that is one kernel per Mamba2 layer per call that
recomputes the same few numbers: 27 per decode step of the 9B NemotronH,
each about 1 µs of GPU time plus its launch gap.

`hoist(gm, example_inputs)` finds the nodes whose every input is a parameter
the graph does not write (or another such node), among pure ops on a short
list, and moves them into a small prologue graph. In the main graph their
results become extra inputs, appended after Dynamo's, held in tensors pcg
owns and marks as static addresses, so captured pieces read them in place.

`WeightPrologue` is then the graph's entry point. Before each call it checks
its source parameters' version counters and addresses (a C-level `map` over
a few dozen tensors); if any moved (an in-place write to the parameter, as
`load_state_dict` and `param.mul_` make, or a `.data` swap) it reruns the
prologue into the same tensors before the graph runs, and a call that
changes nothing costs no kernel. A write that moves neither goes unseen:
one through `param.data` (`param.data.mul_(...)`, which has a version
counter of its own) or through another tensor on the parameter's storage.
After such a write, `pcg_backend.refresh_weights()` (`refresh_all`) makes
every graph recompute before its next call.

What is left in the graph: results that alias a weight (views and no-op
casts cost no kernel anyway), results that the graph writes in place or
returns (one tensor held across calls would carry the write, or be handed
to every caller), results whose dense copy would not have the traced
strides (an `expand`), results above MAX_ELEMENTS (a hoisted copy of a large
weight would cost memory for the model's life), results of parameters
that are not plain strided `nn.Parameter`s or are inference tensors (built
under `torch.inference_mode()`: they keep no version counter), and any
graph traced with autograd on (hoisting would cut the weights' gradients).
"""

from __future__ import annotations

import operator
import weakref

import torch
import torch.fx

from ..analyse.fx_facts import VIEW_NAMES, mutated_inputs, node_value, target_name, written_args
from ..stats import STATS

# Pure ops that may be hoisted: elementwise math, casts and views. Nothing random, nothing that reads state.
_MATH = {"float", "half", "bfloat16", "double", "to", "neg", "exp", "exp2", "expm1", "log", "log1p", "sqrt", "rsqrt",
         "abs", "sigmoid", "reciprocal", "square", "pow", "mul", "add", "sub", "div", "clamp", "softplus",
         "__neg__", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__",
         "__rtruediv__", "__pow__", "truediv"}
_VIEWS = {"view", "reshape", "squeeze", "unsqueeze", "transpose", "permute", "t", "expand", "flatten", "contiguous"}
_FUNCTION_MODULES = ("torch", "torch.nn.functional", "_operator", "operator", "torch._C._nn")
MAX_ELEMENTS = 1 << 20


def _pure(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or written_args(node):
        return False
    name = target_name(node)
    if name not in _MATH and name not in _VIEWS:
        return False
    if node.op == "call_function" and getattr(node.target, "__module__", None) not in _FUNCTION_MODULES \
            and node.target not in (operator.neg, operator.mul, operator.add, operator.sub, operator.truediv,
                                    operator.pow):
        return False
    if name == "to":   # a cast, never a move to another device
        extras = [*node.args[1:], *node.kwargs.values()]
        return all(isinstance(a, torch.dtype) for a in extras) and set(node.kwargs) <= {"dtype"}
    return all(isinstance(a, (int, float, bool, torch.dtype, torch.fx.Node, type(None)))
               for a in [*node.args, *node.kwargs.values()])


def _source(value) -> bool:
    """True for a parameter whose writes the prologue can see: a plain strided `nn.Parameter` (a subclass,
    such as a quantized weight, may hold no storage of its own to take the address of) that is not an
    inference tensor (a model built under `torch.inference_mode()`: it keeps no version counter)."""
    return type(value) is torch.nn.Parameter and value.layout == torch.strided and not value.is_inference()


def _holdable(value: torch.Tensor, node: torch.fx.Node) -> bool:
    """True if a dense copy of `value` has the strides the graph was traced with (an expanded result's
    copy would not, and the compiled pieces assume the traced strides)."""
    traced = node_value(node)
    if not isinstance(traced, torch.Tensor):
        return False
    try:
        return tuple(int(st) for st in traced.stride()) == value.clone().stride()
    except TypeError:   # a symbolic stride
        return False


def _computes(node: torch.fx.Node, hoisted: set) -> bool:
    """True if the chain that makes `node` holds an op that is not a view (hoisting it saves a kernel)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or n not in hoisted:
            continue
        seen.add(n)
        if target_name(n) not in _VIEWS and target_name(n) not in VIEW_NAMES:
            return True
        stack.extend(n.all_input_nodes)
    return False


_LIVE: "weakref.WeakSet[WeightPrologue]" = weakref.WeakSet()


def refresh_all() -> None:
    """Make every graph recompute its hoisted arithmetic before its next call.

    For weight changes that move neither the parameter's version counter nor
    its address: writes through `param.data` (`param.data.mul_(...)`), or
    through another tensor that shares the parameter's storage.
    """
    for prologue in list(_LIVE):
        prologue._key = None


class WeightPrologue:
    """The graph's entry: keeps the hoisted results current, then calls the graph with them appended."""

    def __init__(self, module: torch.fx.GraphModule, sources: list[int], values: list[torch.Tensor], hoisted: int):
        self.module = module
        self.sources = operator.itemgetter(*sources) if len(sources) > 1 else (lambda args, i=sources[0]: (args[i],))
        self.values = values
        self.hoisted = hoisted
        self.runner = None
        self._key = None
        _LIVE.add(self)

    def wrap(self, runner):
        self.runner = runner
        return self

    @staticmethod
    def _state(tensors) -> tuple:
        return tuple(map(_VERSION, tensors)), tuple(map(torch.Tensor.data_ptr, tensors))

    def refresh(self, sources) -> None:
        with torch.no_grad():
            fresh = self.module(*sources)
            for held, value in zip(self.values, fresh):
                if held.shape != value.shape or held.dtype != value.dtype:
                    raise RuntimeError(f"pcg: a weight changed shape or dtype under a compiled graph ({tuple(held.shape)} "
                                       f"{held.dtype} -> {tuple(value.shape)} {value.dtype}); recompile the model")
                held.copy_(value)
        STATS.weight_prologue_runs += 1
        self._key = self._state(sources)

    def __call__(self, *args):
        sources = self.sources(args)
        if self._state(sources) != self._key:
            self.refresh(sources)
        return self.runner(*args, *self.values)

    def __getattr__(self, name):   # the runner's attributes (its stats, its split) read through
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)


_VERSION = operator.attrgetter("_version")


def hoist(gm: torch.fx.GraphModule, example_inputs) -> tuple[WeightPrologue | None, torch.fx.GraphModule]:
    """Move weight-only arithmetic out of `gm`: (the prologue, a copy of `gm` that takes its results as inputs),
    or (None, gm) where there is none to move. Dynamo reads its own graph's inputs after the backend returns,
    so the graph with the extra inputs is a copy."""
    if torch.is_grad_enabled():
        return None, gm
    found = _hoistable(gm, example_inputs)
    if found is None:
        return None, gm
    copy = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    copy.output(copy.graph_copy(gm.graph, env))
    new_gm = torch.fx.GraphModule(gm, copy)
    new_gm.meta = gm.meta
    weights, hoisted, outputs = ({env[n]: i for n, i in found[0].items()}, {env[n]: None for n in found[1]},
                                 [env[n] for n in found[2]])
    prologue = _build(new_gm, example_inputs, weights, hoisted, outputs)
    return (prologue, new_gm) if prologue is not None else (None, gm)


def _hoistable(gm, example_inputs):
    """(weight placeholders -> input index, hoistable nodes, nodes whose results leave the hoisted set), or None."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    written = mutated_inputs(gm)
    weights = {n: i for i, n in enumerate(placeholders) if _source(example_inputs[i]) and n.name not in written}
    hoisted: dict[torch.fx.Node, None] = {}   # insertion-ordered: topological
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if inputs and _pure(node) and all(i in weights or i in hoisted for i in inputs):
            hoisted[node] = None
    outputs = [n for n in hoisted if any(u not in hoisted for u in n.users) and _computes(n, hoisted)]
    shared = _written_or_returned(gm, outputs)
    outputs = [n for n in outputs if n not in shared]
    return (weights, hoisted, outputs) if outputs else None


def _written_or_returned(gm, outputs) -> set:
    """The outputs that a node writes in place or the graph returns, directly or through views: one tensor
    held across calls would carry a write into the next call, or hand every caller the same tensor."""
    root: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node in outputs:
            root[node] = node
        elif node.op in ("call_method", "call_function") and node.args and isinstance(node.args[0], torch.fx.Node) \
                and node.args[0] in root and target_name(node) in VIEW_NAMES | _VIEWS:
            root[node] = root[node.args[0]]
    shared = {root[a] for node in gm.graph.nodes for a in written_args(node) if a in root}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    shared |= {root[a] for a in output.all_input_nodes if a in root}
    return shared


def _build(gm, example_inputs, weights, hoisted, outputs) -> WeightPrologue | None:
    """Make the prologue from `gm`'s hoistable nodes and rewrite `gm` to take its results as inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    prologue = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    sources: list[int] = []
    for node in gm.graph.nodes:
        if node in weights and any(u in hoisted for u in node.users):
            env[node] = prologue.placeholder(node.name)
            sources.append(weights[node])
        elif node in hoisted:
            env[node] = prologue.node_copy(node, lambda n: env[n])
    prologue.output(tuple(env[o] for o in outputs))
    module = torch.fx.GraphModule(torch.nn.Module(), prologue)
    weight_tensors = [example_inputs[i] for i in sources]
    values = module(*weight_tensors)
    storages = {w.untyped_storage().data_ptr() for w in weight_tensors}
    keep = [j for j, v in enumerate(values) if isinstance(v, torch.Tensor) and v.numel() <= MAX_ELEMENTS
            and v.untyped_storage().data_ptr() not in storages and _holdable(v, outputs[j])]
    if not keep:
        return None
    if len(keep) < len(outputs):
        output_node = next(n for n in prologue.nodes if n.op == "output")
        output_node.args = (tuple(env[outputs[j]] for j in keep),)
        prologue.eliminate_dead_code()
        module = torch.fx.GraphModule(torch.nn.Module(), prologue)
    held = []
    anchor = placeholders[-1]
    for j in keep:
        node, value = outputs[j], values[j].detach().clone()
        torch._dynamo.mark_static_address(value, guard=False)
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.placeholder(f"pcg_weights_{node.name}")
        anchor.meta = {k: v for k, v in node.meta.items() if k in ("example_value", "val", "tensor_meta")}
        node.replace_all_uses_with(anchor)
        held.append(value)
    removed = 0
    for node in reversed(list(hoisted)):
        if not node.users:
            gm.graph.erase_node(node)
            removed += 1
    gm.recompile()
    STATS.weight_nodes_hoisted += removed
    STATS.weight_prologue_runs += 1
    prologue_entry = WeightPrologue(module, sources, held, removed)
    prologue_entry._key = WeightPrologue._state(prologue_entry.sources(example_inputs))
    return prologue_entry
