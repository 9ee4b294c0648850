"""bf16 on CPU: pcg's prefill and decode logits stay within eager's own noise, for every family.

There is no exact bf16 answer: the bound is eager's own change when its
prompt is padded at the end to the bucket, as pcg pads it
(`hf_checks.within_half_precision_noise`). The sizes
are generated around every bucket (one below, on it, one above) and above the
largest, so that padded and unpadded calls, and each bucket's edge, are all
checked; the padded calls are counted exactly.
"""

from __future__ import annotations

import pytest
import torch

import pcg_backend
from pcg_backend.buckets import Ladder
from conftest import requires_reference_kernels
from hf_checks import OPTIONS, sizes_around_buckets, within_half_precision_noise
from hf_models import FAMILIES, tiny_model

pytestmark = requires_reference_kernels
# The ladder and its overflow buckets: every size pcg pads to.
_OPTS = pcg_backend.options.parse_options(OPTIONS)
LADDER = Ladder(_OPTS.capture_sizes + _OPTS.overflow_sizes)


@pytest.mark.parametrize("family", FAMILIES)
@torch._dynamo.config.patch(recompile_limit=64)
def test_bf16_logits_stay_within_eager_noise(family):
    pcg_backend.reset_stats()
    sizes = sizes_around_buckets(LADDER)
    rows = within_half_precision_noise(tiny_model(family, dtype=torch.bfloat16), sizes, LADDER)
    assert [r["tokens"] for r in rows] == sizes
    below = [n for n in sizes if LADDER.bucket(n) not in (None, n)]
    assert pcg_backend.stats()["padded_calls"] == len(below), pcg_backend.report()
