"""The padding rule, checked with generated models: a padded result never differs from eager.

Each generated model is a random chain of steps over a (tokens, features)
activation. Steps are drawn from three families:

* row-wise and causal steps, which keep the graph paddable;
* rewritable steps (the token count as a value, a row picked from the end),
  which keep it paddable through a rewrite;
* unsafe steps (a flip, a sort, a reduction over the tokens, an index computed
  from data), after which the graph must run at exact sizes, with its reason.

Padding is poisoned with NaN (`runtime.pad_dims` is replaced), and the first
linear has a bias, so any real row that reads a padded one goes NaN or wrong.
Every model runs at token counts below, at, between and above the buckets,
and must equal eager there (fp32 on CPU, atol 1e-5). The verdict must be the
expected one: padded exactly when the chain has no unsafe step.
"""

from __future__ import annotations

import random

import pytest
import torch

import pcg_backend
from pcg_backend import runtime
from pcg_backend.ops import toy  # noqa: F401  (registers pcg_toy::mix)
from test_reliability import _nan_pad

ATOL = 1e-5
SIZES = [4, 8, 16]
# Between, at and above the buckets: 17 and 25 pad to the overflow buckets 24 and 32, 33 is above those.
COUNTS = [3, 4, 5, 8, 9, 13, 16, 17, 24, 25, 33]
CHAIN_OPTIONS = {"capture_sizes": SIZES, "max_overflow_size": 32}
# The hand-written cases below count their padded calls with nothing padded above the ladder.
OPTIONS = {"capture_sizes": SIZES, "max_overflow_size": 0}
H = 8


def _mix(x):
    out = torch.empty_like(x)
    torch.ops.pcg_toy.mix(x, out)
    return out


# name -> step(x, params) ; each keeps the (n, H) shape
SAFE = {
    "linear": lambda x, p: p["lin"](x),
    "gelu": lambda x, p: torch.nn.functional.gelu(x),
    "norm": lambda x, p: torch.nn.functional.layer_norm(x, (H,)),
    "softmax_features": lambda x, p: torch.softmax(x, -1),
    "split_heads": lambda x, p: x.view(x.shape[0], 2, H // 2).transpose(0, 1).reshape(2, -1, H // 2)
                                 .transpose(0, 1).reshape(x.shape[0], H),
    "where": lambda x, p: torch.where(x > 0, x, 0.1 * x),
    "cat_features": lambda x, p: torch.cat([x[:, : H // 2], x[:, H // 2:] * 2], -1),
    "cumsum": lambda x, p: x.cumsum(0) / 4,
    "diff": lambda x, p: torch.diff(x, dim=0, prepend=x[:1] - 1),
    "first_row": lambda x, p: x + x[:1],
    "shift_down": lambda x, p: torch.cat([x[:1] * 0, x[:-1]], 0),
    "arange_positions": lambda x, p: x + torch.arange(x.shape[0], device=x.device)[:, None].float() * 0.01,
    # an HF-style (tokens, tokens) causal mask: row i counts the keys it may see, i + 1
    "causal_mask": lambda x, p: x + torch.where(torch.arange(x.shape[0], device=x.device)[None, :] <= torch.arange(x.shape[0], device=x.device)[:, None],
                                                1.0, 0.0).cumsum(1)[:, -1:] * 0.1,
    "split_op": lambda x, p: _mix(x),
}
REWRITABLE = {
    "count_scale": lambda x, p: x * x.shape[0] / 10,
    "count_positions": lambda x, p: x + (torch.arange(x.shape[0], device=x.device) / x.shape[0])[:, None],
    "count_affine": lambda x, p: x * (x.shape[0] - 1),
}
UNSAFE = {
    "flip": lambda x, p: x.flip(0),
    "roll": lambda x, p: x.roll(1, 0),
    "sort": lambda x, p: x.sort(0).values,
    "center_tokens": lambda x, p: x - x.mean(0, keepdim=True),
    "data_index": lambda x, p: x[torch.argsort(x[:, 0])],
    "softmax_tokens": lambda x, p: torch.softmax(x, 0),
    "append_row": lambda x, p: torch.cat([x, x[:1]], 0)[1:],
    "strided": lambda x, p: x[::2].repeat_interleave(2, 0)[: x.shape[0]],
}
# A last step may change the shape: picks from the end are rewritable.
LAST_PICKS = {
    "last_row": lambda x, p: x[-1],
    "last_rows": lambda x, p: x[-2:],
    "narrow_end": lambda x, p: x.narrow(0, x.shape[0] - 2, 2),
    "select_end": lambda x, p: x.select(0, -2),
    "token_sum": lambda x, p: x.sum(0),   # unsafe
}


def _chain(rng: random.Random, length: int, unsafe: bool):
    names = [rng.choice(list(SAFE) + list(REWRITABLE)) for _ in range(length)]
    if unsafe:
        names.insert(rng.randrange(len(names) + 1), rng.choice(list(UNSAFE)))
    if rng.random() < 0.4:
        names.append(rng.choice(list(LAST_PICKS)))
    return names


STEPS = {**SAFE, **REWRITABLE, **UNSAFE, **LAST_PICKS}


class _Chain(torch.nn.Module):
    def __init__(self, names):
        super().__init__()
        self.names = names
        self.first = torch.nn.Linear(H, H)     # a bias: padded rows are not zeros after it
        self.lin = torch.nn.Linear(H, H)

    def forward(self, x):
        x = self.first(x)
        for name in self.names:
            x = STEPS[name](x, {"lin": self.lin})
        return x


def _expect_paddable(names) -> bool:
    return not any(n in UNSAFE or n == "token_sum" for n in names)


def _run(names, monkeypatch):
    torch.manual_seed(0)
    model = _Chain(names)
    compiled = torch.compile(model, backend="pcg", dynamic=True, options=CHAIN_OPTIONS)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    with torch.no_grad():
        for n in COUNTS:
            x = torch.randn(n, H)
            got, ref = compiled(x), model(x)
            assert got.shape == ref.shape, (names, n)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"{names} at {n} tokens")
    return pcg_backend.stats()


# Six counts are padded: 3, 5, 9 and 13 (to 4, 8, 16 and 16), 17 and 25 (to the overflow buckets 24 and 32).
PADDED_CALLS = sum(1 for n in COUNTS if n <= 32 and n not in SIZES + [24, 32])


@pytest.mark.parametrize("seed", range(150))
def test_generated_chain_is_padded_exactly_when_it_is_safe(seed, monkeypatch):
    rng = random.Random(seed)
    names = _chain(rng, rng.randint(1, 4), unsafe=seed % 3 == 0)
    s = _run(names, monkeypatch)
    if _expect_paddable(names):
        assert s["padded_calls"] == PADDED_CALLS, (names, pcg_backend.report())
        assert "cannot be padded" not in pcg_backend.report()
    else:
        assert s["padded_calls"] == 0, names
        assert "so padded rows could change a real result" in pcg_backend.report()


@pytest.mark.parametrize("name", sorted(SAFE) + sorted(REWRITABLE) + sorted(UNSAFE) + sorted(LAST_PICKS))
def test_every_step_alone(name, monkeypatch):
    s = _run([name], monkeypatch)
    assert (s["padded_calls"] == PADDED_CALLS) == _expect_paddable([name]), pcg_backend.report()


def test_rewrites_are_counted_in_the_report(monkeypatch):
    _run(["count_scale", "last_row"], monkeypatch)
    report = pcg_backend.report()
    assert "1 row pick(s) from the end and 1 use(s) of the token count as a value read the real count" in report


# The issue's own examples: each was silently wrong before the rule, with a split op in the graph.
ISSUE_CASES = {
    "times_count": lambda h: h * h.shape[0],
    "positions_over_count": lambda h: h + (torch.arange(h.shape[0], device=h.device) / h.shape[0])[:, None],
    "flip": lambda h: h.flip(0),
}


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_issue_examples_with_a_split_op_match_eager(case):
    lin = torch.nn.Linear(H, H)

    def f(x):
        return ISSUE_CASES[case](_mix(lin(x)))

    compiled = torch.compile(f, backend="pcg", dynamic=True, options=OPTIONS)
    with torch.no_grad():
        for n in [3, 5, 6, 9, 17]:
            x = torch.randn(n, H)
            torch.testing.assert_close(compiled(x), f(x), atol=ATOL, rtol=0)
    assert (pcg_backend.stats()["padded_calls"] == 4) == (case != "flip")


@pytest.mark.parametrize("pick", ["slice", "index"])
def test_last_rows_of_a_3d_activation_without_split_op(pick):
    # up(x)[:, -1:] and up(x)[:, -1, :] at n = 5 with buckets [4, 8, 16]: a gather at row n-1.
    up = torch.nn.Linear(H, 4 * H)

    def f(x):
        y = up(x)
        return y[:, -1:] if pick == "slice" else y[:, -1, :]

    compiled = torch.compile(f, backend="pcg", dynamic=True, options=OPTIONS)
    with torch.no_grad():
        for n in [5, 7, 16, 17]:
            x = torch.randn(2, n, H)
            got, ref = compiled(x), f(x)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert pcg_backend.stats()["padded_calls"] == 2


def test_numbers_of_the_count_returned_by_a_padded_graph_are_the_real_ones():
    lin = torch.nn.Linear(H, H)

    def f(x):
        y = lin(x)
        return y, y.shape[0] * 2, y.shape[0] - 1      # Dynamo returns these sizes as graph outputs

    compiled = torch.compile(f, backend="pcg", dynamic=True, options=OPTIONS)
    for n in [3, 5, 9]:
        x = torch.randn(n, H)
        got, ref = compiled(x), f(x)
        assert got[1:] == ref[1:] == (2 * n, n - 1)
        torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=0)
    assert pcg_backend.stats()["padded_calls"] == 3


def test_rows_from_the_end_written_in_place_keep_the_graph_exact(monkeypatch):
    # A gather would be a copy, and the write through the view would be lost: no rewrite, no padding.
    lin = torch.nn.Linear(H, H)

    def f(x):
        y = lin(x)
        y[-2:].mul_(0)
        return y

    compiled = torch.compile(f, backend="pcg", dynamic=True, options=OPTIONS)
    monkeypatch.setattr(runtime, "pad_dims", _nan_pad)
    for n in [3, 5, 9]:
        x = torch.randn(n, H)
        torch.testing.assert_close(compiled(x), f(x), atol=ATOL, rtol=0)
    assert pcg_backend.stats()["padded_calls"] == 0
    assert "rows picked from the token dim's end are written in place" in pcg_backend.report()


# Named like the `double()` cast on purpose: a custom op must not pass for a torch op by its name.
@torch.library.custom_op("pcg_rowtest::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_custom_op_pcg_does_not_know_keeps_the_graph_exact_until_declared_row_wise():
    lin = torch.nn.Linear(H, H)

    def f(x):
        return torch.ops.pcg_rowtest.double(lin(x))

    def run():
        torch._dynamo.reset()
        pcg_backend.reset_stats()
        compiled = torch.compile(f, backend="pcg", dynamic=True, options=OPTIONS)
        for n in [3, 5, 9]:
            x = torch.randn(n, H)
            torch.testing.assert_close(compiled(x), f(x), atol=ATOL, rtol=0)
        return pcg_backend.stats()["padded_calls"]

    assert run() == 0
    assert "pcg_rowtest::double is not known to keep rows apart along the token dim" in pcg_backend.report()
    pcg_backend.register_row_wise(torch.ops.pcg_rowtest.double)
    try:
        assert run() == 3
    finally:
        from pcg_backend.analyse import padding_rule

        padding_rule.ROW_WISE_OPS.discard("pcg_rowtest::double")
    with pytest.raises(ValueError, match="register_row_wise takes a module class or a torch custom op"):
        pcg_backend.register_row_wise(42)
