"""The one-chunk scan kernel on a GPU against mamba-ssm's chunked scan, at the families' 9B shapes.

As in `test_short_scan_gpu.py`: both scans see the same bf16 inputs as
`_padded_prefill` hands them over, and the kernel passes where its error
against the fp32 recurrence (`short_scan.reference`) is at most twice the
chunked scan's plus 1e-3 of the largest value, for y and for the final state.
"""

from __future__ import annotations

import pytest
import torch

from pcg_backend.ops import one_chunk_scan as oc
from pcg_backend.ops import short_scan as ss
from test_short_scan_gpu import _chunked_scan, _inputs, _max_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# family: (heads, head_dim, groups, N, chunk_size), as pcg_backend/families.py builds them
SHAPES = {
    "nemotron_h": (128, 80, 8, 128, 128),
    "bamba": (128, 64, 1, 128, 256),
    "falcon_h1": (40, 128, 1, 256, 256),
    "zamba2": (112, 64, 2, 64, 256),
    "granitemoehybrid": (48, 64, 1, 128, 256),
    "mamba2": (128, 64, 8, 128, 256),
}


def _check(family, rows, batch, config=None):
    chunk_scan = _chunked_scan()
    heads, head_dim, groups, state, chunk_size = SHAPES[family]
    real, hs, dt, A, B, C, D = _inputs(batch, rows, heads, head_dim, groups, state, seed=rows * batch)
    y_ref, state_ref = ss.reference(hs, dt, A, B, C, D, groups, head_dim)
    y_chunk, state_chunk = chunk_scan(
        hs.reshape(batch, rows, heads, head_dim), dt, A, B.reshape(batch, rows, groups, state),
        C.reshape(batch, rows, groups, state), chunk_size=chunk_size, D=D, z=None, dt_bias=None,
        dt_softplus=False, return_final_states=True)
    ssm_state = torch.full((batch, heads, head_dim, state), float("nan"), device="cuda")
    out = torch.full_like(hs, float("nan"), memory_format=torch.contiguous_format)
    assert oc.applies(hs, dt, B, C, ssm_state, out)
    before = oc.LAUNCHES["one_chunk_scan"]
    oc.one_chunk_scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, config=config)
    assert oc.LAUNCHES["one_chunk_scan"] == before + 1

    y_eps = 1e-3 * y_ref.abs().max().item() + 1e-6
    state_eps = 1e-3 * state_ref.abs().max().item() + 1e-6
    y_err, y_chunk_err = _max_error(out, y_ref), _max_error(y_chunk.reshape(batch, rows, -1), y_ref)
    state_err, state_chunk_err = _max_error(ssm_state, state_ref), _max_error(state_chunk, state_ref)
    assert y_err <= 2 * y_chunk_err + y_eps, (y_err, y_chunk_err, y_eps)
    assert state_err <= 2 * state_chunk_err + state_eps, (state_err, state_chunk_err, state_eps)
    assert torch.equal(out[:, real:], torch.zeros_like(out[:, real:]))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("rows", [25, 64, 128])
@pytest.mark.parametrize("family", list(SHAPES))
def test_the_kernel_is_as_near_the_fp32_recurrence_as_the_chunked_scan(family, rows, batch):
    _check(family, rows, batch)


@pytest.mark.parametrize("config", [{"BLOCK_P": 16, "num_warps": 4}, {"BLOCK_P": 32, "num_warps": 4},
                                    {"BLOCK_P": 32, "num_warps": 8}, {"num_warps": 4}])
@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1", "zamba2"])
def test_every_launch_the_timing_tool_tries_is_as_near(family, config):
    _check(family, 128, 2, config)


def test_the_kernel_replays_in_a_cuda_graph():
    # pcg launches it inside captured prefill graphs: a replay over new inputs gives what a launch gives.
    heads, head_dim, groups, state, _ = SHAPES["nemotron_h"]
    _, hs, dt, A, B, C, D = _inputs(1, 128, heads, head_dim, groups, state, seed=2)
    ssm_state = torch.empty(1, heads, head_dim, state, device="cuda")
    out = torch.empty(hs.shape, dtype=hs.dtype, device="cuda")
    oc.one_chunk_scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim)   # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oc.one_chunk_scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim)
    _, hs2, dt2, _, B2, C2, _ = _inputs(1, 128, heads, head_dim, groups, state, seed=3)
    hs.copy_(hs2)
    dt.copy_(dt2)
    B.copy_(B2)
    C.copy_(C2)
    graph.replay()
    torch.cuda.synchronize()
    expected_state = torch.empty_like(ssm_state)
    expected = torch.empty_like(out)
    oc.one_chunk_scan(hs, dt, A, B, C, D, expected_state, expected, groups, head_dim)
    assert torch.equal(out, expected) and torch.equal(ssm_state, expected_state)
