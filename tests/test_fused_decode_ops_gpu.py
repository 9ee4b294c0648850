"""The decode step's fewer kernels on CUDA: the gated-norm kernel, the relu2 epilogue, and a NemotronH decode with both."""

import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from hf_checks import within_half_precision_noise
from pcg_backend.buckets import Ladder
from pcg_backend.ops import gated_norm, skinny_gemm
from pcg_backend.rewrite import skinny_routing

pytestmark = requires_cuda


@pytest.mark.parametrize("rows, width, group", [(1, 10240, 1280), (8, 8192, 8192), (24, 7168, 3584), (3, 120, 40)])
def test_gated_rms_norm_kernel_rounds_as_hf(rows, width, group):
    torch.manual_seed(rows)
    y = torch.randn(rows, 1, width, device="cuda", dtype=torch.bfloat16)
    # The gate as the adapter passes it: a view of the in-projection, between other columns.
    z = torch.randn(rows, 1, width + 40, device="cuda", dtype=torch.bfloat16)[..., 16:16 + width]
    w = torch.rand(width, device="cuda", dtype=torch.bfloat16) + 0.5
    before = dict(gated_norm.LAUNCHES)
    got = torch.ops.pcg.gated_rms_norm(y, z, w, 1e-5, group)
    assert gated_norm.LAUNCHES["norm_kernel"] - before["norm_kernel"] == 1
    ref = gated_norm.reference(y, z, w, 1e-5, group)
    # The same roundings; only the sum of squares adds in another order: a bf16 step at most.
    torch.testing.assert_close(got, ref, atol=0, rtol=2 ** -7)


@pytest.mark.parametrize("split", [1, 2])
def test_relu2_epilogue_equals_relu_and_square_of_the_kernels_output(split):
    torch.manual_seed(split)
    x = torch.randn(8, 4480, device="cuda", dtype=torch.bfloat16)
    x[3, 7] = float("nan")    # a NaN row stays NaN through the relu, as in torch
    w = torch.randn(3072, 4480, device="cuda", dtype=torch.bfloat16) / 67
    tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4, "SPLIT_K": split}
    plain = skinny_gemm.triton_linear(x, w, tile=tile)
    fused = skinny_gemm.triton_linear(x, w, tile=tile, activation="relu2")
    torch.testing.assert_close(fused, torch.square(torch.relu(plain)), atol=0, rtol=0, equal_nan=True)
    assert fused[3].isnan().all() and not fused[:3].isnan().any()


@torch._dynamo.config.patch(recompile_limit=64)
def test_a_nemotron_decode_runs_the_norm_kernel_and_relu2_epilogue_within_eager_noise():
    # Wide enough for the skinny GEMM (out_proj and up_proj of at least 512 columns), small enough to build fast.
    pytest.importorskip("mamba_ssm")
    import transformers as tf

    torch.manual_seed(0)
    config = tf.NemotronHConfig(
        vocab_size=256, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, mamba_num_heads=16, mamba_head_dim=32, n_groups=2, ssm_state_size=64, conv_kernel=4,
        chunk_size=64, mlp_hidden_act="relu2", layers_block_type=["mamba", "mlp", "attention", "mamba"],
        num_hidden_layers=4, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
    pcg_backend.reset_stats()
    before_norm, before_skinny = dict(gated_norm.LAUNCHES), dict(skinny_gemm.LAUNCHES)
    before_fusions = dict(skinny_routing.FUSIONS)
    rows = within_half_precision_noise(model, [5], Ladder(pcg_backend.options.parse_options({"max_capture_size": 64})
                                                           .capture_sizes), steps=4)
    assert rows and rows[0]["decode"] <= rows[0]["bound"]
    launches = {k: v - before_norm[k] for k, v in gated_norm.LAUNCHES.items()}
    fusions = {k: v - before_fusions[k] for k, v in skinny_routing.FUSIONS.items()}
    # Two decode graphs are compiled (the first step's, then one dynamic in the KV length); each
    # captures its Mamba2 norms once after a warm-up and a sync probe: 2 graphs x 2 layers x 3 launches.
    assert launches == {"norm_kernel": 12, "reference": 0}, pcg_backend.report()
    # relu2 moves into up_proj in both decode graphs and in the 8-token bucket's routed twin.
    assert fusions == {"relu2": 3}
    assert skinny_gemm.LAUNCHES["triton"] > before_skinny["triton"]
