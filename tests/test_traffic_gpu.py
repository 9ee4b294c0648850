"""generate() traffic on CUDA: after the warm-up, no CUDA graph is captured, no Dynamo graph compiled,
allocated memory stays flat, and tokens equal eager's (fp32, mamba-ssm kernels).

Each call makes a new cache; the decode graphs captured in the warm-up
replay because every cache gets the state slots of the one before it
(`state_slots.py`). Also with `cache_implementation="static"`, whose KV rows
are allocated inside the first forward too.
"""

from __future__ import annotations


import pytest
import torch

import pcg_backend
from pcg_backend import traffic
from conftest import requires_cuda
from hf_models import pcg_twin, tiny_model

pytestmark = requires_cuda


@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "falcon_h1", "zamba2"])
@torch._dynamo.config.patch(recompile_limit=64)
def test_traffic_captures_and_compiles_nothing_after_warm_up(family):
    pytest.importorskip("mamba_ssm")
    model = tiny_model(family, device="cuda")
    calls = traffic.plan(0, 24, 32, [1, 4, 8])
    eager = traffic.run(model, calls, 4, largest=32)
    compiled = pcg_twin(model, {"max_capture_size": 32, "progress": False})
    got = traffic.run(compiled, calls, 4, largest=32)
    s = pcg_backend.stats()
    assert got["captures_after_warm_up"] == 0, pcg_backend.report()
    assert got["compiles_after_warm_up"] == 0, pcg_backend.report()
    assert s["new_address_captures"] == 0, pcg_backend.report()
    assert got["allocated_after_mib"] == got["allocated_before_mib"]
    assert s["cuda_graph_replays"] > 0
    same = [torch.equal(a, b) for a, b in zip(got["sequences"], eager["sequences"])]
    assert all(same), f"{sum(same)}/{len(same)} calls equal eager\n{pcg_backend.report()}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch._dynamo.config.patch(recompile_limit=64)
def test_the_issue_plan_100_calls_at_batch_1_to_8_capture_nothing_after_warm_up(cache):
    pytest.importorskip("mamba_ssm")
    model = tiny_model("nemotron_h", device="cuda")
    calls = traffic.plan(7, 100, 32, list(range(1, 9)))
    compiled = pcg_twin(model, {"max_capture_size": 32, "progress": False})
    got = traffic.run(compiled, calls, 3, cache=cache, largest=32)
    assert (got["captures_after_warm_up"], got["compiles_after_warm_up"]) == (0, 0), pcg_backend.report()
    assert got["allocated_after_mib"] == got["allocated_before_mib"]
    assert pcg_backend.stats()["new_address_captures"] == 0, pcg_backend.report()


@torch._dynamo.config.patch(recompile_limit=64)
def test_static_cache_traffic_replays_too():
    pytest.importorskip("mamba_ssm")
    model = tiny_model("nemotron_h", device="cuda")
    compiled = pcg_twin(model, {"max_capture_size": 32, "progress": False})
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, **traffic.cache_kwargs("static"))
    with torch.no_grad():
        # Warm-up: the longest call first (HF reuses a static cache only while it is long enough;
        # a longer call builds a bigger one, with new shapes), then a shorter one (Dynamo's
        # dynamic graph after its static first).
        for n in (30, 3):
            compiled.generate(torch.randint(3, 100, (1, n), device="cuda"), **kw)
        captured = pcg_backend.stats()["cuda_graphs_captured"]
        for n in (5, 9, 17, 30):
            ids = torch.randint(3, 100, (1, n), device="cuda")
            torch.testing.assert_close(compiled.generate(ids, **kw), model.generate(ids, **kw), atol=0, rtol=0)
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] == captured, pcg_backend.report()
    assert s["new_address_captures"] == 0, pcg_backend.report()
