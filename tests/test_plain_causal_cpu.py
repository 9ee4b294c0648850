"""A prefill's mask read on the host: SDPA's causal flag where the mask is plain causal, the mask otherwise.

Outside CUDA graphs `pcg::attention` compares a boolean 4-D mask with the
causal pattern once per mask tensor (`ops/plain_causal.py`) and, where they
are equal, calls SDPA with no mask and its causal flag, as HF eager does.
These tests pin the comparison on generated masks, the conditions and the
once-per-tensor verdict, the op's output against the masked call, and every
attention family end to end against eager, with exact counts of host checks
and of calls that took the flag.

On CPU the end-to-end calls run the first, static graph: its pieces run
without graphs, so the mask is read. Once Dynamo makes the graph dynamic,
CPU calls above the ladder take the padded path with the count on the
device (the path CUDA graphs use) and keep the mask; the host path above
the ladder, on a GPU, is covered by the op-level tests here and measured by
the benchmark.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pcg_backend
from pcg_backend import context
from pcg_backend.ops import attention as att
from pcg_backend.ops import plain_causal
from pcg_backend.stats import STATS

from hf_models import pcg_twin, tiny_model


def _causal(batch: int, heads: int, rows: int) -> torch.Tensor:
    return torch.ones(rows, rows, dtype=torch.bool).tril().expand(batch, heads, rows, rows).clone()


@pytest.mark.parametrize("seed", range(6))
def test_generated_masks_are_plain_causal_exactly_when_equal_to_the_pattern(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(25):
        rows = int(torch.randint(1, 70, (), generator=g))
        batch, heads = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(1, 3, (), generator=g))
        mask = _causal(batch, heads, rows)
        assert plain_causal.is_plain_causal(mask)
        # One element flipped anywhere (a padded key, a key beyond the diagonal) is no longer plain causal.
        b, h, i, j = (int(torch.randint(0, n, (), generator=g)) for n in (batch, heads, rows, rows))
        flipped = mask.clone()
        flipped[b, h, i, j] = ~flipped[b, h, i, j]
        assert not plain_causal.is_plain_causal(flipped)
        # Left padding of one sequence: its first columns hidden from every row.
        if rows > 1:
            padded = mask.clone()
            padded[b, :, :, 0] = False
            assert not plain_causal.is_plain_causal(padded)


def _forward(capture_key=None):
    return context.forward_context(context.ForwardContext(num_tokens=None, padded_tokens=None,
                                                          capture_key=capture_key))


def _stand_in(*args, **kwargs):
    raise AssertionError("never called")


@pytest.fixture
def takes_flag(monkeypatch):
    """`_stand_in` counted as a function that honours the causal flag, and MIN_ROWS at 8."""
    monkeypatch.setattr(plain_causal, "MIN_ROWS", 8)
    monkeypatch.setattr(plain_causal, "TAKES_CAUSAL_FLAG", {_stand_in})


def test_applies_only_to_long_prefills_over_their_own_rows_and_reads_each_mask_once_per_forward(takes_flag):
    key = torch.zeros(1, 2, 8, 4)
    mask = _causal(1, 1, 8)
    before = STATS.causal_mask_checks
    with _forward():
        assert not plain_causal.applies(7, key[:, :, :7], _causal(1, 1, 7), _stand_in, True)   # below MIN_ROWS
        assert not plain_causal.applies(8, key, mask, F.scaled_dot_product_attention, True)   # not known to
        assert not plain_causal.applies(8, key, mask, _stand_in, False)    # a bidirectional module
        assert not plain_causal.applies(8, torch.zeros(1, 2, 12, 4), _causal(1, 1, 12)[:, :, 4:], _stand_in, True)
        assert not plain_causal.applies(8, key, _causal(1, 1, 12)[:, :, 4:], _stand_in, True)   # mask not square
        assert not plain_causal.applies(8, key, None, _stand_in, True)     # nothing to drop
        assert not plain_causal.applies(8, key, torch.where(mask, 0.0, float("-inf")), _stand_in, True)   # float
        assert STATS.causal_mask_checks == before                          # none of these read a mask
        assert plain_causal.applies(8, key, mask, _stand_in, True)
        assert plain_causal.applies(8, key, mask, _stand_in, True)         # the same tensor: the kept verdict
        assert STATS.causal_mask_checks == before + 1
        padded = mask.clone()
        padded[..., 0] = False
        assert not plain_causal.applies(8, key, padded, _stand_in, True)   # another tensor is read
        assert not plain_causal.applies(8, key, padded, _stand_in, True)
        assert STATS.causal_mask_checks == before + 2
        padded[..., 0] = mask[..., 0]                                      # written in place: read again
        assert plain_causal.applies(8, key, padded, _stand_in, True)
        assert STATS.causal_mask_checks == before + 3
    # The next forward reads the same tensor again: a replayed CUDA graph hands back the same
    # output tensor with new contents and an unchanged version counter.
    version = mask._version
    mask.data[..., 0] = False   # as a graph replay writes: new contents, the version counter untouched
    assert mask._version == version
    with _forward():
        assert not plain_causal.applies(8, key, mask, _stand_in, True)
    assert STATS.causal_mask_checks == before + 4
    # Outside a forward nothing is kept: the same tensor is read on every call.
    plain = _causal(1, 1, 8)
    assert plain_causal.applies(8, key, plain, _stand_in, True)
    assert plain_causal.applies(8, key, plain, _stand_in, True)
    assert STATS.causal_mask_checks == before + 6


def test_no_mask_is_read_inside_a_piece_that_a_graph_records(takes_flag):
    key, mask = torch.zeros(1, 2, 8, 4), _causal(1, 1, 8)
    before = STATS.causal_mask_checks
    # A static graph's piece, or a bucket's: warmed up, probed and captured under this key.
    for capture_key in [("static", 1), (8, 1)]:
        with _forward(capture_key), context.piece_running():
            assert not plain_causal.applies(8, key, mask, _stand_in, True)
    assert STATS.causal_mask_checks == before
    # The same forward's split op between pieces, and a piece run without graphs: read.
    with _forward(("static", 1)):
        assert plain_causal.applies(8, key, mask, _stand_in, True)
    with _forward(None), context.piece_running():
        assert plain_causal.applies(8, key, mask, _stand_in, True)
    assert STATS.causal_mask_checks == before + 2


def test_inference_tensors_are_read_once_per_forward(takes_flag):
    key = torch.zeros(1, 2, 8, 4)
    with torch.inference_mode():
        mask = _causal(1, 1, 8)
    before = STATS.causal_mask_checks
    with _forward():
        assert plain_causal.applies(8, key, mask, _stand_in, True)
        assert plain_causal.applies(8, key, mask, _stand_in, True)
    assert STATS.causal_mask_checks == before + 1


def _hf_like_sdpa(calls):
    # HF's sdpa function's contract: no mask and a causal module mean SDPA's causal flag.
    def sdpa(module, query, key, value, mask, dropout=0.0, scaling=None, **kwargs):
        calls.append(mask is None)
        rep = module.num_key_value_groups
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        causal = mask is None and module.is_causal and query.shape[2] > 1
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    return sdpa


def _hf_sdpa_spy(calls):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def spy(module, query, key, value, mask, **kwargs):
        calls.append(mask is None)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return spy


@pytest.mark.parametrize("function", ["stand_in", "hf"])
@pytest.mark.parametrize("padding", [0, 3])
def test_the_op_gives_the_masked_result_with_or_without_the_flag(monkeypatch, padding, function):
    monkeypatch.setattr(plain_causal, "MIN_ROWS", 16)
    calls = []
    if function == "hf":
        # HF's own function, as the adapter registers it (the spy only records the mask it was given).
        spy = _hf_sdpa_spy(calls)
        monkeypatch.setattr(plain_causal, "TAKES_CAUSAL_FLAG", {spy})
    else:
        spy = _hf_like_sdpa(calls)
        monkeypatch.setattr(plain_causal, "TAKES_CAUSAL_FLAG", {spy})
    monkeypatch.setitem(att.ORIGINAL_ATTENTION, "sdpa", spy)
    g = torch.Generator().manual_seed(padding)
    batch, heads, kv_heads, rows, dim = 2, 4, 2, 24, 8
    query = torch.randn(batch, heads, rows, dim, generator=g)
    key, value = (torch.randn(batch, kv_heads, rows, dim, generator=g) for _ in range(2))
    mask = _causal(batch, 1, rows)
    mask[1, :, :, :padding] = False      # left padding of the second sequence
    mask[1, :, :padding, :padding] = torch.eye(padding, dtype=torch.bool)   # padded rows see themselves, as HF's do
    want = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                                          attn_mask=mask, scale=dim ** -0.5).transpose(1, 2)
    before = (STATS.causal_mask_checks, STATS.causal_flag_attention)
    with _forward():
        for _ in range(2):   # two layers of one forward: the same mask tensor
            out = torch.empty(batch, rows, heads, dim)
            att.attention(query, key, value, mask, out, dim ** -0.5, "sdpa", 2, True, False)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    flagged = 2 if padding == 0 else 0
    assert calls == [padding == 0] * 2
    assert (STATS.causal_mask_checks, STATS.causal_flag_attention) == (before[0] + 1, before[1] + flagged)


# Attention layers of each tiny model (tests/hf_models.py): each takes the flag once per forward.
ATTENTION_LAYERS = {"nemotron_h": 1, "bamba": 1, "falcon_h1": 2, "granitemoehybrid": 1, "zamba2": 1}


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", sorted(ATTENTION_LAYERS))
def test_every_attention_family_matches_eager_with_and_without_padding(name, grad_mode):
    model = tiny_model(name)
    compiled = pcg_twin(model, {"capture_sizes": [8, 16], "max_overflow_size": 0, "progress": False})
    g = torch.Generator().manual_seed(1)
    rows = plain_causal.MIN_ROWS + 44
    cases = [(rows, 0), (rows, 7), (plain_causal.MIN_ROWS - 1, 0)]   # (tokens, left padding of sequence 1)
    for tokens, padding in cases:
        ids = torch.randint(3, 128, (2, tokens), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :padding] = 0
        pcg_backend.reset_stats()
        with getattr(torch, grad_mode)():
            got = compiled(ids, attention_mask=mask).logits
            want = model(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
        checked = 1 if tokens >= plain_causal.MIN_ROWS else 0
        flagged = ATTENTION_LAYERS[name] if checked and padding == 0 else 0
        s = pcg_backend.stats()
        assert (s["causal_mask_checks"], s["causal_flag_attention"]) == (checked, flagged), (tokens, padding)
        line = (f"  Attention outside CUDA graphs: {checked} mask(s) read on the host (one sync per forward); "
                f"{flagged} call(s) had no padding and ran with SDPA's causal flag, as HF eager runs them")
        assert (line in pcg_backend.report().splitlines()) == bool(checked)
    # The HF adapter named HF's own SDPA function as one that takes the causal flag.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    assert plain_causal.TAKES_CAUSAL_FLAG == {sdpa_attention_forward}
