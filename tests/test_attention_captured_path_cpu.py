"""`pcg::attention`'s captured path on CPU, called directly: what it writes, and the constants it keeps.

Inside a padded piece the op runs every padded row and reads the real count
from the device. It masks the padded key columns (when the keys are the
call's own rows), zeroes the padded query rows in the one kernel that writes
`out`, and reads its positions and zero from tensors it made once, outside
any capture (`_positions`, `_zero`). The models' tests check it end to end;
these pin its values at every count of a bucket, with NaN in the padded query
rows and large values in the padded keys and values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcg_backend import context
from pcg_backend.ops import attention as att


def _sdpa(module, query, key, value, mask, dropout=0.0, scaling=None, **kwargs):
    # HF's sdpa attention function's shape: (batch, heads, q, d) in, (batch, q, heads, d) out.
    rep = module.num_key_value_groups
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def sdpa(monkeypatch):
    monkeypatch.setitem(att.ORIGINAL_ATTENTION, "test_sdpa", _sdpa)


def _run_captured(query, key, value, mask, out, count, keys_are_new_rows=True):
    padded = query.shape[2]
    device_count = torch.tensor([count])
    ctx = context.ForwardContext(num_tokens=count, padded_tokens=padded, device_count=device_count)
    with context.forward_context(ctx), context.piece_running():
        att.attention(query, key, value, mask, out, query.shape[-1] ** -0.5, "test_sdpa", 2, True, keys_are_new_rows)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_every_count_of_a_bucket_gives_the_real_rows_attention_and_zero_padding(sdpa, mask_dtype, out_dtype):
    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, padded, dim = 2, 4, 2, 8, 16
    for count in range(1, padded + 1):
        query = torch.randn(batch, heads, padded, dim, generator=g)
        key = torch.randn(batch, kv_heads, padded, dim, generator=g)
        value = torch.randn(batch, kv_heads, padded, dim, generator=g)
        query[:, :, count:] = float("nan")   # a padded query row's output must be zeroed whatever it holds
        key[:, :, count:] = 1e4             # padded keys and values: finite garbage, which the mask must hide
        value[:, :, count:] = -1e4
        causal = torch.ones(padded, padded, dtype=torch.bool).tril()
        # A padded mask that says "attend" on its padded columns (a float mask padded with zeros does)
        mask = causal if mask_dtype is torch.bool else torch.where(causal, 0.0, float("-inf"))
        mask = mask.expand(batch, 1, padded, padded).clone()
        mask[..., count:] = True if mask_dtype is torch.bool else 0.0
        out = torch.full((batch, padded, heads, dim), float("nan"), dtype=out_dtype)
        _run_captured(query, key, value, mask, out, count)
        ref, _ = _sdpa(type("M", (), {"num_key_value_groups": 2})(), query[:, :, :count], key[:, :, :count],
                       value[:, :, :count], causal[:count, :count], scaling=dim ** -0.5)
        torch.testing.assert_close(out[:, :count], ref.to(out_dtype), rtol=1e-5, atol=1e-5, msg=f"count {count}")
        assert torch.equal(out[:, count:], torch.zeros_like(out[:, count:])), count


def test_positions_grow_by_doubling_and_keep_what_they_replaced():
    device = torch.device("cpu")
    att._POSITIONS.pop(device, None)
    retired = len(att._RETIRED)
    first = att._positions(5, device)
    assert torch.equal(first, torch.arange(5))
    assert att._positions(3, device).data_ptr() == first.data_ptr()   # a view of the kept arange
    longer = att._positions(7, device)   # grows to twice the old length, keeping the old tensor alive
    assert torch.equal(longer, torch.arange(7)) and att._POSITIONS[device].shape[0] == 10
    assert len(att._RETIRED) == retired + 1 and att._RETIRED[-1].data_ptr() == first.data_ptr()
    assert att._positions(40, device).shape[0] == 40 and att._POSITIONS[device].shape[0] == 40
    zero = att._zero(torch.float16, device)
    assert zero.dim() == 0 and zero.item() == 0 and att._zero(torch.float16, device) is zero


def test_inputs_that_require_grad_take_the_copy_that_autograd_allows(sdpa):
    # `torch.where(..., out=)` records no autograd and refuses inputs that require grad (a model run
    # outside `torch.no_grad()`): there the op zeroes the padded rows with a copy instead.
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 8, 16, generator=g, requires_grad=True)
    key, value = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g)
    mask = torch.ones(8, 8, dtype=torch.bool).tril().expand(1, 1, 8, 8)
    out = torch.full((1, 8, 4, 16), float("nan"))
    _run_captured(query, key, value, mask, out, 5)
    ref, _ = _sdpa(type("M", (), {"num_key_value_groups": 2})(), query[:, :, :5], key[:, :, :5], value[:, :, :5],
                   mask[..., :5, :5], scaling=0.25)
    torch.testing.assert_close(out[:, :5], ref.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 5:], torch.zeros_like(out[:, 5:]))
