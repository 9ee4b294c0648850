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
# The ladder and its overflow buckets: every size pcg pads to.
_OPTS = pcg_backend.options.parse_options(OPTIONS)
LADDER = Ladder(_OPTS.capture_sizes + _OPTS.overflow_sizes)


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


@torch._dynamo.config.patch(recompile_limit=64)
def test_bf16_falcon_h1_with_an_odd_vocabulary_on_cuda():
    """The LM head over a vocabulary that is not a multiple of 8 (Falcon-H1's 130049, here 1027) is computed
    transposed (`rewrite/aligned_linear.py`) in the graphs whose buckets exceed the skinny kernel's rows,
    within eager's own bf16 noise on the GPU's kernels."""
    pytest.importorskip("mamba_ssm")
    import transformers as tf
    from hf_models import tiny_config

    torch._dynamo.reset()
    pcg_backend.reset_stats()
    config = tiny_config("falcon_h1")
    config.vocab_size = 1027
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(device="cuda", dtype=torch.bfloat16).eval()
    rows = within_half_precision_noise(model, [3, 16, 17, 70], LADDER, steps=2)
    assert [r["tokens"] for r in rows] == [3, 16, 17, 70]
    assert pcg_backend.stats()["aligned_linears"] >= 1, pcg_backend.report()
    torch._dynamo.reset()
