"""Shared checks of pcg against eager on HF hybrid models, used by the CPU and GPU test files."""

from __future__ import annotations

import copy

import torch

import pcg_backend

PREFILL_SIZES = [1, 3, 17, 64, 200]   # 200 is above the largest bucket (64) used here
OPTIONS = {"max_capture_size": 64}


def prefill_logits(model, sizes, atol, device="cpu", seed=0):
    """Compile `model` and compare prefill logits with eager at each size; returns the max differences."""
    compiled = torch.compile(model, backend="pcg", options=OPTIONS)
    g = torch.Generator().manual_seed(seed)
    diffs = {}
    with torch.no_grad():
        for n in sizes:
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).to(device)
            ref = model(ids).logits
            got = compiled(ids).logits
            assert got.shape == ref.shape
            diffs[n] = (got.float() - ref.float()).abs().max().item()
            torch.testing.assert_close(got, ref, atol=atol, rtol=0, msg=f"prefill of {n} tokens")
    return diffs


def _states(cache):
    out = []
    for layer in cache.layers:
        for attr in ("conv_states", "recurrent_states"):
            d = getattr(layer, attr, None)
            if isinstance(d, dict) and d.get(0) is not None:
                out.append(d[0])
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor) and t.numel():
                out.append(t)
    return out


def generate_matches(model, batch, cache_implementation=None, new_tokens=32, device="cpu", state_atol=1e-4):
    """Greedy generate with pcg equals eager (tokens exactly; cache states within `state_atol`)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, 9), generator=g).to(device)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1:, :3] = 0  # left padding
        ids[1:, :3] = 0
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)
        compiled = copy.copy(model)  # shares the weights; only `forward` differs
        compiled.forward = torch.compile(model.forward, backend="pcg", options=OPTIONS)
        got = compiled.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, ref.sequences), (got.sequences, ref.sequences)
    ref_states, got_states = _states(ref.past_key_values), _states(got.past_key_values)
    assert len(ref_states) == len(got_states) and ref_states
    for r, s in zip(ref_states, got_states):
        torch.testing.assert_close(s.float(), r.float(), atol=state_atol, rtol=0)
    assert pcg_backend.stats()["split_op_nodes"] > 0
