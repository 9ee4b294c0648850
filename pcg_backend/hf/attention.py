"""Routing HF attention through split ops: KV writes in the cache layers, the core in the attention function.

HF attention modules call `cache.update(k, v, layer_idx)` and then an
attention function looked up by `config._attn_implementation`. pcg wraps
`DynamicLayer.update`, `StaticLayer.update` and the attention functions
("sdpa" in the registry, and each modeling module's `eager_attention_forward`)
so that, inside a pcg trace, the KV write and the core are split ops that see
only the real tokens. Outside a pcg trace the originals run unchanged.
"""

from __future__ import annotations

import functools

import torch

from ..ops import attention as ops
from .gate import tracing_for_pcg
from .layers import note_routing


def _append(layer, key_states, value_states) -> None:
    layer.keys = torch.ops.pcg.kv_append(key_states, layer.keys)
    layer.values = torch.ops.pcg.kv_append(value_states, layer.values)


def _write_static(layer, key_states, value_states) -> None:
    torch.ops.pcg.kv_write_static(key_states, value_states, layer.keys, layer.values, layer.cumulative_length)


def _wrap_update(original, write):
    @functools.wraps(original)
    def update(self, key_states, value_states, *args, **kwargs):
        if not tracing_for_pcg():
            return original(self, key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        write(self, key_states, value_states)
        return self.keys, self.values

    update._pcg_wrapped = True
    return update


def wrap_dynamic_update(original):
    return _wrap_update(original, _append)


def wrap_static_update(original):
    return _wrap_update(original, _write_static)


def wrap_attention_function(original, impl: str):
    ops.ORIGINAL_ATTENTION[impl] = original

    @functools.wraps(original)
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if not tracing_for_pcg():
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        batch, heads, seq_len, head_dim = query.shape
        out = query.new_empty(batch, seq_len, heads, value.shape[-1])
        scale = float(scaling) if scaling is not None else head_dim ** -0.5
        note_routing(f"{type(module).__name__} layer {getattr(module, 'layer_idx', '?')}: attention via pcg::attention ({impl})")
        torch.ops.pcg.attention(query, key, value, attention_mask, out, scale, impl,
                                int(getattr(module, "num_key_value_groups", 1)), bool(getattr(module, "is_causal", True)))
        return out, None

    attention._pcg_wrapped = True
    return attention
