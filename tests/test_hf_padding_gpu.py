"""HF calls take the padded path on CUDA with mamba-ssm and causal-conv1d, and match eager (fp32).

A GPU subset of `test_hf_padding_cpu.py`: every family, `model(ids,
attention_mask=...)` at lengths that are not buckets, and `generate()` with a
DynamicCache at batch 4 left-padded and with a static cache at batch 1.
Tokens must equal eager's; logits within 1e-3 (fp32; the kernels' and
padded GEMMs' accumulation order).
"""

from __future__ import annotations


import pytest
import torch

import pcg_backend
from pcg_backend import traffic
from conftest import requires_cuda
from hf_models import FAMILIES, pcg_twin, tiny_model

pytestmark = requires_cuda
OPTIONS = {"capture_sizes": [1, 4, 8, 16, 32], "progress": False}
UNPADDED = "cannot be padded"
MODELS = FAMILIES + ["nemotron_h_moe"]
MOE = ("granitemoehybrid", "nemotron_h_moe")


@pytest.mark.parametrize("name", MODELS)
def test_forward_with_mask_is_padded_on_cuda(name):
    pytest.importorskip("mamba_ssm")
    model = tiny_model(name, device="cuda")
    compiled = torch.compile(model, backend="pcg", options=OPTIONS)
    with torch.no_grad():
        for n in [5, 9, 13, 30]:
            ids = torch.randint(3, model.config.vocab_size, (1, n), device="cuda")
            kw = {"attention_mask": torch.ones_like(ids)}
            torch.testing.assert_close(compiled(ids, **kw).logits, model(ids, **kw).logits, atol=1e-3, rtol=0)
    s = pcg_backend.stats()
    assert s["padded_calls"] == 3, pcg_backend.report()
    # fp32 MoE experts run HF's grouped_mm fallback, which reads offsets on the host: those pieces stay eager.
    assert s["cuda_graph_replays"] > 0 or name in MOE, pcg_backend.report()
    assert UNPADDED not in pcg_backend.report()


@pytest.mark.parametrize("batch,cache", [(4, "dynamic"), (1, "static")])
@pytest.mark.parametrize("name", MODELS)
def test_generate_is_padded_on_cuda(name, batch, cache):
    pytest.importorskip("mamba_ssm")
    model = tiny_model(name, device="cuda")
    compiled = pcg_twin(model, OPTIONS)
    with torch.no_grad():
        for n in [5, 9, 13]:
            ids = torch.randint(3, model.config.vocab_size, (batch, n), device="cuda")
            mask = torch.ones_like(ids)
            mask[1:, :3] = 0
            ids[1:, :3] = 0
            kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                      **traffic.cache_kwargs(cache))
            assert torch.equal(compiled.generate(ids, **kw), model.generate(ids, **kw)), (name, n)
    s = pcg_backend.stats()
    assert s["padded_calls"] == 2 and s["cuda_graph_replays"] > 0, pcg_backend.report()
    assert UNPADDED not in pcg_backend.report()
