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


@pytest.mark.parametrize("rows,n,channels", [(16, 16, 12288), (16, 5, 384), (128, 100, 10496), (2, 1, 384),
                                             (40, 40, 264)])
@pytest.mark.parametrize("bias", [True, False])
def test_prepare_with_the_conv_matches_causal_conv1d(rows, n, channels, bias):
    """The fused conv against causal-conv1d's kernel where it is installed (else torch's conv1d), on the
    unfused call's x, in bf16: within two bf16 roundings of it (rtol 8e-3). The other outputs are the
    unfused call's."""
    batch, heads = 2, 24
    xBC, dt, dt_bias = _inputs(batch, rows, channels, heads, torch.bfloat16)
    weight = torch.randn(channels, WIDTH, device="cuda", dtype=torch.bfloat16) / 2
    conv_bias = torch.randn(channels, device="cuda", dtype=torch.bfloat16) if bias else None
    count = torch.tensor([n], device="cuda")
    plain_state = torch.full((batch, channels, WIDTH), 7.0, device="cuda", dtype=torch.bfloat16)
    fused_state = plain_state.clone()
    x, dt_plain, keep_plain = mamba2_prep.prepare(xBC, dt, dt_bias, count, plain_state, 0.0, float("inf"))
    h, dt_fused, keep_fused = mamba2_prep.prepare(xBC, dt, dt_bias, count, fused_state, 0.0, float("inf"),
                                                  conv=(weight, conv_bias, "silu"))
    try:
        from causal_conv1d import causal_conv1d_fn
        ref = causal_conv1d_fn(x.transpose(1, 2), weight, conv_bias, activation="silu").transpose(1, 2)
    except ImportError:
        ref = F.silu(F.conv1d(x.transpose(1, 2).float(), weight[:, None, :].float(),
                              None if conv_bias is None else conv_bias.float(), padding=WIDTH - 1,
                              groups=channels)[..., :rows]).transpose(1, 2).to(torch.bfloat16)
    assert h.shape == ref.shape and h.is_contiguous()
    torch.testing.assert_close(h, ref, atol=1e-2, rtol=8e-3)
    assert torch.equal(fused_state, plain_state) and torch.equal(dt_fused, dt_plain)
    assert torch.equal(keep_fused, keep_plain)
