"""CUDA-graph capture and replay of the toy models (skipped without CUDA)."""

import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from toy_models import NoSplitModel, ToyModel, compile_toy

pytestmark = requires_cuda
SIZES = [1, 2, 4, 8, 16]
ATOL = 1e-5  # fp32; TF32 is off by default for matmuls


def _model(cls=ToyModel, **kw):
    torch.manual_seed(0)
    return cls(**kw).cuda()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_captures_once_per_bucket_then_replays(compiler):
    layers = 3
    model = _model(layers=layers)
    compiled = compile_toy(model, capture_sizes=SIZES, compiler=compiler)
    dynamic_sizes = [s for s in SIZES if s > 1]  # n=1 is Dynamo's own static graph
    for n in dynamic_sizes:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["graphs_compiled"] == 1
    assert s["cuda_graphs_captured"] == len(dynamic_sizes) * (layers + 1)
    assert s["cuda_graph_replays"] == 0
    # second pass, including in-between sizes: replays only, no new captures
    for n in [2, 3, 4, 5, 7, 8, 9, 16]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] == len(dynamic_sizes) * (layers + 1)
    assert s["cuda_graph_replays"] == 8 * (layers + 1)
    assert s["eager_runs"] == 0


def test_one_token_and_above_the_largest_bucket():
    model = _model(layers=2)
    compiled = compile_toy(model, capture_sizes=SIZES)
    for n in [1, 1, 17, 33]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] == 3  # the static n=1 graph, once
    assert s["cuda_graph_replays"] == 3
    assert s["eager_reasons"] == {"token count above the largest bucket 16": 2 * 3}


def test_earlier_outputs_are_never_overwritten():
    model = _model(layers=2)
    compiled = compile_toy(model, capture_sizes=SIZES)
    x1, x2, x3 = (torch.randn(5, 16, device="cuda") for _ in range(3))
    out1 = compiled(x1)
    keep = out1.clone()
    compiled(x2)                                   # same bucket (8)
    compiled(torch.randn(3, 16, device="cuda"))   # another bucket
    compiled(x3)
    torch.testing.assert_close(out1, keep, atol=0, rtol=0)
    assert pcg_backend.stats()["cuda_graph_replays"] > 0


def test_functional_split_op_inputs_are_copied_into_static_buffers():
    model = _model(layers=2, functional=True)
    compiled = compile_toy(model, capture_sizes=SIZES)
    for n in [3, 6, 3, 6, 8]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] == 2 * 3 and s["cuda_graph_replays"] == 3 * 3


def test_graph_without_split_op_is_captured_per_bucket():
    model = _model(NoSplitModel)
    compiled = compile_toy(model, capture_sizes=SIZES)
    for n in [3, 4, 5, 9]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert (s["pieces"], s["capturable_pieces"]) == (1, 1)
    assert s["cuda_graphs_captured"] == 3 and s["cuda_graph_replays"] == 1


def test_piece_that_cannot_be_captured_falls_back_alone():
    lin = torch.nn.Linear(16, 16).cuda()

    def f(x):
        y = lin(x)
        host = y[:, 0].cpu()          # a device-to-host copy: cannot live in a CUDA graph
        out = torch.empty_like(y)
        torch.ops.pcg_toy.mix(y, out)
        return lin(out) * 2, host

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES}, dynamic=True)
    for n in [3, 4, 3]:
        x = torch.randn(n, 16, device="cuda")
        got, ref = compiled(x), f(x)
        torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-5)
    s = pcg_backend.stats()
    assert s["eager_runs"] >= 3
    assert any("CPU" in r or "cpu" in r for r in s["eager_reasons"]), s["eager_reasons"]
    assert s["cuda_graphs_captured"] >= 2  # the piece after the split op is still captured per bucket
