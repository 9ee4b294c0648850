"""The decode step written into the op's output, against mamba-ssm's public `selective_state_update`.

Skipped without CUDA or mamba-ssm. The launcher uses mamba-ssm's own kernel
and launch parameters, so state and output must match bit for bit.
"""

import importlib.util

import pytest
import torch

from conftest import requires_cuda
from hf_models import pcg_twin, tiny_model
from pcg_backend.ops import state_update

pytestmark = [requires_cuda, pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None,
                                                reason="needs mamba-ssm")]


def _step_args(batch, heads, dim, dstate, groups, dtype, softplus_bias):
    torch.manual_seed(batch * 1000 + dim + dstate)
    state = torch.randn(batch, heads, dim, dstate, device="cuda", dtype=torch.float32)
    # x, B and C as the op passes them: views into one conv output row, heads first
    h = torch.randn(batch, heads * dim + 2 * groups * dstate, device="cuda", dtype=dtype)
    x = h[:, :heads * dim].view(batch, heads, dim)
    B = h[:, heads * dim:heads * dim + groups * dstate].view(batch, groups, dstate)
    C = h[:, heads * dim + groups * dstate:].view(batch, groups, dstate)
    dt = (torch.randn(batch, 1, heads, device="cuda", dtype=dtype) * 3).transpose(1, 2).expand(-1, -1, dim)
    A = -torch.rand(heads, device="cuda", dtype=torch.float32).add(0.5)[:, None, None].expand(-1, dim, dstate)
    D = torch.randn(heads, device="cuda", dtype=dtype)[:, None].expand(-1, dim)
    bias = torch.randn(heads, device="cuda", dtype=dtype) if softplus_bias else torch.zeros(1, device="cuda")
    dt_bias = (bias[:, None] if softplus_bias else bias).expand(heads, dim)
    return state, x, dt, A, B, C, D, dt_bias


def test_the_kernel_is_found_in_the_installed_mamba_ssm():
    assert state_update.kernel() is not None


@pytest.mark.parametrize("batch,heads,dim,dstate,groups", [
    (1, 8, 8, 16, 2), (2, 8, 16, 32, 2), (3, 8, 16, 64, 1), (1, 128, 80, 128, 8), (8, 128, 80, 128, 8), (2, 24, 64, 128, 1),
    (4, 16, 32, 256, 2),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softplus_bias", [True, False])
def test_step_into_matches_selective_state_update_bitwise(batch, heads, dim, dstate, groups, dtype, softplus_bias):
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    state, x, dt, A, B, C, D, dt_bias = _step_args(batch, heads, dim, dstate, groups, dtype, softplus_bias)
    expected_state = state.clone()
    expected = selective_state_update(expected_state, x, dt, A, B, C, D, z=None, dt_bias=dt_bias,
                                      dt_softplus=softplus_bias)
    out = torch.full((batch, 1, heads * dim), float("nan"), device="cuda", dtype=dtype)
    assert state_update.step_into(out.view(batch, heads, dim), state, x, dt, A, B, C, D, dt_bias, softplus_bias)
    torch.testing.assert_close(out.view(batch, heads, dim), expected, rtol=0, atol=0)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)


def test_step_into_declines_an_output_of_another_dtype():
    state, x, dt, A, B, C, D, dt_bias = _step_args(1, 8, 8, 16, 2, torch.bfloat16, True)
    out = torch.empty(1, 8, 8, device="cuda", dtype=torch.float32)
    before = state.clone()
    assert not state_update.step_into(out, state, x, dt, A, B, C, D, dt_bias, True)
    assert torch.equal(state, before)   # nothing ran


def test_a_compiled_decode_step_takes_the_direct_launch(monkeypatch):
    """Every Mamba2 decode step of a compiled bf16 model launches into the op's output, none falls back."""
    model = tiny_model("nemotron_h", dtype=torch.bfloat16, device="cuda")
    launched = []
    real = state_update.step_into
    monkeypatch.setattr(state_update, "step_into", lambda *a, **k: launched.append(real(*a, **k)) or launched[-1])
    ids = torch.randint(3, model.config.vocab_size, (1, 5), device="cuda")
    with torch.no_grad():
        pcg_twin(model, {}).generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # Captures call the op (warm-up, sync probe, capture); replays do not.
    assert launched and all(launched), launched
