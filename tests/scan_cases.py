"""The fresh-scan kernels' checks under Triton's interpreter: their inputs and their common assertions.

The checks run in a subprocess (`test_skinny_gemm_interpreter_cpu._run_interpreted`) that imports this
module from `tests/`, for the short scan and the one-chunk scan alike.
"""

import torch


def interpreted_case(batch, heads, groups, head_dim, state, real, padded):
    """fp16 hs, B and C as strided views of one (batch, rows, channels) buffer, fp32 dt >= 0, A < 0 and D,
    with the `padded` rows after the `real` ones as identity steps (zero inputs, dt = 0)."""
    rows = real + padded
    width = heads * head_dim
    h = torch.randn(batch, rows, width + 2 * groups * state + 8, dtype=torch.float16)[..., 3:-5]
    h[:, real:] = 0
    hs, B, C = torch.split(h, [width, groups * state, groups * state], dim=-1)
    dt = torch.rand(batch, rows, heads) * 0.5
    dt[:, real:] = 0
    A = -torch.empty(heads).uniform_(0.5, 8.0)
    D = torch.randn(heads)
    return hs, dt, A, B, C, D


def check_cases(scan, applies, launches, key, cases, close_y, close_state):
    """Run `scan` on each ((batch, heads, groups, head_dim, N, real, padded), launch overrides) case,
    with states in fp32 and fp16 and every output element starting as NaN, against the fp32 reference:
    `applies` takes the call, it launches once, `close_y(out, y_ref)` and `close_state(state, ref)`
    hold, and padded rows give 0; where a case has padded rows, also `check_counted`. Then once more into one layer's slice of a (layers, batch, ...) cache:
    the state is written at its own strides and nowhere else."""
    from pcg_backend.ops import short_scan as ss

    for shape, config in cases:
        batch, heads, groups, head_dim, state, real, padded = shape
        hs, dt, A, B, C, D = interpreted_case(*shape)
        y_ref, state_ref = ss.reference(hs, dt, A, B, C, D, groups, head_dim)
        for state_dtype in (torch.float32, torch.float16):
            ssm_state = torch.full((batch, heads, head_dim, state), float("nan"), dtype=state_dtype)
            out = torch.full(hs.shape, float("nan"), dtype=torch.float16)
            assert applies(hs, dt, B, C, ssm_state, out)
            before = launches[key]
            scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, config=config)
            assert launches[key] == before + 1
            close_y(out, y_ref)
            close_state(ssm_state, state_ref)
            assert torch.equal(out[:, real:], torch.zeros_like(out[:, real:]))
        if padded:
            check_counted(scan, launches, key, (hs, dt, A, B, C, D), groups, head_dim, real, config,
                          (y_ref, state_ref), close_y, close_state)
    hs, dt, A, B, C, D = interpreted_case(2, 4, 2, 8, 16, 12, 2)
    cache = torch.full((3, 2, 4, 8, 16), float("nan"))
    out = torch.empty(hs.shape, dtype=torch.float16)
    scan(hs, dt, A, B, C, D, cache[1], out, 2, 8)
    close_state(cache[1], ss.reference(hs, dt, A, B, C, D, 2, 8)[1])
    assert cache[0].isnan().all() and cache[2].isnan().all()


def check_counted(scan, launches, key, inputs, groups, head_dim, real, config, refs, close_y, close_state):
    """With pcg's device count (`count=`), padded rows may hold anything: here NaN in x, B, C and dt.
    The kernel must read them as identity steps (the reference computed with them zeroed) and write
    their y as 0, for an int64 and an int32 count; a count past the rows reads them all."""
    hs, dt, A, B, C, D = inputs
    y_ref, state_ref = refs
    hs, dt, B, C = (t.clone() for t in (hs, dt, B, C))
    for t in (hs, dt, B, C):
        t[:, real:] = float("nan")
    for dtype in (torch.int64, torch.int32):
        ssm_state = torch.full((hs.shape[0], dt.shape[-1], head_dim, B.shape[-1] // groups), float("nan"))
        out = torch.full(hs.shape, float("nan"), dtype=hs.dtype)
        before = launches[key]
        scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, count=torch.tensor([real], dtype=dtype),
             config=config)
        assert launches[key] == before + 1
        close_y(out, y_ref)
        close_state(ssm_state, state_ref)
        assert torch.equal(out[:, real:], torch.zeros_like(out[:, real:]))
    # A count past the rows reads every row (and nothing beyond): the clean inputs' own results.
    hs, dt, B, C = inputs[0], inputs[1], inputs[3], inputs[4]
    ssm_state = torch.full((hs.shape[0], dt.shape[-1], head_dim, B.shape[-1] // groups), float("nan"))
    out = torch.full(hs.shape, float("nan"), dtype=hs.dtype)
    scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, count=torch.tensor([hs.shape[1] + 7]), config=config)
    close_y(out, y_ref)
    close_state(ssm_state, state_ref)
