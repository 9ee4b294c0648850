"""Attention split ops: the KV-cache writes and the attention core, on the real tokens only.

* `pcg::kv_append`        - DynamicCache: concatenate the real new K or V rows.
* `pcg::kv_write_static`  - StaticCache: write the real rows at the cache's
                            cumulative length, and advance it by the real count.
* `pcg::attention`        - the attention core, through HF's own attention
                            function for the layer (sdpa, eager, ...), on the
                            real query rows; padded output rows are zeroed.
"""

from __future__ import annotations

import types

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import context
from .lean_op import lean_op
from .registry import register_split_op

# The HF attention functions the routed wrappers replaced, by implementation name.
ORIGINAL_ATTENTION: dict[str, object] = {}

# SDPA backends pcg::attention lets torch choose from. cuDNN's is left out: it builds an
# execution plan for every new shape (about half a second of host time on an H200), and
# a decode step meets a new KV length every time, so each call at a prompt length not
# seen before paid it ~15 times over. Flash and memory-efficient attention have no plans.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@register_split_op(cudagraph_safe=True)
@lean_op("pcg::kv_append", mutates_args=())
def kv_append(new: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    n = context.real_tokens(new.shape[-2])
    new = new[..., :n, :]
    if cache.numel() == 0:
        return new.contiguous().clone()
    return torch.cat([cache, new], dim=-2)


@torch.library.register_fake("pcg::kv_append")
def _(new, cache):
    if cache.dim() != new.dim():
        return new.new_empty(new.shape)
    return new.new_empty((*new.shape[:-2], cache.shape[-2] + new.shape[-2], new.shape[-1]))


@register_split_op(cudagraph_safe=True)
@lean_op("pcg::kv_write_static", mutates_args=["keys", "values", "cumulative_length"])
def kv_write_static(
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cumulative_length: torch.Tensor,
) -> None:
    n = context.real_tokens(key_states.shape[-2])
    positions = torch.arange(n, device=keys.device) + cumulative_length
    cumulative_length.add_(n)
    keys.index_copy_(2, positions, key_states[..., :n, :])
    values.index_copy_(2, positions, value_states[..., :n, :])


@register_split_op(cudagraph_safe=True)
@lean_op("pcg::attention", mutates_args=["out"])
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    scaling: float,
    impl: str,
    num_key_value_groups: int,
    is_causal: bool,
) -> None:
    padded = query.shape[2]
    n = context.real_tokens(padded)
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :n, : key.shape[-2]]
    # HF attention functions read only these attributes of the module.
    module = types.SimpleNamespace(num_key_value_groups=num_key_value_groups, is_causal=is_causal, training=False)
    with sdpa_kernel(SDPA_BACKENDS):
        result, _ = ORIGINAL_ATTENTION[impl](module, query[:, :, :n], key, value, mask, dropout=0.0, scaling=scaling)
    out[:, :n] = result
    if n < padded:
        out[:, n:] = 0
