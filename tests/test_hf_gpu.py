"""The six HF hybrid families on an H100 with mamba-ssm and causal-conv1d, in bf16 (skipped without CUDA)."""

import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from hf_checks import PREFILL_SIZES, generate_matches, one_token_prefill_matches, prefill_logits
from hf_models import FAMILIES, tiny_model

pytestmark = requires_cuda


def _eager_run_to_run(model, sizes):
    """Eager's own run-to-run variation in bf16 on this GPU (same inputs, two runs)."""
    worst = 0.0
    with torch.no_grad():
        for n in sizes:
            ids = torch.randint(3, model.config.vocab_size, (1, n), device="cuda")
            worst = max(worst, (model(ids).logits.float() - model(ids).logits.float()).abs().max().item())
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_bf16_matches_eager_with_kernels(family):
    pytest.importorskip("mamba_ssm")
    model = tiny_model(family, dtype=torch.bfloat16, device="cuda")
    # bf16 logits are O(1); padding changes GEMM shapes, hence accumulation order, by a few bf16 ulps.
    diffs = prefill_logits(model, PREFILL_SIZES, atol=0.05, device="cuda")
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] > 0 and s["cuda_graph_replays"] >= 0
    print(f"{family}: pcg vs eager max |diff| {max(diffs.values()):.4f}, eager run-to-run "
          f"{_eager_run_to_run(model, PREFILL_SIZES):.4f} ({torch.cuda.get_device_name()})")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_fp32_with_kernels(family):
    pytest.importorskip("mamba_ssm")
    model = tiny_model(family, device="cuda")
    generate_matches(model, 4, device="cuda", state_atol=1e-3)
    assert pcg_backend.stats()["cuda_graph_replays"] > 0, pcg_backend.report()


def test_generate_static_cache_gpu():
    model = tiny_model("nemotron_h", device="cuda")
    generate_matches(model, 4, cache_implementation="static", device="cuda", state_atol=1e-3)


@pytest.mark.parametrize("family", ["nemotron_h", "bamba"])
def test_one_token_prefill_step_kernels_fp32(family, monkeypatch):
    # The mamba-ssm step kernel from zeroed states against the chunked scan's
    # prefill, in fp32 (NemotronH clamps dt at 0.001, Bamba does not).
    pytest.importorskip("mamba_ssm")
    one_token_prefill_matches(tiny_model(family, device="cuda"), monkeypatch, 1e-3, device="cuda")
