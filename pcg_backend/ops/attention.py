"""Attention split ops: the KV-cache writes and the attention core, on the real tokens only.

* `pcg::kv_append`        - DynamicCache: concatenate the real new K or V rows.
* `pcg::kv_write_static`  - StaticCache: write the real rows at the cache's
                            cumulative length, and advance it by the real count.
* `pcg::attention`        - the attention core, through HF's own attention
                            function for the layer (sdpa, eager, ...), on the
                            real query rows; padded output rows are zeroed.
                            A decode step's (one query row, "sdpa", bf16 or
                            fp16 on CUDA) runs `decode_attention.py`'s kernel;
                            a long prefill on the host whose mask holds no
                            padding runs with SDPA's causal flag
                            (`plain_causal.py`).

`kv_write_static` and `attention` are padding-safe: captured inside a padded
piece (`context.in_piece`, with the real count on the device), they run on
every padded row without reading the count on the host, so a prefill over a
static cache is captured whole, attention included:

* the KV write sends each padded row to the last real row's position with
  that row's values, so nothing lands beyond the real length (which may be
  the cache's end) and the duplicate writes agree;
* attention runs every padded query row. A real row's causal mask never lets
  it see a later position, so padded rows change no real row; their own
  outputs are never read by a real row either (the padding rule's contract).
  When the keys are this call's own rows (no cache, or a new DynamicCache),
  their padded rows are masked on the device as well (`keys_are_new_rows`):
  a 4-D mask that came in as a graph input was padded along its key columns
  too, and a float mask padded with zeros would let real rows attend them.
  The positions this compares with the count, and the zero written to the
  padded output rows, are tensors made once outside any capture
  (`_positions`, `_zero`); with the keys' padded columns reused as the
  padded query rows and the zeroing done in the one kernel that writes
  `out`, a captured attention layer records four kernels fewer than with an
  arange per use and a separate copy where the keys are the call's own rows
  (Falcon-H1 has 44 such layers), two fewer over a static cache.

A new DynamicCache's first write is no split op at all (the HF adapter
copies the new rows; the runtime cuts the cache's keys to the real rows when
the forward returns), so attention over it is captured too. On a cache that
holds rows the keys come from `kv_append`, which stays eager and returns only
the real rows; attention over them then stays eager too
(`analyse/node_kinds._fuse_safe_split_ops`), and the report shows the cut.
"""

from __future__ import annotations

import types

import torch

from .. import context
from ..stats import STATS
from . import decode_attention, plain_causal
from .lean_op import lean_op
from .registry import register_split_op

# The HF attention functions the routed wrappers replaced, by implementation name.
ORIGINAL_ATTENTION: dict[str, object] = {}

def _without_cudnn_sdpa(call):
    """`call()` with SDPA's cuDNN backend off, as the caller had it afterwards.

    cuDNN's SDPA builds an execution plan for every new shape (about half a
    second of host time on an H200), and a decode step meets a new KV length
    every time, so each call at a prompt length not seen before paid it ~15
    times over. Flash and memory-efficient attention have no plans. One flag
    toggled (well under a microsecond), not `sdpa_kernel` (about 9 µs per call,
    paid per attention layer per decode step).
    """
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return call()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return call()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


# Constant tensors the captured attention path reads, made outside any capture and never freed: made
# inside one, each would be one more kernel per layer in every graph, in memory the graph's pool owns;
# freed, a graph captured with one would read reused memory.
_POSITIONS: dict[torch.device, torch.Tensor] = {}
_ZEROS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []   # shorter aranges a longer one replaced


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _positions(length: int, device: torch.device) -> torch.Tensor:
    """0, 1, ..., length - 1 on `device` (int64): a view of one arange per device, at least twice as long
    as the one it replaced, so that calls at ever new lengths keep a few tensors, not one each."""
    kept = _POSITIONS.get(device)
    if kept is not None and kept.shape[0] >= length:
        return kept[:length]
    fresh = torch.arange(length if kept is None else max(length, 2 * kept.shape[0]), device=device)
    if not _capturing(fresh):
        if kept is not None:
            _RETIRED.append(kept)
        _POSITIONS[device] = fresh
    return fresh[:length]


def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim zero of `dtype` on `device`."""
    zero = _ZEROS.get((dtype, device))
    if zero is None:
        zero = torch.zeros((), dtype=dtype, device=device)
        if not _capturing(zero):
            _ZEROS[(dtype, device)] = zero
    return zero


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


@register_split_op(padding_safe=True)
@lean_op("pcg::kv_write_static", mutates_args=["keys", "values", "cumulative_length"])
def kv_write_static(
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cumulative_length: torch.Tensor,
) -> None:
    padded = key_states.shape[-2]
    count = context.device_token_count(padded) if context.in_piece() else None
    if count is not None:
        # Row i < count goes to its own position; a padded row repeats the last real row.
        rows = torch.minimum(torch.arange(padded, device=keys.device), count - 1)
        positions = rows + cumulative_length
        keys.index_copy_(2, positions, key_states.index_select(2, rows))
        values.index_copy_(2, positions, value_states.index_select(2, rows))
        cumulative_length.add_(count.view(()))
        return
    n = context.real_tokens(padded)
    positions = torch.arange(n, device=keys.device) + cumulative_length
    cumulative_length.add_(n)
    keys.index_copy_(2, positions, key_states[..., :n, :])
    values.index_copy_(2, positions, value_states[..., :n, :])


@register_split_op(padding_safe=True)
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
    keys_are_new_rows: bool,
) -> None:
    padded = query.shape[2]
    count = context.device_token_count(padded) if context.in_piece() else None
    if count is not None and mask is not None and mask.dim() == 4 and mask.shape[2] != padded:
        # A mask at another length than the padded query: only the host path, with the real
        # count, can cut it, and a capture would bake that count in for the whole bucket.
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"pcg::attention: the mask has {mask.shape[2]} query rows, the padded query "
                               f"{padded}; it cannot be captured for every count in the bucket")
        count = None
    n = padded if count is not None else context.real_tokens(padded)
    if keys_are_new_rows and count is None and n < key.shape[-2]:
        # The keys are this call's rows, padded: cut them with the queries (a mask's padded
        # columns may say "attend", as a float mask padded with zeros does).
        key, value = key[:, :, :n], value[:, :, :n]
    # The row count first: a decode step's attention (one row) runs here every layer of every step.
    if count is None and n >= plain_causal.MIN_ROWS and \
            plain_causal.applies(n, key, mask, ORIGINAL_ATTENTION.get(impl), is_causal):
        # On the host, and the mask holds no padding: SDPA's causal flag, as HF eager would call it.
        # (Checked before the mask is cut below: the verdict is kept for the tensor every layer receives.)
        STATS.causal_flag_attention += 1
        mask = None
    padded_rows = None   # captured: which query rows are padding, where already known
    if mask is not None and mask.dim() == 4:
        mask = mask[:, :, :n, : key.shape[-2]]
        if keys_are_new_rows and count is not None:
            # Captured: the padded key columns are masked on the device, whatever the mask holds there.
            padded_keys = _positions(key.shape[-2], mask.device) >= count
            mask = mask & ~padded_keys if mask.dtype == torch.bool else \
                mask.masked_fill(padded_keys, torch.finfo(mask.dtype).min)
            if key.shape[-2] == padded:
                padded_rows = padded_keys   # the keys are the query's own rows
    if padded == 1 and impl == "sdpa" and decode_attention.applies(query, key, value, mask):
        # A decode step: one kernel reads the cache as it lies (no repeat_kv copies, no mask conversion).
        decode_attention.decode_attention(query, key, value, mask, out, scaling)
        return
    # HF attention functions read only these attributes of the module.
    module = types.SimpleNamespace(num_key_value_groups=num_key_value_groups, is_causal=is_causal, training=False)
    result, _ = _without_cudnn_sdpa(lambda: ORIGINAL_ATTENTION[impl](
        module, query[:, :, :n], key, value, mask, dropout=0.0, scaling=scaling))
    if count is not None:
        # Padded query rows may be fully masked (NaN from softmax): zero them, as the host path does, in
        # the one kernel that writes `out`.
        if padded_rows is None:
            padded_rows = _positions(padded, out.device) >= count
        padded_rows = padded_rows[None, :, None, None]
        if result.dtype == out.dtype and not result.requires_grad:   # out= records no autograd
            torch.where(padded_rows, _zero(out.dtype, out.device), result, out=out)
        else:
            out.copy_(result.masked_fill(padded_rows, 0))
        return
    out[:, :n] = result
    if n < padded:
        out[:, n:] = 0
