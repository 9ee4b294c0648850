"""generate() traffic on CPU: after the warm-up, no Dynamo graph is compiled, and tokens equal eager's (fp32).

The calls mix prompt lengths (1 to twice the largest bucket) and batch sizes
1, 4 and 8 with left padding, each with a new cache, as `bench --traffic` does
on the GPU. On CPU no CUDA graph is captured, so only compiles are asserted.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pcg_backend
from pcg_backend import traffic
from conftest import requires_reference_kernels
from hf_models import pcg_twin, tiny_model

pytestmark = requires_reference_kernels


@pytest.mark.parametrize("family", ["nemotron_h", "bamba"])
# Three batch sizes give Dynamo more graphs per frame than its default limit of 8, past which it
# would run new shapes with no backend at all (the benchmark raises the limit the same way).
@torch._dynamo.config.patch(recompile_limit=64)    # monkeypatch would delete the config key on undo
def test_traffic_compiles_nothing_after_warm_up_and_matches_eager(family):
    model = tiny_model(family)
    calls = traffic.plan(0, 24, 32, [1, 4, 8])
    eager = traffic.run(model, calls, 4, largest=32)
    compiled = pcg_twin(model, {"max_capture_size": 32})
    got = traffic.run(compiled, calls, 4, largest=32)
    assert got["compiles_after_warm_up"] == 0, pcg_backend.report()
    assert got["captures_after_warm_up"] == 0          # CPU: CUDA graphs are off
    # Eager has nothing to compile, so its first warm-up round is its last; pcg's first round
    # compiles, and the warm-up ends with a round that compiled nothing.
    assert eager["warm_up_passes"] == 1 and 2 <= got["warm_up_passes"] <= traffic.MAX_WARM_UP_PASSES
    assert all(torch.equal(a, b) for a, b in zip(got["sequences"], eager["sequences"]))
    padded = sum(1 for c in calls if c.prompt <= 32 and c.prompt not in (1, 2, 4) and c.prompt % 8)
    assert pcg_backend.stats()["padded_calls"] >= padded   # the timed calls' prefills, plus the warm-up's
    assert "cannot be padded" not in pcg_backend.report()


@torch._dynamo.config.patch(recompile_limit=64)
def test_static_cache_traffic_compiles_nothing_after_warm_up_and_matches_eager():
    model = tiny_model("nemotron_h")
    calls = traffic.plan(1, 16, 32, [1, 4])
    eager = traffic.run(model, calls, 4, cache="static", largest=32)
    compiled = pcg_twin(model, {"max_capture_size": 32})
    got = traffic.run(compiled, calls, 4, cache="static", largest=32)
    assert got["compiles_after_warm_up"] == 0, pcg_backend.report()
    assert all(torch.equal(a, b) for a, b in zip(got["sequences"], eager["sequences"]))
    s = pcg_backend.stats()
    assert s["pieces"] == s["capturable_pieces"] == s["graphs_compiled"], pcg_backend.report()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch._dynamo.config.patch(recompile_limit=64)
def test_the_issue_plan_100_calls_at_batch_1_to_8_compile_nothing_after_warm_up(cache):
    model = tiny_model("nemotron_h")
    calls = traffic.plan(7, 100, 32, list(range(1, 9)))
    assert {c.batch for c in calls} == set(range(1, 9)) and max(c.prompt for c in calls) > 32
    compiled = pcg_twin(model, {"max_capture_size": 32})
    got = traffic.run(compiled, calls, 3, cache=cache, largest=32)
    assert got["compiles_after_warm_up"] == 0, pcg_backend.report()
    eager = traffic.run(model, calls[:12], 3, cache=cache, largest=32)
    assert all(torch.equal(a, b) for a, b in zip(got["sequences"][:12], eager["sequences"]))
    assert pcg_backend.stats()["state_slots"] > 0


def test_cache_kinds_are_checked():
    assert traffic.cache_kwargs("static") == {"cache_implementation": "static", "disable_compile": True}
    assert traffic.cache_kwargs("dynamic") == {}
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        traffic.cache_kwargs("paged")


def test_ideal_times_each_bucket_and_batch_once_through_generate():
    model = tiny_model("bamba")
    calls = [traffic.Call(1, 3), traffic.Call(1, 4), traffic.Call(2, 9), traffic.Call(1, 40)]
    result = traffic.ideal(model, calls, 4, pcg_backend.buckets.Ladder((4, 8, 16, 32)), repeats=1)
    assert sorted(result["decode_step_ms"]) == [1, 2]
    per_call = result["per_call_s"]
    assert len(per_call) == 4 and per_call[0] == per_call[1] > 0     # prompts 3 and 4 share the bucket 4
    assert result["p50_s"] == sorted(per_call)[1] / 2 + sorted(per_call)[2] / 2
    # Calls of one new token have no decode step to time.
    assert traffic.ideal(model, calls[:1], 1, pcg_backend.buckets.Ladder((4, 8)), repeats=1)["decode_step_ms"] == {1: 0.0}


@pytest.mark.parametrize("family", ["nemotron_h", "bamba"])
def test_reference_calls_are_the_timed_calls_made_on_another_model(family):
    model = tiny_model(family)
    calls = [traffic.Call(1, 3), traffic.Call(2, 8), traffic.Call(4, 11), traffic.Call(1, 40), traffic.Call(2, 1)]
    timed = traffic.run(model, calls, 3, largest=32)["sequences"]
    reference = traffic.reference_sequences(copy.deepcopy(model).double(), calls, 3)
    # The same prompts (the plan's seed) and, in fp32 against fp64 on a tiny model, the same tokens.
    assert [r.shape for r in reference] == [s.shape for s in timed]
    assert all(torch.equal(r[:, :-3], s[:, :-3]) for r, s in zip(reference, timed))
    assert traffic.agreement(timed, reference, 3) == {"same_calls_share": 1.0, "leading_equal_tokens": 3.0,
                                                      "new_tokens": 3, "calls": 5}


def test_agreement_counts_whole_calls_and_each_rows_equal_tokens_before_the_first_difference():
    reference = [torch.tensor([[9, 1, 2, 3]]), torch.tensor([[9, 4, 5, 6], [9, 7, 8, 9]])]
    ours = [torch.tensor([[9, 1, 2, 3]]), torch.tensor([[9, 4, 0, 6], [9, 0, 8, 9]])]
    a = traffic.agreement(ours, reference, 3)
    # Rows: 3 equal, 1 (then a difference; the later equal token is not counted), 0.
    assert a == {"same_calls_share": 0.5, "leading_equal_tokens": 4 / 3, "new_tokens": 3, "calls": 2}
    with pytest.raises(ValueError, match="2 calls against 1 reference calls"):
        traffic.agreement(ours, reference[:1], 3)
    with pytest.raises(ValueError, match="0 calls against 0 reference calls"):
        traffic.agreement([], [], 3)
    with pytest.raises(ValueError, match="new_tokens must be at least 1"):
        traffic.agreement(ours, reference, 0)


def test_table_states_tokens_against_eager_and_the_noise():
    row = {"p50_s": 0.1, "p90_s": 0.1, "max_s": 0.1, "ttft_p50_s": 0.01, "tokens_per_s": 1.0,
           "captures_after_warm_up": 0, "compiles_after_warm_up": 0, "allocated_before_mib": 0,
           "allocated_after_mib": 0}
    fp32 = {"same_calls_share": 0.5, "leading_equal_tokens": 9.25, "new_tokens": 16, "calls": 40}
    results = {"eager": {**row, "against_fp32": fp32},
               "pcg-inductor": {**row, "same_tokens_as_eager": 0.45, "against_fp32": {**fp32, "same_calls_share": 0.4}}}
    lines = traffic.table(results, None).splitlines()
    assert lines[-3:] == [
        "same tokens as eager: pcg-inductor in 45% of calls",
        "against an fp32 copy: eager keeps all its new tokens in 50% of 40 calls, 9.2 of 16 before the first "
        "difference (mean over rows)",
        "against an fp32 copy: pcg-inductor keeps all its new tokens in 40% of 40 calls, 9.2 of 16 before the "
        "first difference (mean over rows)"]
