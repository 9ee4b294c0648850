"""The six HF hybrid families on an H100 with mamba-ssm and causal-conv1d, in bf16 (skipped without CUDA)."""

import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from hf_checks import PREFILL_SIZES, generate_matches, one_token_prefill_matches, prefill_logits
from hf_models import FAMILIES, tiny_config, tiny_model

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
    # 3, 17 and 100 padded (buckets 4, 24, the overflow bucket 120); 200 above the overflow buckets.
    assert (s["padded_calls"], s["overflow_calls"]) == (3, 1), pcg_backend.report()
    assert s["cuda_graphs_captured"] > 0 and s["cuda_graph_replays"] > 0, pcg_backend.report()
    assert "token count above the largest overflow bucket 128" in s["eager_reasons"], pcg_backend.report()
    print(f"{family}: pcg vs eager max |diff| {max(diffs.values()):.4f}, eager run-to-run "
          f"{_eager_run_to_run(model, PREFILL_SIZES):.4f} ({torch.cuda.get_device_name()})")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_fp32_with_kernels(family):
    pytest.importorskip("mamba_ssm")
    model = tiny_model(family, device="cuda")
    generate_matches(model, 4, device="cuda", state_atol=1e-3)
    assert pcg_backend.stats()["cuda_graph_replays"] > 0, pcg_backend.report()


@pytest.mark.parametrize("family", ["nemotron_h", "granitemoehybrid"])
def test_prefill_and_generate_under_inference_mode_with_kernels(family):
    """Inference tensors through captured pieces, state slots and the split ops between pieces (fp32)."""
    pytest.importorskip("mamba_ssm")
    model = tiny_model(family, device="cuda")
    with torch.inference_mode():
        prefill_logits(model, [1, 17, 100], atol=1e-3, device="cuda")
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


def test_skinny_linear_in_hf_nemotron_h_prefill_and_decode_matches_eager():
    # A vocab of 4096 makes lm_head the one linear wide enough for pcg::skinny_linear
    # (every other weight of the tiny model has at most 64 output columns).
    pytest.importorskip("mamba_ssm")
    import transformers as tf

    config = tiny_config("nemotron_h")
    config.vocab_size = 4096
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(device="cuda", dtype=torch.bfloat16).eval()
    # 1 is Dynamo's static one-token graph (lm_head routed in place); 3 compiles the padded graph,
    # whose twin is captured at buckets 2, 4, 8 and 16 and replayed for 3; 17 and 64 replay the
    # unrouted piece, as does 100 in the overflow bucket 120; 200 is above the overflow buckets (128).
    prefill_logits(model, PREFILL_SIZES, atol=0.05, device="cuda")
    s = pcg_backend.stats()
    assert (s["skinny_linears"], s["skinny_linears_small_buckets"], s["twin_captures"]) == (1, 1, 4), \
        pcg_backend.report()
    # A decode step after a prefill: a static graph of one row, lm_head routed in place.
    compiled = torch.compile(model, backend="pcg")
    ids = torch.randint(3, 4096, (1, 5), device="cuda")
    step = torch.randint(3, 4096, (1, 1), device="cuda")
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        got = compiled(ids, use_cache=True)
        torch.testing.assert_close(got.logits, ref.logits, atol=0.05, rtol=0)
        for _ in range(3):
            ref = model(step, past_key_values=ref.past_key_values, use_cache=True)
            got = compiled(step, past_key_values=got.past_key_values, use_cache=True)
            torch.testing.assert_close(got.logits, ref.logits, atol=0.05, rtol=0)
    # This compile (default ladder, 2..512) adds a padded graph whose twin is captured at
    # buckets 2, 4, 8 and 16, and two static decode graphs (the first step, then one with the
    # cache length symbolic), each with lm_head routed in place.
    s = pcg_backend.stats()
    assert (s["skinny_linears"], s["skinny_linears_small_buckets"], s["twin_captures"]) == (3, 2, 8), \
        pcg_backend.report()
