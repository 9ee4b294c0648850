"""With a static cache, every graph of every family is one piece: attention is inside the padded prefill graph.

`cache_implementation="static"` gives attention fixed-size keys, so
`pcg::kv_write_static` and `pcg::attention` run padded inside the captured
piece (`ops/attention.py`): a prefill of one bucket, and a decode step, are
each one graph for the whole model. With a DynamicCache attention stays cut
out, and the report says why. fp32, padding poisoned with NaN, tokens and
cache states equal eager (atol 1e-4).
"""

from __future__ import annotations

import re

import pytest
import torch

import pcg_backend
from pcg_backend import runtime, traffic
from conftest import requires_reference_kernels
from hf_checks import _states, cache_argument, left_padded_prompt, output_cache
from hf_models import FAMILIES, pcg_twin, tiny_model
from test_reliability import _nan_pad

pytestmark = requires_reference_kernels
OPTIONS = {"capture_sizes": [1, 2, 4, 8, 16, 24, 32], "progress": False}
LENGTHS = (3, 20, 5, 9, 17)     # 3 compiles Dynamo's static graph; the others run padded (none is a bucket)
HELD_BACK = "padding-safe split op(s) run eagerly between pieces"


def _generate(model, n, cache, batch=2, **extra):
    ids, mask = left_padded_prompt(model, batch, n, pad=2, seed=n)
    kw = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, **extra)
    kw.update(traffic.cache_kwargs(cache))
    return model.generate(ids, **kw)


def _compiled(model):
    compiled = pcg_twin(model, OPTIONS)
    return compiled


def _generate_matches_eager(name, cache, monkeypatch):
    """pcg's generate() at every length of LENGTHS, padding poisoned with NaN: tokens equal, states within 1e-4."""
    model = tiny_model(name)
    compiled = _compiled(model)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    with torch.no_grad():
        for n in LENGTHS:
            ref, got = _generate(model, n, cache), _generate(compiled, n, cache)
            assert torch.equal(got.sequences, ref.sequences), (name, cache, n)
            for r, s in zip(_states(ref.past_key_values), _states(got.past_key_values), strict=True):
                torch.testing.assert_close(s, r, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_static_cache_graphs_are_one_piece_each_and_match_eager(name, monkeypatch):
    _generate_matches_eager(name, "static", monkeypatch)
    s = pcg_backend.stats()
    # Every graph (static prefill at 3, padded prefill, decode) is exactly one capturable piece
    # holding every split op: the whole model, attention and its KV write included.
    assert s["pieces"] == s["capturable_pieces"] == s["graphs_compiled"], pcg_backend.report()
    assert s["split_ops_in_graphs"] == s["split_op_nodes"], pcg_backend.report()
    assert s["padded_calls"] == 4, pcg_backend.report()          # 20, 5, 9, 17: none is a bucket
    assert s["eager_runs"] == sum(s["eager_reasons"].values())
    assert all(r.startswith("CUDA graphs off") for r in s["eager_reasons"]), s["eager_reasons"]
    assert HELD_BACK not in pcg_backend.report()


PADDED_GRAPH = re.compile(r"(graph\d+): (\d+) pieces, (\d+) capturable, .*padding to buckets")


@pytest.mark.parametrize("name", ["nemotron_h", "bamba", "zamba2"])
def test_a_new_dynamic_cache_prefill_is_one_graph_with_its_attention(name, monkeypatch):
    """A fresh DynamicCache's first write is the new rows themselves: the padded prefill holds attention too."""
    _generate_matches_eager(name, "dynamic", monkeypatch)    # the KV rows are cut to the real ones
    report = pcg_backend.report()
    padded = PADDED_GRAPH.findall(report)
    assert len(padded) == 1 and padded[0][1:] == ("1", "1"), report   # the whole model in one piece
    assert pcg_backend.stats()["padded_calls"] == 4, report
    assert HELD_BACK not in report, report


@pytest.mark.parametrize("name", ["nemotron_h", "bamba", "zamba2"])
def test_appending_to_a_dynamic_cache_keeps_attention_out_and_the_report_says_why(name, monkeypatch):
    """A padded call on a cache that holds rows: kv_append stays eager, and attention over its output too."""
    model = tiny_model(name)
    compiled = _compiled(model)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    arg = cache_argument(model)
    first = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for chunk in (5, 6, 11):                          # 5 compiles Dynamo's static graph; 6 and 11 are padded
            then = torch.randint(3, model.config.vocab_size, (1, chunk), generator=torch.Generator().manual_seed(chunk))
            outs = []
            for m in (model, compiled):
                cache = output_cache(m(first, use_cache=True))
                outs.append((m(then, use_cache=True, **{arg: cache}).logits, cache))
            (want, want_cache), (got, got_cache) = outs
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            for r, s in zip(_states(want_cache), _states(got_cache), strict=True):
                torch.testing.assert_close(s, r, atol=1e-4, rtol=0)
    report = pcg_backend.report()
    attention_layers = sum(1 for line in pcg_backend.stats()["routing"] if "pcg::attention" in line)
    assert report.count(HELD_BACK) == 1, report          # the padded graph over a cache with rows
    assert f"{attention_layers} {HELD_BACK}" in report, report
