"""The padding rule's generated models on CUDA, with CUDA graphs: rewrites replay right at every count.

The same chains as `test_padding_rule_cpu.py`, run with both piece compilers.
A paddable chain must replay captured graphs for its padded calls (the row
picks and count values read the device count inside them), and every output
must equal eager (fp32, atol 1e-4: GEMMs at bucket shapes round differently).
"""

from __future__ import annotations

import random

import pytest
import torch

import pcg_backend
from pcg_backend import runtime
from conftest import requires_cuda
from test_padding_rule_cpu import (CHAIN_OPTIONS, COUNTS, H, PADDED_CALLS, _Chain, _chain, _expect_paddable,
                                   _nan_pad)

pytestmark = requires_cuda


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("seed", range(12))
def test_generated_chain_on_cuda_graphs(seed, compiler, monkeypatch):
    rng = random.Random(1000 + seed)
    names = _chain(rng, rng.randint(1, 4), unsafe=seed % 4 == 0)
    torch.manual_seed(0)
    model = _Chain(names).cuda()
    compiled = torch.compile(model, backend="pcg", dynamic=True,
                             options={**CHAIN_OPTIONS, "compiler": compiler, "progress": False})
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    with torch.no_grad():
        for n in COUNTS:
            x = torch.randn(n, H, device="cuda")
            got, ref = compiled(x), model(x)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"{names} at {n} tokens")
    s = pcg_backend.stats()
    if _expect_paddable(names):
        assert s["padded_calls"] == PADDED_CALLS, (names, pcg_backend.report())
        assert s["cuda_graph_replays"] > 0
    else:
        assert s["padded_calls"] == 0, names
