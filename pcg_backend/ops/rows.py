"""`pcg::last_rows`: the last k real rows along the token dim, a selection that padding would break.

HF causal LMs compute logits for the last token(s) only: `generate` passes
`logits_to_keep=1`, and the model takes `hidden_states[:, -1:, :]`. On a
padded call that slice would pick a padded row, so a graph holding it could
only run at exact bucket sizes. `rewrites.py` replaces such slices with this
op, which counts from the real end: on the device in a padded graph (so the
graph is captured once per bucket), on the host otherwise.
"""

from __future__ import annotations

import torch

from .. import context
from .registry import register_split_op


@register_split_op(padding_safe=True)
@torch.library.custom_op("pcg::last_rows", mutates_args=())
def last_rows(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    padded = x.shape[dim]
    count = context.device_token_count(padded)
    if count is not None:
        # Dynamo's trace fixed the result at k rows, so n >= k: the indices never go below 0.
        return x.index_select(dim, count - k + torch.arange(k, device=x.device))
    n = context.real_tokens(padded)
    return x.narrow(dim, n - k, k).clone()


@last_rows.register_fake
def _(x, k, dim):
    shape = list(x.shape)
    shape[dim] = k
    return x.new_empty(shape)
