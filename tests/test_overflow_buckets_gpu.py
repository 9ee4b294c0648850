"""Overflow buckets on CUDA: captured on a caller's first call, replayed after, and given up cleanly."""

import pytest
import torch

import pcg_backend
from conftest import requires_cuda
from toy_models import NoSplitModel, ToyModel, compile_toy

pytestmark = requires_cuda
ATOL = 1e-4   # fp32 on CUDA: TF32 is off, padded and unpadded GEMMs may still differ in reassociation


def _check(model, compiled, n):
    x = torch.randn(n, 16, device="cuda")
    out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=ATOL, rtol=0, msg=f"{n} tokens")
    return x, out


def test_an_overflow_bucket_is_captured_once_on_first_use_and_replayed_after():
    torch.manual_seed(0)
    model = ToyModel(3).cuda()
    compiled = compile_toy(model, capture_sizes=[4, 8, 16], max_overflow_size=64, progress=False)
    _check(model, compiled, 3)
    s = pcg_backend.stats()
    # Up front: 4 capturable pieces x buckets 4, 8 and 16 (Dynamo's dynamic graph starts at 2 tokens).
    assert (s["cuda_graphs_captured"], s["live_captures"]) == (12, 0)
    x20, out20 = _check(model, compiled, 20)           # overflow bucket 24: captured now, on the caller's call
    s = pcg_backend.stats()
    assert (s["cuda_graphs_captured"], s["live_captures"], s["overflow_calls"]) == (16, 4, 1)
    replays = s["cuda_graph_replays"]
    _check(model, compiled, 22)                         # the same bucket: replays only
    _check(model, compiled, 24)
    s = pcg_backend.stats()
    assert (s["cuda_graphs_captured"], s["overflow_calls"]) == (16, 3)
    assert s["cuda_graph_replays"] == replays + 2 * 4
    # An earlier call's output is its own: later replays of its bucket did not overwrite it.
    torch.testing.assert_close(out20, model(x20), atol=ATOL, rtol=0)
    _check(model, compiled, 65)                         # above the overflow buckets: unpadded, no graphs
    assert pcg_backend.stats()["eager_reasons"] == {"token count above the largest overflow bucket 64": 4}


def test_without_cuda_graphs_on_a_gpu_nothing_pads_to_an_overflow_bucket():
    model = ToyModel(1).cuda()
    compiled = compile_toy(model, capture_sizes=[4, 8, 16], max_overflow_size=64, cuda_graphs=False)
    _check(model, compiled, 20)
    s = pcg_backend.stats()
    assert (s["overflow_calls"], s["padded_calls"]) == (0, 0)
    assert s["eager_reasons"] == {"token count above the largest bucket 16": 2}


@torch.library.custom_op("pcg_test::reads_host_above_16_rows", mutates_args=())
def _reads_host_above_16_rows(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > 16:
        x.sum().item()    # a host read: no CUDA graph can hold it
    return x.clone()


@torch.library.custom_op("pcg_test::syncs_in_captures_above_16_rows", mutates_args=())
def _syncs_in_captures_above_16_rows(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] > 16 and torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()   # hidden from the trial run: only a capture finds it, and CUDA then ends it
    return x.clone()


for _op in (_reads_host_above_16_rows, _syncs_in_captures_above_16_rows):
    _op.register_fake(lambda x: torch.empty_like(x))
    # Row-wise, so that the graph may be padded: an op pcg does not know keeps its graph at exact sizes.
    pcg_backend.register_row_wise(_op._qualname)


class _OpAbove16(NoSplitModel):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.down(self.op(torch.relu(self.up(x))))


@pytest.mark.parametrize("op, why", [
    (torch.ops.pcg_test.reads_host_above_16_rows, "synchronizes with the host"),
    (torch.ops.pcg_test.syncs_in_captures_above_16_rows, "CUDA graph capture failed"),
])
def test_a_piece_that_cannot_be_captured_at_an_overflow_bucket_gives_up_overflow_buckets_only(op, why):
    """Found by the trial run before the capture, or by the capture itself: that call runs the piece
    eagerly and right, later calls above the ladder run unpadded without graphs with the reason in the report,
    the ladder's graphs still replay, and CUDA's random numbers still work after a capture CUDA ended."""
    torch.manual_seed(0)
    model = _OpAbove16(op).cuda()
    compiled = compile_toy(model, capture_sizes=[4, 8, 16], max_overflow_size=64, progress=False)
    _check(model, compiled, 5)
    assert pcg_backend.stats()["cuda_graphs_captured"] == 3          # buckets 4, 8 and 16, up front
    _check(model, compiled, 20)
    s = pcg_backend.stats()
    assert s["cuda_graphs_captured"] == 3 and s["overflow_calls"] == 1
    [(failed, runs)] = s["eager_reasons"].items()
    assert why in failed and runs == 1
    torch.randn(8, device="cuda")                                   # the RNG is out of capture mode
    _check(model, compiled, 20)
    off = [r for r in pcg_backend.stats()["eager_reasons"] if r.startswith("token count above the largest bucket 16; "
                                                                           "overflow buckets off for key ()")]
    assert len(off) == 1 and why in off[0]
    replays = pcg_backend.stats()["cuda_graph_replays"]
    _check(model, compiled, 7)
    assert pcg_backend.stats()["cuda_graph_replays"] == replays + 1
    assert pcg_backend.stats()["overflow_calls"] == 1


@pytest.mark.parametrize("family", ["nemotron_h", "granitemoehybrid"])
def test_hf_prefills_in_overflow_buckets_match_eager_in_bf16(family):
    """A bf16 prefill padded to an overflow bucket equals eager within the noise of the ladder's buckets."""
    pytest.importorskip("mamba_ssm")
    from hf_models import tiny_model

    model = tiny_model(family, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 32, "max_overflow_size": 96,
                                                          "progress": False})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (20, 33, 50, 96, 97):     # a ladder bucket, overflow buckets 40, 56 and 96, above them
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).cuda()
            # bf16 logits are O(1); padding changes GEMM shapes, hence accumulation order (as test_hf_gpu.py)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=0.05, rtol=0,
                                       msg=f"{family}: {n} tokens")
    s = pcg_backend.stats()
    assert s["overflow_calls"] == 3 and s["live_captures"] > 0
    assert any(r.startswith("token count above the largest overflow bucket 96") for r in s["eager_reasons"])
