"""On CUDA, a padded prefill on a new cache is one captured graph for the whole model.

The GPU counterpart of `test_static_cache_cpu.py` (fp32, mamba-ssm kernels):
tokens equal eager's, and the padded prefill graph captures exactly one graph
per bucket (1 piece x 6 buckets). With a static cache every graph is one
piece and after the two warm-up calls no graph is captured; with a new
DynamicCache the prefill is one piece, and decode keeps attention eager.
"""

from __future__ import annotations

import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from hf_models import tiny_model
from test_static_cache_cpu import _compiled, _generate

pytestmark = requires_cuda


ONE_GRAPH_PER_BUCKET = "captured 6 CUDA graphs (1 piece x 6 buckets 2..32"   # Dynamo's dynamic graph starts at 2


def _tokens_match_eager(name, cache, warm_up, lengths) -> int:
    """generate() with pcg equals eager at each of `lengths`, after `warm_up`; returns the captures since the warm-up."""
    pytest.importorskip("mamba_ssm")
    model = tiny_model(name, device="cuda")
    compiled = _compiled(model)
    with torch.no_grad():
        for n in warm_up:
            _generate(compiled, n, cache)
        captured = pcg_backend.stats()["cuda_graphs_captured"]
        for n in lengths:
            want = _generate(model, n, cache).sequences
            assert torch.equal(_generate(compiled, n, cache).sequences.cpu(), want.cpu()), (name, cache, n)
    return pcg_backend.stats()["cuda_graphs_captured"] - captured


@pytest.mark.parametrize("name", ["nemotron_h", "bamba", "falcon_h1", "zamba2", "mamba2"])
@torch._dynamo.config.patch(recompile_limit=64)
def test_static_cache_prefill_is_one_graph_per_bucket(name):
    # Warm-up: Dynamo's static graph, then the dynamic one; max_cache_len stays 24, the warm-up's.
    assert _tokens_match_eager(name, "static", (3, 20), (5, 9, 17)) == 0, pcg_backend.report()
    s = pcg_backend.stats()
    assert s["pieces"] == s["capturable_pieces"] == s["graphs_compiled"], pcg_backend.report()
    assert any(ONE_GRAPH_PER_BUCKET in c for c in s["capture_summaries"]), pcg_backend.report()
    assert s["new_address_captures"] == 0, pcg_backend.report()
    assert not any("attention" in r for r in s["eager_reasons"]), pcg_backend.report()


@pytest.mark.parametrize("name", ["nemotron_h", "bamba", "falcon_h1", "zamba2"])
@torch._dynamo.config.patch(recompile_limit=64)
def test_new_dynamic_cache_prefill_is_one_graph_per_bucket(name):
    """A DynamicCache made by generate() holds no rows at prefill: attention is captured with the rest."""
    _tokens_match_eager(name, "dynamic", (), (3, 20, 5, 9, 17))   # 3: Dynamo's static graph; the rest padded
    s = pcg_backend.stats()
    assert any(ONE_GRAPH_PER_BUCKET in c for c in s["capture_summaries"]), pcg_backend.report()
    assert "run eagerly between pieces" not in pcg_backend.report()
