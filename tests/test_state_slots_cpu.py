"""Model state at stable addresses (`state_slots.py`): every new cache gets the slots of the one before it.

On CPU no CUDA graph is captured, but the slots are lent the same way, so the
addresses a decode graph would be captured at are checked here, along with
the exact slot counts and the values against eager (fp32, 1e-4).
"""

from __future__ import annotations

import gc

import pytest
import torch

import pcg_backend
from pcg_backend import state_slots
from pcg_backend.stats import STATS
from conftest import requires_reference_kernels
from hf_models import pcg_twin, tiny_model


def _pool_and_states(*shapes):
    pool = state_slots.StatePool()
    return pool, [torch.randn(*s) for s in shapes]


def test_a_new_lend_after_the_handles_die_gets_the_same_slots():
    pool, states = _pool_and_states((2, 3), (2, 3), (4,))
    handles = pool.lend(states)
    assert all(torch.equal(h, s) for h, s in zip(handles, states))
    first = [h.data_ptr() for h in handles]
    assert len(set(first)) == 3 and STATS.state_slots == 3
    del handles
    gc.collect()
    again = pool.lend([torch.randn(2, 3), torch.randn(2, 3), torch.randn(4)])
    assert [h.data_ptr() for h in again] == first
    assert STATS.state_slots == 3 and pool.lent() == 3


def test_a_live_handle_keeps_its_slot_and_a_view_keeps_the_handle():
    pool, states = _pool_and_states((2, 3), (2, 3))
    handles = pool.lend(states)
    view = handles[1][0]          # a view taken from the cache's state
    kept = handles[0]
    ptrs = [h.data_ptr() for h in handles]
    del handles
    gc.collect()
    assert pool.lent() == 2
    second = pool.lend([torch.zeros(2, 3), torch.zeros(2, 3)])
    assert not {h.data_ptr() for h in second} & set(ptrs)
    assert STATS.state_slots == 4
    assert torch.equal(view, states[1][0]) and torch.equal(kept, states[0])   # never overwritten
    del view, kept
    gc.collect()
    assert pool.lent() == 2


def test_a_dropped_handle_waiting_in_a_reference_cycle_is_collected_before_a_new_slot():
    pool, states = _pool_and_states((2, 3))
    holder = {"state": pool.lend(states)[0]}
    holder["self"] = holder                  # a cycle: only the garbage collector frees it
    ptr = holder["state"].data_ptr()
    gc.disable()
    try:
        del holder
        assert pool.lent() == 1
        again = pool.lend([torch.randn(2, 3)])
    finally:
        gc.enable()
    assert again[0].data_ptr() == ptr and STATS.state_slots == 1


def test_a_collection_that_frees_nothing_is_not_repeated_until_a_slot_comes_back(monkeypatch):
    pool = state_slots.StatePool()
    collections = []
    monkeypatch.setattr(state_slots.gc, "collect", lambda: collections.append(1))
    kept = [pool.lend([torch.randn(2)]) for _ in range(4)]    # the caller keeps every cache
    assert len(collections) == 1 and STATS.state_slots == 4
    del kept[0]                                               # freed by refcount: slot 0 is back
    kept.append(pool.lend([torch.randn(2)]))                  # reuses it, no collection needed
    kept.append(pool.lend([torch.randn(2)]))                  # all lent again: collecting is worth a try
    assert len(collections) == 2 and STATS.state_slots == 5


def test_shapes_and_dtypes_never_share_slots():
    pool = state_slots.StatePool()
    a = pool.lend([torch.ones(2, 3)])
    del a
    gc.collect()
    b = pool.lend([torch.ones(3, 2), torch.ones(2, 3, dtype=torch.float64)])
    assert STATS.state_slots == 3 and [h.shape for h in b] == [(3, 2), (2, 3)]


def _mamba_state_ptrs(cache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers if getattr(layer, "conv_states", {}).get(0) is not None
            for t in (layer.conv_states[0], layer.recurrent_states[0])]


def _compiled(model):
    compiled = pcg_twin(model, {"max_capture_size": 32})
    return compiled


@requires_reference_kernels
@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "zamba2"])
def test_each_new_cache_gets_the_states_of_the_one_before(family):
    model = tiny_model(family)
    compiled = _compiled(model)
    mamba_layers = sum(1 for m in model.modules() if hasattr(m, "A_log"))
    seen = []
    for n in (5, 9, 13, 40):     # padded to the ladder's 8, 16 and 16, then to the overflow bucket 40
        out = compiled(torch.randint(3, 100, (1, n)), use_cache=True)
        seen.append(_mamba_state_ptrs(out.past_key_values))
        del out
        gc.collect()
    assert all(ptrs == seen[0] for ptrs in seen)
    assert len(seen[0]) == STATS.state_slots == 2 * mamba_layers


@requires_reference_kernels
def test_two_live_caches_never_share_state_and_both_decode_like_eager():
    torch.manual_seed(0)
    model = tiny_model("nemotron_h")
    compiled = _compiled(model)
    prompts = [torch.randint(3, 100, (2, n)) for n in (7, 12)]
    step = torch.randint(3, 100, (2, 1))
    with torch.no_grad():
        want = []
        for ids in prompts:
            out = model(ids, use_cache=True)
            want.append(model(step, past_key_values=out.past_key_values, use_cache=True).logits)
        first = compiled(prompts[0], use_cache=True)
        second = compiled(prompts[1], use_cache=True)     # alive beside the first
        a, b = _mamba_state_ptrs(first.past_key_values), _mamba_state_ptrs(second.past_key_values)
        assert not set(a) & set(b)
        assert STATS.state_slots == len(a) + len(b) == 8
        # Interleaved decode steps: each cache advances only its own state.
        got = [compiled(step, past_key_values=c.past_key_values, use_cache=True).logits for c in (first, second)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert "state_slots" in pcg_backend.stats() and "Model state: 8 buffers" in pcg_backend.report()
