"""Options validation, the default ladder, split-op registration and backend registration (CPU)."""

import importlib.metadata

import pytest
import torch

from torch._dynamo.exc import BackendCompilerFailed

import pcg_backend
from pcg_backend.buckets import MAX_PAD_WASTE, Ladder, default_ladder, pad_dims, slice_dims
from pcg_backend.options import BackendOptionError, PcgOptionError, parse_backend_options, parse_options
from toy_models import ToyModel


def test_default_options():
    opts = parse_options(None)
    assert opts.capture_sizes == default_ladder(512)
    assert opts.compiler == "eager" and opts.cuda_graphs is True and opts.max_capture_size == 512
    assert opts.gemm_library == "cublaslt"


@pytest.mark.parametrize("bad, match", [
    ({"capture_size": [1]}, r"unknown pcg option\(s\) \['capture_size'\]; valid options are \['capture"),
    ({"capture_sizes": [4, 2]}, r"sorted ascending without repeats, got \[4, 2\]; pass \[2, 4\]"),
    ({"capture_sizes": [0, 2]}, "positive"),
    ({"capture_sizes": [-1]}, "positive"),
    ({"capture_sizes": []}, "non-empty"),
    ({"capture_sizes": "some"}, "auto"),
    ({"compiler": "tvm"}, r"compiler must be one of \('eager', 'inductor'\), got 'tvm'"),
    ({"cuda_graphs": "yes"}, "True or False"),
    ({"max_capture_size": 0}, "positive int"),
    ({"gemm_library": "cublas"}, "cublaslt"),
    ({"capture": "later"}, r"\('upfront', 'lazy'\)"),
    ({"skinny_gemm": "some"}, r"\('static', 'all', 'off'\)"),
])
def test_bad_options_raise_a_value_error_naming_the_choices(bad, match):
    with pytest.raises(PcgOptionError, match=match) as e:
        parse_options(bad)
    assert isinstance(e.value, ValueError)


def test_compile_checks_options_before_tracing():
    with pytest.raises(ValueError, match=r"unknown pcg option\(s\) \['max_capture_sizes'\]; valid options are"):
        pcg_backend.compile(ToyModel(1), max_capture_size=16, max_capture_sizes=8)
    with pytest.raises(PcgOptionError, match="compiler must be one of"):
        pcg_backend.compile(ToyModel(1), compiler="tvm")
    assert pcg_backend.stats()["graphs_compiled"] == 0   # nothing was traced


def test_compile_passes_options_to_the_backend():
    torch.manual_seed(0)
    model = ToyModel(2)
    compiled = pcg_backend.compile(model, capture_sizes=[1, 2, 4, 8], max_overflow_size=0, dynamic=True)
    for n in (3, 8, 9):
        x = torch.randn(n, 16)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    s = pcg_backend.stats()
    assert (s["graphs_compiled"], s["pieces"], s["padded_calls"]) == (1, 5, 1)   # 3 padded to 4; 9 is above 8
    assert s["eager_reasons"]["token count above the largest bucket 8"] == 3     # the 3 token-wise pieces


def test_compile_hands_torch_compiles_own_guard_filter_to_torch_compile():
    seen = []

    def keep_every_guard(entries):   # torch.compile calls it with the guards it built
        seen.append(len(entries))
        return [True] * len(entries)

    torch.manual_seed(0)
    model = ToyModel(1)
    compiled = pcg_backend.compile(model, capture_sizes=[4, 8], guard_filter_fn=keep_every_guard)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    assert len(seen) == 1 and seen[0] > 0
    assert pcg_backend.stats()["graphs_compiled"] == 1


def test_bad_option_through_torch_compile_fails_at_the_first_call():
    # Dynamo calls the backend only then; the error names the choices either way.
    f = torch.compile(lambda x: x + 1, backend="pcg", options={"nope": 1})
    with pytest.raises(BackendCompilerFailed, match=r"unknown pcg option\(s\) \['nope'\]; valid options") as e:
        f(torch.ones(3))
    assert isinstance(e.value.inner_exception, PcgOptionError)


def test_bad_option_through_torch_compile_is_a_value_error():
    f = torch.compile(lambda x: x + 1, backend="pcg", options={"nope": 1})
    with pytest.raises(ValueError, match=r"unknown pcg option\(s\) \['nope'\]; valid options are"):
        f(torch.ones(3))


def test_backend_option_error_reaches_the_caller_as_a_value_error():
    # Dynamo wraps a backend's ValueError in BackendCompilerFailed, but passes on
    # BackendOptionError as it is: a ValueError the caller can catch.
    def backend(gm, example_inputs, options=None, **kwargs):
        parse_backend_options(options, None, backend, kwargs)
        return gm.forward

    f = torch.compile(lambda x: x * 2, backend=backend, options={"compiler": "tvm"})
    with pytest.raises(ValueError, match=r"compiler must be one of \('eager', 'inductor'\), got 'tvm'") as e:
        f(torch.ones(3))
    assert type(e.value) is BackendOptionError
    assert isinstance(e.value, BackendCompilerFailed) and isinstance(e.value.inner_exception, PcgOptionError)
    torch.testing.assert_close(torch.compile(lambda x: x * 2, backend=backend)(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(PcgOptionError, match=r"unexpected keyword\(s\) \['turbo'\]; pass settings in options="):
        parse_backend_options(None, None, backend, {"turbo": True})


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

    forms = (double, torch.ops.pcg_test.double, torch.ops.pcg_test.double.default, "pcg_test::double",
             "pcg_test::double.default")
    for form in forms:
        pcg_backend.unregister_split_op("pcg_test::double")
        assert [pcg_backend.is_split_op(f) for f in forms] == [False] * len(forms)
        assert pcg_backend.register_split_op(form) is form
        assert [pcg_backend.is_split_op(f) for f in forms] == [True] * len(forms)   # every form, every form
    pcg_backend.unregister_split_op(double)
    assert not pcg_backend.is_split_op(double)


@pytest.mark.parametrize("not_an_op", [lambda x: x, 3, "nonamespace", "pcg_test::does_not_exist", None])
def test_is_split_op_is_false_for_anything_else(not_an_op):
    assert pcg_backend.is_split_op(not_an_op) is False


def test_registering_again_with_other_flags_is_an_error():
    from pcg_backend.ops.registry import is_cudagraph_safe, is_padding_safe

    @torch.library.custom_op("pcg_test::tripled", mutates_args=())
    def tripled(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    name = "pcg_test::tripled"
    try:
        pcg_backend.register_split_op(tripled, cudagraph_safe=True)
        assert pcg_backend.register_split_op("pcg_test::tripled", cudagraph_safe=True) == "pcg_test::tripled"
        with pytest.raises(ValueError, match=r"pcg_test::tripled is already registered with cudagraph_safe=True, "
                                             r"padding_safe=False; registering it again with cudagraph_safe=True, "
                                             r"padding_safe=True would change its promises: call "
                                             r"unregister_split_op\('pcg_test::tripled'\) first"):
            pcg_backend.register_split_op(tripled, padding_safe=True)
        with pytest.raises(ValueError, match="cudagraph_safe=False, padding_safe=False would change"):
            pcg_backend.register_split_op(torch.ops.pcg_test.tripled.default)
        assert is_cudagraph_safe(name) and not is_padding_safe(name)   # the failed calls changed nothing
        pcg_backend.unregister_split_op(tripled)
        pcg_backend.register_split_op(tripled, padding_safe=True)     # after unregistering, any flags
        assert is_padding_safe(name) and is_cudagraph_safe(name)
    finally:
        pcg_backend.unregister_split_op(tripled)


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
    from pcg_backend.ops import attention  # noqa: F401  (registers pcg's attention ops)
    from pcg_backend.ops.registry import is_cudagraph_safe, is_padding_safe

    @torch.library.custom_op("pcg_test::scaled", mutates_args=())
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    name = "pcg_test::scaled"
    pcg_backend.register_split_op(scaled, padding_safe=True)
    assert is_padding_safe(name) and is_cudagraph_safe(name)
    pcg_backend.register_split_op(scaled, cudagraph_safe=True, padding_safe=True)   # the same promise: a no-op
    assert is_padding_safe(name) and is_cudagraph_safe(name)
    pcg_backend.unregister_split_op(scaled)
    pcg_backend.register_split_op(padding_safe=True)(scaled)       # decorator form
    assert is_padding_safe(name)
    pcg_backend.unregister_split_op(scaled)
    assert not is_padding_safe(name) and not is_cudagraph_safe(name) and not pcg_backend.is_split_op(torch.ops.pcg_test.scaled.default)
    # pcg's own Mamba2 core, static KV write and attention read the device count; the DynamicCache append
    # cannot (it returns a tensor of the real rows, whose size no captured graph can hold)
    assert all(is_padding_safe(f"pcg::{op}") for op in ("mamba2_core", "kv_write_static", "attention"))
    assert is_cudagraph_safe("pcg::kv_append") and not is_padding_safe("pcg::kv_append")


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
