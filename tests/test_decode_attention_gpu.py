"""The decode-attention kernels on the GPU, against HF's SDPA path and an fp32 reference (skipped without CUDA).

bf16 noise: the kernel's largest error against the fp32 reference may be at
most twice HF's own (SDPA's memory-efficient kernel after `repeat_kv`), plus
half a bf16 ulp of 1.
"""

import copy
import types

import pytest
import torch

from conftest import requires_cuda
from pcg_backend.ops import decode_attention as da

pytestmark = requires_cuda


def _hf_sdpa(query, key, value, mask, scale):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], is_causal=True,
                                   training=False)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scale)[0]


@pytest.mark.parametrize("batch,heads,kv_heads,keys,dim", [
    (1, 40, 8, 1, 128), (1, 40, 8, 64, 128), (1, 40, 8, 600, 128), (8, 40, 8, 600, 128), (1, 40, 8, 4096, 128),
    (2, 32, 8, 100, 64), (3, 12, 4, 33, 80), (4, 8, 8, 257, 256),
])
@pytest.mark.parametrize("kind", [None, "left-padded", "per-head", "float"])
def test_the_kernel_is_within_bf16_noise_of_hfs_sdpa(batch, heads, kv_heads, keys, dim, kind):
    torch.manual_seed(batch * 7 + keys)
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    # The cache as a view of a longer buffer, as a static cache's first `keys` rows are.
    k = torch.randn(batch, kv_heads, keys + 5, dim, device="cuda", dtype=torch.bfloat16)[:, :, :keys]
    v = torch.randn(batch, kv_heads, keys + 5, dim, device="cuda", dtype=torch.bfloat16)[:, :, :keys]
    mask = None
    if kind == "left-padded":
        mask = torch.ones(batch, 1, 1, keys, device="cuda", dtype=torch.bool)
        for row in range(batch):
            mask[row, ..., : min(row * 5, keys - 1)] = False
    elif kind == "per-head":
        mask = torch.rand(batch, heads, 1, keys, device="cuda") > 0.3
        mask[..., -1] = True
    elif kind == "float":
        mask = torch.where(torch.rand(batch, 1, 1, keys, device="cuda") > 0.3, 0.0,
                           torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
        mask[..., -1] = 0
    assert da.applies(q, k, v, mask)
    scale = dim ** -0.5
    out = torch.full((batch, 1, heads, dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    da.decode_attention(q, k, v, mask, out, scale)
    exact = da.reference(q.float(), k.float(), v.float(), mask, scale).float()
    hf_error = (_hf_sdpa(q, k, v, mask, scale).float() - exact).abs().max().item()
    error = (out.float() - exact).abs().max().item()
    assert error <= 2 * hf_error + 2 ** -9, (error, hf_error)


def test_a_fully_masked_row_gives_zeros():
    q = torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.full((1, 1, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    da.decode_attention(q, k, k, torch.zeros(1, 1, 1, 700, device="cuda", dtype=torch.bool), out, 0.1)
    assert torch.equal(out, torch.zeros_like(out))


def test_a_decode_over_a_dynamic_cache_runs_the_kernel_within_eager_noise():
    """bf16 NemotronH: every decode step's attention layer launches the kernel once; logits stay in eager's noise."""
    from hf_models import tiny_model

    torch._dynamo.reset()
    model = tiny_model("nemotron_h", dtype=torch.bfloat16, device="cuda")
    twin = copy.copy(model)
    twin.forward = torch.compile(model.forward, backend="pcg", options={"progress": False})
    ids = torch.randint(3, 128, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        twin.generate(ids, **kwargs)   # warm-up: compiles and captures
        before = da.LAUNCHES["decode_attention"]
        got = twin.generate(ids, **kwargs)
        ref = model.generate(ids, **kwargs)
        fp32 = copy.deepcopy(model).float()
        exact = fp32.generate(ids, **kwargs)
    torch._dynamo.reset()
    # 1 attention layer, 5 decode steps: the prefill's attention is captured with it, not this kernel.
    assert da.LAUNCHES["decode_attention"] - before == 5
    # Scored on the first decode step's logits (the tokens before it are the same prompt): pcg's error
    # against fp32 within twice eager's, plus a bf16 ulp of the logits' scale.
    step = 1
    exact_logits = exact.logits[step].float()
    eager_error = (ref.logits[step].float() - exact_logits).abs().max().item()
    error = (got.logits[step].float() - exact_logits).abs().max().item()
    scale = exact_logits.abs().max().item()
    assert error <= 2 * eager_error + scale * 2 ** -7, (error, eager_error)
