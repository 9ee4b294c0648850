"""Trace-time notes of which HF layers were routed through split ops.

`note_routing` runs while Dynamo traces (its result is a graph constant), so
each routing decision is recorded once per trace in `pcg_backend.stats()`
and `report()`, not once per call. It takes only strings: torch 2.11 cannot
pass a module to an `assume_constant_result` function.
"""

from __future__ import annotations

import torch

from ..stats import STATS


@torch._dynamo.assume_constant_result
def note_routing(text: str) -> bool:
    STATS.routing.append(text)
    return True
