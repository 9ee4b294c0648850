"""Where pieces start and end: launch chunks and the eager prologue's place (schedule.py), on CPU.

These call `split_graph` from a test backend and run the split module as it
is, so each test checks both the cut and that the cut graph still computes
what eager does.
"""

import torch

from pcg_backend.ops import toy  # noqa: F401  (registers the toy split ops)
from pcg_backend.node_kinds import Kind
from pcg_backend.split import split_graph


class ResidualStack(torch.nn.Module):
    """`layers` blocks of x + b(relu(a(x))): four compute nodes each, and only x crosses a block boundary."""

    def __init__(self, layers: int):
        super().__init__()
        self.a = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(layers))
        self.b = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(layers))

    def forward(self, x):
        for a, b in zip(self.a, self.b):
            x = x + b(torch.relu(a(x)))
        return x


def _split_with(fn, args, **split_args):
    """Compile `fn` with a backend that returns `split_graph`'s module; check it against eager; return the split."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(split_graph(gm, **split_args))
        return seen[-1].module

    torch._dynamo.reset()
    got = torch.compile(fn, backend=backend)(*args)
    torch.testing.assert_close(got, fn(*args), atol=1e-6, rtol=0)
    assert len(seen) == 1
    return seen[0]


def _compute_nodes(split, piece) -> int:
    sub = getattr(split.module, piece.name)
    return sum(1 for n in sub.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def test_a_long_captured_run_is_cut_into_growing_pieces():
    split = _split_with(ResidualStack(12), (torch.randn(3, 8),), head_piece_nodes=2)
    assert [p.kind for p in split.pieces] == [Kind.STATIC] * 4
    # budgets 2, 8, 32, 128: the head is `relu(a(x))`; later cuts fall on block boundaries
    # (the 8-node budget fits 6 nodes up to the end of block 1, the 32 one blocks 2..9)
    assert [_compute_nodes(split, p) for p in split.pieces] == [2, 6, 32, 8]
    for piece in split.pieces[2:]:
        inputs = [n for n in getattr(split.module, piece.name).graph.nodes
                  if n.op == "placeholder" and "self" not in n.name]
        assert len(inputs) == 1, inputs          # only the hidden state crosses


def test_head_piece_nodes_zero_keeps_one_piece():
    split = _split_with(ResidualStack(12), (torch.randn(3, 8),), head_piece_nodes=0)
    assert len(split.pieces) == 1 and _compute_nodes(split, split.pieces[0]) == 48


def test_a_run_within_its_budget_is_not_cut():
    split = _split_with(ResidualStack(1), (torch.randn(3, 8),), head_piece_nodes=4)
    assert len(split.pieces) == 1


def test_the_eager_prologue_sinks_below_the_first_captured_piece():
    # `kv.sum(0)` needs an unkeyed size, so it runs eagerly. Its only consumer is
    # the last add: it runs after the split op, not before `lin`, so the GPU
    # would start on `lin` while the host works on it.
    lin, lin2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def f(x, kv):
        h = lin(x)
        bias = kv.sum(0)
        out = torch.empty_like(h)
        torch.ops.pcg_toy.mix(h, out)
        return lin2(out) + bias

    x, kv = torch.randn(5, 16), torch.randn(7, 16)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(kv, 0)
    split = _split_with(f, (x, kv))
    assert [p.kind for p in split.pieces] == [Kind.STATIC, Kind.SPLIT, Kind.DYNAMIC, Kind.STATIC]
    eager = getattr(split.module, split.pieces[2].name)
    assert [n.target for n in eager.graph.nodes if n.op == "call_method"] == ["sum"]
