"""The Triton prefill-prep kernel against the torch ops it replaces (skipped without CUDA and Triton)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import requires_cuda
from pcg_backend.ops import mamba2_prep

pytestmark = [requires_cuda, pytest.mark.skipif(mamba2_prep.triton is None, reason="needs Triton")]

WIDTH = 4


def _inputs(batch, rows, channels, heads, dtype):
    torch.manual_seed(0)
    # xBC and dt as the mixer has them: column slices of one projection (row stride > channels)
    projected = torch.randn(batch, rows, channels + heads + 24, device="cuda", dtype=dtype)
    xBC = projected[..., 8:8 + channels]
    dt = projected[..., 8 + channels:8 + channels + heads] * 4   # some values beyond softplus' threshold 20
    dt_bias = torch.randn(heads, device="cuda", dtype=dtype)
    return xBC, dt, dt_bias


@pytest.mark.parametrize("rows,n", [(16, 1), (16, 3), (16, 4), (16, 16), (32, 17), (512, 300), (2, 2)])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.001, 0.1)])
def test_prepare_matches_the_torch_ops(rows, n, dt_limit):
    batch, channels, heads = 2, 384, 24
    xBC, dt, dt_bias = _inputs(batch, rows, channels, heads, torch.bfloat16)
    count = torch.tensor([n], device="cuda")
    conv_state = torch.full((batch, channels, WIDTH), 7.0, device="cuda", dtype=torch.bfloat16)

    x, dt_out, keep = mamba2_prep.prepare(xBC, dt, dt_bias, count, conv_state, *dt_limit)

    assert x.is_contiguous() and x.shape == (batch, rows, channels)
    torch.testing.assert_close(x, xBC, atol=0, rtol=0)
    # the conv state: the last WIDTH real rows, zero-filled before row 0
    window = F.pad(xBC[:, :n].transpose(1, 2), (WIDTH, 0))[..., -WIDTH:]
    torch.testing.assert_close(conv_state, window, atol=0, rtol=0)
    expected_dt = F.softplus(dt.float() + dt_bias.float()).clamp(*dt_limit)
    expected_dt[:, n:] = 0
    torch.testing.assert_close(dt_out, expected_dt, atol=1e-6, rtol=1e-6)
    assert (dt_out[:, n:] == 0).all()
    torch.testing.assert_close(keep, torch.arange(rows, device="cuda") < n, atol=0, rtol=0)


def test_prepare_is_only_offered_where_its_layout_holds():
    xBC, _, _ = _inputs(1, 8, 384, 8, torch.bfloat16)
    state = torch.zeros(1, 384, WIDTH, device="cuda", dtype=torch.bfloat16)
    assert mamba2_prep.available(xBC, state)
    assert not mamba2_prep.available(xBC.cpu(), state.cpu())
    assert not mamba2_prep.available(xBC[..., :380], state[:, :380])          # channels not a multiple of 8
    assert not mamba2_prep.available(xBC, state.float())                      # the state in another dtype
