"""Inputs of a fresh padded prefill's scan, for the kernel checks that run under Triton's interpreter.

The checks run in a subprocess (`test_skinny_gemm_interpreter_cpu._run_interpreted`) that imports this
module from `tests/`: one case generator for the short scan's and the one-chunk scan's checks.
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
