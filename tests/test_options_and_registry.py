"""Options validation, the default ladder, split-op registration and backend registration (CPU)."""

import importlib.metadata

import pytest
import torch

import pcg_backend
from pcg_backend.buckets import MAX_PAD_WASTE, Ladder, default_ladder, pad_dims, slice_dims
from pcg_backend.options import parse_options


def test_default_options():
    opts = parse_options(None)
    assert opts.capture_sizes == default_ladder(512)
    assert opts.compiler == "eager" and opts.cuda_graphs is True and opts.max_capture_size == 512
    assert opts.gemm_library == "cublaslt"


@pytest.mark.parametrize("bad, match", [
    ({"capture_size": [1]}, "unknown pcg option"),
    ({"capture_sizes": [4, 2]}, "sorted"),
    ({"capture_sizes": [0, 2]}, "positive"),
    ({"capture_sizes": [-1]}, "positive"),
    ({"capture_sizes": []}, "non-empty"),
    ({"capture_sizes": "some"}, "auto"),
    ({"compiler": "tvm"}, "eager"),
    ({"cuda_graphs": "yes"}, "True or False"),
    ({"max_capture_size": 0}, "positive int"),
    ({"gemm_library": "cublas"}, "cublaslt"),
])
def test_bad_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_options(bad)


def test_bad_option_raises_at_compile_time():
    f = torch.compile(lambda x: x + 1, backend="pcg", options={"nope": 1})
    with pytest.raises(Exception, match="unknown pcg option"):
        f(torch.ones(3))


def test_mode_keyword_is_accepted():
    assert parse_options(None, "reduce-overhead").compiler == "eager"
    with pytest.raises(ValueError, match="valid modes"):
        parse_options(None, "turbo")


def test_explicit_sizes_set_the_largest_bucket_and_never_drop_silently():
    assert parse_options({"capture_sizes": [1, 8, 64, 1024]}).max_capture_size == 1024
    assert parse_options({"capture_sizes": [1, 8, 64], "max_capture_size": 64}).capture_sizes == (1, 8, 64)
    with pytest.raises(ValueError, match=r"above max_capture_size=64: \[1024\]"):
        parse_options({"capture_sizes": [1, 8, 64, 1024], "max_capture_size": 64})


def test_default_ladder_covers_1_to_512_with_bounded_waste():
    sizes = default_ladder(512)
    ladder = Ladder(sizes)
    assert sizes[0] == 1 and sizes[-1] == 512
    for n in range(1, 513):
        b = ladder.bucket(n)
        assert b >= n and b in sizes
        if n > 64:  # "except at the smallest sizes"
            assert (b - n) / b <= MAX_PAD_WASTE, (n, b)
    assert ladder.bucket(513) is None
    assert len(sizes) == 35


def test_pad_is_zeros_and_slice_is_a_view():
    t = torch.arange(6.0).reshape(3, 2)
    p = pad_dims(t, {0: 5})
    assert p.shape == (5, 2) and torch.equal(p[:3], t) and torch.count_nonzero(p[3:]) == 0
    s = slice_dims(p, {0: 3})
    assert s.data_ptr() == p.data_ptr() and torch.equal(s, t)


def test_register_split_op_forms():
    @torch.library.custom_op("pcg_test::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    for form in (double, torch.ops.pcg_test.double, torch.ops.pcg_test.double.default, "pcg_test::double"):
        pcg_backend.unregister_split_op("pcg_test::double")
        assert not pcg_backend.is_split_op(torch.ops.pcg_test.double.default)
        assert pcg_backend.register_split_op(form) is form
        assert pcg_backend.is_split_op(torch.ops.pcg_test.double.default)
    pcg_backend.unregister_split_op(double)


@pytest.mark.parametrize("bad", [lambda x: x, 3, "nonamespace", "pcg_test::does_not_exist"])
def test_register_split_op_rejects_non_ops(bad):
    with pytest.raises(ValueError):
        pcg_backend.register_split_op(bad)


def test_backend_is_registered():
    assert "pcg" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("pcg") is pcg_backend.pcg_backend


def test_entry_point_is_declared_when_installed():
    try:
        dist = importlib.metadata.distribution("pcg_backend")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pcg_backend is not pip-installed here")
    eps = [ep for ep in dist.entry_points if ep.group == "torch_dynamo_backends"]
    assert [ep.name for ep in eps] == ["pcg"] and eps[0].load() is pcg_backend.pcg_backend


def test_padding_safe_implies_cudagraph_safe_and_unregisters_cleanly():
    from pcg_backend.ops.registry import is_cudagraph_safe, is_padding_safe

    @torch.library.custom_op("pcg_test::scaled", mutates_args=())
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    name = "pcg_test::scaled"
    pcg_backend.register_split_op(scaled, padding_safe=True)
    assert is_padding_safe(name) and is_cudagraph_safe(name)
    pcg_backend.register_split_op(scaled, cudagraph_safe=True)   # re-registering narrows the promise
    assert not is_padding_safe(name) and is_cudagraph_safe(name)
    pcg_backend.register_split_op(scaled)
    assert not is_padding_safe(name) and not is_cudagraph_safe(name)
    pcg_backend.register_split_op(padding_safe=True)(scaled)       # decorator form
    assert is_padding_safe(name)
    pcg_backend.unregister_split_op(scaled)
    assert not is_padding_safe(name) and not is_cudagraph_safe(name) and not pcg_backend.is_split_op(torch.ops.pcg_test.scaled.default)
    # pcg's own Mamba2 core reads the device count; attention cannot (it writes the KV cache per real row)
    assert is_padding_safe("pcg::mamba2_core") and not is_padding_safe("pcg::attention")


def test_gemm_library_is_set_only_inside_the_block_and_restored_on_error(monkeypatch):
    from pcg_backend.gemm_library import gemm_library

    calls = []
    current = ["cublas"]

    def fake(backend=None):
        if backend is not None:
            calls.append(backend)
            current[0] = backend
        return current[0]

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", fake)
    with gemm_library("unchanged"):
        assert current == ["cublas"]
    assert calls == []
    with pytest.raises(KeyError):
        with gemm_library("cublaslt"):
            assert current == ["cublaslt"]
            raise KeyError("capture failed")
    assert calls == ["cublaslt", "cublas"] and current == ["cublas"]
