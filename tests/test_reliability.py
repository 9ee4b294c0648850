"""Reliability: fuzzed token counts, NaN padding poison, no aliasing, no recompiles on live traffic.

Every test runs on CPU (no CUDA graphs, same splitting, padding and slicing)
and, where a GPU is present, again on CUDA with graphs, where it also counts
captures. Tolerances: fp32 toy models 1e-5; HF models 1e-4 on CPU, 1e-3 on
GPU (padding changes GEMM shapes, hence the accumulation order).
"""

from __future__ import annotations

import random

import pytest
import torch

import pcg_backend
from pcg_backend import buckets, runtime
from pcg_backend.cudagraph import CudaGraphPiece
from conftest import requires_reference_kernels
from hf_models import tiny_model
from toy_models import StatefulToyModel

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# HF models on CPU need the torch reference kernels (see conftest.requires_reference_kernels).
HF_DEVICES = [pytest.param("cpu", marks=requires_reference_kernels)] + (["cuda"] if torch.cuda.is_available() else [])
TOY_SIZES = [1, 2, 4, 8, 16, 24, 32]
FUZZ_CALLS = 500


def _nan_pad(t, sizes):
    """pad_dims with NaN instead of zeros in float padding: anything that reads a padded row goes NaN."""
    out = buckets.pad_dims(t, sizes)
    if out is not t and out.is_floating_point():
        padding = torch.ones(out.shape, dtype=torch.bool, device=out.device)
        padding[tuple(slice(0, s) for s in t.shape)] = False
        out = out.masked_fill(padding, float("nan"))
    return out


def _poison_static_buffers():
    """Fill every captured piece's static input buffers with NaN: a replay must overwrite what it reads."""
    for piece in list(CudaGraphPiece._live):
        for entry in (e for versions in piece.entries.values() for e in versions):
            for _, static in entry.copies:
                if static.is_floating_point():
                    static.fill_(float("nan"))


def _fuzz_plan(rng: random.Random, largest: int, calls: int):
    """A mix of prefills (random count in [1, 2*largest], fresh state) and decode steps (1 token)."""
    plan = []
    for _ in range(calls):
        if plan and rng.random() < 0.4:
            plan.append(("decode", 1))
        else:
            plan.append(("prefill", rng.randint(1, 2 * largest)))
    return plan


# ---------------------------------------------------------------- toy model


class _ToyDriver:
    """Runs the stateful toy model with pcg and eagerly side by side, on separate states."""

    def __init__(self, device, **options):
        torch.manual_seed(0)
        self.model = StatefulToyModel().to(device)
        self.device = device
        self.compiled = torch.compile(self.model, backend="pcg", dynamic=True,
                                      options={"capture_sizes": TOY_SIZES, "progress": False, **options})
        self.state_pcg = self.state_ref = None

    def step(self, kind, n, poison=False):
        if kind == "prefill" or self.state_pcg is None:
            self.state_pcg, self.state_ref = self.model.new_state(self.device), self.model.new_state(self.device)
        x = torch.randn(n, 16, device=self.device)
        if poison and self.device == "cuda":
            _poison_static_buffers()
        got = self.compiled(x, self.state_pcg)
        ref = self.model(x, self.state_ref)
        assert torch.isfinite(got).all(), f"{kind} of {n}: non-finite output"
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{kind} of {n}")
        torch.testing.assert_close(self.state_pcg, self.state_ref, atol=1e-5, rtol=0, msg=f"state after {kind} of {n}")
        return got


@pytest.mark.parametrize("device", DEVICES)
def test_toy_fuzz_500_counts_no_recompiles_no_recaptures(device):
    driver = _ToyDriver(device)
    # The fuzz plan's prefills reach twice the largest bucket: pcg's default overflow buckets up to there.
    overflow = [b for b in buckets.overflow_ladder(TOY_SIZES[-1], 2048) if b <= 2 * TOY_SIZES[-1]]
    assert overflow == [40, 48, 56, 64]
    for n in [*TOY_SIZES, 3, *overflow]:                   # the first pass over the buckets
        driver.step("prefill", n)
        driver.step("decode", 1)
    before = pcg_backend.stats()
    plan = _fuzz_plan(random.Random(0), TOY_SIZES[-1], FUZZ_CALLS)
    for kind, n in plan:
        driver.step(kind, n)
    after = pcg_backend.stats()
    assert after["graphs_compiled"] == before["graphs_compiled"] == 2   # dynamic counts, and Dynamo's n=1 graph
    # Every prefill between buckets is padded, overflow buckets included (the state's two rows are not a token
    # dim, whatever n was traced).
    padded = sum(1 for kind, n in plan if kind == "prefill" and 1 < n and n not in TOY_SIZES + overflow)
    assert after["padded_calls"] - before["padded_calls"] == padded
    assert after["cuda_graphs_captured"] == before["cuda_graphs_captured"]
    if device == "cuda":
        # 3 capturable pieces; the dynamic graph took every bucket >= 2 up front and each overflow bucket on
        # its first call, the n=1 graph its one shape
        assert before["cuda_graphs_captured"] == 3 * (len(TOY_SIZES) - 1 + len(overflow)) + 3
        assert before["live_captures"] == 3 * len(overflow) + 3
        assert after["cuda_graph_replays"] > before["cuda_graph_replays"]


@pytest.mark.parametrize("device", DEVICES)
def test_toy_nan_padding_and_static_buffers_never_reach_real_rows(device, monkeypatch):
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    driver = _ToyDriver(device)
    for kind, n in [("prefill", 5), ("decode", 1), ("prefill", 13), ("decode", 1), ("decode", 1),
                    ("prefill", 31), ("prefill", 3), ("decode", 1)]:
        driver.step(kind, n, poison=True)
    assert pcg_backend.stats()["padded_calls"] >= 4


def test_nan_pad_helper_poisons_only_the_padding():
    t = torch.ones(3, 2)
    p = _nan_pad(t, {0: 5})
    assert torch.equal(p[:3], t) and torch.isnan(p[3:]).all()


# ---------------------------------------------------------------- HF model


def _cache(model, device):
    import transformers as tf

    return tf.DynamicCache(config=model.config)


class _HFDriver:
    """NemotronH with pcg and eagerly side by side, each with its own cache; decode feeds eager's argmax."""

    OPTIONS = {"max_capture_size": 64, "progress": False}

    def __init__(self, device, **options):
        self.device = device
        self.model = tiny_model("nemotron_h", device=device)
        self.compiled = torch.compile(self.model, backend="pcg", options={**self.OPTIONS, **options})
        self.atol = 1e-4 if device == "cpu" else 1e-3
        self.cache_pcg = self.cache_ref = self.next = None
        self.gen = torch.Generator().manual_seed(0)

    def step(self, kind, n):
        if kind == "prefill" or self.cache_pcg is None:
            self.cache_pcg, self.cache_ref = _cache(self.model, self.device), _cache(self.model, self.device)
            ids = torch.randint(3, self.model.config.vocab_size, (1, n), generator=self.gen).to(self.device)
        else:
            ids = self.next
        with torch.no_grad():
            got = self.compiled(ids, past_key_values=self.cache_pcg, use_cache=True).logits
            ref = self.model(ids, past_key_values=self.cache_ref, use_cache=True).logits
        assert torch.isfinite(got).all(), f"{kind} of {n}: non-finite logits"
        torch.testing.assert_close(got, ref, atol=self.atol, rtol=0, msg=f"{kind} of {n}")
        self.next = ref[:, -1:].argmax(-1)

    def check_states(self):
        from hf_checks import _states

        got, ref = _states(self.cache_pcg), _states(self.cache_ref)
        assert got and len(got) == len(ref)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=self.atol, rtol=0)


@pytest.mark.parametrize("device", HF_DEVICES)
@pytest.mark.parametrize("capture_split_ops", [True, False])
def test_hf_fuzz_500_prefill_and_decode_calls(device, capture_split_ops):
    driver = _HFDriver(device, capture_split_ops=capture_split_ops)
    sizes = buckets.default_ladder(64)
    # The fuzz plan's prefills reach 128 tokens: the default overflow buckets above 64 they land in.
    above = buckets.Ladder(buckets.overflow_ladder(64, 2048))
    overflow = sorted({above.bucket(n) for n in range(65, 129)})
    assert overflow == [80, 96, 120, 144]
    for n in [*sizes, 3, 100, 128, *overflow]:           # the first pass over the buckets
        driver.step("prefill", n)
        for _ in range(3):
            driver.step("decode", 1)
    before = pcg_backend.stats()
    for kind, n in _fuzz_plan(random.Random(1), 64, FUZZ_CALLS):
        driver.step(kind, n)
    driver.check_states()
    after = pcg_backend.stats()
    assert after["graphs_compiled"] == before["graphs_compiled"], "recompiled on live traffic"
    # Every prefill here starts a new cache. With split ops captured in the decode graph,
    # a cache at new addresses gets its own decode graph (counted); nothing else is captured.
    new = after["cuda_graphs_captured"] - before["cuda_graphs_captured"]
    assert new == after["new_address_captures"] - before["new_address_captures"], "recaptured on live traffic"
    if not capture_split_ops:
        assert new == 0
    print(f"{device}, capture_split_ops={capture_split_ops}: {FUZZ_CALLS} calls, "
          f"{after['cuda_graph_replays'] - before['cuda_graph_replays']} replays, {new} captures for new cache addresses")


@pytest.mark.parametrize("device", HF_DEVICES)
def test_hf_nan_padding_never_reaches_logits_or_state(device, monkeypatch):
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    driver = _HFDriver(device)
    for kind, n in [("prefill", 5), ("decode", 1), ("decode", 1), ("prefill", 27), ("decode", 1), ("prefill", 13)]:
        if device == "cuda":
            _poison_static_buffers()
        driver.step(kind, n)
        driver.check_states()
    assert pcg_backend.stats()["padded_calls"] >= 2


# ---------------------------------------------------------------- clear errors


def test_split_op_with_an_undeclared_write_is_an_error():
    from pcg_backend.eager_pieces import UndeclaredWriteError

    @torch.library.custom_op("pcg_test::sneaky", mutates_args=())
    def sneaky(x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)                      # writes x, but the schema says x is read-only
        return x.clone()

    sneaky.register_fake(lambda x: torch.empty_like(x))
    pcg_backend.register_split_op(sneaky)
    try:
        lin = torch.nn.Linear(4, 4)
        f = torch.compile(lambda x: torch.ops.pcg_test.sneaky(lin(x)) + 1, backend="pcg", dynamic=True,
                          options={"capture_sizes": [1, 2, 4, 8]})
        with pytest.raises(UndeclaredWriteError, match=r"'x' in place.*mutates_args"):
            f(torch.randn(3, 4))
    finally:
        pcg_backend.unregister_split_op(sneaky)


def test_declared_writes_pass_the_check():
    driver = _ToyDriver("cpu")
    driver.step("prefill", 5)     # running_sum declares state and out: no error


def test_mixed_devices_are_refused_before_any_work():
    from pcg_backend.backend import check_one_device

    gm = torch.fx.symbolic_trace(lambda x, y: x + y.sum())
    xs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    xs[0].meta["val"] = torch.empty(3, 4)
    xs[1].meta["val"] = torch.empty(3, 4, device="meta")
    with pytest.raises(ValueError, match="different devices: x on cpu and y on meta.*move the model"):
        check_one_device(gm)
    xs[1].meta["val"] = torch.tensor(2.0)      # a 0-dim CPU scalar is fine, as in eager
    check_one_device(gm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_through_torch_compile():
    f = torch.compile(lambda x, y: x + y.cuda(), backend="pcg")
    with pytest.raises(Exception, match="different devices"):
        f(torch.randn(3, 4, device="cuda"), torch.randn(3, 4))


# ---------------------------------------------------------------- no aliasing


@pytest.mark.parametrize("device", HF_DEVICES)
def test_outputs_and_cache_writes_survive_later_calls(device):
    """Call k's logits and the cache it wrote are unchanged by calls k+1, k+2 at the same and other buckets."""
    driver = _HFDriver(device)
    for n in (5, 7):                         # compile the static then the dynamic prefill graph
        driver.step("prefill", n)
    driver.step("prefill", 6)                # call k, bucket 8
    driver.step("decode", 1)
    cache_k = driver.cache_pcg
    with torch.no_grad():
        logits_k = driver.compiled(driver.next, past_key_values=cache_k, use_cache=True).logits
    from hf_checks import _states

    kept_logits, kept_states = logits_k.clone(), [t.clone() for t in _states(cache_k)]
    for kind, n in [("prefill", 6), ("decode", 1), ("prefill", 7), ("prefill", 30), ("decode", 1), ("prefill", 2)]:
        driver.step(kind, n)                 # new caches each prefill: cache_k is not touched by them
    assert torch.equal(logits_k, kept_logits)
    states = _states(cache_k)
    assert len(states) == len(kept_states)
    for now, kept in zip(states, kept_states):
        assert torch.equal(now, kept)
