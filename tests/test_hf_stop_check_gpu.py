"""generate() on a pcg-compiled model reads its stop flag one step late on CUDA: the tokens equal eager's
(fp32, mamba-ssm kernels), including when an EOS stops the loop and the one step too many is undone."""

from __future__ import annotations


import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from hf_models import pcg_twin, tiny_model

pytestmark = requires_cuda


@torch._dynamo.config.patch(recompile_limit=64)
def test_deferred_stop_check_gives_eager_tokens_with_and_without_eos():
    pytest.importorskip("mamba_ssm")
    model = tiny_model("nemotron_h", device="cuda")
    compiled = pcg_twin(model, {"max_capture_size": 32, "progress": False})
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 9), generator=generator).cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                     # the second prompt is left-padded
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    # Routing on before the first generate(): a plain torch.compile turns it on at its first
    # forward, after that generate() has already entered HF's own decoding loop.
    pcg_backend.hf.enable()
    pcg_backend.reset_stats()
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=12, min_new_tokens=12, **kw)
        assert torch.equal(compiled.generate(ids, max_new_tokens=12, min_new_tokens=12, **kw), free)
        # First an EOS only the first row is sure to meet (the loop may run to the end), then one
        # for each row: the loop stops early, reads that one step late, and the step too many
        # leaves no token behind.
        eos = int(free[0, ids.shape[1] + 2])
        row_two = free[1, ids.shape[1]:].tolist()
        eos_two = next((t for t in row_two if t != eos), eos)
        for stop in ([eos], [eos, eos_two]):
            want = model.generate(ids, max_new_tokens=12, eos_token_id=stop, **kw)
            got = compiled.generate(ids, max_new_tokens=12, eos_token_id=stop, **kw)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert want.shape[1] < ids.shape[1] + 12    # both rows met an EOS: the loop stopped early
    assert pcg_backend.stats()["deferred_stop_checks"] == 3, pcg_backend.report()
