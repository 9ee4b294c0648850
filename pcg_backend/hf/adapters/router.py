"""Adapter for HF MoE top-k routers: a linear, a top-k, and a softmax over the k logits.

GraniteMoe's router classes (GraniteMoeHybrid's `GraniteMoeHybridTopKRouter`
and its siblings) compute `F.linear(hidden_states, self.weight).float()`,
take its `topk(self.top_k)` and a softmax over the k picked logits. Such a
class is recognised by its forward's source (those three lines), not by its
family's name; inside a pcg trace its forward becomes one
`pcg::moe_router` call (`ops/moe_router.py`), which runs inside the captured
graphs. Its three outputs come back in the order the class returns them
(transformers 5.17 returns the ids first, later versions the logits first),
read from the forward's `return` line; a class that returns anything else
is left alone. Outside a pcg trace the original runs unchanged.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap

import torch

from ...ops import moe_router  # noqa: F401 - registers pcg::moe_router
from ..gate import tracing_for_pcg
from ..layers import note_routing
from . import Adapter, register_adapter

# The three lines of the router's arithmetic, as they appear in its forward, which must hold those
# three statements and a return and nothing else (a bias, a temperature or noise would be lost).
MARKERS = ("F.linear(hidden_states, self.weight).float()", ".topk(self.top_k, dim=-1)",
           "torch.softmax(top_k_logits, dim=-1).type_as(hidden_states)")
# The forward's local names for the op's three outputs.
OUTPUT_NAMES = ("router_logits", "top_k_weights", "top_k_index")
_RETURN = re.compile(r"^\s*return\s+(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*(#.*)?$", re.MULTILINE)


def output_order(cls) -> tuple[int, ...] | None:
    """Where each returned value sits in the op's (logits, weights, ids); None if `cls` is not such a router."""
    forward = vars(cls).get("forward")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and forward is not None):
        return None
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return None
    returns = _RETURN.findall(source)
    if not all(m in source for m in MARKERS) or len(returns) != 1 or _statements(source) != 4:
        return None
    names = returns[0][:3]
    if sorted(names) != sorted(OUTPUT_NAMES):
        return None
    return tuple(OUTPUT_NAMES.index(n) for n in names)


def _statements(source: str) -> int:
    """How many statements the function in `source` holds, its docstring aside."""
    try:
        body = ast.parse(textwrap.dedent(source)).body[0].body
    except (SyntaxError, IndexError, AttributeError):
        return -1
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return len(body)


def wrap_forward(original, order: tuple[int, ...]):
    @functools.wraps(original)
    def forward(self, hidden_states):
        if not tracing_for_pcg():
            return original(self, hidden_states)
        note_routing(type(self).__name__, str(getattr(self, "layer_idx", "?")), "router via pcg::moe_router", True)
        outputs = torch.ops.pcg.moe_router(hidden_states, self.weight, self.top_k)
        return tuple(outputs[i] for i in order)

    return forward


def patch_modeling_module(module, patches) -> None:
    for value in list(vars(module).values()):
        # Only classes the module defines: an imported router is wrapped in its own module.
        if isinstance(value, type) and value.__module__ == module.__name__:
            order = output_order(value)
            if order is not None:
                patches.wrap(value, "forward", lambda f, order=order: wrap_forward(f, order))


ADAPTER = register_adapter(Adapter("MoE router", patch_modeling_module))
