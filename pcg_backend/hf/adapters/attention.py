"""Adapter for HF attention: the KV writes in the cache layers, the core in the attention function.

HF attention modules call `cache.update(k, v, layer_idx)` and then an
attention function looked up by `config._attn_implementation`. Neither is a
layer class of its own, so this adapter recognises attention by those two
shared entry points instead of by a module's source:

* library-wide: `DynamicLayer.update`, `StaticLayer.update` and the "sdpa"
  entry of `ALL_ATTENTION_FUNCTIONS`;
* per modeling module: its `eager_attention_forward`, if it has one.

Inside a pcg trace the wrappers turn the KV write into `pcg::kv_append` or
`pcg::kv_write_static` and the core into `pcg::attention`, split ops that
see only the real tokens. Outside a pcg trace the originals run unchanged.
"""

from __future__ import annotations

import functools

import torch

from ...ops import attention as ops
from ...ops import plain_causal
from ..gate import tracing_for_pcg
from ..layers import note_routing
from . import Adapter, register_adapter

# Implementations HF dispatches to by name; "eager" is each modeling module's own function.
ATTENTION_IMPLEMENTATIONS = ("sdpa",)


def _append(layer, key_states, value_states) -> None:
    if _empty(layer.keys) and _empty(layer.values):
        # A new cache's first write: the keys are the new rows themselves. Padded rows sit
        # after the real ones, where a causal mask keeps every real query from them, and the
        # runtime cuts the cache's keys to the real rows when the forward returns. So the
        # write and the attention over it stay inside a padded piece, as with a static cache.
        layer.keys = key_states.clone(memory_format=torch.contiguous_format)
        layer.values = value_states.clone(memory_format=torch.contiguous_format)
        return
    layer.keys = torch.ops.pcg.kv_append(key_states, layer.keys)
    layer.values = torch.ops.pcg.kv_append(value_states, layer.values)


def _empty(t) -> bool:
    # Decided while tracing: a layer made empty by `_initialize` has a static size of 0.
    return isinstance(t, torch.Tensor) and t.dim() == 1 and isinstance(t.shape[0], int) and t.shape[0] == 0


def _write_static(layer, key_states, value_states) -> None:
    torch.ops.pcg.kv_write_static(key_states, value_states, layer.keys, layer.values, layer.cumulative_length)


def _initialize(layer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """HF's `lazy_initialization`, without the host-to-device copies it makes (no CUDA graph can hold one).

    * A static layer's `cumulative_length` is a CPU tensor that HF moves to
      the device. A layer not yet initialized has written nothing, so it is
      made on the device as 0 first, and HF's own `.to` then keeps it.
    * A DynamicCache layer starts from `torch.tensor([])` on the device. The
      empty K and V are made from the new states instead; the copy, now
      unused, is dead code in the traced graph.
    """
    length = getattr(layer, "cumulative_length", None)
    if isinstance(length, torch.Tensor) and length.device != key_states.device:
        layer.cumulative_length = torch.zeros((), dtype=length.dtype, device=key_states.device)
    layer.lazy_initialization(key_states, value_states)
    if isinstance(layer.keys, torch.Tensor) and layer.keys.numel() == 0:
        layer.keys = key_states.new_empty((0,))
        layer.values = value_states.new_empty((0,))


def _wrap_update(original, write):
    @functools.wraps(original)
    def update(self, key_states, value_states, *args, **kwargs):
        if not tracing_for_pcg():
            return original(self, key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            _initialize(self, key_states, value_states)
        write(self, key_states, value_states)
        return self.keys, self.values

    return update


def _same_sizes(mask: torch.Tensor, batch, seq_len, kv_len) -> torch.Tensor:
    """`mask` with its sizes tied to the query's and keys' in the traced graph.

    HF may build the 4-D mask before the forward; it is then a graph input,
    and once its sizes change Dynamo gives each of them a symbol of its own.
    A symbol pcg cannot relate to the token count or a keyed size keeps every
    node that reads it eager, attention included. Comparing the sizes here
    makes Dynamo guard that they are equal, and a guarded equality of two
    symbols makes them one. Sizes that differ (a mask longer than the keys)
    are cut, as `pcg::attention` would cut them.
    """
    b, _, q, k = mask.shape
    if b == batch and q == seq_len and k == kv_len:
        return mask
    return mask[:, :, :seq_len, :kv_len]


def _hf_sdpa():
    """HF's SDPA attention function, or None if this transformers keeps it elsewhere (no causal flag then)."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return None
    return sdpa_attention_forward


def wrap_attention_function(original, impl: str):
    # pcg::attention runs the original by this name, in every graph routed through it,
    # so the entry outlives `disable()` (graphs compiled before it still call it).
    ops.ORIGINAL_ATTENTION[impl] = original
    if original is not None and original is _hf_sdpa():
        plain_causal.TAKES_CAUSAL_FLAG.add(original)

    @functools.wraps(original)
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if not tracing_for_pcg():
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        batch, heads, seq_len, head_dim = query.shape
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = _same_sizes(attention_mask, batch, seq_len, key.shape[-2])
        out = query.new_empty(batch, seq_len, heads, value.shape[-1])
        scale = float(scaling) if scaling is not None else head_dim ** -0.5
        note_routing(type(module).__name__, str(getattr(module, "layer_idx", "?")),
                     f"attention via pcg::attention ({impl})", True)
        torch.ops.pcg.attention(query, key, value, attention_mask, out, scale, impl,
                                int(getattr(module, "num_key_value_groups", 1)), bool(getattr(module, "is_causal", True)),
                                False)   # keys_are_new_rows: set from the traced graph (rewrite/attention_keys.py)
        return out, None

    return attention


def patch_library(patches) -> None:
    from transformers import cache_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    patches.wrap(cache_utils.DynamicLayer, "update", lambda f: _wrap_update(f, _append))
    patches.wrap(cache_utils.StaticLayer, "update", lambda f: _wrap_update(f, _write_static))
    for impl in ATTENTION_IMPLEMENTATIONS:
        patches.wrap_item(ALL_ATTENTION_FUNCTIONS._global_mapping, impl,
                          lambda f, impl=impl: wrap_attention_function(f, impl))


def patch_modeling_module(module, patches) -> None:
    if callable(getattr(module, "eager_attention_forward", None)):
        patches.wrap(module, "eager_attention_forward",
                     lambda f: wrap_attention_function(f, f"eager:{module.__name__}"))


ADAPTER = register_adapter(Adapter("attention", patch_modeling_module, patch_library))
