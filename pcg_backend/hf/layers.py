"""Trace-time notes of which HF layers were routed through pcg's ops, under each layer's module path.

`note_routing` runs while Dynamo traces (its result is a graph constant), so
a routing decision is recorded when a graph is traced, never per call.
`Stats.route` keeps one line per layer and decision, so a layer traced in
several graphs (prefill, decode) is listed once.

The layer's name is its module path in the compiled model, such as
`model.layers.1.mixer` or Zamba2's `model.layers.1.shared_transformer.self_attn`:
Dynamo's stack of the modules it is inlining ends with the calling layer.
Where that stack cannot be read, the name falls back to the class and its
`layer_idx`. The function takes only strings and a bool: torch 2.11 cannot
pass a module to an `assume_constant_result` function.
"""

from __future__ import annotations

import re

import torch

from ..stats import STATS

_ROOT = re.compile(r"^[LG]\['([^']+)'\]")


def module_path(source: str) -> str:
    """`L['self'].model.layers[1]._modules['mixer']` -> `model.layers.1.mixer` (the root's name kept unless self)."""
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", source)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    root = _ROOT.match(path)
    if root:
        rest = path[root.end():].lstrip(".")
        path = rest if root.group(1) == "self" else ".".join(p for p in (root.group(1), rest) if p)
    return path


def _calling_layer(module_class: str) -> str | None:
    """The module path of the innermost module Dynamo is inlining, if it is of `module_class`."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        stack = InstructionTranslator.current_tx().output.current_tx.nn_module_stack
        source, cls = list(stack.values())[-1]
    except Exception:  # noqa: BLE001 - not tracing, or a torch without this stack: fall back
        return None
    name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1])
    return module_path(str(source)) if name == module_class else None


@torch._dynamo.assume_constant_result
def note_routing(module_class: str, layer_idx: str, decision: str, routed: bool) -> bool:
    layer = _calling_layer(module_class) or f"layer {layer_idx}"
    STATS.route(layer, module_class, decision, routed)
    return True
