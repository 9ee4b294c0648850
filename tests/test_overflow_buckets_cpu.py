"""Overflow buckets: calls above the ladder padded to coarse buckets, on CPU (the same padding, no graphs)."""

import random

import pytest
import torch

import pcg_backend
from pcg_backend import traffic
from pcg_backend.buckets import MAX_OVERFLOW_WASTE, Ladder, overflow_ladder
from pcg_backend.options import PcgOptionError, parse_options
from conftest import requires_reference_kernels
from hf_checks import OPTIONS, _states, left_padded_prompt
from hf_models import FAMILIES, pcg_twin, tiny_model
from toy_models import ToyModel, compile_toy

ATOL = 1e-5   # fp32 on CPU: padded and unpadded matmuls differ only in reassociation


def test_the_default_overflow_buckets_run_from_the_ladder_to_2048():
    opts = parse_options({})
    assert opts.largest == 512
    assert opts.overflow_sizes == (640, 800, 1000, 1248, 1560, 1944, 2048)
    assert parse_options({"max_overflow_size": 0}).overflow_sizes == ()
    assert parse_options({"max_overflow_size": 512}).overflow_sizes == ()      # not above the ladder: none
    assert parse_options({"capture_sizes": [4, 8, 16], "max_overflow_size": 40}).overflow_sizes == (24, 32, 40)


@pytest.mark.parametrize("bad", [-1, 1.5, "2048", True, None])
def test_a_bad_max_overflow_size_is_an_error(bad):
    with pytest.raises(PcgOptionError, match="max_overflow_size must be an int >= 0"):
        parse_options({"max_overflow_size": bad})


@pytest.mark.parametrize("seed", range(60))
def test_generated_overflow_ladders_keep_their_waste_bound(seed):
    """Every overflow ladder climbs above the ladder to exactly `max_size`, in multiples of 8 but its last, and
    (from a largest bucket of 32) no call of (previous bucket + 1) tokens pads more than MAX_OVERFLOW_WASTE."""
    rng = random.Random(seed)
    largest = rng.choice([1, 8, 16, 32, 64, 100, 256, 512, 1024, rng.randint(1, 3000)])
    max_size = rng.choice([0, largest, largest + 1, 2 * largest, 4096, rng.randint(1, 9000)])
    sizes = overflow_ladder(largest, max_size)
    if max_size <= largest:
        assert sizes == ()
        return
    assert sizes[-1] == max_size and list(sizes) == sorted(set(sizes)) and sizes[0] > largest
    steps = list(zip((largest,) + sizes, sizes))
    for low, high in steps[:-1]:
        assert high % 8 == 0 or low % 8, (largest, sizes)
        assert high - low == max(8, low // 4 // 8 * 8)
    if largest >= 32:
        assert max((high - low - 1) / high for low, high in steps) <= MAX_OVERFLOW_WASTE
    ladder = Ladder(sizes)
    for n in rng.sample(range(largest + 1, max_size + 1), min(50, max_size - largest)):
        bucket = ladder.bucket(n)
        assert bucket >= n and not [s for s in sizes if n <= s < bucket]
    assert ladder.bucket(max_size + 1) is None


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_the_toy_model_matches_eager_in_overflow_buckets_and_above_them(compiler):
    torch.manual_seed(0)
    model = ToyModel(3)
    compiled = compile_toy(model, capture_sizes=[4, 8, 16], max_overflow_size=40, compiler=compiler)
    # 17 -> 24, 24 (an overflow bucket itself), 25 -> 32, 40 (the last), 41 and 100: above them all.
    for n in [3, 17, 24, 25, 40, 41, 100]:
        x = torch.randn(n, 16)
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0, msg=f"{n} tokens")
    s = pcg_backend.stats()
    assert s["overflow_calls"] == 4
    assert s["padded_calls"] == 3           # 3, 17 and 25
    assert s["eager_reasons"] == {
        "CUDA graphs off: the graph runs on CPU": 4 * 5,
        "token count above the largest overflow bucket 40": 4 * 2,
    }
    assert "Calls above the largest bucket padded to an overflow bucket: 4" in pcg_backend.report()


def test_a_split_op_sees_the_overflow_bucket_with_zero_padded_rows_and_the_real_count():
    from pcg_backend import context

    seen = []

    @torch.library.custom_op("pcg_test::overflow_spy", mutates_args=())
    def spy(x: torch.Tensor) -> torch.Tensor:
        ctx = context.current()
        n = context.real_tokens(x.shape[0])
        seen.append((x.shape[0], n, ctx.overflow_refusals,
                     x[n:].abs().sum().item()))
        return x.clone()

    spy.register_fake(lambda x: torch.empty_like(x))
    pcg_backend.register_split_op(spy)
    try:
        f = torch.compile(lambda x: torch.ops.pcg_test.overflow_spy(x * 2) + 1, backend="pcg",
                          options={"capture_sizes": [4, 8, 16], "max_overflow_size": 64}, dynamic=True)
        for n in (5, 20, 33):
            x = torch.randn(n, 4)
            torch.testing.assert_close(f(x), x * 2 + 1)
        # 5 pads to the ladder's 8; 20 and 33 to the overflow buckets 24 and 40, an empty refusal list each
        assert seen == [(8, 5, None, 0.0), (24, 20, [], 0.0), (40, 33, [], 0.0)]
    finally:
        pcg_backend.unregister_split_op(spy)
    assert pcg_backend.stats()["overflow_calls"] == 2


@pytest.mark.parametrize("seed", range(30))
def test_the_traffic_warm_up_reaches_every_overflow_bucket_of_every_batch_size(seed):
    """Generated plans: the warm-up makes one call per (batch, path), each overflow bucket a path of its own."""
    rng = random.Random(seed)
    largest = rng.choice([8, 32, 512])
    overflow = overflow_ladder(largest, rng.choice([0, largest + 8, 2 * largest, 4 * largest]))
    calls = traffic.plan(seed, rng.randint(1, 120), largest, rng.sample(range(1, 9), rng.randint(1, 8)))
    above = Ladder(overflow) if overflow else None

    def path(c):
        if c.prompt == 1 or c.prompt <= largest:
            return c.batch, ("one" if c.prompt == 1 else "ladder")
        bucket = above.bucket(c.prompt) if above else None
        return c.batch, ("exact" if bucket is None else bucket)

    warm = traffic.warm_up_calls(calls, largest, overflow)
    assert warm[0].prompt == max(c.prompt for c in calls)
    assert {path(c) for c in warm} == {path(c) for c in calls}
    assert len(warm) == 1 + len({path(c) for c in calls})


@requires_reference_kernels
@pytest.mark.parametrize("family, cache", [(f, None) for f in FAMILIES]
                         + [(f, "static") for f in ("nemotron_h", "bamba", "granitemoehybrid")])
def test_generate_over_a_left_padded_batch_in_an_overflow_bucket_equals_eager(family, cache):
    """Batch 3, every row but the first left-padded, a 70-token prompt in the overflow bucket 80 (ladder to
    64, overflow buckets to 128): the same tokens as eager, and every cache state within fp32's noise."""
    model = tiny_model(family)
    compiled = pcg_twin(model, OPTIONS)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    if cache:
        kw.update(cache_implementation=cache, disable_compile=True)
    with torch.no_grad():
        # 9 tokens first: Dynamo's first prefill graph has static shapes, the second length makes it dynamic.
        for n in (9, 70):
            ids, mask = left_padded_prompt(model, 3, n, pad=5, seed=n)
            ref = model.generate(ids, attention_mask=mask, **kw)
            got = compiled.generate(ids, attention_mask=mask, **kw)
            assert torch.equal(got.sequences, ref.sequences), (n, got.sequences, ref.sequences)
            pairs = list(zip(_states(ref.past_key_values), _states(got.past_key_values), strict=True))
            assert pairs
            for r, s in pairs:
                torch.testing.assert_close(s, r, atol=1e-4, rtol=0, msg=f"{family}, {n} tokens: a cache state")
    s = pcg_backend.stats()
    assert s["overflow_calls"] == 1 and s["padded_calls"] >= 1, pcg_backend.report()
