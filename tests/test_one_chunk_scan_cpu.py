"""The one-chunk scan kernel (`ops/one_chunk_scan.py`) on CPU: what it computes, and which calls it takes.

The kernel runs under Triton's interpreter, in fp16, against
`short_scan.reference` (the fp32 recurrence, itself checked against an
independent float64 formula in `test_short_scan_cpu.py`). Which fresh
prefills reach it inside a model, and that they equal eager, is
`test_short_scan_cpu.py`'s end-to-end test, which covers both one-launch
kernels.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from pcg_backend.ops import one_chunk_scan as oc
from pcg_backend.ops import short_scan as ss
from test_skinny_gemm_interpreter_cpu import _run_interpreted

INTERPRETED_CHECK = textwrap.dedent('''
import sys
import torch
from pcg_backend.ops import one_chunk_scan as oc, short_scan as ss
sys.path.insert(0, "tests")
from scan_cases import check_cases   # strided fp16 views of one buffer, padded rows as no-ops
assert ss.INTERPRETED
torch.manual_seed(0)

def close(got, ref, what):
    # The kernel rounds the decayed scores and the scaled B to fp16 before its products, as the chunked
    # scan rounds them to the model dtype: errors of a few fp16 ulps of the largest value.
    scale = ref.abs().max().item()
    err = (got.float() - ref).abs().max().item()
    assert err <= 1.5e-3 * scale + 1e-6, (what, err, scale)

# (batch, heads, groups, head_dim, N, real rows, padded rows), launch overrides: T = 1 and 128, padding,
# groups > 1, batch > 1, head_dim and N off powers of two and below tl.dot's 16, several head_dim blocks
cases = [((1, 2, 1, 8, 16, 1, 0), {}), ((2, 4, 2, 8, 16, 25, 7), {}), ((2, 6, 3, 12, 24, 40, 8), {}),
         ((1, 4, 2, 80, 32, 100, 28), {}), ((1, 4, 2, 80, 32, 97, 31), {"BLOCK_P": 32, "num_warps": 4}),
         ((2, 4, 1, 20, 8, 33, 0), {"BLOCK_P": 16}), ((1, 2, 2, 16, 128, 64, 0), {"num_warps": 4}),
         ((3, 2, 1, 3, 5, 2, 2), {})]
check_cases(oc.one_chunk_scan, oc.applies, oc.LAUNCHES, "one_chunk_scan", cases,
            lambda out, ref: close(out, ref, "y"), lambda state, ref: close(state, ref, "state"))
print("ok")
''')


def test_the_kernel_under_the_interpreter():
    _run_interpreted(INTERPRETED_CHECK)


def _half(rows, state=32, dtype=torch.float16):
    batch, heads, groups, head_dim = 2, 8, 2, 16
    h = torch.zeros(batch, rows, heads * head_dim + 2 * groups * state, dtype=dtype)
    hs, B, C = torch.split(h, [heads * head_dim, groups * state, groups * state], dim=-1)
    dt = torch.zeros(batch, rows, heads)
    return hs, dt, B, C, torch.zeros(batch, heads, head_dim, state), torch.empty(hs.shape, dtype=dtype)


@pytest.mark.parametrize("rows, takes", [(1, True), (ss.MAX_ROWS + 1, True), (oc.MAX_ROWS, True),
                                         (oc.MAX_ROWS + 1, False)])
def test_row_limit(rows, takes, monkeypatch):
    # Devices aside (CPU tensors need the interpreter), the row count decides: up to MAX_ROWS, for the
    # kernel and for may_apply, which tells the core to compute dt for it.
    monkeypatch.setattr(ss, "_device_ok", lambda t: True)
    monkeypatch.setattr(ss, "triton", ss.triton or object())
    hs, dt, B, C, state, out = _half(rows)
    assert oc.applies(hs, dt, B, C, state, out) == takes
    assert oc.may_apply(hs, state, out) == takes
    assert ss.applies(hs, dt, B, C, state, out) == (rows <= ss.MAX_ROWS)


def test_bad_parameters_are_errors():
    hs, dt, B, C, state, out = _half(40)
    with pytest.raises(ValueError, match="one_chunk_scan: B of width 64 is not 4 groups"):
        oc.one_chunk_scan(hs, dt, torch.zeros(8), B, C, torch.zeros(8), state, out, 4, 16)
    with pytest.raises(ValueError, match=r"A \(7,\)"):
        oc.one_chunk_scan(hs, dt, torch.zeros(7), B, C, torch.zeros(8), state, out, 2, 16)
    for count in (torch.tensor([3, 4]), torch.tensor([3.0])):   # the count must be one integer
        with pytest.raises(ValueError, match="the real token count must be one integer"):
            oc.one_chunk_scan(hs, dt, torch.zeros(8), B, C, torch.zeros(8), state, out, 2, 16, count=count)


@pytest.mark.parametrize("rows, state, head_dim, expected", [
    (32, 64, 64, {"BLOCK_P": 64, "num_warps": 4}), (64, 128, 64, {"BLOCK_P": 64, "num_warps": 4}),
    (128, 128, 80, {"BLOCK_P": 128, "num_warps": 8}), (24, 256, 128, {"BLOCK_P": 128, "num_warps": 8}),
    (64, 256, 128, {"BLOCK_P": 128, "num_warps": 8}), (25, 16, 3, {"BLOCK_P": 16, "num_warps": 4})])
def test_default_launch_config(rows, state, head_dim, expected):
    # A whole head per program (its scores are computed once), at least tl.dot's 16 columns; 4 warps
    # up to 64 rows with states of up to 128, else 8.
    assert oc.launch_config(rows, state, head_dim) == expected
