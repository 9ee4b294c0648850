"""The Triton skinny-GEMM kernel, and `pcg::skinny_linear` inside captured pieces (skipped without CUDA)."""

import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from pcg_backend.ops import skinny_gemm
from toy_models import ToyModel, compile_toy

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead, k, n, bias", [
    ((1,), 4480, 4096, False),        # a decode row, K on the 128-wide tile
    ((5,), 300, 4160, True),          # K and N off every tile size, with a bias
    ((16,), 10240, 5000, False),      # the most rows, K on the 256-wide tile
    ((2, 3), 512, 4096, True),        # a 3-D input
])
def test_kernel_matches_an_fp32_linear(dtype, lead, k, n, bias):
    torch.manual_seed(0)
    x = torch.randn(*lead, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    assert skinny_gemm.supported(x, w)
    got = skinny_gemm.triton_linear(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == ref.shape and got.dtype == dtype
    # fp32 accumulation, one rounding to the output dtype: within 1 % of an fp32 reference,
    # and no further from it than cuBLAS's own half-precision result is.
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=1e-2)
    cublas = torch.nn.functional.linear(x, w, b).float()
    assert (got.float() - ref).abs().max() <= 2 * (cublas - ref).abs().max() + 1e-3


@pytest.mark.parametrize("m, k, n, split, bias", [
    (1, 10240, 4480, 2, False),      # out_proj's shape, K on the tile
    (8, 12288, 3072, 4, True),       # FalconH1's down_proj, with a bias
    (16, 1000, 4200, 3, False),      # K off every tile size
])
def test_split_k_matches_the_unsplit_kernel_and_repeats_bitwise(m, k, n, split, bias):
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
    whole = skinny_gemm.triton_linear(x, w, b, tile=tile)
    first, again = (skinny_gemm.triton_linear(x, w, b, tile={**tile, "SPLIT_K": split}) for _ in range(2))
    assert torch.equal(first, again)        # the partials are added in a fixed order
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(first.float(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(first, whole, atol=1e-2, rtol=1e-2)   # one bf16 rounding apart at most


def test_split_k_replays_in_a_cuda_graph_with_its_counters_reset():
    # kv_proj's shape: too few column blocks for the SMs, so the tile table splits K.
    torch.manual_seed(0)
    x = torch.randn(1, 4480, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4480, device="cuda", dtype=torch.bfloat16) / 4480 ** 0.5
    assert skinny_gemm._tile(1, 4480, 1024, *skinny_gemm._device_facts(x.device.index or 0)).get("SPLIT_K", 1) > 1
    skinny_gemm.triton_linear(x, w)   # the warm-up allocates the arrival counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_gemm.triton_linear(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert not skinny_gemm._ARRIVALS[str(x.device)].any()   # every column block's last program reset it
        assert torch.equal(y, skinny_gemm.triton_linear(x, w))   # replay and eager launch: the same bits
        ref = torch.nn.functional.linear(x.float(), w.float())
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=1e-2)


def test_a_first_split_launch_inside_a_capture_is_an_error():
    # The counters must exist before a capture records their address (pcg's warm-up makes them).
    x = torch.randn(1, 4480, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4480, device="cuda", dtype=torch.bfloat16)
    key = str(x.device)
    saved = skinny_gemm._ARRIVALS.pop(key, None)   # kept alive: graphs of other tests may hold its address
    try:
        with pytest.raises(RuntimeError, match="before any CUDA graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                skinny_gemm.triton_linear(x, w)
        assert key not in skinny_gemm._ARRIVALS
    finally:
        skinny_gemm._ARRIVALS.pop(key, None)
        if saved is not None:
            skinny_gemm._ARRIVALS[key] = saved


def test_kernel_limits():
    w = torch.empty(4096, 64, device="cuda", dtype=torch.bfloat16)
    assert skinny_gemm.supported(torch.empty(16, 64, device="cuda", dtype=torch.bfloat16), w)
    assert not skinny_gemm.supported(torch.empty(17, 64, device="cuda", dtype=torch.bfloat16), w)
    assert skinny_gemm.supported(torch.empty(1, 64, device="cuda", dtype=torch.bfloat16), w[:512])
    assert not skinny_gemm.supported(torch.empty(1, 64, device="cuda", dtype=torch.bfloat16), w[:511])
    assert not skinny_gemm.supported(torch.empty(1, 64, device="cuda"), w.float())
    assert not skinny_gemm.supported(torch.empty(1, 64, device="cuda", dtype=torch.bfloat16), w.t().contiguous().t())


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_static_graphs_of_few_rows_capture_the_kernel_and_padded_graphs_keep_f_linear(compiler):
    torch.manual_seed(0)
    model = ToyModel(layers=1, hidden=4096).cuda().to(torch.bfloat16)   # 2 captured pieces, 1 linear each
    compiled = compile_toy(model, capture_sizes=[4, 16], compiler=compiler, skinny_gemm="static",
                           max_overflow_size=0)
    before = dict(skinny_gemm.LAUNCHES)

    def launches():
        return {k: v - before[k] for k, v in skinny_gemm.LAUNCHES.items()}

    with torch.no_grad():
        # The padded graph (symbolic rows): not routed, its captures hold cuBLAS GEMMs.
        for n in (3, 16, 40):
            x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x), atol=5e-2, rtol=2e-2, msg=f"{n} rows")
        assert pcg_backend.stats()["skinny_linears"] == 0
        assert launches() == {"triton": 0, "linear": 0}
        # One row is Dynamo's static graph: per piece a warm-up, the sync probe and the capture
        # call the kernel; later calls replay without calling anything on the host.
        for _ in range(3):
            x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x), atol=5e-2, rtol=2e-2)
    s = pcg_backend.stats()
    assert s["skinny_linears"] == 2
    assert launches() == {"triton": 2 * 3, "linear": 0}
    assert s["cuda_graph_replays"] == 2 * 2 + 2 * 2   # n=3 and 16, then the 2nd and 3rd one-row calls
    assert s["eager_runs"] == 2                        # n=40, above the largest bucket: both pieces


def test_static_graph_above_16_rows_is_not_routed():
    torch.manual_seed(0)
    model = ToyModel(layers=1, hidden=4096).cuda().to(torch.bfloat16)
    compiled = torch.compile(model, backend="pcg", dynamic=False, options={"skinny_gemm": "static"})
    with torch.no_grad():
        for rows, routed in ((8, 2), (17, 2)):
            x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x), atol=5e-2, rtol=2e-2)
            assert pcg_backend.stats()["skinny_linears"] == routed   # 8 rows: 2; the 17-row graph adds none


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_option_all_captures_routed_twins_at_small_buckets_only(compiler):
    torch.manual_seed(0)
    model = ToyModel(layers=1, hidden=4096).cuda().to(torch.bfloat16)   # 2 captured pieces, 1 linear each
    compiled = compile_toy(model, capture_sizes=[4, 16, 32], compiler=compiler, skinny_gemm="all",
                           max_overflow_size=0)
    before = dict(skinny_gemm.LAUNCHES)

    def launches():
        return {k: v - before[k] for k, v in skinny_gemm.LAUNCHES.items()}

    with torch.no_grad():
        x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), model(x), atol=5e-2, rtol=2e-2)
        s = pcg_backend.stats()
        assert (s["skinny_linears"], s["skinny_linears_small_buckets"]) == (0, 2)
        # Up front, largest first, per piece: bucket 32 warm-up + sync probe + capture run the
        # unrouted piece (aten's linear, not the op: no launch counted); buckets 16 and 4 warm
        # up and capture the routed twin, with the kernel.
        assert launches() == {"triton": 2 * 2 * 2, "linear": 0}
        assert s["twin_captures"] == 2 * 2
        for n in (1, 4, 16, 17, 32, 40):
            x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x), atol=5e-2, rtol=2e-2, msg=f"{n} rows")
    s = pcg_backend.stats()
    # Replays call nothing on the host. n=1 is Dynamo's static graph: its 2 pieces are routed in
    # place and warm up, probe and capture with the kernel (6); n=40 is above the largest
    # bucket and runs the unrouted pieces without graphs (no launch counted).
    assert launches() == {"triton": 8 + 6, "linear": 0}
    assert (s["skinny_linears"], s["skinny_linears_small_buckets"]) == (2, 2)
    assert s["twin_captures"] == 4
    assert s["cuda_graph_replays"] == 2 * 5          # the first call, then 4, 16, 17, 32
    assert s["eager_runs"] == 2                       # n=40: both pieces without graphs


def test_decode_graphs_dynamic_in_the_batch_capture_the_kernel_per_batch_up_to_16_rows():
    # A decode step (B, 1, H) with B symbolic: no token dim, captures keyed on B. Its linears are
    # routed in place, and each capture takes the kernel its batch calls for.
    torch.manual_seed(0)
    model = ToyModel(layers=1, hidden=4096).cuda().to(torch.bfloat16)   # 2 captured pieces, 1 linear each
    compiled = torch.compile(model, backend="pcg")
    before = dict(skinny_gemm.LAUNCHES)

    def launches():
        return {k: v - before[k] for k, v in skinny_gemm.LAUNCHES.items()}

    with torch.no_grad():
        for batch in (2, 8, 24, 8, 2):
            x = torch.randn(batch, 1, 4096, device="cuda", dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(x, 0)
            torch.testing.assert_close(compiled(x), model(x), atol=5e-2, rtol=2e-2, msg=f"batch {batch}")
    s = pcg_backend.stats()
    assert s["skinny_linears"] == 2 and s["skinny_linears_small_buckets"] == 0
    # Per piece: the first batch warms up, probes for host syncs and captures (3 op calls), later
    # batches warm up and capture (2); replays call nothing. Batches 2 and 8 take the kernel,
    # 24 rows (above 16) F.linear inside the op.
    assert launches() == {"triton": 2 * (3 + 2), "linear": 2 * 2}
    assert s["cuda_graph_replays"] == 2 * 2           # the second calls at batch 8 and 2


def test_option_off_keeps_f_linear():
    torch.manual_seed(0)
    model = ToyModel(layers=1, hidden=4096).cuda().to(torch.bfloat16)
    compiled = compile_toy(model, capture_sizes=[4, 16], skinny_gemm="off")
    before = dict(skinny_gemm.LAUNCHES)
    with torch.no_grad():
        x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-2, rtol=1e-2)
    assert pcg_backend.stats()["skinny_linears"] == 0
    assert skinny_gemm.LAUNCHES == before
