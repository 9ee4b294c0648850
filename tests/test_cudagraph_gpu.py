"""CUDA-graph capture and replay of the toy models (skipped without CUDA)."""

import pytest
import torch

import pcg_backend
from pcg_backend.analyse.padding_rule import register_row_wise
from conftest import requires_cuda
from pcg_backend.cudagraph import CudaGraphPiece
from toy_models import NoSplitModel, ToyModel, compile_toy

pytestmark = requires_cuda
SIZES = [1, 2, 4, 8, 16]
ATOL = 1e-5  # fp32; TF32 is off by default for matmuls


def _model(cls=ToyModel, **kw):
    torch.manual_seed(0)
    return cls(**kw).cuda()


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_first_call_captures_every_bucket_then_only_replays(compiler):
    layers = 3
    model = _model(layers=layers)
    compiled = compile_toy(model, capture_sizes=SIZES, compiler=compiler)
    dynamic_sizes = [s for s in SIZES if s > 1]  # n=1 is Dynamo's own static graph
    x = torch.randn(3, 16, device="cuda")
    torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["graphs_compiled"] == 1
    assert s["cuda_graphs_captured"] == len(dynamic_sizes) * (layers + 1)   # all buckets, up front
    assert s["cuda_graph_replays"] == layers + 1                             # the call itself
    # every bucket and sizes in between: replays only, no new captures
    for n in [2, 3, 4, 5, 7, 8, 9, 16]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] == len(dynamic_sizes) * (layers + 1)
    assert s["cuda_graph_replays"] == 9 * (layers + 1)
    assert s["eager_runs"] == 0


@pytest.mark.parametrize("library", ["cublaslt", "unchanged"])
def test_gemm_library_is_active_during_capture_only(monkeypatch, library):
    seen = []
    original = CudaGraphPiece._capture

    def spy(self, key, args):
        seen.append(torch.backends.cuda.preferred_blas_library())
        return original(self, key, args)

    monkeypatch.setattr(CudaGraphPiece, "_capture", spy)
    before = torch.backends.cuda.preferred_blas_library()
    model = _model(layers=2)
    compiled = compile_toy(model, capture_sizes=SIZES, gemm_library=library)
    for n in [3, 8, 16]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    expected = torch._C._BlasBackend.Cublaslt if library == "cublaslt" else before
    assert seen == [expected] * 12            # 3 pieces x buckets 2, 4, 8, 16
    assert torch.backends.cuda.preferred_blas_library() == before
    assert pcg_backend.stats()["cuda_graph_replays"] == 3 * 3


def test_upfront_capture_goes_largest_first(monkeypatch):
    order = []
    original = CudaGraphPiece._capture

    def spy(self, key, args):
        order.append(key[0])
        return original(self, key, args)

    monkeypatch.setattr(CudaGraphPiece, "_capture", spy)
    model = _model(layers=2)
    compiled = compile_toy(model, capture_sizes=SIZES)
    compiled(torch.randn(3, 16, device="cuda"))
    assert order == [b for b in (16, 8, 4, 2) for _ in range(3)]
    assert any("captured 12 CUDA graphs (3 pieces x 4 buckets 2..16, largest first)" in r
               for r in pcg_backend.stats()["capture_summaries"])


def test_lazy_capture_takes_only_the_buckets_it_sees():
    layers = 2
    model = _model(layers=layers)
    compiled = compile_toy(model, capture_sizes=SIZES, capture="lazy")
    for n in [3, 4, 9, 3]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] == 2 * (layers + 1)      # buckets 4 and 16
    assert s["cuda_graph_replays"] == 2 * (layers + 1)        # the second 3 and the 4 after the 3


def test_one_token_and_above_the_largest_bucket():
    model = _model(layers=2)
    compiled = compile_toy(model, capture_sizes=SIZES, max_overflow_size=0)   # no overflow buckets
    for n in [1, 1, 17, 33]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    # the static n=1 graph captures its one shape; the dynamic graph captures buckets 2..16 up front
    assert s["cuda_graphs_captured"] == 3 + 4 * 3
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
    assert s["cuda_graphs_captured"] == 4 * 3 and s["cuda_graph_replays"] == 5 * 3


def test_graph_without_split_op_is_captured_per_bucket():
    model = _model(NoSplitModel)
    compiled = compile_toy(model, capture_sizes=SIZES)
    for n in [3, 4, 5, 9]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert (s["pieces"], s["capturable_pieces"]) == (1, 1)
    assert s["cuda_graphs_captured"] == 4 and s["cuda_graph_replays"] == 4


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


def test_ten_thousand_replays_do_not_grow_memory():
    layers = 2
    model = _model(layers=layers)
    compiled = compile_toy(model, capture_sizes=SIZES, progress=False)
    xs = {n: torch.randn(n, 16, device="cuda") for n in (2, 3, 5, 8, 13, 16)}
    for x in xs.values():
        compiled(x)
    torch.cuda.synchronize()
    before_replays = pcg_backend.stats()["cuda_graph_replays"]
    allocated = torch.cuda.memory_allocated()
    calls = 10_000 // (layers + 1) + 1
    for i in range(calls):
        compiled(xs[(2, 3, 5, 8, 13, 16)[i % 6]])
    torch.cuda.synchronize()
    replays = pcg_backend.stats()["cuda_graph_replays"] - before_replays
    assert replays >= 10_000
    assert torch.cuda.memory_allocated() == allocated
    print(f"{replays} replays, allocated before {allocated} B, after {torch.cuda.memory_allocated()} B "
          f"({torch.cuda.get_device_name()})")


def test_two_models_never_share_captures():
    a, b = _model(layers=2), _model(layers=2)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-1.5)
    ca, cb = compile_toy(a, capture_sizes=SIZES), compile_toy(b, capture_sizes=SIZES)
    for n in [3, 5, 8, 3, 16, 5]:
        x = torch.randn(n, 16, device="cuda")
        ya, yb = ca(x), cb(x)
        torch.testing.assert_close(ya, a(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(yb, b(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    # Dynamo shares one graph between instances of a class (weights are graph inputs);
    # pcg keeps one set of captures per weight address, each captured up front once.
    assert s["graphs_compiled"] == 1 and s["cuda_graphs_captured"] == 2 * 4 * 3
    assert s["cuda_graph_replays"] == 2 * 6 * 3


def test_dynamo_reset_frees_the_graphs_and_their_pool():
    import gc

    def settle():
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved()

    model = _model(hidden=1024, layers=4)
    x = torch.randn(100, 1024, device="cuda")
    # A first cycle creates what lives for the process (capture stream, cuBLAS workspaces).
    compile_toy(model, capture_sizes=[2, 64, 256, 1024], progress=False)(x)
    torch._dynamo.reset()
    baseline = settle()
    pcg_backend.reset_stats()
    compiled = compile_toy(model, capture_sizes=[2, 64, 256, 1024], progress=False)
    compiled(x)
    held = settle() - baseline
    assert pcg_backend.stats()["cuda_graphs_captured"] == 4 * 5 and held > 4 * 2**20, held
    torch._dynamo.reset()
    del compiled
    after = settle() - baseline
    print(f"graph memory held {held / 2**20:.1f} MiB, after torch._dynamo.reset() {after / 2**20:.1f} MiB "
          f"({torch.cuda.get_device_name()})")
    assert after <= 0, f"{after} bytes still reserved after reset"


@torch._dynamo.config.patch(capture_scalar_outputs=True)   # monkeypatch would delete the config key on undo
def test_host_sync_piece_falls_back_alone():
    lin = torch.nn.Linear(16, 16).cuda()

    def f(x):
        y = lin(x)
        out = torch.empty_like(y)
        torch.ops.pcg_toy.mix(y, out)
        scale = lin.bias[0].item()     # a device-to-host sync: not allowed while capturing
        return lin(out) * scale

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES, "progress": False}, dynamic=True)
    for n in [3, 4, 3]:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), f(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    # found before capture: the .item() piece runs eagerly, once per call, and says why
    reasons = [r for r in s["eager_reasons"] if "item() reads a tensor's value on the host" in r]
    assert len(reasons) == 1 and s["eager_reasons"][reasons[0]] == 3, s["eager_reasons"]
    assert "item() reads a tensor's value on the host" in pcg_backend.report()
    assert s["cuda_graphs_captured"] >= 4      # the piece before the split op is still captured per bucket


@torch.library.custom_op("pcg_test::hidden_host_sync", mutates_args=())
def _hidden_host_sync(x: torch.Tensor) -> torch.Tensor:
    # Like HF's MoE `grouped_mm_fallback`: an opaque op that reads device values on the host.
    scale = float(sum(x[:1, :1].abs().flatten().tolist()) > -1.0)
    return x * scale


@_hidden_host_sync.register_fake
def _(x):
    return torch.empty_like(x)


# Row-wise (it returns its input): declared so, the padding rule may pad the graph around it.
register_row_wise(torch.ops.pcg_test.hidden_host_sync)


def test_hidden_host_sync_is_found_before_capture():
    # The sync is invisible in the FX graph. A capture that hits it fails, and a
    # failed capture leaves torch's CUDA RNG and the pools damaged for the rest of
    # the process (the next randn raises). pcg finds it in a trial run under CUDA
    # sync debugging and never tries to capture the piece.
    lin = torch.nn.Linear(16, 16).cuda()

    def f(x):
        y = torch.ops.pcg_test.hidden_host_sync(lin(x))
        out = torch.empty_like(y)
        torch.ops.pcg_toy.mix(y, out)
        return lin(out) * 2

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES, "progress": False}, dynamic=True)
    calls = [3, 4, 16, 9]
    for n in calls:
        x = torch.randn(n, 16, device="cuda")
        torch.testing.assert_close(compiled(x), f(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    dynamic_buckets = [b for b in SIZES if b > 1]
    failed = [r for r in s["eager_reasons"] if "synchronizes with the host" in r]
    assert len(failed) == 1 and "submod_0" in failed[0], s["eager_reasons"]
    assert s["eager_reasons"][failed[0]] == len(dynamic_buckets) + len(calls)   # up-front buckets, then calls
    assert not any("capture failed" in r for r in s["eager_reasons"])
    # the piece after the split op: every bucket, up front, then one replay per call
    assert s["cuda_graphs_captured"] == len(dynamic_buckets), pcg_backend.report()
    assert s["cuda_graph_replays"] == len(calls)
    assert torch.randn(2, device="cuda").isfinite().all()          # the CUDA RNG still works
    # a second graph afterwards (static shapes: one capture) uses the same pool as usual
    g = torch.compile(lambda x: lin(x).relu() + 1, backend="pcg", options={"capture_sizes": SIZES})
    x = torch.randn(8, 16, device="cuda")
    torch.testing.assert_close(g(x), lin(x).relu() + 1, atol=ATOL, rtol=0)
    assert pcg_backend.stats()["cuda_graphs_captured"] == len(dynamic_buckets) + 1


def test_safe_split_ops_are_captured_at_exact_size_and_state_advances_once():
    from toy_models import StatefulToyModel

    pcg_backend.unregister_split_op(torch.ops.pcg_toy.running_sum)   # other promises need a fresh registration
    pcg_backend.register_split_op(torch.ops.pcg_toy.running_sum, cudagraph_safe=True)
    try:
        torch.manual_seed(0)
        model = StatefulToyModel(layers=2).cuda()
        compiled = torch.compile(model, backend="pcg", options={"capture_sizes": SIZES})
        for cache in range(2):                   # a second "cache" sits at new addresses
            s_pcg, s_ref = model.new_state("cuda"), model.new_state("cuda")
            keep = s_pcg                         # hold it, so the next one cannot reuse its memory
            for _ in range(4):                   # decode-like steps: Dynamo's static n=1 graph
                x = torch.randn(1, 16, device="cuda")
                torch.testing.assert_close(compiled(x, s_pcg), model(x, s_ref), atol=ATOL, rtol=0)
                torch.testing.assert_close(s_pcg, s_ref, atol=ATOL, rtol=0)
            s = pcg_backend.stats()
            assert s["split_ops_in_graphs"] == 2 and s["eager_runs"] == 0
            assert s["cuda_graphs_captured"] == cache + 1 and s["new_address_captures"] == cache
            assert s["cuda_graph_replays"] == 3 * (cache + 1)
        del keep
    finally:
        pcg_backend.unregister_split_op(torch.ops.pcg_toy.running_sum)
        pcg_backend.register_split_op(torch.ops.pcg_toy.running_sum)


def test_address_sets_are_kept_most_recent_first_and_the_least_recent_is_dropped():
    # Graphs of one key for different state addresses (several caches): the one
    # used last is checked first, and beyond MAX_VERSIONS_PER_KEY the least
    # recently used is dropped. The capture count after each step shows both.
    from pcg_backend.cudagraph import MAX_VERSIONS_PER_KEY
    from toy_models import StatefulToyModel

    pcg_backend.unregister_split_op(torch.ops.pcg_toy.running_sum)   # other promises need a fresh registration
    pcg_backend.register_split_op(torch.ops.pcg_toy.running_sum, cudagraph_safe=True)
    try:
        torch.manual_seed(0)
        model = StatefulToyModel(layers=2).cuda()
        compiled = torch.compile(model, backend="pcg", options={"capture_sizes": SIZES})
        states = [(model.new_state("cuda"), model.new_state("cuda")) for _ in range(MAX_VERSIONS_PER_KEY + 1)]

        def step(k):
            s_pcg, s_ref = states[k]
            x = torch.randn(1, 16, device="cuda")
            torch.testing.assert_close(compiled(x, s_pcg), model(x, s_ref), atol=ATOL, rtol=0)
            torch.testing.assert_close(s_pcg, s_ref, atol=ATOL, rtol=0)
            return pcg_backend.stats()["cuda_graphs_captured"]

        assert MAX_VERSIONS_PER_KEY == 4
        # 0-3 capture; 0 replays; 4 captures and drops 1 (0 was used after it); 0 replays; 1 captures again.
        assert [step(k) for k in [0, 1, 2, 3, 0, 4, 0, 1]] == [1, 2, 3, 4, 4, 5, 5, 6]
    finally:
        pcg_backend.unregister_split_op(torch.ops.pcg_toy.running_sum)
        pcg_backend.register_split_op(torch.ops.pcg_toy.running_sum)
