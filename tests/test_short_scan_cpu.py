"""The short-scan kernel (`ops/short_scan.py`) on CPU: what it computes, and which calls it takes.

The kernel is checked against `short_scan.reference`, so here that reference
is checked against an independent float64 formulation of the SSM (each
output as a decayed sum over the rows before it, not a recurrence) and
against HF's own torch chunked scan, the function transformers falls back
to without mamba-ssm. The kernel itself runs under Triton's interpreter
where Triton is installed (skipped otherwise, as in
`test_skinny_gemm_interpreter_cpu.py`, whose approach this copies: fp16,
in a subprocess that sets `TRITON_INTERPRET=1` before Triton is imported).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import textwrap

import pytest
import torch

from pcg_backend.ops import short_scan as ss
from test_skinny_gemm_interpreter_cpu import _run_interpreted


def _case(batch, heads, groups, head_dim, state, real, padded, dtype=torch.float32, seed=0):
    """Inputs of a fresh padded prefill as `_padded_prefill` hands them to the scan: hs, B and C are views
    of one (batch, rows, conv_dim) buffer, dt >= 0, and the padded rows are identity steps."""
    g = torch.Generator().manual_seed(seed)
    rows = real + padded
    width = heads * head_dim
    h = torch.randn(batch, rows, width + 2 * groups * state, generator=g).to(dtype)
    h[:, real:] = 0
    hs, B, C = torch.split(h, [width, groups * state, groups * state], dim=-1)
    dt = torch.rand(batch, rows, heads, generator=g) * 0.5
    dt[:, real:] = 0
    A = -torch.empty(heads).uniform_(0.5, 8.0, generator=g)
    D = torch.randn(heads, generator=g)
    return hs, dt, A, B, C, D


def _closed_form(hs, dt, A, B, C, D, groups, head_dim):
    """float64 y and final state, each as a sum over rows s of that row's input, decayed by exp(A * the
    sum of dt over the rows after s): no recurrence, no chunks."""
    batch, rows, _ = hs.shape
    heads = dt.shape[-1]
    x = hs.double().reshape(batch, rows, heads, head_dim)
    Bh = B.double().reshape(batch, rows, groups, -1).repeat_interleave(heads // groups, 2)
    Ch = C.double().reshape(batch, rows, groups, -1).repeat_interleave(heads // groups, 2)
    dt, A = dt.double(), A.double()
    cum = torch.cumsum(dt, 1) * A                                          # (batch, rows, heads)
    # decay[b, t, s, h] = exp(A * sum of dt over rows s+1..t), for s <= t
    causal = torch.ones(rows, rows, dtype=torch.bool).tril()
    decay = torch.exp((cum[:, :, None] - cum[:, None, :]).masked_fill(~causal[None, :, :, None], float("-inf")))
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh) * decay * dt[:, None]
    y = torch.einsum("btsh,bshp->bthp", scores, x) + D.double()[:, None] * x
    to_end = torch.exp(cum[:, -1:] - cum) * dt                             # (batch, rows, heads)
    state = torch.einsum("bsh,bshp,bshn->bhpn", to_end, x, Bh)
    return y.reshape(batch, rows, -1), state


def _shapes(count, seed):
    """Random (batch, heads, groups, head_dim, N, real rows, padded rows), T = 1 and padding included."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    shapes = [(1, 1, 1, 1, 1, 1, 0), (2, 4, 2, 3, 5, 1, 3)]
    for _ in range(count):
        groups = pick([1, 2, 3])
        heads = groups * pick([1, 2, 4])
        shapes.append((pick([1, 2, 3]), heads, groups, pick([1, 4, 7, 16]), pick([1, 6, 16, 32]), pick([1, 2, 5, 13]),
                       pick([0, 0, 1, 4])))
    return shapes


@pytest.mark.parametrize("shape", _shapes(10, seed=1))
def test_the_reference_is_the_ssm(shape):
    batch, heads, groups, head_dim, state, real, padded = shape
    hs, dt, A, B, C, D = _case(*shape, seed=sum(shape))
    y, final = ss.reference(hs, dt, A, B, C, D, groups, head_dim)
    assert y.dtype == final.dtype == torch.float32
    assert y.shape == hs.shape and final.shape == (batch, heads, head_dim, state)
    y64, final64 = _closed_form(hs, dt, A, B, C, D, groups, head_dim)
    torch.testing.assert_close(y.double(), y64, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final.double(), final64, atol=1e-4, rtol=1e-4)
    # Padded rows are identity steps: their y is 0, and the state after them is the one after the real rows.
    y_real, final_real = ss.reference(hs[:, :real], dt[:, :real], A, B[:, :real], C[:, :real], D, groups, head_dim)
    assert torch.equal(y[:, real:], torch.zeros_like(y[:, real:]))
    torch.testing.assert_close(y[:, :real], y_real, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(final, final_real, atol=1e-6, rtol=1e-6)


def _hf_torch_chunk_scan(family):
    # transformers binds `mamba2_chunk_scan` to mamba-ssm's kernel where it imports; the function it wraps
    # is the torch reference, whichever is bound.
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return inspect.unwrap(module.mamba2_chunk_scan)


@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "falcon_h1", "zamba2", "granitemoehybrid"])
@pytest.mark.parametrize("chunk_size", [4, 256])
@pytest.mark.parametrize("shape", [(1, 4, 1, 8, 16, 16, 0), (2, 6, 3, 5, 8, 11, 5), (3, 4, 2, 16, 32, 1, 0),
                                   (1, 8, 2, 4, 6, 7, 2)])
def test_the_reference_is_hfs_torch_chunked_scan(family, chunk_size, shape):
    # What `_chunk_scan` computes in eager on CPU after `mamba2_prep`: dt already processed (no bias, no
    # softplus), no initial state, and the final state returned.
    batch, heads, groups, head_dim, state, real, padded = shape
    hs, dt, A, B, C, D = _case(*shape, seed=sum(shape))
    rows = real + padded
    y_hf, final_hf = _hf_torch_chunk_scan(family)(
        hs.reshape(batch, rows, heads, head_dim), dt, A, B.reshape(batch, rows, groups, state),
        C.reshape(batch, rows, groups, state), chunk_size=chunk_size, D=D, dt_bias=None, dt_softplus=False,
        initial_states=None, return_final_states=True)
    y, final = ss.reference(hs, dt, A, B, C, D, groups, head_dim)
    torch.testing.assert_close(y, y_hf.reshape(batch, rows, -1).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_hf.float(), atol=1e-4, rtol=1e-4)


def _half(batch=2, rows=ss.MAX_ROWS, heads=8, groups=2, head_dim=16, state=32, dtype=torch.float16):
    h = torch.empty(batch, rows, heads * head_dim + 2 * groups * state, dtype=dtype)
    hs, B, C = torch.split(h, [heads * head_dim, groups * state, groups * state], dim=-1)
    dt = torch.empty(batch, rows, heads)
    ssm_state = torch.empty(batch, heads, head_dim, state)
    out = torch.empty(batch, rows, heads * head_dim, dtype=dtype)
    return hs, dt, B, C, ssm_state, out


def test_shapes_it_takes():
    assert ss.shapes_fit(*_half())
    assert ss.shapes_fit(*_half(dtype=torch.bfloat16))
    assert ss.shapes_fit(*_half(rows=1))
    assert ss.shapes_fit(*_half(rows=ss.MAX_ROWS, groups=1, state=256))
    hs, dt, B, C, ssm_state, out = _half()
    assert ss.shapes_fit(hs, dt, B, C, ssm_state.half(), out)   # the state is written in its own dtype
    assert ss.shapes_fit(*_half(rows=48), T_max=64)


@pytest.mark.parametrize("change", ["too many rows", "no rows", "fp32 activations", "fp16 dt", "out of another dtype",
                                    "B of another dtype", "state too large", "heads not a multiple of groups",
                                    "B and C differ", "dt of other heads", "state of other head_dim",
                                    "state of other batch", "hs not unit stride", "out of other shape",
                                    "B not a multiple of the state", "integer state", "2-D hs"])
def test_shapes_it_declines(change):
    hs, dt, B, C, ssm_state, out = _half()
    if change == "too many rows":
        hs, dt, B, C, ssm_state, out = _half(rows=ss.MAX_ROWS + 1)
    elif change == "no rows":
        hs, dt, B, C, ssm_state, out = _half(rows=0)
    elif change == "fp32 activations":
        hs, dt, B, C, ssm_state, out = _half(dtype=torch.float32)
    elif change == "fp16 dt":
        dt = dt.half()
    elif change == "out of another dtype":
        out = out.bfloat16()
    elif change == "B of another dtype":
        B = B.bfloat16()
    elif change == "state too large":
        hs, dt, B, C, ssm_state, out = _half(groups=1, state=ss.MAX_STATE + 8)
    elif change == "heads not a multiple of groups":
        hs, dt, B, C, ssm_state, out = _half(heads=6, groups=4)
    elif change == "B and C differ":
        C = C[..., :-1]
    elif change == "dt of other heads":
        dt = dt[..., :-1]
    elif change == "state of other head_dim":
        ssm_state = torch.empty(2, 8, 8, 32)
    elif change == "state of other batch":
        ssm_state = ssm_state[:1]
    elif change == "hs not unit stride":
        hs = torch.empty(2, ss.MAX_ROWS, 128, 2, dtype=torch.float16)[..., 0]
    elif change == "out of other shape":
        out = out[:, :-1]
    elif change == "B not a multiple of the state":
        B, C = B[..., :-4], C[..., :-4]
    elif change == "integer state":
        ssm_state = ssm_state.int()
    elif change == "2-D hs":
        hs = hs[0]
    assert not ss.shapes_fit(hs, dt, B, C, ssm_state, out)


def test_cpu_tensors_take_the_kernel_only_under_the_interpreter():
    assert ss.shapes_fit(*_half())
    assert ss.applies(*_half()) == ss.INTERPRETED
    if ss.triton is None:
        assert not ss.INTERPRETED


@pytest.mark.parametrize("state,head_dim,block_p", [(128, 64, 8), (256, 128, 4), (64, 64, 16), (16, 4, 4),
                                                    (5, 3, 4), (1, 1, 1)])
def test_default_launch_config(state, head_dim, block_p):
    # One warp, 32 fp32 state values per thread, never more rows than head_dim rounds up to.
    cfg = ss.launch_config(state, head_dim)
    assert cfg == {"BLOCK_P": block_p, "num_warps": 1, "UNROLL": False}


INTERPRETED_CHECK = textwrap.dedent('''
import functools
import sys
import torch
from pcg_backend.ops import short_scan as ss
sys.path.insert(0, "tests")
from scan_cases import check_cases   # strided fp16 views of one buffer, padded rows as no-ops
assert ss.INTERPRETED
torch.manual_seed(0)

# (batch, heads, groups, head_dim, N, real rows, padded rows), launch overrides
cases = [((1, 2, 1, 8, 16, 1, 0), {}), ((2, 4, 2, 8, 16, 5, 3), {}), ((2, 6, 3, 12, 24, 7, 1), {}),
         ((2, 4, 2, 16, 16, 9, 0), {"BLOCK_P": 4}), ((2, 4, 1, 10, 8, 4, 4), {"BLOCK_P": 4, "UNROLL": False}),
         ((1, 2, 2, 8, 32, 3, 0), {"UNROLL": False, "num_warps": 4}), ((3, 2, 1, 3, 5, 2, 2), {}),
         ((2, 4, 2, 8, 16, 5, 3), {"UNROLL": True})]
def close_y(out, y_ref):   # fp32 sums in another order, then one rounding to fp16
    torch.testing.assert_close(out, y_ref.half(), atol=2e-3, rtol=2e-3)

def close_state(state, ref):
    tol = 1e-5 if state.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(state, ref.to(state.dtype), atol=tol, rtol=tol)

# the kernel takes more rows than the bucket limit pcg routes to it by (MAX_ROWS)
check_cases(ss.short_scan, functools.partial(ss.applies, T_max=16), ss.LAUNCHES, "short_scan", cases, close_y,
            close_state)
print("ok")
''')


def test_the_kernel_under_the_interpreter():
    # fp16 inputs against the fp32 reference: T = 1, padded rows, groups > 1, batch > 1, strided views of
    # one buffer, head_dim and N off powers of two, several row blocks per head, unrolled and looped, and
    # states in fp32 and fp16, every element written (they start as NaN).
    _run_interpreted(INTERPRETED_CHECK)


def test_may_apply_reads_rows_dtype_state_and_device():
    x = torch.zeros(1, ss.MAX_ROWS, 64, dtype=torch.bfloat16)
    state = torch.zeros(1, 4, 8, 128)
    assert not ss.may_apply(x, state, x)   # CPU tensors (bf16, which the interpreter does not take either)
    if ss.triton is not None:
        for bad in ("float", "rows", "state", "out"):
            xs, st, out = x, state, x
            if bad == "float":
                xs = out = x.float()
            elif bad == "rows":
                xs = torch.zeros(1, ss.MAX_ROWS + 1, 64, dtype=torch.bfloat16)
            elif bad == "state":
                st = torch.zeros(1, 4, 8, ss.MAX_STATE + 1)
            else:
                out = x.float()   # the torch reference scan's fp32 output (no mamba-ssm)
            monkey = ss._device_ok
            try:
                ss._device_ok = lambda t: True
                assert ss.may_apply(x, state, x)
                assert not ss.may_apply(xs, st, out), bad
            finally:
                ss._device_ok = monkey


def _scaled_close(got, ref, msg):
    # States of the tiny models are as small as 1e-6: a tolerance relative to each tensor's largest value,
    # so that a state left unwritten, zeroed or decayed by padded rows fails.
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, atol=1e-4 * scale + 1e-12, rtol=0, msg=msg)


def _stub_fresh_scans(monkeypatch, calls: list) -> None:
    """Tell the Mamba2 core that both one-launch kernels apply (short_scan up to its MAX_ROWS,
    one_chunk_scan up to its own), and put the fp32 reference in their place, recording
    (kernel, rows) per call."""
    from pcg_backend.ops import one_chunk_scan as oc

    def reference_into(kernel):
        def run(hs, dt, A, B, C, D, ssm_state, out, n_groups, head_dim, count=None):
            # A padded prefill passes pcg's device count; the kernels read rows from it on as zeros (their
            # NaN padding included), as this reference does.
            from pcg_backend import context

            # pcg's count of real tokens, no other
            assert count is not None and count.numel() == 1 and int(count) == context.real_tokens(hs.shape[1])
            real = torch.arange(hs.shape[1])[None, :, None] < count
            hs, B, C = (torch.where(real, t, 0) for t in (hs, B, C))
            dt = torch.where(real, dt, 0)
            assert dt.dtype == torch.float32 and (dt >= 0).all()     # computed dt: softplus and clamp applied
            calls.append((kernel, hs.shape[1]))
            y, state = ss.reference(hs, dt, A, B, C, D, n_groups, head_dim)
            out.copy_(y)
            ssm_state.copy_(state)
        return run

    monkeypatch.setattr(ss, "may_apply", lambda x, state, out, max_rows=ss.MAX_ROWS: x.shape[1] <= max_rows)
    monkeypatch.setattr(ss, "applies", lambda hs, dt, B, C, s, o, T_max=ss.MAX_ROWS: hs.shape[1] <= T_max)
    monkeypatch.setattr(ss, "short_scan", reference_into("short"))
    monkeypatch.setattr(oc, "one_chunk_scan", reference_into("one_chunk"))


def _kernel_for(bucket: int) -> str | None:
    from pcg_backend.ops import one_chunk_scan as oc

    return "short" if bucket <= ss.MAX_ROWS else "one_chunk" if bucket <= oc.MAX_ROWS else None


@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1", "zamba2", "mamba2"])
def test_fresh_prefills_go_through_the_one_launch_scans_and_equal_eager(family, monkeypatch):
    # On CPU the kernels do not apply; told that they do, the Mamba2 core hands each fresh padded
    # prefill's scan to the short scan (buckets up to its MAX_ROWS) or the one-chunk scan (above), here
    # the fp32 reference writing `out` and the state in their place. Padded rows are NaN and new states
    # start as NaN. Every prefill, state and generated token must equal eager's, with exactly one call per
    # Mamba2 layer per fresh prefill of 2 tokens or more, of the kernel its bucket calls for, and none for
    # one token, a prefill that continues a cache, or decode.
    from hf_checks import _states, output_cache
    from hf_models import tiny_model
    from test_reliability import _nan_pad

    from pcg_backend import runtime
    from pcg_backend.hf.adapters import mamba2 as adapter

    calls = []
    _stub_fresh_scans(monkeypatch, calls)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    monkeypatch.setattr(adapter, "uninitialized_like", lambda t: torch.full_like(t, float("nan")))
    torch._dynamo.reset()
    model = tiny_model(family)
    mixers = sum(1 for m in model.modules() if hasattr(m, "A_log"))
    # No overflow buckets: 65 tests the unpadded path above the largest bucket.
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 64, "max_overflow_size": 0,
                                                          "progress": False})
    g = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3, 8, 13, 17, 24, 25, 40, 57, 64, 65]   # buckets 1, 2, 4, 8, 16, 24, 24, 32, 40, 64, 64, above
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(3, 128, (1, n), generator=g)
            ref, got = model(ids, use_cache=True), compiled(ids, use_cache=True)
            torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=0, msg=f"{family} {n}")
            states = list(zip(_states(output_cache(ref)), _states(output_cache(got)), strict=True))
            assert states
            for r, s in states:
                _scaled_close(s, r, f"{family} {n}: a state")
    # Above the largest bucket nothing is padded, but without CUDA graphs the runner still publishes the
    # count, so that the path captured graphs take is the one tested: 65 rows take the one-chunk scan.
    rows = [_bucket(n) if n <= 64 else n for n in lengths if n >= 2]
    assert calls == [(_kernel_for(r), r) for r in rows for _ in range(mixers)]

    # generate() over a left-padded batch. Dynamo's first prefill graph is static (5 tokens, exact size:
    # no one-launch scan); the second prompt length makes it dynamic, padded: that prefill (bucket 8, then
    # 32) takes the kernel of its bucket, the decode steps none.
    twin = copy.copy(model)
    twin.forward = torch.compile(model.forward, backend="pcg", options={"max_capture_size": 64, "progress": False})
    for length, expected in ((5, []), (7, [("one_chunk", 8)] * mixers), (30, [("one_chunk", 32)] * mixers)):
        calls.clear()
        ids = torch.randint(3, 128, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        kwargs = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0)
        with torch.no_grad():
            ref, got = model.generate(ids, **kwargs), twin.generate(ids, **kwargs)
        assert torch.equal(got.sequences, ref.sequences)
        for a, b in zip(got.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert calls == expected, length
    torch._dynamo.reset()


def _bucket(n: int) -> int:
    # the ladder of max_capture_size 64: 1, 2, 4, then steps of 8
    return n if n <= 2 else 4 if n <= 4 else -(-n // 8) * 8



@pytest.mark.parametrize("family", ["nemotron_h", "bamba"])
def test_a_prefill_that_continues_a_cache_keeps_the_chunked_scan(family, monkeypatch):
    # The one-launch scans start from a zero state: a second prompt on a cache that holds one must take
    # neither, even where they would apply (here told so), and must equal eager's continuation.
    from hf_checks import _states, output_cache
    from hf_models import tiny_model

    calls = []
    _stub_fresh_scans(monkeypatch, calls)
    torch._dynamo.reset()
    model = tiny_model(family)
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 64, "progress": False})
    g = torch.Generator().manual_seed(1)
    first, second = torch.randint(3, 128, (1, 6), generator=g), torch.randint(3, 128, (1, 5), generator=g)
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 3), generator=g))   # Dynamo's first, static graph: at another length
        compiled(torch.randint(3, 128, (1, 3), generator=g))
        ref = model(first, use_cache=True)
        got = compiled(first, use_cache=True)
        calls.clear()
        ref = model(second, past_key_values=output_cache(ref), use_cache=True)
        got = compiled(second, past_key_values=output_cache(got), use_cache=True)
    torch._dynamo.reset()
    assert calls == []
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=0)
    states = list(zip(_states(output_cache(ref)), _states(output_cache(got)), strict=True))
    assert states
    for r, s in states:
        _scaled_close(s, r, f"{family}: a state after the continuation")


def _core(mixer, xBC, dt, conv_state, ssm_state, out, use_state):
    dt_min, dt_max = mixer.time_step_limit
    torch.ops.pcg.mamba2_core(
        xBC, dt, None, conv_state, ssm_state, out, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
        -torch.exp(mixer.A_log.float()), mixer.D, mixer.dt_bias, type(mixer).__module__, mixer.n_groups,
        mixer.head_dim, mixer.ssm_state_size, mixer.chunk_size, mixer.activation, float(dt_min), float(dt_max),
        use_state)


@pytest.mark.parametrize("path", ["one-launch scans (stubbed)", "chunked scan", "continuing a cache"])
def test_the_padded_core_keeps_nan_padding_out_of_every_output_and_state(path, monkeypatch):
    # The Mamba2 core as a captured piece runs it: at the bucket, with the real count n on the device, and
    # here with NaN in every padded row of its inputs (the models' tests pad token ids, which embed to finite
    # rows). y's real rows and the states must equal the core run eagerly on the n real rows, and padded y
    # must be 0, at every n of a bucket of 16. With the scans stubbed, the stub requires the real count.
    from hf_models import tiny_model

    from pcg_backend import context

    calls = []
    if path == "one-launch scans (stubbed)":
        _stub_fresh_scans(monkeypatch, calls)
    mixer = next(m for m in tiny_model("nemotron_h").modules() if hasattr(m, "A_log"))
    padded, use_state = 16, path == "continuing a cache"
    g = torch.Generator().manual_seed(3)
    conv_shape = (1, mixer.conv_dim, mixer.conv_kernel_size)
    ssm_shape = (1, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
    with torch.no_grad():
        for n in range(2, padded + 1):
            xBC = torch.randn(1, padded, mixer.conv_dim, generator=g)
            dt = torch.randn(1, padded, mixer.num_heads, generator=g)
            xBC[:, n:], dt[:, n:] = float("nan"), float("nan")
            previous = (torch.randn(conv_shape, generator=g), torch.randn(ssm_shape, generator=g) * 0.1)
            ref_states = [t.clone() if use_state else torch.zeros_like(t) for t in previous]
            ref = torch.empty(1, n, mixer.intermediate_size)
            _core(mixer, xBC[:, :n], dt[:, :n], *ref_states, ref, use_state)
            states = [t.clone() if use_state else torch.full_like(t, float("nan")) for t in previous]
            out = torch.full((1, padded, mixer.intermediate_size), float("nan"))
            ctx = context.ForwardContext(num_tokens=n, padded_tokens=padded, device_count=torch.tensor([n]))
            with context.forward_context(ctx), context.piece_running():
                _core(mixer, xBC, dt, *states, out, use_state)
            torch.testing.assert_close(out[:, :n], ref, atol=1e-5, rtol=1e-5, msg=f"{path}, {n} tokens")
            assert torch.equal(out[:, n:], torch.zeros_like(out[:, n:])), (path, n)
            for got, want in zip(states, ref_states):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{path}, {n} tokens: a state")
    assert calls == ([("short" if padded <= ss.MAX_ROWS else "one_chunk", padded)] * 15 if calls else [])
    assert bool(calls) == (path == "one-launch scans (stubbed)")
