"""Where the eager prologue lands (schedule.py), on CPU.

The test calls `split_graph` from a test backend and runs the split module as
it is, so it checks both the order of the pieces and that the reordered graph
still computes what eager does.
"""

import torch

from pcg_backend.ops import toy  # noqa: F401  (registers the toy split ops)
from pcg_backend.node_kinds import Kind
from pcg_backend.split import split_graph


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
