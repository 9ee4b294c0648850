"""Where the direct decode-step launch does not apply, `step_into` declines and leaves the state alone."""

import torch

from pcg_backend.ops import state_update


def test_step_into_declines_on_the_cpu_and_runs_nothing():
    heads, dim, dstate = 4, 8, 16
    state = torch.randn(1, heads, dim, dstate)
    before = state.clone()
    x = torch.randn(1, heads, dim)
    dt = torch.randn(1, heads, 1).expand(-1, -1, dim)
    A = -torch.rand(heads)[:, None, None].expand(-1, dim, dstate)
    B, C = torch.randn(1, 2, dstate), torch.randn(1, 2, dstate)
    D, dt_bias = torch.randn(heads, 1).expand(-1, dim), torch.randn(heads, 1).expand(-1, dim)
    out = torch.full((1, heads, dim), float("nan"))
    assert not state_update.step_into(out, state, x, dt, A, B, C, D, dt_bias, True)
    assert torch.equal(state, before) and out.isnan().all()

