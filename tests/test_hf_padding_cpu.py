"""Every HF call takes the padded path: plain forwards and generate(), for every hybrid family.

For each family (NemotronH dense and with MoE layers, Bamba, FalconH1,
GraniteMoeHybrid, Zamba2, Mamba2) a prefill whose length is not a bucket must
run padded, never at exact sizes for want of a sound padding rule, and must
equal eager (fp32 on CPU, atol 1e-4). Padding is poisoned with NaN, so a real
row, logit or cache state that read a padded row would show it.

The calls: `model(input_ids)` with and without `use_cache`, with an
`attention_mask`; `generate()` with a DynamicCache and with
`cache_implementation="static"`, at batch 1 and at batch 4 left-padded.
"""

from __future__ import annotations


import pytest
import torch

import pcg_backend
from pcg_backend import runtime, traffic
from conftest import requires_reference_kernels
from hf_checks import _states, left_padded_prompt, output_cache
from hf_models import FAMILIES, pcg_twin, tiny_model
from test_reliability import _nan_pad

pytestmark = requires_reference_kernels
ATOL = 1e-4
OPTIONS = {"max_capture_size": 64}      # buckets 1, 2, 4, 8, 16, 24, 32, ..., 64
LENGTHS = [5, 9, 13, 30]                # none is a bucket; the first call compiles Dynamo's static graph
UNPADDED = "cannot be padded"
MODELS = FAMILIES + ["nemotron_h_moe"]


def _padded_path_only():
    s = pcg_backend.stats()
    assert not any(UNPADDED in r for r in s["eager_reasons"]), pcg_backend.report()
    assert UNPADDED not in pcg_backend.report()
    return s


@pytest.mark.parametrize("call", ["plain", "no_cache", "use_cache", "mask"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_is_padded_and_matches_eager(name, call, monkeypatch):
    model = tiny_model(name)
    compiled = torch.compile(model, backend="pcg", options=OPTIONS)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in LENGTHS:
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
            kw = {"plain": {}, "no_cache": {"use_cache": False}, "use_cache": {"use_cache": True},
                  "mask": {"attention_mask": torch.ones_like(ids)}}[call]
            ref, got = model(ids, **kw), compiled(ids, **kw)
            torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=0, msg=f"{name} {call} {n}")
            if call == "use_cache":
                for r, s in zip(_states(output_cache(ref)), _states(output_cache(got)), strict=True):
                    torch.testing.assert_close(s, r, atol=ATOL, rtol=0)
    assert _padded_path_only()["padded_calls"] == len(LENGTHS) - 1


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_generate_is_padded_and_matches_eager(name, batch, cache, monkeypatch):
    model = tiny_model(name)
    compiled = pcg_twin(model, OPTIONS)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    with torch.no_grad():
        for n in LENGTHS[:3]:
            ids, mask = left_padded_prompt(model, batch, n, pad=3, seed=n)
            kw = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True, **traffic.cache_kwargs(cache))
            ref, got = model.generate(ids, **kw), compiled.generate(ids, **kw)
            assert torch.equal(got.sequences, ref.sequences), (name, batch, cache, n)
            for r, s in zip(_states(ref.past_key_values), _states(got.past_key_values), strict=True):
                torch.testing.assert_close(s, r, atol=ATOL, rtol=0)
    # The prefills of 9 and 13 tokens ran padded (to 16); Dynamo compiled its static graph for 5.
    assert _padded_path_only()["padded_calls"] == 2


def _mask_4d(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """A causal 4-D mask of `kind` ("float": additive, 0 = attend; "bool": True = attend), some keys dropped."""
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    keep[:, : int(torch.randint(0, max(1, n // 3), (1,), generator=g))] = False   # left padding
    keep |= torch.eye(n, dtype=torch.bool)                                        # every row keeps itself
    if kind == "bool":
        return keep[None, None]
    return torch.zeros(n, n).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["nemotron_h", "bamba"])
def test_a_4d_mask_given_to_forward_never_lets_real_rows_attend_padded_keys(name, use_cache, impl, monkeypatch):
    """The mask is a graph input padded along its key columns, with NaN: real rows must never read them.

    Generated lengths around the buckets (1 below, at, 1 above), float and bool masks.
    """
    model = tiny_model(name)
    model.config._attn_implementation = impl
    compiled = torch.compile(model, backend="pcg", options=OPTIONS)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    g = torch.Generator().manual_seed(0)
    lengths = [3] + [b + d for b in (8, 16, 24, 32) for d in (-1, 1)]   # 3 compiles Dynamo's static graph
    with torch.no_grad():
        # HF's eager attention adds the mask to the scores, so it takes float masks only.
        for kind in ("float", "bool") if impl == "sdpa" else ("float",):
            for n in lengths:
                ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
                mask = _mask_4d(kind, n, g)
                ref = model(ids, attention_mask=mask, use_cache=use_cache).logits
                got = compiled(ids, attention_mask=mask, use_cache=use_cache).logits
                torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"{name} {kind} {n}")
    # Every call but the first is padded (none is a bucket): the bool mask's first call, a new
    # dtype, compiles a graph that is already dynamic.
    kinds = 2 if impl == "sdpa" else 1
    assert _padded_path_only()["padded_calls"] == kinds * len(lengths) - 1, pcg_backend.report()


@pytest.mark.parametrize("name", MODELS)
def test_a_fresh_prefill_writes_every_element_of_the_new_states(name, monkeypatch):
    """A new cache's Mamba2 states are allocated uninitialized (HF's zero fill is dead work, since a fresh
    prefill overwrites them): poisoned with NaN here, every state a prefill returns must equal eager's.

    Generated lengths: 1 (the one-step path), around the conv width (4) and the scan's chunk (16),
    between buckets, and above the largest bucket (64). On the CPU every length of more than one token
    takes the padded path (`_padded_prefill`); the host-sliced path is the next test's.
    """
    from pcg_backend.hf.adapters import mamba2 as adapter

    model = tiny_model(name)
    compiled = torch.compile(model, backend="pcg", options=OPTIONS)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    monkeypatch.setattr(adapter, "uninitialized_like", lambda t: torch.full_like(t, float("nan")))
    g = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3, 4, 5, 7, 15, 16, 17, 33, 70]
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
            ref, got = model(ids, use_cache=True), compiled(ids, use_cache=True)
            torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=0, msg=f"{name} {n}")
            states = list(zip(_states(output_cache(ref)), _states(output_cache(got)), strict=True))
            assert states
            for r, s in states:
                torch.testing.assert_close(s, r, atol=ATOL, rtol=0, msg=f"{name} {n}: a state element not written")
    # Padded to a bucket: 3, 5, 7, 15, 17 and 33, and 70 to the overflow bucket 80 (1, 2, 4 and 16 are buckets).
    assert _padded_path_only()["padded_calls"] == 7, pcg_backend.report()


@pytest.mark.parametrize("batch", [1, 2])
def test_the_host_path_of_a_fresh_prefill_writes_every_state_element(batch):
    """`pcg::mamba2_core` called outside pcg's runtime (no device count: the path of calls above the largest
    bucket on CUDA, and of eager pieces) from NaN states must leave exactly the states it leaves from zeros.

    Generated lengths: 1 (the one-step path), below, at and above the conv width (4), and past the chunk (16).
    """
    model = tiny_model("nemotron_h")
    mixer = next(m for m in model.modules() if hasattr(m, "A_log"))
    width = mixer.conv_kernel_size
    g = torch.Generator().manual_seed(batch)
    for n in (1, 2, 3, 4, 5, 17):
        xBC = torch.randn(batch, n, mixer.conv_dim, generator=g)
        dt = torch.randn(batch, n, mixer.num_heads, generator=g)
        runs = []
        for fill in (0.0, float("nan")):
            conv_state = torch.full((batch, mixer.conv_dim, width), fill)
            ssm_state = torch.full((batch, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size), fill)
            out = torch.empty(batch, n, mixer.intermediate_size)
            torch.ops.pcg.mamba2_core(
                xBC, dt, None, conv_state, ssm_state, out, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                -torch.exp(mixer.A_log.float()), mixer.D, mixer.dt_bias, type(mixer).__module__, mixer.n_groups,
                mixer.head_dim, mixer.ssm_state_size, mixer.chunk_size, mixer.activation,
                *map(float, mixer.time_step_limit), False)
            runs.append((conv_state, ssm_state, out))
        for name, zero, poisoned in zip(("conv state", "SSM state", "output"), *runs):
            assert not poisoned.isnan().any(), f"n={n}: {name} element left unwritten"
            torch.testing.assert_close(poisoned, zero, atol=0, rtol=0, msg=f"n={n}: {name}")
