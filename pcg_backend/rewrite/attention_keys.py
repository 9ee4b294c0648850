"""Tell `pcg::attention` where its keys are the call's own rows, which padding extends as it does the queries.

The attention adapter cannot tell while Dynamo traces: comparing the query's
and the keys' lengths there records the comparison in the graph (a host
piece, and a symbolic flag for the op). The traced graph can tell: the two
lengths are the same expression exactly when the keys are this call's rows
(no cache, or a new DynamicCache), and never for a static cache (its own
length) or a cache that holds rows (past plus new). For those calls
`pcg::attention` keeps real queries off the padded key columns, whatever a
mask that came in as an input holds there (`ops/attention.py`).
"""

from __future__ import annotations

import torch

from ..analyse.fx_facts import node_value
from ..ops.registry import split_op_name


def mark_attention_over_new_rows(gm: torch.fx.GraphModule) -> int:
    """Set `keys_are_new_rows` on every `pcg::attention` whose keys have the query's length; returns how many."""
    marked = 0
    for node in gm.graph.nodes:
        # By name: the op exists only once HF routing has imported it.
        if node.op != "call_function" or split_op_name(node.target) != "pcg::attention":
            continue
        query, key = (node_value(a) for a in node.args[:2])
        if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and \
                _same_length(query.shape[-2], key.shape[-2]):
            node.args = (*node.args[:-1], True)
            marked += 1
    return marked


def _same_length(a, b) -> bool:
    # Compared as expressions: no guard, and no node in the graph.
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return isinstance(a, int) and isinstance(b, int) and a == b
