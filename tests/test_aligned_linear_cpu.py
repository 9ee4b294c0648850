"""Linear layers with misaligned output rows computed transposed (`rewrite/aligned_linear.py`), on CPU.

Which linears the rule picks is checked over generated widths and dtypes;
that the product is the same is checked against `F.linear` directly, through
pcg on a plain module, and on a bf16 Falcon-H1 whose vocabulary (as the real
model's 130049) is not a multiple of 8, against eager's own bf16 noise.
Whether it is faster is a GPU question: `docs/benchmarks.md`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pcg_backend
from conftest import requires_reference_kernels
from pcg_backend.rewrite import aligned_linear as al


@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64), (1, 16, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_transposed_product_is_the_linear_layer(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(1027, 64, generator=g, dtype=torch.float64)
    b = torch.randn(1027, generator=g, dtype=torch.float64) if bias else None
    got = al.transposed_linear(x, w, b)
    assert got.shape == (*shape[:-1], 1027) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_the_rule_over_generated_widths_and_dtypes():
    # Picked: a half-precision weight of at least MIN_COLUMNS output columns that are not a multiple of 8,
    # over an input width that is, and an input of the weight's dtype.
    columns = [al.MIN_COLUMNS - 1, al.MIN_COLUMNS, al.MIN_COLUMNS + 1, 1027, 4096, 32001, 130048, 130049]
    widths = [60, 64, 3072, 3076, 3075]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    picked = 0
    for n, k, dtype in itertools.product(columns, widths, dtypes):
        w = torch.empty(n, k, dtype=dtype, device="meta")
        x = torch.empty(3, k, dtype=dtype, device="meta")
        expected = dtype != torch.float32 and n >= al.MIN_COLUMNS and n % 8 != 0 and k % 8 == 0
        assert al.misaligned(x, w) == expected, (n, k, dtype)
        picked += expected
        if expected:
            assert not al.misaligned(x.float(), w)   # an input of another dtype: F.linear would fail first
    assert picked == 4 * 2 * 2   # 4 misaligned widths >= MIN_COLUMNS, 2 aligned input widths, 2 half dtypes
    assert not al.misaligned(torch.empty(3, 64), None)


class _Head(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)
        self.head = torch.nn.Linear(64, vocab, bias=False)

    def forward(self, x):
        return self.head(self.norm(x)) * 0.5


@pytest.mark.parametrize("vocab, rewritten", [(1027, 1), (1024, 0), (1000, 0)])
def test_pcg_rewrites_exactly_the_misaligned_head_and_matches_eager(vocab, rewritten):
    torch._dynamo.reset()
    pcg_backend.reset_stats()
    torch.manual_seed(0)
    model = _Head(vocab).to(torch.bfloat16)
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 16, "progress": False})
    with torch.no_grad():
        for n in (5, 9, 16, 40):
            x = torch.randn(1, n, 64, dtype=torch.bfloat16)
            ref, got = model(x), compiled(x)
            assert got.is_contiguous() and got.shape == ref.shape
            # The same products summed in fp32 by another kernel: a bf16 rounding apart at most.
            torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert pcg_backend.stats()["aligned_linears"] == rewritten * pcg_backend.stats()["graphs_compiled"]
    assert pcg_backend.stats()["graphs_compiled"] == 2   # Dynamo's static first graph, then the dynamic one
    assert ("computed as weight times input transposed" in pcg_backend.report()) == bool(rewritten)
    torch._dynamo.reset()


@requires_reference_kernels
def test_a_bf16_falcon_h1_with_an_odd_vocabulary_stays_within_eager_noise():
    import transformers as tf
    from hf_checks import OPTIONS, within_half_precision_noise
    from hf_models import tiny_config

    from pcg_backend.buckets import Ladder

    torch._dynamo.reset()
    pcg_backend.reset_stats()
    config = tiny_config("falcon_h1")
    config.vocab_size = 1027   # odd, as Falcon-H1's 130049
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    opts = pcg_backend.options.parse_options(OPTIONS)
    ladder = Ladder(opts.capture_sizes + opts.overflow_sizes)   # 70 pads to the overflow bucket 80
    rows = within_half_precision_noise(model, [3, 16, 17, 70], ladder, steps=2)
    assert [r["tokens"] for r in rows] == [3, 16, 17, 70]
    stats = pcg_backend.stats()
    # Every graph (prefills and decode steps) computes its LM head transposed: on CPU no linear goes to
    # pcg::skinny_linear, which on a GPU takes the decode steps' heads (one row) before this rewrite.
    assert stats["aligned_linears"] == stats["graphs_compiled"] >= 2, pcg_backend.report()
    torch._dynamo.reset()
