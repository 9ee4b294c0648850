"""The six HF hybrid families on CPU with the torch reference kernels: prefill, generate, states."""

import pytest
import torch

import pcg_backend
from conftest import requires_reference_kernels
from hf_checks import PREFILL_SIZES, _states, generate_matches, one_token_prefill_matches, prefill_logits
from hf_models import FAMILIES, pcg_twin, tiny_model

ATOL = 1e-4  # fp32 on CPU, as the issue asks
pytestmark = requires_reference_kernels


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_matches_eager(family):
    model = tiny_model(family)
    prefill_logits(model, PREFILL_SIZES, ATOL)
    s = pcg_backend.stats()
    assert s["padded_calls"] == 3            # 3, 17 and 100 were padded to buckets 4, 24 and 120
    assert s["overflow_calls"] == 1          # 100: the overflow bucket 120
    if family == "granitemoehybrid":
        # The experts are one row-wise op (HF's sort by expert across the token dim runs inside it): padded.
        assert "experts via pcg::moe_experts (grouped_mm)" in "\n".join(s["routing"])
        assert "route each token alone (registered row-wise)" not in pcg_backend.report()
    assert "token count above the largest overflow bucket 128" in s["eager_reasons"]
    routing = "\n".join(s["routing"])
    assert "pcg::mamba2_core" in routing
    if family != "mamba2":
        assert "pcg::attention" in routing


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 4])
def test_generate_dynamic_cache(family, batch):
    generate_matches(tiny_model(family), batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_generate_under_inference_mode(family):
    """Inference tensors keep no version counter, which pcg's write check and weight prologue would read."""
    model = tiny_model(family)
    with torch.inference_mode():
        prefill_logits(model, [1, 17, 100], ATOL)     # a bucket, and an overflow bucket
        generate_matches(model, 4)                    # left-padded batch
    s = pcg_backend.stats()
    # 17 and 100 padded; the twin that generate() uses sees its 9-token prompt first: a static graph, unpadded
    assert (s["overflow_calls"], s["padded_calls"]) == (1, 2), pcg_backend.report()


@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "granitemoehybrid"])
def test_generate_static_cache(family):
    generate_matches(tiny_model(family), 4, cache_implementation="static")


def test_routing_is_only_active_for_pcg():
    model = tiny_model("nemotron_h")
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        other = torch.compile(model, backend="eager")(ids).logits
    torch.testing.assert_close(other, ref, atol=ATOL, rtol=0)
    assert pcg_backend.stats()["routing"] == []   # nothing routed outside a pcg trace


def test_unroutable_mixer_is_reported(monkeypatch):
    from pcg_backend.hf.adapters import mamba2 as mixer

    # Pretend routing needs an attribute these mixers lack: they must keep their own forward, and say so.
    monkeypatch.setattr(mixer, "REQUIRED", mixer.REQUIRED + ("pcg_test_attribute",))
    model = tiny_model("nemotron_h")
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 64})
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=ATOL, rtol=0)
    routing = pcg_backend.stats()["routing"]
    assert any("NOT routed, missing pcg_test_attribute" in r for r in routing)
    assert not any("pcg::mamba2_core" in r for r in routing)


@pytest.mark.parametrize("capture_split_ops", [True, False])
def test_mamba_cores_join_padded_pieces(capture_split_ops, monkeypatch):
    # The Mamba2 core is padding_safe: in a padded prefill graph it runs inside a
    # piece at the full bucket and takes the real count from the device buffer.
    import pcg_backend.ops.mamba2 as mamba2

    padded_runs = []
    real = mamba2._padded_prefill
    monkeypatch.setattr(mamba2, "_padded_prefill", lambda *a, **k: padded_runs.append(a[1].shape[1]) or real(*a, **k))
    model = tiny_model("nemotron_h")                       # layers M * M: 2 Mamba cores, 1 attention
    compiled = torch.compile(model, backend="pcg", options={"capture_sizes": [1, 2, 4, 8, 16], "max_overflow_size": 32,
                                                           "capture_split_ops": capture_split_ops})
    g = torch.Generator().manual_seed(0)
    # in a bucket, a bucket, bucket + 1, largest, above it (the overflow bucket 24), above the overflow (32)
    sizes = [3, 4, 5, 16, 17, 33]
    with torch.no_grad():
        for n in sizes:
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
            torch._dynamo.mark_dynamic(ids, 1)
            ref, got = model(ids, use_cache=True), compiled(ids, use_cache=True)
            torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=0, msg=f"{n} tokens")
            for r, s in zip(_states(ref.past_key_values), _states(got.past_key_values)):
                torch.testing.assert_close(s, r, atol=ATOL, rtol=0, msg=f"state after {n} tokens")
    s = pcg_backend.stats()
    # 2 Mamba cores and attention: a new DynamicCache's first KV write is no split op.
    assert s["graphs_compiled"] == 1 and s["split_op_nodes"] == 3
    if capture_split_ops:
        assert s["split_ops_in_graphs"] == 3                         # attention too: the whole model
        assert "3 padding-safe split op(s) captured inside pieces at every bucket" in pcg_backend.report()
        # each core, each call, at the bucket's rows (33 is above the overflow buckets: its own size;
        # on CPU the device count is published there too, see runtime._context)
        assert padded_runs == [b for b in [4, 4, 8, 16, 24, 33] for _ in range(2)]
    else:
        assert s["split_ops_in_graphs"] == 0 and padded_runs == []


@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1", "bamba"])
def test_one_token_prefill_is_one_step_from_zero_state(family, monkeypatch):
    # NemotronH clamps dt at time_step_min (0.001), FalconH1 and Bamba do not: both step variants.
    one_token_prefill_matches(tiny_model(family), monkeypatch, ATOL)


def test_decode_graphs_are_two_captured_pieces_at_any_batch():
    # A decode step over a DynamicCache: the attention mask (over the growing KV
    # length) runs in one eager prologue, the attention output's allocation joins
    # the captured piece before the KV writes, and both Mamba cores stay inside
    # the captured pieces even once the batch is symbolic (the cache states carry
    # batch symbols of their own, which are keyed, not foreign).
    from pcg_backend.stats import STATS

    model = tiny_model("nemotron_h")                       # layers M * M -: 2 Mamba cores, 1 attention
    compiled = pcg_twin(model, {"max_capture_size": 64})
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in (1, 3):
            ids = torch.randint(3, model.config.vocab_size, (batch, 9), generator=g)
            mask = torch.ones_like(ids)
            assert torch.equal(compiled.generate(ids, attention_mask=mask, **kw),
                               model.generate(ids, attention_mask=mask, **kw))
    decode = [r for r in STATS.graphs if r.token_symbol is None and r.split_op_nodes == 5
              and r.capturable_pieces < r.pieces]       # the KV length is symbolic: attention stays split
    assert len(decode) == 2, [(r.name, r.pieces, r.capturable_pieces) for r in STATS.graphs]
    for r in decode:
        # 2 captured pieces and the 3 attention split ops, and no host piece in front (the
        # unused size arithmetic Dynamo leaves there is dropped). Where transformers builds the
        # decode mask over the KV length in the graph (5.17), the mask's eager prologue and the
        # host size arithmetic feeding it add 2.
        mask_in_graph = any("shape depends on dynamic size" in n for n in r.notes)
        assert r.capturable_pieces == 2 and r.pieces == (7 if mask_in_graph else 5), (r, r.notes)
        assert any(n.startswith("2 cudagraph-safe split op(s) captured inside pieces") for n in r.notes), r.notes
