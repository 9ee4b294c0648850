"""Deciding, at trace time, whether Dynamo is tracing for the pcg backend.

HF layers are wrapped at class level; the wrapper must take pcg's path only
inside a pcg trace. `assume_constant_result` makes Dynamo call this function
while tracing and bake its answer into the graph (no guard is needed: Dynamo
already keys its caches on the backend).
"""

from __future__ import annotations

import torch


def _is_pcg(fn) -> bool:
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if getattr(fn, "_pcg_backend", False):
            return True
        fn = (getattr(fn, "compiler_fn", None) or getattr(fn, "_torchdynamo_orig_backend", None)
              or getattr(fn, "_inner_fn", None) or getattr(fn, "func", None) or getattr(fn, "__wrapped__", None))
    return False


@torch._dynamo.assume_constant_result
def tracing_for_pcg() -> bool:
    """True while Dynamo traces a frame that the pcg backend will compile."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return _is_pcg(InstructionTranslator.current_tx().output.compiler_fn)
    except Exception:  # noqa: BLE001 - not tracing at all
        return False
