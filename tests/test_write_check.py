"""Undeclared writes of split ops (`write_check.py`): between pieces and captured inside them.

CPU runs the pieces as plain eager pieces; on CUDA the captured cases run
through `CudaGraphPiece`, whose first run is the warm-up before its capture.
Results are compared with eager (fp32, atol 1e-6).
"""

import pytest
import torch

import pcg_backend
from pcg_backend import UndeclaredWriteError, write_check

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


@pytest.fixture
def ops():
    """pcg_test::sneaky_scratch writes `scratch` without declaring it; pcg_test::acc declares `out`."""

    @torch.library.custom_op("pcg_test::sneaky_scratch", mutates_args=())
    def sneaky(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        scratch.add_(1)
        return x * 2

    @torch.library.custom_op("pcg_test::acc", mutates_args=("out",))
    def acc(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out.add_(x.sum())
        return x * 2

    sneaky.register_fake(lambda x, scratch: torch.empty_like(x))
    acc.register_fake(lambda x, out: torch.empty_like(x))
    yield sneaky, acc
    for op in (sneaky, acc):
        if pcg_backend.is_split_op(op):
            pcg_backend.unregister_split_op(op)


def _compiled(fn, dynamic, compiler="eager"):
    return torch.compile(fn, backend="pcg", dynamic=dynamic,
                         options={"capture_sizes": [1, 2, 4, 8], "compiler": compiler, "progress": False})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("flags, dynamic, sizes", [
    ({"cudagraph_safe": True}, False, (3,)),      # inside a piece of an exact-size graph
    ({"padding_safe": True}, True, (3, 5)),        # inside a padded piece (buckets 4 and 8)
])
def test_a_captured_split_op_with_an_undeclared_write_is_an_error(ops, device, compiler, flags, dynamic, sizes):
    sneaky, _ = ops
    pcg_backend.register_split_op(sneaky, **flags)
    lin = torch.nn.Linear(4, 4, device=device)
    f = _compiled(lambda x, s: torch.ops.pcg_test.sneaky_scratch(lin(x), s) + 1, dynamic, compiler)
    for n in sizes:   # a scratch of 1 element: Dynamo keeps a size of 1 static, where 2 would be a symbol
        with torch.no_grad(), pytest.raises(UndeclaredWriteError,
                                            match=r"sneaky_scratch wrote its argument 'scratch' in place"):
            f(torch.randn(n, 4, device=device), torch.zeros(1, device=device))
    assert pcg_backend.stats()["split_ops_in_graphs"] == 1, pcg_backend.report()


@pytest.mark.parametrize("device", DEVICES)
def test_a_captured_split_op_that_declares_its_writes_is_checked_once(ops, device, monkeypatch):
    _, acc = ops
    checks = []
    real = write_check._schema_arguments
    monkeypatch.setattr(write_check, "_schema_arguments", lambda *a: checks.append(a[0]) or real(*a))
    pcg_backend.register_split_op(acc, cudagraph_safe=True)
    lin = torch.nn.Linear(4, 4, device=device)
    f = _compiled(lambda x, s: torch.ops.pcg_test.acc(lin(x), s) + 1, dynamic=False)
    total = torch.zeros(1, device=device)
    expected = torch.zeros(1, device=device)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3, 4, device=device)
            torch.testing.assert_close(f(x, total), lin(x) * 2 + 1, atol=1e-6, rtol=0)
            expected += lin(x).sum()
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=0)
    assert len(checks) == 1 and pcg_backend.stats()["split_ops_in_graphs"] == 1, pcg_backend.report()


@pytest.mark.parametrize("flags", [{}, {"cudagraph_safe": True}])
def test_a_tensor_passed_as_read_and_as_written_is_no_error(ops, flags):
    """acc(s, s) and acc(s[:2], s[2:]): the read-only argument shares the written one's storage."""
    _, acc = ops
    pcg_backend.register_split_op(acc, **flags)

    def fn(s):
        return torch.ops.pcg_test.acc(s, s).sum() + torch.ops.pcg_test.acc(s[:2], s[2:]).sum()

    s, ref = torch.arange(4.0), torch.arange(4.0)
    with torch.no_grad():
        got, want = _compiled(fn, dynamic=False)(s), fn(ref)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(s, ref, atol=1e-6, rtol=0)


def test_a_piece_with_a_higher_order_op_runs_its_checked_first_call(ops):
    _, acc = ops
    pcg_backend.register_split_op(acc, cudagraph_safe=True)

    def fn(x, s):
        h = torch.ops.pcg_test.acc(x, s)
        return torch.cond(h.sum() > 0, lambda h: h + 1, lambda h: h - 1, (h,))

    f = _compiled(fn, dynamic=False)
    x, s = torch.randn(3, 4), torch.zeros(1)
    with torch.no_grad():
        torch.testing.assert_close(f(x, s), fn(x.clone(), torch.zeros(1)), atol=1e-6, rtol=0)


def test_an_eager_split_op_under_inference_mode_is_checked(ops):
    """Inference tensors keep no version counter: the eager check compares their bytes instead."""
    sneaky, acc = ops
    pcg_backend.register_split_op(sneaky)
    pcg_backend.register_split_op(acc)
    good = _compiled(lambda x, s: torch.ops.pcg_test.acc(x * 3, s) + 1, dynamic=False)
    bad = _compiled(lambda x, s: torch.ops.pcg_test.sneaky_scratch(x * 3, s) + 1, dynamic=False)
    with torch.inference_mode():
        x, s = torch.randn(3, 4), torch.zeros(1)
        torch.testing.assert_close(good(x, s), x * 6 + 1, atol=1e-6, rtol=0)
        torch.testing.assert_close(s, (x * 3).sum().reshape(1), atol=1e-5, rtol=0)
        with pytest.raises(UndeclaredWriteError, match="'scratch' in place"):
            bad(x, torch.zeros(1))


@pytest.mark.parametrize("copy_limit", [write_check.COPY_LIMIT_BYTES, 0])
def test_fingerprints_see_a_write_and_nothing_else(copy_limit, monkeypatch):
    """Whole copies and, above the copy limit, checksums; conjugate and negative views, NaN, 0-dim."""
    monkeypatch.setattr(write_check, "COPY_LIMIT_BYTES", copy_limit)
    monkeypatch.setattr(write_check, "_CHECKSUM_CHUNK", 7)   # several chunks for the small tensors here
    tensors = [torch.randn(5, 3), torch.tensor(float("nan")), torch.randn(4, dtype=torch.complex64).conj(),
               torch.randn(4, dtype=torch.complex64)._neg_view(), torch.arange(6, dtype=torch.int8)[::2],
               torch.zeros(3, dtype=torch.bool)]
    for t in tensors:
        before = write_check.fingerprint(t)
        assert not write_check.changed(t, before)
        flat = t.view(-1) if t.is_contiguous() else t
        flat[-1] = 7 if t.dtype != torch.bool else True   # no element holds 7 or True before
        assert write_check.changed(t, before), t


def test_tensors_whose_bytes_cannot_be_read_flat_are_left_out():
    quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    kept = write_check.read_only_to_check(
        [("meta", torch.empty(3, device="meta")), ("sparse", torch.eye(3).to_sparse()), ("q", quantized),
         ("dense", torch.ones(2))], [torch.eye(2).to_sparse(), None])
    assert [name for name, _ in kept] == ["dense"]
