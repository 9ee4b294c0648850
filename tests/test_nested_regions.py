"""Split ops inside higher-order ops: nested compile regions are inlined and cut; control flow runs eagerly."""

import random

import pytest
import torch

import pcg_backend
from pcg_backend.ops import toy
from pcg_backend.rewrite.nested_regions import inline_nested_regions, nested_split_ops

SIZES = [1, 2, 4, 8, 16]
LENGTHS = [1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 40]   # 1 token, buckets, bucket + 1, above the largest
ATOL = 1e-5   # fp32 on CPU: only reassociation differences between padded and unpadded matmuls

requires_regions = pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"),
                                      reason="this torch has no torch.compiler.nested_compile_region")


if hasattr(torch.compiler, "nested_compile_region"):
    # Regions at module level, as a model would wrap its decoder layer (a closure over a Python number
    # makes Dynamo fail inside the region, before any backend sees the graph).
    @torch.compiler.nested_compile_region
    def half_mix(h, weight):
        return torch.ops.pcg_toy.mix_functional(h) * 0.5 + torch.tanh(h @ weight)

    @torch.compiler.nested_compile_region
    def double_mix(h, weight):
        return torch.ops.pcg_toy.mix_functional(torch.relu(h)) * 2.0 - h @ weight


class RegionModel(torch.nn.Module):
    """`layers` calls of one nested region (two regions when `two_regions`) between linear layers."""

    def __init__(self, layers: int, hidden: int, two_regions: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = layers
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers + 1))
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(hidden, hidden) / hidden ** 0.5)
                                              for _ in range(layers))
        self.regions = [half_mix, double_mix if two_regions else half_mix]

    def forward(self, x):
        x = self.blocks[0](x)
        for i in range(self.layers):
            x = self.blocks[i + 1](self.regions[i % 2](x, self.weights[i])) + x
        return x


def _region_calls(model, hidden: int) -> int:
    """How many `invoke_subgraph` calls Dynamo's graph of `model` holds (it inlines a region used once)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=record, dynamic=True)(torch.randn(3, hidden))
    torch._dynamo.reset()
    return sum(1 for gm in graphs for n in gm.graph.nodes
               if n.op == "call_function" and getattr(n.target, "__name__", "") == "invoke_subgraph")


def _generated_cases(count: int):
    """Random region models in which each region is called at least twice (Dynamo inlines a region it
    sees once itself, which would leave pcg's inliner nothing to do)."""
    rng = random.Random(20)
    cases = []
    for _ in range(count):
        layers = rng.randint(2, 5)
        cases.append((layers, rng.choice([8, 16]), layers >= 4 and rng.random() < 0.5, rng.randint(0, 10 ** 6)))
    return cases


@requires_regions
@pytest.mark.parametrize("layers,hidden,two_regions,seed", _generated_cases(6))
def test_split_ops_in_nested_regions_are_cut_and_padded_like_any_other(layers, hidden, two_regions, seed):
    model = RegionModel(layers, hidden, two_regions, seed).eval()
    region_calls = _region_calls(model, hidden)
    assert region_calls == layers   # every call is an invoke_subgraph: the inliner has work in every case
    compiled = torch.compile(model, backend="pcg", dynamic=True,
                             options={"capture_sizes": SIZES, "max_overflow_size": 0})
    before = toy.CALLS["mix_functional"]
    with torch.no_grad():
        for n in LENGTHS:
            x = torch.randn(n, hidden)
            torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    # Two graphs (Dynamo gives a 1-token call a static graph of its own). In each, every region call was
    # inlined: one split op node and one split piece per layer, as without regions.
    assert s["graphs_compiled"] == 2
    assert s["split_op_nodes"] == 2 * layers
    assert s["pieces"] == 2 * (2 * layers + 1)
    assert s["capturable_pieces"] == 2 * (layers + 1)
    # Padded: every length that is not a bucket, from 2 up to the largest (3, 5, 9, 15).
    assert s["padded_calls"] == 4
    # Each compiled call and each eager call ran the split op once per layer (a 1-token call included).
    assert toy.CALLS["mix_functional"] - before == 2 * layers * len(LENGTHS)
    assert f"{region_calls} subgraph call(s) (nested compile regions, wrap) inlined" in pcg_backend.report()


@requires_regions
def test_a_region_called_three_times_is_inlined_three_times():
    model = RegionModel(3, 16, two_regions=False, seed=0).eval()
    assert _region_calls(model, 16) == 3
    compiled = torch.compile(model, backend="pcg", dynamic=True, options={"capture_sizes": SIZES})
    with torch.no_grad():
        for n in (5, 16):
            x = torch.randn(n, 16)
            torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert (s["graphs_compiled"], s["split_op_nodes"], s["pieces"], s["padded_calls"]) == (1, 3, 7, 1)
    assert "3 subgraph call(s) (nested compile regions, wrap) inlined" in pcg_backend.report()


class CondModel(torch.nn.Module):
    """A split op in one branch of `torch.cond`: control flow, which pcg cannot inline."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(hidden, hidden)
        self.down = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        h = torch.relu(self.up(x))
        h = torch.cond(h.sum() > 0, lambda t: torch.ops.pcg_toy.mix_functional(t), lambda t: t * 2, (h,))
        return self.down(h)


def test_a_split_op_inside_cond_runs_eagerly_at_exact_sizes_with_its_reason():
    torch.manual_seed(0)
    model = CondModel().eval()
    compiled = torch.compile(model, backend="pcg", dynamic=True,
                             options={"capture_sizes": SIZES, "max_overflow_size": 0})
    with torch.no_grad():
        for n in LENGTHS[1:]:   # a 1-token call gets a static graph of its own
            for shift in (0.5, -5.0):   # both branches
                x = torch.randn(n, 16) + shift
                torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    calls = 2 * len(LENGTHS[1:])
    assert s["graphs_compiled"] == 1
    assert s["split_op_nodes"] == 0 and s["padded_calls"] == 0
    held = {reason: runs for reason, runs in s["eager_reasons"].items()
            if "cond at node" in reason and "holds split op(s) pcg_toy::mix_functional" in reason}
    assert sum(held.values()) == calls, s["eager_reasons"]
    assert "where pcg cannot cut them out or hand them the real token count" in pcg_backend.report()


def _dynamo_graph(f, *args):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(f, backend=record, dynamic=True)(*args)
    torch._dynamo.reset()
    (gm,) = graphs
    return gm


def _hops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)]


def test_split_ops_inside_control_flow_are_found_at_any_depth():
    def inner(t):
        return torch.cond(t.sum() > 0, lambda u: torch.ops.pcg_toy.mix_functional(u), lambda u: u + 1, (t,))

    def with_split_op(x):
        return torch.cond(x.mean() > 0, inner, lambda t: t - 1, (x,))

    def without(x):
        return torch.cond(x.mean() > 0, lambda t: t.sin(), lambda t: t - 1, (x,))

    gm = _dynamo_graph(with_split_op, torch.randn(6, 4))
    assert [nested_split_ops(gm, n) for n in _hops(gm)] == [["pcg_toy::mix_functional"]]
    gm = _dynamo_graph(without, torch.randn(6, 4))
    assert [nested_split_ops(gm, n) for n in _hops(gm)] == [[]]


if hasattr(torch.compiler, "nested_compile_region"):
    @torch.compiler.nested_compile_region
    def inner_mix(h):
        return torch.ops.pcg_toy.mix_functional(h) * 2

    @torch.compiler.nested_compile_region
    def outer_mix(h):
        return inner_mix(inner_mix(h)) - 1

    @torch.compiler.nested_compile_region
    def plain_mix(h):
        return torch.ops.pcg_toy.mix_functional(h) + 1

    def _inner_cond(t):
        return torch.cond(t.mean() > 1, lambda u: u.sin(), lambda u: u * 2, (t,))

    @torch.compiler.nested_compile_region
    def gated(h):
        # A cond whose branch holds a cond: the branch module has a submodule of its own.
        return torch.cond(h.sum() > 0, _inner_cond, lambda t: t - 1, (h,))

    @torch.compiler.nested_compile_region
    def gated_mix(h):
        return torch.cond(h.sum() > 0, lambda t: torch.ops.pcg_toy.mix_functional(t), lambda t: t - 1, (h,))

    @torch.compiler.nested_compile_region
    def two_outputs(h, weight):
        return torch.ops.pcg_toy.mix_functional(h), torch.tanh(h @ weight)


def _matches_eager(f, *extra, lengths=LENGTHS[1:]):
    compiled = torch.compile(f, backend="pcg", dynamic=True,
                             options={"capture_sizes": SIZES, "max_overflow_size": 0})
    with torch.no_grad():
        for n in lengths:
            for shift in (0.5, -5.0):
                x = torch.randn(n, 16) + shift
                torch.testing.assert_close(compiled(x, *extra), f(x, *extra), atol=ATOL, rtol=0)
    return len(lengths) * 2


@requires_regions
def test_regions_inside_regions_are_inlined_and_cut():
    def f(x):
        return outer_mix(outer_mix(plain_mix(plain_mix(x))))

    _matches_eager(f)
    s = pcg_backend.stats()
    # 2 plain calls + 2 outer calls of 2 inner calls each: 8 calls inlined, 6 split ops cut, each
    # followed by a piece (the first op reads the input itself, so no piece comes before it).
    assert (s["graphs_compiled"], s["split_op_nodes"], s["pieces"]) == (1, 6, 12)
    assert s["padded_calls"] == 2 * 4   # 3, 5, 9, 15, each with both shifts
    assert "8 subgraph call(s) (nested compile regions, wrap) inlined" in pcg_backend.report()


@requires_regions
def test_a_cond_inside_a_region_stays_a_cond_and_its_modules_are_kept():
    def f(x):
        return gated(gated(plain_mix(plain_mix(x))))

    _matches_eager(f)
    s = pcg_backend.stats()
    assert s["split_op_nodes"] == 2   # the plain regions' ops; the conds hold none
    assert "4 subgraph call(s) (nested compile regions, wrap) inlined" in pcg_backend.report()


@requires_regions
def test_a_split_op_in_a_cond_inside_a_region_runs_eagerly_at_exact_sizes():
    def f(x):
        return gated_mix(gated_mix(x)) * 3

    calls = _matches_eager(f)
    s = pcg_backend.stats()
    assert s["split_op_nodes"] == 0 and s["padded_calls"] == 0
    held = sum(runs for reason, runs in s["eager_reasons"].items()
               if "holds split op(s) pcg_toy::mix_functional" in reason)
    assert held == calls   # one eager piece holds both conds
    assert "2 subgraph call(s) (nested compile regions, wrap) inlined" in pcg_backend.report()


@requires_regions
def test_every_output_of_an_inlined_region_keeps_its_value():
    weight = torch.randn(16, 16) / 4

    def f(x, w):
        a, b = two_outputs(x, w)
        c, d = two_outputs(b, w)
        return a - 2 * b + 3 * c - 4 * d

    _matches_eager(f, weight)
    s = pcg_backend.stats()
    assert s["split_op_nodes"] == 2 and s["padded_calls"] == 2 * 4


def test_wrap_is_inlined_too():
    from torch._higher_order_ops.wrap import wrap

    weight = torch.randn(16, 16) / 4

    def body(h, w):
        return torch.ops.pcg_toy.mix_functional(h) + h @ w

    def f(x, w):
        return wrap(body, x, w) * 2

    assert [n.target.name() for n in _hops(_dynamo_graph(f, torch.randn(5, 16), weight))] == ["wrap"]
    _matches_eager(f, weight)
    s = pcg_backend.stats()
    assert s["split_op_nodes"] == 1 and s["padded_calls"] == 2 * 4
    assert "1 subgraph call(s) (nested compile regions, wrap) inlined" in pcg_backend.report()


@requires_regions
def test_a_region_call_used_other_than_through_getitem_is_left_alone():
    gm = _dynamo_graph(RegionModel(3, 16, two_regions=False, seed=0).eval(), torch.randn(5, 16))
    calls = [n for n in _hops(gm) if n.target.name() == "invoke_subgraph"]
    assert len(calls) == 3
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((*output.args[0], calls[1]),)   # the call's tuple itself reaches the output
    assert inline_nested_regions(gm) == 2
    assert [n for n in _hops(gm) if n.target.name() == "invoke_subgraph"] == [calls[1]]


@requires_regions
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inlined_regions_are_captured_per_bucket_on_cuda():
    layers = 3
    model = RegionModel(layers, 16, two_regions=False, seed=0).cuda().eval()
    compiled = torch.compile(model, backend="pcg", dynamic=True,
                             options={"capture_sizes": SIZES, "max_overflow_size": 0})
    dynamic_sizes = [s for s in SIZES if s > 1]   # a 1-token call is Dynamo's own static graph
    with torch.no_grad():
        for n in [3, 2, 4, 5, 9, 16]:
            x = torch.randn(n, 16, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["graphs_compiled"] == 1 and s["split_op_nodes"] == layers
    # Every bucket of every piece between the inlined split ops, up front; then replays only.
    assert s["cuda_graphs_captured"] == len(dynamic_sizes) * (layers + 1)
    assert s["cuda_graph_replays"] == 6 * (layers + 1)
    assert s["padded_calls"] == 3 and s["eager_runs"] == 0
