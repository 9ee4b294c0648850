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
from test_short_scan_gpu import SHAPES, check_against_the_chunked_scan, check_graph_replay

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check(family, rows, batch, config=None):
    check_against_the_chunked_scan(oc.one_chunk_scan, oc.applies, oc.LAUNCHES, "one_chunk_scan", family, rows,
                                   batch, config)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("rows", [3, 4, 8, 16, 25, 64, 128])   # every bucket kind it takes, 3 rows up
@pytest.mark.parametrize("family", list(SHAPES))
def test_the_kernel_is_as_near_the_fp32_recurrence_as_the_chunked_scan(family, rows, batch):
    _check(family, rows, batch)


@pytest.mark.parametrize("config", [{"BLOCK_P": 16, "num_warps": 4}, {"BLOCK_P": 32, "num_warps": 4},
                                    {"BLOCK_P": 32, "num_warps": 8}, {"num_warps": 4}])
@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1", "zamba2"])
def test_every_launch_the_timing_tool_tries_is_as_near(family, config):
    _check(family, 128, 2, config)


def test_the_kernel_replays_in_a_cuda_graph():
    check_graph_replay(oc.one_chunk_scan, 128)
