"""The skinny-GEMM kernels on CPU through Triton's interpreter (skipped where Triton is not installed).

A CPU-only torch ships without Triton, so CI skips this file; with Triton
installed, the kernels run on CPU tensors under `TRITON_INTERPRET=1`. The
interpreter reads bf16 wrongly (NumPy has no bf16) and its loops need NumPy
before 2.0, so the check is in fp16, in a subprocess that sets the variable
before Triton is imported. Split-K must give the unsplit kernel's result
within fp16 rounding, for K on and off the tile and for more splits than K
has tiles. The gated-norm kernel (`ops/gated_norm.py`), the relu2
epilogue, the decode-attention kernels (`ops/decode_attention.py`), the
fresh prefill's prep kernel with its conv (`ops/mamba2_prep.py`) and the MoE
experts kernels (`ops/moe_experts.py`) are checked the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import torch
    from pcg_backend.ops import skinny_gemm
    torch.manual_seed(0)
    for m, k, n, split, bias in [(1, 300, 4160, 2, False), (5, 1000, 4200, 3, True), (16, 512, 4096, 4, True),
                                 (3, 130, 4160, 4, False)]:
        x = torch.randn(m, k, dtype=torch.float16)
        w = torch.randn(n, k, dtype=torch.float16) / k ** 0.5
        b = torch.randn(n, dtype=torch.float16) if bias else None
        tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2}
        whole = skinny_gemm.triton_linear(x, w, b, tile=tile)
        split_k = skinny_gemm.triton_linear(x, w, b, tile={**tile, "SPLIT_K": split})
        # The last program of each column block reset its arrival counter, and a second launch,
        # which finds them at zero again, adds the partials in the same order: the same bits.
        assert not skinny_gemm._ARRIVALS["cpu"].any()
        assert torch.equal(skinny_gemm.triton_linear(x, w, b, tile={**tile, "SPLIT_K": split}), split_k)
        ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        for name, got in (("whole", whole), ("split", split_k)):
            assert got.shape == ref.shape and got.dtype == torch.float16
            err = ((got.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-3, (name, m, k, n, split, err)
        torch.testing.assert_close(split_k, whole, atol=2e-3, rtol=0)
    print("ok")
""")


FUSED_CHECK = textwrap.dedent('''
import torch
from pcg_backend.ops import gated_norm, skinny_gemm
torch.manual_seed(0)
# The norm kernel: HF's arithmetic, to fp16 rounding (its reduction adds in another order).
for rows, width, group in [(1, 64, 32), (3, 96, 96), (5, 256, 64)]:
    y = torch.randn(rows, width, dtype=torch.float16)
    z = torch.randn(rows, width + 24, dtype=torch.float16)[:, 8:8 + width]   # a strided gate, as split() gives it
    w = torch.rand(width, dtype=torch.float16) + 0.5
    got = gated_norm.norm_launch(y, z, w, 1e-5, group)
    ref = gated_norm.reference(y, z, w, 1e-5, group)
    assert got.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
# relu2 in the epilogue: the plain kernel's output, relu'd and squared in fp16, bit for bit.
x = torch.randn(3, 256, dtype=torch.float16)
x[1, 5] = float("nan")   # the relu keeps a NaN, as torch.relu does
w = torch.randn(4160, 256, dtype=torch.float16) / 16
for split in (1, 2):
    tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 2, "SPLIT_K": split}
    plain = skinny_gemm.triton_linear(x, w, None, tile=tile)
    fused = skinny_gemm.triton_linear(x, w, None, tile=tile, activation="relu2")
    torch.testing.assert_close(fused, torch.square(torch.relu(plain)), atol=0, rtol=0, equal_nan=True)
    assert fused[1].isnan().all() and not fused[0].isnan().any(), split
print("ok")
''')

DECODE_ATTENTION_CHECK = textwrap.dedent('''
import torch
from pcg_backend.ops import decode_attention as da
torch.manual_seed(0)
# One query row over a cache, against the fp32 reference: unsplit and split (the merge kernel),
# boolean masks shared by the heads or per head, an additive mask, none, and a cache that is a view.
cases = [(1, 8, 2, 5, "bool", False), (2, 10, 2, 300, "bool", True), (3, 4, 4, 130, "float", False),
         (2, 6, 3, 70, None, False), (1, 4, 1, 1, "bool", False)]
for b, heads, kv, keys, kind, per_head in cases:
    dim = 16 if keys != 300 else 24
    q = torch.randn(b, heads, 1, dim, dtype=torch.float16)
    k = torch.randn(b, kv, keys + 3, dim, dtype=torch.float16)[:, :, 3:]
    v = torch.randn(b, kv, keys, dim, dtype=torch.float16)
    m = None
    if kind == "bool":
        m = torch.rand(b, heads if per_head else 1, 1, keys) > 0.3
        m[..., -1] = True
    elif kind == "float":
        m = torch.where(torch.rand(b, 1, 1, keys) > 0.3, 0.0, torch.finfo(torch.float16).min).to(torch.float16)
        m[..., -1] = 0
    for programs in (1, 132):
        da.TARGET_PROGRAMS = programs
        out = torch.full((b, 1, heads, dim), float("nan"), dtype=torch.float16)
        da.decode_attention(q, k, v, m, out, dim ** -0.5)
        torch.testing.assert_close(out, da.reference(q, k, v, m, dim ** -0.5), atol=2e-3, rtol=2e-3)
    assert da.splits_for(b, kv, keys) == min(-(-keys // 64), -(-132 // (b * kv)))
# A row whose every key is masked gets zeros, split or not.
for programs in (1, 132):
    da.TARGET_PROGRAMS = programs
    q = torch.randn(1, 4, 1, 16, dtype=torch.float16)
    k = torch.randn(1, 2, 100, 16, dtype=torch.float16)
    out = torch.full((1, 1, 4, 16), float("nan"), dtype=torch.float16)
    da.decode_attention(q, k, k, torch.zeros(1, 1, 1, 100, dtype=torch.bool), out, 0.25)
    assert torch.equal(out, torch.zeros_like(out))
print("ok")
''')

# The fresh prefill's prep kernel with the conv fused in, against torch's grouped conv1d (fp32, then the
# activation) from a zero state: rows across several row tiles (the conv reads 3 rows back over a tile's
# edge), fewer real rows than the conv is wide, no bias, no activation. Its other outputs must not
# change with the conv: the conv state (the last real rows of xBC), dt and the row mask are the unfused
# call's, bit for bit.
PREP_CONV_CHECK = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from pcg_backend.ops import mamba2_prep
    torch.manual_seed(0)
    width, heads = 4, 6
    cases = [(2, 40, 37, 264, True, "silu"), (1, 16, 2, 256, False, "silu"), (1, 8, 8, 520, True, None),
             (2, 3, 3, 128, True, "swish")]
    # and generated ones: any batch, rows, real count and channel count (a multiple of 8), with and
    # without a bias, with and without SiLU
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        rows = int(torch.randint(1, 70, (), generator=g))
        cases.append((int(torch.randint(1, 4, (), generator=g)), rows, int(torch.randint(1, rows + 1, (), generator=g)),
                      8 * int(torch.randint(1, 80, (), generator=g)), bool(torch.randint(0, 2, (), generator=g)),
                      ["silu", None][int(torch.randint(0, 2, (), generator=g))]))
    for batch, rows, n, channels, bias, activation in cases:
        projected = torch.randn(batch, rows, channels + heads + 8, dtype=torch.float16)
        xBC, dt = projected[..., :channels], projected[..., channels:channels + heads]
        dt_bias = torch.randn(heads, dtype=torch.float16)
        weight = torch.randn(channels, width, dtype=torch.float16) / 2
        conv_bias = torch.randn(channels, dtype=torch.float16) if bias else None
        count = torch.tensor([n])
        plain_state = torch.full((batch, channels, width), 7.0, dtype=torch.float16)
        fused_state = plain_state.clone()
        x, dt_plain, keep_plain = mamba2_prep.prepare(xBC, dt, dt_bias, count, plain_state, 0.0, float("inf"))
        assert torch.equal(x, xBC)
        assert mamba2_prep.conv_fusable(weight, conv_bias, activation, fused_state)
        h, dt_fused, keep_fused = mamba2_prep.prepare(xBC, dt, dt_bias, count, fused_state, 0.0, float("inf"),
                                                      conv=(weight, conv_bias, activation))
        assert h.shape == (batch, rows, channels) and h.is_contiguous()
        ref = F.conv1d(xBC.transpose(1, 2).float(), weight[:, None, :].float(),
                       None if conv_bias is None else conv_bias.float(), padding=width - 1, groups=channels)
        ref = ref[..., :rows].transpose(1, 2)
        if activation is not None:
            ref = F.silu(ref)
        torch.testing.assert_close(h.float(), ref.half().float(), atol=2e-3, rtol=2e-3)
        assert torch.equal(fused_state, plain_state) and torch.equal(dt_fused, dt_plain)
        assert torch.equal(keep_fused, keep_plain)
        # the conv state itself: the last `width` real rows of xBC, zeros before row 0
        window = F.pad(xBC[:, :n].transpose(1, 2), (width, 0))[..., -width:]
        assert torch.equal(plain_state, window)
        assert torch.equal(dt_plain[:, n:], torch.zeros_like(dt_plain[:, n:]))
    state = torch.zeros(1, 256, width, dtype=torch.float16)
    assert not mamba2_prep.conv_fusable(torch.zeros(256, 3, dtype=torch.float16), None, "silu", state)   # width
    assert not mamba2_prep.conv_fusable(torch.zeros(256, width, dtype=torch.float16), None, "gelu", state)
    assert not mamba2_prep.conv_fusable(torch.zeros(256, width, dtype=torch.float16),
                                        torch.zeros(128, dtype=torch.float16), "silu", state)           # bias size
    try:
        mamba2_prep.prepare(xBC, dt, dt_bias, count, fused_state, 0.0, 1.0,
                            conv=(torch.zeros(channels, 3, dtype=torch.float16), None, "silu"))
    except ValueError:
        pass
    else:
        raise AssertionError("an unfusable conv was accepted")
    print("ok")
''')


MOE_CHECK = textwrap.dedent('''
import random
import torch
from pcg_backend.ops import moe_experts
torch.manual_seed(0)
rng = random.Random(0)
# New float buffers hold NaN, not the zeros a CPU allocation often holds: a row the kernels should
# leave unread (a sentinel pair's) would then show.
_empty = torch.empty
torch.empty = lambda *a, **k: (lambda t: t.fill_(float("nan")) if t.is_floating_point() else t)(_empty(*a, **k))

def reference(x, ids, wts, gate_up, down):
    # HF's roundings, pair by pair: each GEMM's output, the SiLU, its product with up, the weighted row;
    # the k rows of a token summed in fp32.
    tokens, top_k = ids.shape
    out = torch.zeros(tokens, top_k, x.shape[1])
    for t in range(tokens):
        for j in range(top_k):
            e = ids[t, j]
            if not 0 <= e < gate_up.shape[0]:
                continue   # an expert-parallel sentinel adds nothing
            gate, up = (x[t].float() @ gate_up[e].float().T).to(x.dtype).chunk(2)
            h = (torch.nn.functional.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
            y = (h.float() @ down[e].float().T).to(x.dtype)
            # The weighted row in the wider of the two dtypes, as HF's product promotes.
            out[t, j] = (y.float() * wts[t, j].float()).to(torch.promote_types(x.dtype, wts.dtype)).float()
    return out.sum(1).to(x.dtype)

# Hand-picked: one token; tokens past a tile of 16; an expert with more pairs than a tile; more
# tokens than the route kernel's block (ROUTE_BLOCK is lowered so the running count crosses blocks).
# And more tokens than the default largest bucket (512), which calls above it bring.
cases = [(1, 8, 3, 64, 32), (17, 6, 4, 64, 32), (40, 4, 2, 32, 64), (70, 16, 6, 64, 32), (600, 8, 2, 32, 16)]
# Generated: random shapes and routings.
cases += [(rng.randint(1, 90), rng.choice([2, 5, 8, 16]), 0, rng.choice([32, 48, 96]), rng.choice([16, 40, 64]))
          for _ in range(8)]
moe_experts.ROUTE_BLOCK = 64
for case, (tokens, experts, top_k, hidden, inter) in enumerate(cases):
    top_k = top_k or rng.randint(1, experts)
    x = torch.randn(tokens, hidden, dtype=torch.float16)
    gate_up = (torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5).half()
    down = (torch.randn(experts, hidden, inter) / inter ** 0.5).half()
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    # Routing weights in the model's dtype (GraniteMoeHybrid's router casts them) or left in fp32.
    wts = torch.softmax(torch.randn(tokens, top_k), -1)
    wts = wts.half() if case % 2 else wts
    if case % 3 == 0:
        # Strided inputs: hidden rows inside a wider buffer, ids and weights sliced from a wider top-k.
        x = torch.cat([x, torch.randn(tokens, 5, dtype=x.dtype)], dim=1)[:, :hidden]
        ids = torch.cat([ids, ids], dim=1)[:, :top_k]
        wts = torch.cat([wts, wts], dim=1)[:, :top_k]
    if case % 4 == 1:
        ids[0, 0] = experts   # a sentinel id beyond the experts
    got = moe_experts.triton_experts(x, ids, wts, gate_up, down)
    ref = reference(x, ids, wts, gate_up, down)
    assert got.shape == ref.shape and got.dtype == torch.float16
    # The same roundings; only the order of fp32 sums differs (a rounding step at most, fp16).
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)
print("ok")
''')

ROUTER_CHECK = textwrap.dedent('''
import random
import torch
from pcg_backend.ops import moe_router
torch.manual_seed(0)
rng = random.Random(0)
# Hand-picked: one token, a block of 16 and one more, Granite's 64 experts; then generated shapes.
cases = [(1, 64, 6, 96), (16, 64, 6, 96), (17, 8, 3, 40), (33, 2, 1, 256)]
cases += [(rng.randint(1, 50), rng.choice([2, 5, 16, 40, 64]), 0, rng.choice([32, 100, 160])) for _ in range(6)]
for tokens, experts, top_k, width in cases:
    top_k = top_k or rng.randint(1, experts)
    x = torch.randn(tokens, width + 3, dtype=torch.float16)[:, :width]     # rows at a wider stride
    w = (torch.randn(experts, width) / width ** 0.5).half()
    logits, weights, ids = moe_router.triton_router(x, w, top_k)
    ref_logits = (x.float() @ w.float().T).half().float()
    # The logits: one fp16 rounding of an fp32 sum in another order.
    torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=2e-3)
    # The k picks by the rule (largest first, the lower id among equal values), on the kernel's own logits.
    for t in range(tokens):
        want = sorted(range(experts), key=lambda e: (-logits[t, e].item(), e))[:top_k]
        assert ids[t].tolist() == want, (t, ids[t], want)   # distinct, as torch.topk's
        probs = torch.softmax(logits[t, want], -1).half()
        torch.testing.assert_close(weights[t], probs, atol=1e-3, rtol=1e-3)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float16 and logits.dtype == torch.float32
# Equal logits: the lower expert ids first.
x = torch.ones(3, 32, dtype=torch.float16)
w = torch.zeros(8, 32, dtype=torch.float16)
w[5] = 1
assert moe_router.triton_router(x, w, 3)[2].tolist() == [[5, 0, 1]] * 3
# A NaN row (a padded row's garbage) picks no expert, and its neighbours are untouched.
x = torch.randn(20, 64, dtype=torch.float16)
w = torch.randn(16, 64, dtype=torch.float16) / 8
x2 = x.clone()
x2[7] = float("nan")
a, b = moe_router.triton_router(x, w, 4), moe_router.triton_router(x2, w, 4)
assert b[2][7].tolist() == [16] * 4
rows = [r for r in range(20) if r != 7]
assert all(torch.equal(p[rows], q[rows]) for p, q in zip(a, b))
# Split over the experts (64 in blocks of 16): the last program of each token block reset its arrival
# counter, so a second launch gives the same bits.
from pcg_backend.ops import skinny_gemm
x, w = torch.randn(40, 96, dtype=torch.float16), torch.randn(64, 96, dtype=torch.float16) / 10
first, second = moe_router.triton_router(x, w, 6), moe_router.triton_router(x, w, 6)
assert all(torch.equal(p, q) for p, q in zip(first, second))
assert int(skinny_gemm.arrival_counters(x.device, 3).abs().sum()) == 0
print("ok")
''')


def _interpreter_usable() -> str | None:
    try:
        import numpy
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (a CPU-only torch ships without it)"
    if int(numpy.__version__.split(".")[0]) >= 2:
        return "Triton's interpreter needs NumPy before 2.0 for its loops"
    return None


def _run_interpreted(check: str) -> None:
    reason = _interpreter_usable()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", check], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_split_k_gives_the_unsplit_kernels_result():
    _run_interpreted(CHECK)


def test_gated_norm_kernel_and_the_relu2_epilogue():
    # The gated norm against HF's arithmetic; the relu2 epilogue against the plain kernel's
    # output squared, bit for bit, split or not.
    _run_interpreted(FUSED_CHECK)


def test_decode_attention_kernels():
    # One query row per sequence against the fp32 reference, split and unsplit, with every mask kind.
    _run_interpreted(DECODE_ATTENTION_CHECK)


def test_prep_kernel_with_the_conv_fused():
    _run_interpreted(PREP_CONV_CHECK)


def test_moe_experts_kernels():
    # The route, up and down kernels against HF's roundings pair by pair, at hand-picked and generated shapes.
    _run_interpreted(MOE_CHECK)


def test_moe_router_kernel():
    # Logits against an fp32 GEMM rounded once, the top-k rule, the softmax, ties and a NaN row.
    _run_interpreted(ROUTER_CHECK)
