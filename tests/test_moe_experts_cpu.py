"""`pcg::moe_experts` and the experts adapter on CPU: routing, layout checks, padding, and HF's path beneath.

On CPU the op runs HF's own experts implementation (the kernels need CUDA,
or Triton's interpreter: `test_skinny_gemm_interpreter_cpu.py`), so a
compiled GraniteMoeHybrid must equal eager exactly, and a graph around the
op must still be padded: the op is declared row-wise.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import pcg_backend
from pcg_backend.ops import moe_experts, moe_router
from hf_models import tiny_config

pytest.importorskip("transformers")


def _granite(experts=8, top_k=3, seed=0):
    import transformers as tf

    config = tiny_config("granitemoehybrid")
    config.num_local_experts, config.num_experts_per_tok = experts, top_k
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@torch._dynamo.config.patch(recompile_limit=64)
@pytest.mark.parametrize("tokens", [1, 5, 16, 23])
def test_a_compiled_granite_routes_its_experts_through_the_op_and_equals_eager(fresh_pcg, tokens):
    model = _granite()
    compiled = torch.compile(model, backend="pcg")
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    before, routers = dict(moe_experts.LAUNCHES), dict(moe_router.LAUNCHES)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    # Three MoE layers, each one call of each op, on HF's path beneath (CPU): the router's torch
    # arithmetic is HF's line for line.
    assert moe_experts.LAUNCHES["original"] - before["original"] == 3
    assert moe_experts.LAUNCHES["triton"] == before["triton"]
    assert moe_router.LAUNCHES["torch"] - routers["torch"] == 3 and moe_router.LAUNCHES["triton"] == routers["triton"]
    report = pcg_backend.report()
    for layer in range(3):
        assert (f"model.layers.{layer}.block_sparse_moe.experts (GraniteMoeHybridExperts): "
                f"experts via pcg::moe_experts (grouped_mm)") in report
        assert (f"model.layers.{layer}.block_sparse_moe.router (GraniteMoeHybridTopKRouter): "
                f"router via pcg::moe_router") in report
    assert pcg_backend.stats()["graphs_compiled"] == 1


def test_outside_a_pcg_trace_the_registry_entry_is_hfs_own(fresh_pcg):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    model = _granite()
    pcg_backend.hf.enable()
    experts = model.model.layers[0].block_sparse_moe.experts
    assert ALL_EXPERTS_FUNCTIONS._global_mapping["grouped_mm"] is not moe_experts.ORIGINAL_EXPERTS["grouped_mm"]
    x = torch.randn(7, model.config.hidden_size)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(7)])
    weights = torch.softmax(torch.randn(7, 3), dim=-1)
    before = dict(moe_experts.LAUNCHES)
    with torch.no_grad():
        torch.testing.assert_close(experts(x, ids, weights),
                                   moe_experts.ORIGINAL_EXPERTS["grouped_mm"](experts, x, ids, weights),
                                   atol=0, rtol=0)
    assert moe_experts.LAUNCHES == before


def test_layouts_the_op_does_not_take_are_named():
    from transformers.integrations.moe import _default_apply_gate

    from pcg_backend.hf.adapters.experts import unsupported_layout

    pcg_backend.hf.enable()
    # GatedExperts, as HF's experts look in the layout the op takes: HF's gate, not expert-parallel.
    hf_gated = type("HFGated", (moe_experts.GatedExperts,),
                    {"_apply_gate": _default_apply_gate, "_is_expert_parallel": False})
    weights = torch.zeros(4, 16, 8), torch.zeros(4, 8, 8)
    assert unsupported_layout(_granite().model.layers[0].block_sparse_moe.experts) is None
    assert unsupported_layout(hf_gated(*weights)) is None
    # GatedExperts defines its own _apply_gate (as a class, not HF's default gate), and calls itself
    # expert-parallel so that HF's paths skip the router op's out-of-range id.
    assert unsupported_layout(moe_experts.GatedExperts(*weights)) == "expert parallel, its own gating"
    cases = {"has_bias": (True, "biased"), "is_transposed": (True, "transposed weights"),
             "has_gate": (False, "not gated"), "is_concatenated": (False, "gate and up interleaved"),
             "_is_expert_parallel": (True, "expert parallel"),
             "has_post_expert_norm": (True, "a norm after the experts"),
             "act_fn": (torch.nn.ReLU(), "not SiLU")}
    for attribute, (value, reason) in cases.items():
        experts = hf_gated(*weights)
        setattr(experts, attribute, value)
        assert unsupported_layout(experts) == reason, attribute
    experts = hf_gated(*weights)
    experts.down_proj = torch.zeros(32, 8)
    assert unsupported_layout(experts) == "weights not 3-D"


@pytest.mark.parametrize("seed", range(4))
def test_the_op_is_row_wise_so_a_graph_around_it_is_padded(fresh_pcg, monkeypatch, seed):
    """Generated blocks (a linear, a router, top-k and the op, at random widths, expert counts and k), compiled
    with a token dim: every call below a bucket is padded, with NaN in its padded rows, and equals eager at
    every count (padded rows route like any token and touch only their own rows)."""
    from pcg_backend import runtime
    from test_reliability import _nan_pad

    pcg_backend.hf.enable()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    hidden, inter, experts = rng.choice([8, 16, 24]), rng.choice([4, 12, 20]), rng.randint(2, 9)
    top_k = rng.randint(1, experts)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.router = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, experts, bias=False)
            self.gate_up = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden) / 4)
            self.down = torch.nn.Parameter(torch.randn(experts, hidden, inter) / 4)

        def forward(self, x):
            h = self.lin(x)
            top, ids = self.router(h).topk(top_k, dim=-1)
            return torch.ops.pcg.moe_experts(h, ids, torch.softmax(top, dim=-1), self.gate_up, self.down,
                                             "grouped_mm")

    block = Block()
    compiled = torch.compile(block, backend="pcg", options={"capture_sizes": [4, 8, 16]})
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    # one, at buckets, in the overflow bucket 24 (17), and drawn
    counts = [1, 4, 16, 17] + [rng.randint(2, 24) for _ in range(4)]
    with torch.no_grad():
        for n in counts:
            x = torch.randn(n, hidden)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=0, msg=f"{n} tokens")
    # One token gets a graph of its own (Dynamo specializes a size of 1), never padded.
    below = [n for n in counts if 1 < n and n not in (4, 8, 16, 24)]
    assert pcg_backend.stats()["padded_calls"] == len(below), pcg_backend.report()


def test_without_a_wrapped_implementation_the_op_says_so():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="no HF experts implementation 'nope' was wrapped"):
        torch.ops.pcg.moe_experts(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                                  torch.zeros(2, 16, 8), torch.zeros(2, 8, 8), "nope")


def test_the_pipeline_is_cut_to_the_shared_memory_at_each_tile_height():
    tile = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    # An H200's 227 KiB per block: the up kernel's 64-row tile (64 + 2 x 32 rows of 128, bf16) fits 4 stages.
    assert moe_experts._fit(tile, 64, 2, 232448)["num_stages"] == 4
    # 100 KiB: 3 stages of 32 KiB; a 16-row tile (24 KiB a stage) keeps 4.
    assert moe_experts._fit(tile, 64, 2, 100 * 1024)["num_stages"] == 3
    assert moe_experts._fit(tile, 16, 2, 100 * 1024)["num_stages"] == 4
    assert moe_experts._fit(tile, 64, 2, None) is tile
    assert tile["num_stages"] == 4


def test_the_router_adapter_finds_routers_by_source_and_keeps_their_return_order():
    import inspect

    import transformers.models.granitemoehybrid.modeling_granitemoehybrid as granite

    from pcg_backend.hf.adapters.router import OUTPUT_NAMES, output_order

    source = inspect.getsource(granite.GraniteMoeHybridTopKRouter.forward)
    returned = source[source.index("return "):].split("\n")[0][len("return "):].split(",")
    order = output_order(granite.GraniteMoeHybridTopKRouter)
    # transformers 5.17 returns (ids, weights, logits), later versions (logits, weights, ids).
    assert order == tuple(OUTPUT_NAMES.index(name.strip()) for name in returned)
    assert sorted(order) == [0, 1, 2]
    assert output_order(granite.GraniteMoeHybridExperts) is None
    assert output_order(granite.GraniteMoeHybridMoE) is None

    class NoSoftmax(torch.nn.Module):   # a softmax over every logit: another router
        def forward(self, hidden_states):
            router_logits = F.linear(hidden_states, self.weight).float()
            top_k_weights, top_k_index = torch.softmax(router_logits, -1).topk(self.top_k, dim=-1)
            return router_logits, top_k_weights, top_k_index

    assert output_order(NoSoftmax) is None

    class Tempered(torch.nn.Module):   # the same three lines plus a temperature: not to be replaced
        def forward(self, hidden_states):
            router_logits = F.linear(hidden_states, self.weight).float()
            router_logits = router_logits / 0.7
            top_k_logits, top_k_index = router_logits.topk(self.top_k, dim=-1)
            top_k_weights = torch.softmax(top_k_logits, dim=-1).type_as(hidden_states)
            return router_logits, top_k_weights, top_k_index

    class Plain(torch.nn.Module):   # HF's router, as transformers writes it
        def forward(self, hidden_states):
            """A docstring does not count."""
            router_logits = F.linear(hidden_states, self.weight).float()
            top_k_logits, top_k_index = router_logits.topk(self.top_k, dim=-1)
            top_k_weights = torch.softmax(top_k_logits, dim=-1).type_as(hidden_states)
            return top_k_index, top_k_weights, router_logits

    assert output_order(Tempered) is None
    assert output_order(Plain) == (2, 1, 0)


@pytest.mark.parametrize("seed", range(4))
def test_the_router_op_equals_hfs_router(fresh_pcg, seed):
    """Generated shapes: the op's torch path is HF's router, and a NaN row routes only itself."""
    import transformers.models.granitemoehybrid.modeling_granitemoehybrid as granite

    from pcg_backend.hf.adapters.router import output_order

    rng = random.Random(seed)
    config = tiny_config("granitemoehybrid")
    config.num_local_experts = rng.choice([2, 8, 64])
    config.num_experts_per_tok = rng.randint(1, config.num_local_experts)
    router = granite.GraniteMoeHybridTopKRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(seed))
    order = output_order(type(router))
    hidden = torch.randn(rng.randint(1, 40), config.hidden_size, generator=torch.Generator().manual_seed(seed))
    ours = torch.ops.pcg.moe_router(hidden, router.weight, router.top_k)
    with torch.no_grad():
        theirs = router(hidden)
    for ours_i, theirs_i in zip((ours[i] for i in order), theirs):
        assert ours_i.dtype == theirs_i.dtype and torch.equal(ours_i, theirs_i)
    padded = torch.cat([hidden, torch.full((3, hidden.shape[1]), float("nan"))])
    logits, weights, ids = torch.ops.pcg.moe_router(padded, router.weight, router.top_k)
    assert torch.equal(logits[:len(hidden)], ours[0]) and torch.equal(ids[:len(hidden)], ours[2])
