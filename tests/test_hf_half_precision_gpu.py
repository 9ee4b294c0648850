"""bf16 on CUDA (mamba-ssm and causal-conv1d kernels, CUDA graphs): pcg's prefill and decode logits stay
within eager's own noise for every family (`hf_checks.within_half_precision_noise`), at sizes around every
bucket and above the largest, and every call below its bucket is padded."""

from __future__ import annotations

import pytest
import torch

import pcg_backend
from pcg_backend.buckets import Ladder
from conftest import requires_cuda
from hf_models import FAMILIES, tiny_model
from hf_checks import OPTIONS, sizes_around_buckets, within_half_precision_noise

pytestmark = requires_cuda
LADDER = Ladder(pcg_backend.options.parse_options(OPTIONS).capture_sizes)


@pytest.mark.parametrize("family", FAMILIES)
@torch._dynamo.config.patch(recompile_limit=64)
def test_bf16_logits_stay_within_eager_noise_on_cuda(family):
    pytest.importorskip("mamba_ssm")
    pcg_backend.reset_stats()
    sizes = sizes_around_buckets(LADDER)
    rows = within_half_precision_noise(tiny_model(family, dtype=torch.bfloat16, device="cuda"), sizes, LADDER)
    assert [r["tokens"] for r in rows] == sizes
    below = [n for n in sizes if LADDER.bucket(n) not in (None, n)]
    assert pcg_backend.stats()["padded_calls"] == len(below), pcg_backend.report()
    assert pcg_backend.stats()["cuda_graph_replays"] > 0
