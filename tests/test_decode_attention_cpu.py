"""The decode-attention path on CPU: what it computes, which calls it takes, and its wiring into pcg::attention.

The Triton kernels need CUDA (or Triton's interpreter:
`test_skinny_gemm_interpreter_cpu.py`); they are checked against
`decode_attention.reference`, so here that reference is checked against HF's
own SDPA attention, and a decode through pcg with the reference standing in
for the kernel must give eager's tokens and logits.
"""

import copy
import types

import pytest
import torch

from pcg_backend.ops import decode_attention as da


def _hf_sdpa(query, key, value, mask, scale):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], is_causal=True,
                                   training=False)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scale)[0]


def _inputs(batch, heads, kv_heads, keys, dim, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=g)
    k = torch.randn(batch, kv_heads, keys, dim, generator=g)
    v = torch.randn(batch, kv_heads, keys, dim, generator=g)
    mask = None
    if kind in ("bool", "left-padded"):
        mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
        if kind == "bool":
            mask = torch.rand(batch, 1, 1, keys, generator=g) > 0.4
            mask[..., -1] = True
        else:   # left padding, as a batch of prompts of different lengths gives it
            for row in range(batch):
                mask[row, ..., : row * 3] = False
    elif kind == "float":
        mask = torch.where(torch.rand(batch, 1, 1, keys, generator=g) > 0.4, 0.0, torch.finfo(torch.float32).min)
        mask[..., -1] = 0.0
    return q, k, v, mask


@pytest.mark.parametrize("batch,heads,kv_heads,keys,dim", [(1, 8, 2, 1, 16), (2, 40, 8, 70, 128), (3, 6, 6, 33, 80),
                                                           (4, 12, 3, 200, 64)])
@pytest.mark.parametrize("kind", [None, "bool", "left-padded", "float"])
def test_the_reference_computes_hfs_sdpa_attention(batch, heads, kv_heads, keys, dim, kind):
    # The kernels are tested against this reference, so it must mean what HF means: query head h reads
    # KV head h // (heads // kv_heads), a False mask entry hides a key, a float one is added to the score.
    q, k, v, mask = _inputs(batch, heads, kv_heads, keys, dim, kind)
    expected = _hf_sdpa(q, k, v, mask, dim ** -0.5)
    torch.testing.assert_close(da.reference(q, k, v, mask, dim ** -0.5), expected, atol=1e-5, rtol=1e-5)


def _half(batch=2, heads=8, kv_heads=2, keys=10, dim=64, dtype=torch.bfloat16):
    return (torch.empty(batch, heads, 1, dim, dtype=dtype), torch.empty(batch, kv_heads, keys, dim, dtype=dtype),
            torch.empty(batch, kv_heads, keys, dim, dtype=dtype))


def test_shapes_it_takes():
    q, k, v = _half()
    assert da.shapes_fit(q, k, v, None)
    assert da.shapes_fit(q, k, v, torch.ones(2, 1, 1, 10, dtype=torch.bool))
    assert da.shapes_fit(q, k, v, torch.ones(1, 8, 1, 10, dtype=torch.bfloat16))


@pytest.mark.parametrize("change", ["two query rows", "fp32", "head dim 512", "heads not a multiple", "no keys",
                                    "mask of other length", "mask with two rows", "integer mask", "3-D mask",
                                    "keys of another dtype"])
def test_shapes_it_declines(change):
    q, k, v = _half()
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    if change == "two query rows":
        q = torch.empty(2, 8, 2, 64, dtype=torch.bfloat16)
    elif change == "fp32":
        q, k, v = _half(dtype=torch.float32)
    elif change == "head dim 512":
        q, k, v = _half(dim=512)
    elif change == "heads not a multiple":
        q, k, v = _half(heads=7)
    elif change == "no keys":
        q, k, v = _half(keys=0)
        mask = None
    elif change == "mask of other length":
        mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    elif change == "mask with two rows":
        mask = torch.ones(2, 1, 2, 10, dtype=torch.bool)
    elif change == "integer mask":
        mask = torch.ones(2, 1, 1, 10, dtype=torch.int64)
    elif change == "3-D mask":
        mask = torch.ones(2, 1, 10, dtype=torch.bool)
    elif change == "keys of another dtype":
        k = k.half()
    assert not da.shapes_fit(q, k, v, mask)


def test_cpu_tensors_never_take_the_kernel():
    q, k, v = _half()
    assert not da.applies(q, k, v, None)


@pytest.mark.parametrize("batch,kv_heads,keys,expected", [(1, 8, 600, 10), (8, 8, 600, 3), (1, 8, 5, 1),
                                                          (1, 1, 100000, 132), (64, 8, 4096, 1)])
def test_a_long_cache_is_split_to_fill_the_sms_in_whole_blocks(batch, kv_heads, keys, expected):
    assert da.splits_for(batch, kv_heads, keys) == expected


@pytest.mark.parametrize("family,attention_layers", [("nemotron_h", 1), ("falcon_h1", 2), ("zamba2", 1)])
def test_decode_steps_go_through_the_decode_path_and_equal_eager(family, attention_layers, monkeypatch):
    # On CPU the kernel does not apply; told that it does (its shape rules kept), pcg::attention hands each
    # decode step's attention to it, here the fp32 reference in its place: eager's tokens, logits within
    # fp32 rounding, and one call per attention layer per decode step, none for the prefill.
    from hf_models import tiny_model

    calls = []

    def reference_into(query, key, value, mask, out, scale):
        calls.append(tuple(query.shape))
        out.copy_(da.reference(query, key, value, mask, scale))

    monkeypatch.setattr(da, "applies", lambda q, k, v, m: da.shapes_fit(q.bfloat16(), k.bfloat16(), v.bfloat16(), m))
    monkeypatch.setattr(da, "decode_attention", reference_into)
    torch._dynamo.reset()
    model = tiny_model(family)
    twin = copy.copy(model)
    twin.forward = torch.compile(model.forward, backend="pcg", options={"progress": False})
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0   # the second prompt is left padded
    kwargs = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref, got = model.generate(ids, **kwargs), twin.generate(ids, **kwargs)
    torch._dynamo.reset()
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert len(calls) == 3 * attention_layers
    assert all(shape[0] == 2 and shape[2] == 1 for shape in calls)
