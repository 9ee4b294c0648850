"""Linear layers whose output rows are not 16-byte aligned, computed transposed.

A linear layer's output (rows, N) in bf16 or fp16 has rows N elements long.
Where N is not a multiple of 8 (Falcon-H1's vocabulary of 130049, say) the
rows after the first start off a 16-byte boundary, and cuBLAS then declines
its Hopper kernels, whose stores need aligned rows, for an older and slower
one: a profile of Falcon-H1's 128-token prefill on an H200 had its LM head
(128 rows, 3072 → 130049) at 1.08 ms on an sm75 CUTLASS kernel, where reading
its 0.8 GB of weights takes about 0.2 ms.

The same product written as W · xᵀ has an output (N, rows) whose rows are
`rows` long: aligned at every bucket that is a multiple of 8. This pass
rewrites each such `F.linear` of a piece to that product, transposed back and
made contiguous (the layout eager returns; Inductor folds the copy into the
ops that read it, such as Falcon-H1's multiplier on the logits).

It rewrites a linear only where it can matter and stays the same product: a
2-D bf16 or fp16 weight of at least `MIN_COLUMNS` rows that are not a
multiple of 8, an input width that is (so the operands themselves stay
aligned), and an activation of the weight's dtype. Linears already routed to
`pcg::skinny_linear` (at most 16 rows, which aligns nothing) are left alone,
so the backend runs this after the skinny routing and its twins.
"""

from __future__ import annotations

import torch
import torch.fx

from ..analyse.fx_facts import node_value
from .skinny_routing import HALF_TYPES, LINEAR_TARGETS, _operands

# Output widths below this are left alone: their rows are short, and their products cheap either way.
MIN_COLUMNS = 1024
# Elements of a 16-byte row alignment in bf16 and fp16.
ALIGNMENT = 8


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as (weight · xᵀ)ᵀ, returned contiguous."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


def misaligned(x, weight) -> bool:
    """True where `transposed_linear` should stand in for `F.linear(x, weight)` (see the module docstring)."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if weight.dim() != 2 or weight.dtype not in HALF_TYPES or x.dtype != weight.dtype:
        return False
    columns, width = weight.shape
    if isinstance(columns, torch.SymInt) or isinstance(width, torch.SymInt):
        return False
    return columns >= MIN_COLUMNS and columns % ALIGNMENT != 0 and width % ALIGNMENT == 0


def align_linear_outputs(gm: torch.fx.GraphModule) -> int:
    """Rewrite the `F.linear` nodes of `gm` that `misaligned` picks to `transposed_linear`; returns how many."""
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, w, b = _operands(node)
        if not misaligned(node_value(x), node_value(w)):
            continue
        node.target = transposed_linear
        node.args = (x, w, b)
        node.kwargs = {}
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten
