"""`pcg::moe_experts` and `pcg::moe_router` on CUDA: the Triton kernels against HF's paths and an fp32 reference,
inside a CUDA graph, and in a compiled GraniteMoeHybrid with more experts than the family's tiny config."""

from __future__ import annotations

import pytest
import torch

import pcg_backend
from pcg_backend.buckets import Ladder
from pcg_backend.ops import moe_experts, moe_router
from conftest import requires_cuda
from hf_checks import OPTIONS, half_precision_ulp, sizes_around_buckets, within_half_precision_noise

pytestmark = requires_cuda


def _layer(experts=64, top_k=6, hidden=1536, inter=512, seed=0):
    torch.manual_seed(seed)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden ** 0.5).to(torch.bfloat16)
    down = (torch.randn(experts, hidden, inter, device="cuda") / inter ** 0.5).to(torch.bfloat16)
    return gate_up, down, top_k


def _routing(tokens, experts, top_k):
    ids = torch.rand(tokens, experts, device="cuda").argsort(dim=-1)[:, :top_k]
    weights = torch.softmax(torch.randn(tokens, top_k, device="cuda"), dim=-1).to(torch.bfloat16)
    return ids, weights


def _fp32(x, ids, weights, gate_up, down):
    gate, up = torch.einsum("th,tkoh->tko", x.float(), gate_up[ids].float()).chunk(2, dim=-1)
    y = torch.einsum("tki,tkoi->tko", torch.nn.functional.silu(gate) * up, down[ids].float())
    return (y * weights.float()[..., None]).sum(dim=1)


@pytest.mark.parametrize("tokens", [1, 3, 16, 17, 100, 512])
def test_kernels_match_hf_grouped_mm_within_bf16_rounding(tokens):
    """Granite-4.0-H-Tiny's MoE shape. The kernels round where HF's path rounds, so against the fp32 result
    both are off by the same bf16 noise (ours within 1.5x of HF's), and the two differ by at most two bf16
    steps at the output's magnitude (the order of fp32 sums; on an H200 they gave the same bits)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    gate_up, down, top_k = _layer()
    x = torch.randn(tokens, gate_up.shape[-1], device="cuda", dtype=torch.bfloat16)
    ids, weights = _routing(tokens, gate_up.shape[0], top_k)
    ours = moe_experts.triton_experts(x, ids, weights, gate_up, down)
    theirs = grouped_mm_experts_forward(moe_experts.GatedExperts(gate_up, down), x, ids, weights)
    exact = _fp32(x, ids, weights, gate_up, down)
    assert ours.shape == theirs.shape == x.shape and ours.dtype == torch.bfloat16
    scale = exact.abs().max()
    err_ours = ((ours.float() - exact).abs().max() / scale).item()
    err_hf = ((theirs.float() - exact).abs().max() / scale).item()
    assert err_ours <= 1.5 * err_hf + 1e-3, (err_ours, err_hf)
    assert (ours.float() - theirs.float()).abs().max().item() <= 2 * half_precision_ulp(scale.item(), torch.bfloat16)


def test_the_op_takes_the_kernels_up_to_max_tokens_and_hf_above():
    gate_up, down, top_k = _layer(experts=8, top_k=2, hidden=256, inter=128)
    from transformers.integrations.moe import grouped_mm_experts_forward

    moe_experts.ORIGINAL_EXPERTS.setdefault("grouped_mm", grouped_mm_experts_forward)
    for tokens, path in ((moe_experts.MAX_TOKENS, "triton"), (moe_experts.MAX_TOKENS + 1, "original")):
        before = dict(moe_experts.LAUNCHES)
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
        ids, weights = _routing(tokens, 8, top_k)
        out = torch.ops.pcg.moe_experts(x, ids, weights, gate_up, down, "grouped_mm")
        assert {k: moe_experts.LAUNCHES[k] - before[k] for k in before} == \
            {"triton": int(path == "triton"), "original": int(path == "original")}
        exact = _fp32(x, ids, weights, gate_up, down)
        assert ((out.float() - exact).abs().max() / exact.abs().max()).item() < 2e-2


def test_a_captured_call_replays_new_routing():
    """The counts and pair lists live in the graph's memory and are rebuilt on every replay from the ids."""
    gate_up, down, top_k = _layer(experts=16, top_k=4, hidden=512, inter=256)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    ids, weights = _routing(16, 16, top_k)
    moe_experts.triton_experts(x, ids, weights, gate_up, down)   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts.triton_experts(x, ids, weights, gate_up, down)
    for seed in range(3):
        torch.manual_seed(seed)
        new_ids, new_weights = _routing(16, 16, top_k)
        ids.copy_(new_ids), weights.copy_(new_weights), x.normal_()
        graph.replay()
        torch.testing.assert_close(out, moe_experts.triton_experts(x, ids, weights, gate_up, down), atol=0, rtol=0)


@torch._dynamo.config.patch(recompile_limit=64)
def test_a_granite_with_eight_experts_stays_within_eager_noise():
    """A compiled bf16 GraniteMoeHybrid (8 experts, 3 per token) through pcg::moe_experts in captured,
    padded graphs: logits within eager's own bf16 noise at sizes around every bucket."""
    pytest.importorskip("mamba_ssm")
    import transformers as tf
    from hf_models import tiny_config

    opts = pcg_backend.options.parse_options(OPTIONS)
    ladder = Ladder(opts.capture_sizes + opts.overflow_sizes)   # every size pcg pads to, overflow buckets too
    config = tiny_config("granitemoehybrid")
    config.num_local_experts, config.num_experts_per_tok = 8, 3
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(device="cuda", dtype=torch.bfloat16).eval()
    pcg_backend.reset_stats()
    before = moe_experts.LAUNCHES["triton"]
    sizes = sizes_around_buckets(ladder)
    rows = within_half_precision_noise(model, sizes, ladder)
    assert [r["tokens"] for r in rows] == sizes
    assert moe_experts.LAUNCHES["triton"] > before
    assert "experts via pcg::moe_experts (grouped_mm)" in pcg_backend.report()
    assert pcg_backend.stats()["cuda_graph_replays"] > 0


@pytest.mark.parametrize("experts", [8, 16, 64])
@pytest.mark.parametrize("tokens", [1, 16, 17, 128, 512])
def test_router_kernel_matches_hfs_router(tokens, experts):
    """Granite-4.0-H-Tiny's router width, with 64 experts (split over four programs) and with 8 or 16 (one
    program per token block). The logits within a bf16 step of cuBLAS's; the kernel's own rule on its own
    logits exactly (largest first, the lower id among equal ones) and their softmax within a bf16 step;
    against HF, the same experts wherever HF's k-th and next logit are more than two bf16 steps apart
    (elsewhere the two sums may order a near-tie either way); the arrival counters back at zero."""
    from pcg_backend.ops import skinny_gemm

    top_k = 6
    torch.manual_seed(tokens + experts)
    x = torch.randn(tokens, 1536, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(experts, 1536, device="cuda") / 1536 ** 0.5).to(torch.bfloat16)
    before = dict(moe_router.LAUNCHES)
    logits, weights, ids = torch.ops.pcg.moe_router(x, w, top_k)
    assert moe_router.LAUNCHES["triton"] == before["triton"] + 1
    ref_logits, ref_weights, ref_ids = moe_router.reference(x, w, top_k)
    step = half_precision_ulp(ref_logits.abs().max().item(), torch.bfloat16)
    assert (logits - ref_logits).abs().max().item() <= step
    assert torch.equal(ids, torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k])
    expect = torch.softmax(logits.gather(1, ids), dim=-1).to(torch.bfloat16)
    torch.testing.assert_close(weights.float(), expect.float(), atol=0, rtol=torch.finfo(torch.bfloat16).eps)
    ranked = ref_logits.sort(dim=-1, descending=True).values
    clear = (ranked[:, top_k - 1] - ranked[:, top_k]) > 2 * step
    assert clear.sum() >= tokens // 2
    assert torch.equal(ids[clear].sort(-1).values, ref_ids[clear].sort(-1).values)
    torch.cuda.synchronize()
    assert int(skinny_gemm.arrival_counters(x.device, 1).abs().sum()) == 0
