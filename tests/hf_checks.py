"""Shared checks of pcg against eager on HF hybrid models, used by the CPU and GPU test files."""

from __future__ import annotations

import inspect
import math

import torch

import pcg_backend
from hf_models import pcg_twin

# 100 pads to the overflow bucket 120 above the largest bucket (64) used here; 200 is above those (128).
PREFILL_SIZES = [1, 3, 17, 64, 100, 200]
OPTIONS = {"max_capture_size": 64, "max_overflow_size": 128}


def left_padded_prompt(model, batch: int, n: int, pad: int, seed: int):
    """(input_ids, attention_mask) on the model's device: every row but the first starts with `pad` pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    ids[1:, :pad] = 0
    return ids.to(model.device), mask.to(model.device)


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


def output_cache(out):
    """The cache a forward returned: `cache` (transformers 5.20+), `past_key_values`, or Mamba2's `cache_params`."""
    return next(out[k] for k in ("cache", "past_key_values", "cache_params") if out.get(k) is not None)


def cache_argument(model) -> str:
    """The name `model.forward` takes its cache by: `cache` (transformers 5.20+), else `past_key_values`,
    or Mamba2's `cache_params`."""
    parameters = inspect.signature(model.forward).parameters
    return next(name for name in ("cache", "past_key_values", "cache_params") if name in parameters)


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
        # disable_compile: with a static cache on CUDA, HF would compile the reference's decode itself.
        kw.update(cache_implementation=cache_implementation, disable_compile=True)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, **kw)
        compiled = pcg_twin(model, OPTIONS)
        got = compiled.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got.sequences, ref.sequences), (got.sequences, ref.sequences)
    ref_states, got_states = _states(ref.past_key_values), _states(got.past_key_values)
    assert len(ref_states) == len(got_states) and ref_states
    for r, s in zip(ref_states, got_states):
        torch.testing.assert_close(s.float(), r.float(), atol=state_atol, rtol=0)
    assert pcg_backend.stats()["split_op_nodes"] > 0


def one_token_prefill_matches(model, monkeypatch, atol, device="cpu"):
    """A fresh one-token prefill runs each Mamba2 core as one step from zeroed states.

    It must call the step kernel once per Mamba layer and the chunked scan
    never, and its logits, every cache state and the next decode step's
    logits must equal eager's within `atol`.
    """
    import sys

    from pcg_backend.ops import state_update

    mixers = [m for m in model.modules() if hasattr(m, "A_log")]
    kernels = sys.modules[type(mixers[0]).__module__]
    calls = {"mamba2_chunk_scan": 0, "mamba2_selective_state_update": 0}
    compiled = torch.compile(model, backend="pcg", options=OPTIONS)
    g = torch.Generator().manual_seed(1)
    ids, step = (torch.randint(3, model.config.vocab_size, (1, 1), generator=g).to(device) for _ in range(2))
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        for name in calls:
            real = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k:
                                calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **k))
        # On CUDA with mamba-ssm the op launches the step kernel itself, into its output
        # (ops/state_update.py); a launch it declines falls back to the function above.
        launch = state_update.step_into

        def counted_launch(*a, **k):
            launched = launch(*a, **k)
            calls["mamba2_selective_state_update"] += launched
            return launched

        monkeypatch.setattr(state_update, "step_into", counted_launch)
        got = compiled(ids, use_cache=True)
        monkeypatch.undo()
        torch.testing.assert_close(got.logits, ref.logits, atol=atol, rtol=0)
        for r, s in zip(_states(ref.past_key_values), _states(got.past_key_values), strict=True):
            torch.testing.assert_close(s.float(), r.float(), atol=atol, rtol=0)
        ref2 = model(step, past_key_values=ref.past_key_values, use_cache=True)
        got2 = compiled(step, past_key_values=got.past_key_values, use_cache=True)
        torch.testing.assert_close(got2.logits, ref2.logits, atol=atol, rtol=0)
    # On CUDA the first call of the one-token graph runs each captured core three
    # times: the warm-up, the host-sync probe, and the capture itself.
    runs = 1 if device == "cpu" else 3
    assert calls == {"mamba2_chunk_scan": 0, "mamba2_selective_state_update": runs * len(mixers)}


def sizes_around_buckets(ladder) -> list[int]:
    """Token counts one below, on and one above every bucket (2 tokens or more), and one above the largest."""
    around = {s + d for s in ladder.sizes for d in (-1, 0, 1) if s + d >= 2}
    return sorted(around | {ladder.largest + 7})


def half_precision_ulp(magnitude: float, dtype: torch.dtype) -> float:
    """The spacing of `dtype` numbers at `magnitude`: one rounding's worth of error there."""
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(magnitude, torch.finfo(dtype).tiny)))


def within_half_precision_noise(model, sizes, ladder, steps: int = 4, seed: int = 0) -> list[dict]:
    """pcg's half-precision logits against eager's, bounded by eager's own noise; one row per size.

    Half precision has no exact answer to compare with: padding changes the
    GEMM shapes, and with them the rounding. The reference noise is eager's
    own change at pcg's shapes: its prompt padded at the end to the bucket,
    as pcg pads it, where no real position can see the padding (causal
    attention and scans). The bound is that noise doubled, and never below
    two roundings of the largest logit. It holds for the prefill's logits at
    every position and for `steps` decode steps after it, fed eager's greedy
    tokens on both sides so that they stay comparable however near a tie a
    step comes.
    """
    compiled = pcg_twin(model, OPTIONS)
    g = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for n in sizes:
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).to(model.device)
            ref = model(ids, use_cache=True)
            got = compiled(ids, use_cache=True)
            bucket = ladder.bucket(n) or n
            padded = model(torch.cat([ids, ids.new_zeros(1, bucket - n)], dim=1)).logits[:, :n]
            noise = (padded.float() - ref.logits.float()).abs().max().item()
            scale = ref.logits.float().abs().max().item()
            bound = max(2 * noise, 2 * half_precision_ulp(scale, model.dtype))
            prefill = (got.logits.float() - ref.logits.float()).abs().max().item()
            decode = 0.0
            ref_cache, got_cache = output_cache(ref), output_cache(got)
            token = ref.logits[:, -1:].argmax(-1)
            arg = cache_argument(model)
            for _ in range(steps):
                ref_step = model(token, use_cache=True, **{arg: ref_cache})
                got_step = compiled(token, use_cache=True, **{arg: got_cache})
                ref_cache, got_cache = output_cache(ref_step), output_cache(got_step)
                decode = max(decode, (got_step.logits.float() - ref_step.logits.float()).abs().max().item())
                token = ref_step.logits[:, -1:].argmax(-1)
            rows.append({"tokens": n, "noise": noise, "bound": bound, "prefill": prefill, "decode": decode})
    worst = [r for r in rows if max(r["prefill"], r["decode"]) > r["bound"]]
    assert not worst, f"beyond eager's own half-precision noise: {worst}\n{pcg_backend.report()}"
    return rows
