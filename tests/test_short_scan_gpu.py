"""The short-scan kernel on a GPU against mamba-ssm's chunked scan, at the families' 9B shapes.

Both scans see the same bf16 inputs, laid out as `_padded_prefill` hands
them over (hs, B and C views of one buffer, dt in fp32 with padded rows at
0). Neither equals the fp32 recurrence (`short_scan.reference`) bit for bit:
the chunked kernels round some products to bf16 and both round y to bf16.
The kernel passes where its error against that reference is at most twice
the chunked scan's plus a small epsilon, for y and for the final state.
"""

from __future__ import annotations

import functools

import pytest
import torch

from pcg_backend.families import FAMILIES, mamba2_shape
from pcg_backend.ops import short_scan as ss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _chunked_scan():
    return pytest.importorskip("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


# family: (heads, head_dim, groups, N, chunk_size) of its benchmark shape
SHAPES = {family: mamba2_shape(family) for family in FAMILIES}


def _inputs(batch, rows, heads, head_dim, groups, state, seed=0):
    """A fresh padded prefill's scan inputs: the last rows // 4 rows are padding (identity steps)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    real = rows - rows // 4
    width = heads * head_dim
    h = torch.randn(batch, rows, width + 2 * groups * state, generator=g, device="cuda").bfloat16()
    h[:, real:] = 0
    hs, B, C = torch.split(h, [width, groups * state, groups * state], dim=-1)
    # dt as `mamba2_prep` leaves it: log-uniform over the models' range, 0 on padded rows
    dt = torch.exp(torch.empty(batch, rows, heads, device="cuda").uniform_(-7.0, -0.7, generator=g))
    dt[:, real:] = 0
    A = -torch.exp(torch.empty(heads, device="cuda").uniform_(0.0, 2.77, generator=g))   # A_log's init, 1..16
    D = torch.randn(heads, device="cuda", generator=g)
    return real, hs, dt, A, B, C, D


def _max_error(got, ref):
    return (got.float() - ref).abs().max().item()


def check_against_the_chunked_scan(scan, applies, launches, key, family, rows, batch, config=None):
    """`scan` (short_scan or one_chunk_scan, with its `applies`, counting its launches in `launches[key]`)
    at `family`'s shape takes the call, and its error against the fp32 recurrence is at most twice the chunked scan's plus 1e-3 of the
    largest value, for y and the final state; it launches once; padded rows give 0, as the chunked
    scan's do."""
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
    assert applies(hs, dt, B, C, ssm_state, out)
    before = launches[key]
    scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, config=config)
    assert launches[key] == before + 1

    y_eps = 1e-3 * y_ref.abs().max().item() + 1e-6
    state_eps = 1e-3 * state_ref.abs().max().item() + 1e-6
    y_err, y_chunk_err = _max_error(out, y_ref), _max_error(y_chunk.reshape(batch, rows, -1), y_ref)
    state_err, state_chunk_err = _max_error(ssm_state, state_ref), _max_error(state_chunk, state_ref)
    assert y_err <= 2 * y_chunk_err + y_eps, (y_err, y_chunk_err, y_eps)
    assert state_err <= 2 * state_chunk_err + state_eps, (state_err, state_chunk_err, state_eps)
    assert torch.equal(out[:, real:], torch.zeros_like(out[:, real:]))

    # As pcg calls it in a padded prefill: with the device count, padded rows may hold NaN (read as zeros):
    # the very values of the call above.
    hs_nan, dt_nan, B_nan, C_nan = (t.clone() for t in (hs, dt, B, C))
    for t in (hs_nan, dt_nan, B_nan, C_nan):
        t[:, real:] = float("nan")
    counted_state, counted = torch.full_like(ssm_state, float("nan")), torch.full_like(out, float("nan"))
    scan(hs_nan, dt_nan, A, B_nan, C_nan, D, counted_state, counted, groups, head_dim,
         count=torch.tensor([real], device="cuda"), config=config)
    assert torch.equal(counted, out) and torch.equal(counted_state, ssm_state)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("rows", [1, 2, 8, 16])
@pytest.mark.parametrize("family", list(SHAPES))
def test_the_kernel_is_as_near_the_fp32_recurrence_as_the_chunked_scan(family, rows, batch):
    # Also above the row limit pcg routes to it by (MAX_ROWS): the kernel itself takes up to 16 rows and more.
    check_against_the_chunked_scan(ss.short_scan, functools.partial(ss.applies, T_max=16), ss.LAUNCHES,
                                   "short_scan", family, rows, batch)


@pytest.mark.parametrize("config", [{}, {"UNROLL": True}, {"UNROLL": False}, {"BLOCK_P": 16, "num_warps": 2},
                                    {"BLOCK_P": 2}])
@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1", "zamba2"])
def test_the_kernel_matches_the_fp32_recurrence(family, config):
    # Without mamba-ssm: the kernel computes in fp32, so its only error is y's rounding to bf16, for the
    # default launch and the ones a sweep may pick instead.
    heads, head_dim, groups, state, _ = SHAPES[family]
    real, hs, dt, A, B, C, D = _inputs(2, 16, heads, head_dim, groups, state, seed=1)
    y_ref, state_ref = ss.reference(hs, dt, A, B, C, D, groups, head_dim)
    ssm_state = torch.empty(2, heads, head_dim, state, device="cuda")
    out = torch.empty(hs.shape, dtype=hs.dtype, device="cuda")
    ss.short_scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, config=config)
    torch.testing.assert_close(out, y_ref.bfloat16(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ssm_state, state_ref, atol=1e-4, rtol=1e-4)


def check_graph_replay(scan, rows):
    """`scan` (short_scan or one_chunk_scan) captured in a CUDA graph, as pcg launches it inside captured
    prefill graphs: a replay over new inputs and a new device count gives what a launch gives."""
    heads, head_dim, groups, state, _ = SHAPES["nemotron_h"]
    _, hs, dt, A, B, C, D = _inputs(1, rows, heads, head_dim, groups, state, seed=2)
    ssm_state = torch.empty(1, heads, head_dim, state, device="cuda")
    out = torch.empty(hs.shape, dtype=hs.dtype, device="cuda")
    count = torch.tensor([rows], device="cuda")
    scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, count=count)   # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, count=count)
    _, hs2, dt2, _, B2, C2, _ = _inputs(1, rows, heads, head_dim, groups, state, seed=3)
    hs.copy_(hs2)
    dt.copy_(dt2)
    B.copy_(B2)
    C.copy_(C2)
    count.fill_(rows // 2 + 1)
    graph.replay()
    torch.cuda.synchronize()
    expected_state = torch.empty_like(ssm_state)
    expected = torch.empty_like(out)
    scan(hs, dt, A, B, C, D, expected_state, expected, groups, head_dim, count=torch.tensor([rows // 2 + 1],
                                                                                         device="cuda"))
    assert torch.equal(out, expected) and torch.equal(ssm_state, expected_state)
    assert torch.equal(out[:, rows // 2 + 1:], torch.zeros_like(out[:, rows // 2 + 1:]))


def test_the_kernel_replays_in_a_cuda_graph():
    check_graph_replay(ss.short_scan, 16)


def test_a_bf16_model_takes_a_one_launch_scan_once_per_layer_per_fresh_prefill():
    # The real `applies` on the real layout: the prep kernel's conv output and mamba-ssm's dtype.
    # Without CUDA graphs every call runs the Mamba2 core on the host, so each padded fresh prefill of
    # a bucket of at most MAX_ROWS launches the kernel exactly once per Mamba2 layer (above it, up to
    # one_chunk_scan.MAX_ROWS, the one-chunk kernel), and the logits stay within bf16 noise of eager's.
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    from hf_models import tiny_model

    torch._dynamo.reset()
    model = tiny_model("nemotron_h", dtype=torch.bfloat16, device="cuda")
    mixers = sum(1 for m in model.modules() if hasattr(m, "A_log"))
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 64, "cuda_graphs": False,
                                                           "max_overflow_size": 0, "progress": False})
    from pcg_backend.ops import mamba2_prep
    from pcg_backend.ops import one_chunk_scan as oc

    g = torch.Generator().manual_seed(0)
    launched = []
    prep_before = dict(mamba2_prep.LAUNCHES)
    with torch.no_grad():
        # 1 token: Dynamo's static graph, one step; then buckets 2 (short), 4, 8, 16, 24, 32 and 64 (one
        # chunk), and above the largest bucket, unpadded: without CUDA graphs the count is still published,
        # so 70 rows take the one-chunk scan and 130 rows, above its limit, the chunked scan.
        for n in (1, 2, 3, 8, 13, 17, 25, 64, 70, 130):
            ids = torch.randint(3, 128, (1, n), generator=g).cuda()
            before = ss.LAUNCHES["short_scan"], oc.LAUNCHES["one_chunk_scan"]
            got, ref = compiled(ids).logits.float(), model(ids).logits.float()
            launched.append((ss.LAUNCHES["short_scan"] - before[0], oc.LAUNCHES["one_chunk_scan"] - before[1]))
            assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item() + 1e-2, n
    torch._dynamo.reset()
    assert launched == [(0, 0), (mixers, 0), (0, mixers), (0, mixers), (0, mixers), (0, mixers), (0, mixers),
                        (0, mixers), (0, mixers), (0, 0)]
    # Every padded fresh prefill (all but the 1-token one) ran its conv inside the prep kernel, once per layer.
    assert mamba2_prep.LAUNCHES["with_conv"] - prep_before["with_conv"] == 9 * mixers
    assert mamba2_prep.LAUNCHES["without_conv"] == prep_before["without_conv"]
