"""Splitting, bucketing, padding and slicing on CPU, where the same pieces run without CUDA graphs."""

import pytest
import torch

import pcg_backend
from pcg_backend import context
from pcg_backend.ops import toy
from toy_models import NoSplitModel, ToyModel, compile_toy

SIZES = [1, 2, 4, 8, 16]
ATOL = 1e-5  # fp32 on CPU: only reassociation differences between padded and unpadded matmuls


def _check(model, compiled, n, hidden=16):
    x = torch.randn(n, hidden)
    torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)


def _compiled_matches(f, calls):
    """Compile `f` with pcg (dynamic shapes, buckets SIZES) and check it against eager on each argument tuple."""
    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES}, dynamic=True)
    for args in calls:
        torch.testing.assert_close(compiled(*args), f(*args), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("functional", [False, True])
def test_exact_piece_counts(layers, functional):
    model = ToyModel(layers, functional=functional)
    compiled = compile_toy(model, capture_sizes=SIZES)
    _check(model, compiled, 3)
    s = pcg_backend.stats()
    assert s["graphs_compiled"] == 1
    assert s["pieces"] == 2 * layers + 1
    assert s["capturable_pieces"] == layers + 1
    assert s["split_op_nodes"] == layers
    assert s["cuda_graphs_captured"] == 0


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_matches_eager_at_every_bucket_and_between(compiler):
    torch.manual_seed(0)
    model = ToyModel(3)
    compiled = compile_toy(model, capture_sizes=SIZES, compiler=compiler, max_overflow_size=0)
    for n in [3, 2, 4, 5, 8, 9, 15, 16, 17, 40]:
        _check(model, compiled, n)
    s = pcg_backend.stats()
    assert s["graphs_compiled"] == 1
    # 4 capturable pieces per call, none with graphs on CPU; sizes 17 and 40 are above the ladder.
    assert s["eager_reasons"] == {
        "CUDA graphs off: the graph runs on CPU": 4 * 8,
        "token count above the largest bucket 16": 4 * 2,
    }
    assert s["padded_calls"] == 4  # 3, 5, 9, 15 were padded; bucket sizes and >16 were not
    # Time in the piece compiler is counted for Inductor only; nothing is captured on CPU.
    assert (s["compile_seconds"] > 0) == (compiler == "inductor")
    assert s["warmup_seconds"] == 0 and s["capture_seconds"] == 0


def test_one_token_gets_a_static_graph():
    # Dynamo specializes size 1, so n=1 is its own static graph: captured as that single shape.
    model = ToyModel(2)
    compiled = compile_toy(model, capture_sizes=SIZES)
    _check(model, compiled, 1)
    assert pcg_backend.stats()["graphs_compiled"] == 1
    assert pcg_backend.stats()["padded_calls"] == 0
    assert "padding off (static shapes)" in pcg_backend.report()


def test_split_op_sees_padded_rows_and_real_count():
    seen = []

    @torch.library.custom_op("pcg_test::spy", mutates_args=())
    def spy(x: torch.Tensor) -> torch.Tensor:
        ctx = context.current()
        seen.append((x.shape[0], None if ctx is None else ctx.num_tokens, context.real_tokens(x.shape[0]),
                     x[context.real_tokens(x.shape[0]):].abs().sum().item()))
        return x.clone()

    spy.register_fake(lambda x: torch.empty_like(x))
    pcg_backend.register_split_op(spy)
    try:
        f = torch.compile(lambda x: torch.ops.pcg_test.spy(x * 2) + 1, backend="pcg",
                          options={"capture_sizes": SIZES}, dynamic=True)
        x = torch.randn(5, 4)
        torch.testing.assert_close(f(x), x * 2 + 1)
        # padded to bucket 8, real count 5, and the 3 padded rows are zeros
        assert seen == [(8, 5, 5, 0.0)]
    finally:
        pcg_backend.unregister_split_op(spy)
    # outside pcg the op sees everything as real
    assert context.current() is None and context.real_tokens(7) == 7


def test_padded_output_rows_are_zeroed_by_the_toy_op():
    x = torch.randn(8, 4)
    out = torch.full_like(x, float("nan"))
    with context.forward_context(context.ForwardContext(5, 8)):
        torch.ops.pcg_toy.mix(x, out)
    assert torch.count_nonzero(out[5:]) == 0 and torch.isfinite(out).all()
    torch.testing.assert_close(out[:5], x[:5].cumsum(0) / torch.arange(1, 6.0).unsqueeze(-1))


def test_graph_without_split_op_is_one_piece():
    model = NoSplitModel()
    compiled = compile_toy(model, capture_sizes=SIZES)
    for n in [3, 6, 20]:
        _check(model, compiled, n)
    s = pcg_backend.stats()
    assert (s["pieces"], s["capturable_pieces"], s["split_op_nodes"]) == (1, 1, 0)
    assert "no split op in this graph" in pcg_backend.report()


def test_mutated_input_with_token_dim_is_never_padded():
    lin = torch.nn.Linear(4, 4)

    def f(x, state):
        y = lin(x)
        state.add_(y)
        return y * 2

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES}, dynamic=True)
    for n in [3, 4]:
        x = torch.randn(n, 4)
        s_ref, s_pcg = torch.randn(n, 4), None
        s_pcg = s_ref.clone()
        torch.testing.assert_close(compiled(x, s_pcg), f(x, s_ref))
        torch.testing.assert_close(s_pcg, s_ref)
    s = pcg_backend.stats()
    assert s["padded_calls"] == 0
    assert any("written in place" in r for r in s["eager_reasons"]) or any(
        "cannot be padded" in r for r in s["eager_reasons"])


def test_cuda_graphs_option_off_is_counted():
    model = ToyModel(1)
    compiled = compile_toy(model, capture_sizes=SIZES, cuda_graphs=False)
    _check(model, compiled, 4)
    assert pcg_backend.stats()["eager_reasons"] == {"CUDA graphs disabled by option cuda_graphs=False": 2}


def test_report_lists_graphs_and_reasons():
    model = ToyModel(2)
    compiled = compile_toy(model, capture_sizes=SIZES)
    _check(model, compiled, 3)
    text = pcg_backend.report()
    assert "graph0: 5 pieces, 3 capturable, 2 split ops" in text
    assert "CUDA graphs off: the graph runs on CPU" in text
    pcg_backend.reset_stats()
    assert pcg_backend.stats()["eager_runs"] == 0


def test_toy_op_call_count_is_one_per_layer_per_call():
    model = ToyModel(3)
    compiled = compile_toy(model, capture_sizes=SIZES)
    _check(model, compiled, 5)  # compile + one call
    before = toy.CALLS["mix"]
    compiled(torch.randn(6, 16))
    assert toy.CALLS["mix"] - before == 3


def test_reduction_over_tokens_outside_a_split_op_turns_padding_off():
    lin = torch.nn.Linear(4, 4)

    def f(x):
        y = lin(x)                      # padded rows would hold the bias, not zeros
        return y.sum(0)                 # reads every row of the token dim

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES}, dynamic=True)
    for n in [3, 4, 5]:
        x = torch.randn(n, 4)
        torch.testing.assert_close(compiled(x), f(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert s["padded_calls"] == 0
    assert "sum reads across the token dim; it reaches a graph output" in pcg_backend.report()


def test_last_row_is_gathered_at_the_real_count_and_the_graph_stays_padded():
    lin = torch.nn.Linear(4, 4)

    def f(x):
        y = lin(x)
        return y[-1], y[-2:]            # rows picked from the end: rewritten to a gather at rows n-k..n-1

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES}, dynamic=True)
    for n in [3, 4, 5]:
        x = torch.randn(n, 4)
        got, ref = compiled(x), f(x)
        assert got[0].shape == ref[0].shape and got[1].shape == ref[1].shape
        torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=ATOL, rtol=0)
    assert pcg_backend.stats()["padded_calls"] == 2      # 3 and 5 were padded (to 4 and 8); 4 is a bucket


@torch._dynamo.config.patch(capture_scalar_outputs=True)   # monkeypatch would delete the config key on undo
def test_host_read_of_a_tensor_value_runs_eagerly():
    lin = torch.nn.Linear(4, 4)

    def f(x):
        y = lin(x)
        out = torch.empty_like(y)
        torch.ops.pcg_toy.mix(y, out)
        return lin(out) * lin.bias[0].item()

    _compiled_matches(f, [(torch.randn(n, 4),) for n in [3, 5]])
    assert "item() reads a tensor's value on the host" in pcg_backend.report()
    # the float it reads scales values and never decides which rows meet: the graph is still padded
    assert "mix tokens outside a split op" not in pcg_backend.report()
    assert pcg_backend.stats()["padded_calls"] == 2


def test_decode_batch_is_keyed_not_padded():
    # (B, 1, H): the symbolic batch is not a token count; the state it indexes cannot be padded.
    from pcg_backend.analyse.token_dim import _row_symbol

    b = torch.fx.experimental.symbolic_shapes.ShapeEnv().create_unbacked_symint()
    assert _row_symbol((b, 1, 16)) is None
    assert _row_symbol((1, b, 16)) == b.node.expr
    assert _row_symbol((b, 16)) == b.node.expr


def test_decode_graph_dynamic_in_the_batch_runs_every_batch_unpadded():
    # A toy decode step (B, 1, H), B symbolic: one graph, no token dim, nothing padded, each batch exact.
    torch.manual_seed(0)
    model = ToyModel(layers=2)
    compiled = torch.compile(model, backend="pcg")
    calls_before = toy.CALLS["mix"]
    for batch in (2, 8, 24, 8):
        x = torch.randn(batch, 1, 16)
        torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)
    s = pcg_backend.stats()
    assert (s["graphs_compiled"], s["padded_calls"], toy.CALLS["mix"] - calls_before) == (1, 0, 2 * 4 + 2 * 4)
    assert "padding off (static shapes)" in pcg_backend.report()


@pytest.mark.parametrize("capture_split_ops", [True, False])
def test_cudagraph_safe_split_ops_join_pieces_only_at_exact_sizes(capture_split_ops):
    from toy_models import StatefulToyModel

    # Re-registering with other promises is an error: unregister first, and restore the toy's own at the end.
    pcg_backend.unregister_split_op(torch.ops.pcg_toy.running_sum)
    pcg_backend.register_split_op(torch.ops.pcg_toy.running_sum, cudagraph_safe=True)
    try:
        torch.manual_seed(0)
        model = StatefulToyModel(layers=2)
        compiled = torch.compile(model, backend="pcg", options={"capture_sizes": SIZES,
                                                               "capture_split_ops": capture_split_ops})
        s_pcg, s_ref = model.new_state(), model.new_state()
        for n in [1, 1, 1]:                      # decode-like steps: Dynamo's static n=1 graph
            x = torch.randn(n, 16)
            torch.testing.assert_close(compiled(x, s_pcg), model(x, s_ref), atol=ATOL, rtol=0)
            torch.testing.assert_close(s_pcg, s_ref, atol=ATOL, rtol=0)
        s = pcg_backend.stats()
        if capture_split_ops:
            # the state views, then one piece holding both split ops
            assert (s["pieces"], s["capturable_pieces"], s["split_ops_in_graphs"]) == (2, 1, 2)
            assert "2 cudagraph-safe split op(s) captured inside pieces" in pcg_backend.report()
        else:
            assert (s["pieces"], s["capturable_pieces"], s["split_ops_in_graphs"]) == (6, 3, 0)
        assert s["split_op_nodes"] == 2
        # a padded graph keeps its split ops eager whatever the flag
        x = torch.randn(5, 16)
        torch.testing.assert_close(compiled(x, s_pcg), model(x, s_ref), atol=ATOL, rtol=0)
        assert pcg_backend.stats()["split_ops_in_graphs"] == s["split_ops_in_graphs"]
    finally:
        pcg_backend.unregister_split_op(torch.ops.pcg_toy.running_sum)
        pcg_backend.register_split_op(torch.ops.pcg_toy.running_sum)


def test_host_to_device_copies_are_found_before_capture():
    # A capture that fails half-way leaves torch's CUDA state damaged, so pcg finds
    # host-to-device copies in the graph and runs them eagerly instead of trying.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pcg_backend.analyse.node_kinds import _copies_host_to_device

    with FakeTensorMode():
        on_gpu, on_host = torch.empty(3, device="cuda"), torch.empty(3)
    gm = torch.fx.symbolic_trace(lambda x, y: x.to("cuda") + y)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        gm.graph.call_function(torch.tensor, ([1.0, 2.0, 3.0],), {"device": "cuda"})
    values = {"x": on_host, "y": on_gpu}
    for node in gm.graph.nodes:
        node.meta["val"] = values.get(node.name, on_gpu)
    found = {n.name: _copies_host_to_device(n) for n in gm.graph.nodes if n.op.startswith("call")}
    assert found == {"to": True, "add": False, "tensor": True}, found


def test_upfront_capture_forwards_leave_model_state_alone(monkeypatch):
    # The up-front capture's forwards, driven by hand on CPU (where pcg never starts them itself):
    # every bucket runs on the caller's inputs fitted to it, split ops see the caller's real count
    # cut to the bucket, and the state they write is a private copy.
    from pcg_backend import backend
    from toy_models import StatefulToyModel

    runners = []

    def recording_backend(gm, example_inputs, **kw):
        runner = backend.pcg_backend(gm, example_inputs, options={"capture_sizes": SIZES, "progress": False})

        def call(*args):
            runners.append((runner, args))
            return runner(*args)

        return call

    torch.manual_seed(0)
    model = StatefulToyModel(layers=2)
    compiled = torch.compile(model, backend=recording_backend, dynamic=True)
    state = model.new_state()
    compiled(torch.randn(5, 16), state)
    runner, args = runners[-1]
    kept = state.clone()
    seen = []
    original = context.forward_context

    def spy(ctx):
        seen.append((ctx.padded_tokens, ctx.num_tokens, ctx.warmup))
        return original(ctx)

    monkeypatch.setattr(context, "forward_context", spy)
    before = toy.CALLS["running_sum"]
    runner._capture_every_bucket(args, ())
    assert torch.equal(state, kept)                                   # model state untouched
    assert seen == [(16, 5, True), (8, 5, True), (4, 4, True), (2, 2, True)]
    assert toy.CALLS["running_sum"] - before == 2 * 4                 # both layers, at every bucket
    assert "captured 0 CUDA graphs (0 pieces x 4 buckets 2..16" in pcg_backend.stats()["capture_summaries"][-1]


def test_input_only_eager_work_moves_to_one_prologue(monkeypatch):
    # `kv.sum(0)` depends on an unkeyed size (like an attention mask over a KV
    # length): it must run eagerly. It reads only a graph input, so it moves
    # out of the captured work around it, which becomes one piece, and it
    # sinks to just before its first consumer's run: after the split op, so
    # the GPU would already run `lin` while the host works on it.
    from pcg_backend import backend
    from pcg_backend.analyse.node_kinds import Kind

    order = []

    def spy(*args):
        # (kind, methods called) per piece, read before the backend wraps the pieces
        result = split_graph(*args)
        order.extend((p.kind, [n.target for n in getattr(result.module, p.name).graph.nodes
                               if n.op == "call_method"]) for p in result.pieces)
        return result

    split_graph = backend.split_graph
    monkeypatch.setattr(backend, "split_graph", spy)
    lin, lin2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def f(x, kv):
        h = lin(x)
        bias = kv.sum(0)
        out = torch.empty_like(h)
        torch.ops.pcg_toy.mix(h, out)
        return lin2(out) + bias

    _compiled_matches(f, [(torch.randn(n, 16), torch.randn(m, 16)) for n, m in [(3, 5), (5, 7)]])
    s = pcg_backend.stats()
    # [lin, empty_like][mix][kv.sum eager][lin2, add]; without the move it was 5 pieces, 3 capturable
    assert (s["graphs_compiled"], s["pieces"], s["capturable_pieces"]) == (1, 4, 2)
    assert order == [(Kind.STATIC, []), (Kind.SPLIT, []), (Kind.DYNAMIC, ["sum"]), (Kind.STATIC, [])]
    prologue = [c for r, c in s["eager_reasons"].items() if "that are not the token count" in r]
    assert prologue == [2]


def test_allocation_between_split_ops_joins_the_captured_piece_before():
    lin = torch.nn.Linear(16, 16)

    def f(x):
        h = lin(x)
        mid = torch.empty_like(h)
        torch.ops.pcg_toy.mix(h, mid)
        out = torch.empty_like(mid)       # alone between two split ops: moves up next to `mid`
        torch.ops.pcg_toy.mix(mid, out)
        return lin(out)

    _compiled_matches(f, [(torch.randn(n, 16),) for n in [3, 5]])
    s = pcg_backend.stats()
    # [lin, empty_like, empty_like][mix][mix][lin]: one piece fewer than in Dynamo's order
    assert (s["pieces"], s["capturable_pieces"], s["split_op_nodes"]) == (4, 2, 2)


def test_bitwise_operator_is_not_an_in_place_write():
    import operator

    from pcg_backend.analyse.fx_facts import written_args

    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    both, in_place = graph.call_function(operator.and_, (a, b)), graph.call_function(operator.iand, (a, b))
    assert written_args(both) == [] and written_args(in_place) == [a]


def test_token_count_meeting_another_dynamic_size_keeps_the_graph_exact():
    # Like HF 5.17's prefill mask: positions over the token count index a tensor with its
    # own length symbol. Padded to a bucket, arange(bucket) would index past its end.
    lin = torch.nn.Linear(16, 16)

    def f(x, m):
        h = lin(x)
        out = torch.empty_like(h)
        torch.ops.pcg_toy.mix(h, out)
        return out * m[torch.arange(x.shape[0])][:, None]

    _compiled_matches(f, [(torch.randn(n, 16), torch.randn(n + 2)) for n in [3, 5, 8]])
    s = pcg_backend.stats()
    assert s["padded_calls"] == 0
    assert "the token count meets another dynamic size" in pcg_backend.report()
    assert sum(c for r, c in s["eager_reasons"].items() if "not a bucket size" in r) > 0


def test_unused_size_arithmetic_and_constructors_are_dropped_and_runtime_asserts_stay():
    # Dynamo leaves size arithmetic nothing reads (a decode step's numel() of a KV
    # tensor and sym_sums); it would form a host piece in front of the first replay.
    # Runtime asserts have no users either, but are impure and must stay.
    from pcg_backend.analyse.node_kinds import Kind
    from pcg_backend.rewrite.schedule import drop_dead_host_work

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    n = graph.call_method("numel", (x,))
    graph.call_function(torch.sym_sum, ([1, n],))                     # unused, and makes n unused
    graph.call_function(torch.tensor, ([],))                           # HF's empty KV, replaced: unused
    positive = graph.call_function(torch.ops.aten.gt.Scalar, (x, 0))   # stands in for a size check
    graph.call_function(torch.ops.aten._assert_scalar.default, (True, "x must be non-empty"))
    doubled = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2))
    graph.output(doubled)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    kinds = {node: (None, "") for node in gm.graph.nodes if node.op not in ("placeholder", "output")}
    kinds[positive] = (Kind.STATIC, "")      # a tensor op: never dropped here, even unused
    for node in gm.graph.nodes:              # values as Dynamo records them: sizes are ints, tensors tensors
        node.meta["example_value"] = torch.zeros(2) if node in (x, positive, doubled) else 2

    assert drop_dead_host_work(gm, kinds) == 3
    left = [node.target for node in gm.graph.nodes if node.op in ("call_method", "call_function")]
    assert left == [torch.ops.aten.gt.Scalar, torch.ops.aten._assert_scalar.default, torch.ops.aten.mul.Tensor]
    assert set(kinds) == {node for node in gm.graph.nodes if node.op not in ("placeholder", "output")}


def test_grouped_copies_and_clones_match_one_copy_each():
    from pcg_backend.batched_copy import clone_all, copy_pairs

    torch.manual_seed(0)
    srcs = [torch.randn(3, 4), torch.randn(5).to(torch.bfloat16), torch.randn(2, 6).t(), torch.randn(7)]
    dsts = [torch.zeros_like(s) for s in srcs]
    with torch.no_grad():
        copy_pairs(zip(dsts, srcs))
        clones = clone_all(srcs)
    for src, dst, clone in zip(srcs, dsts, clones):
        torch.testing.assert_close(dst, src, atol=0, rtol=0)
        torch.testing.assert_close(clone, src, atol=0, rtol=0)
        assert clone.dtype == src.dtype and clone.data_ptr() != src.data_ptr()
    assert clones[2].stride() == srcs[2].stride()   # a dense transposed source keeps its layout, as clone does
    # with grad enabled every pair is copied on its own, so autograd sees each copy_
    leaf = torch.randn(4, requires_grad=True)
    out = torch.zeros(4)
    copy_pairs([(out, leaf * 2)])
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full((4,), 2.0), atol=0, rtol=0)


@pytest.mark.parametrize("fixed_count", [0, 1, 3])
def test_graph_entry_matches_fixed_addresses_and_scalars(fixed_count):
    from pcg_backend.cudagraph import _Entry

    args = [torch.zeros(2) for _ in range(4)] + [7]
    fixed = [(i, args[i].data_ptr()) for i in range(fixed_count)]
    entry = _Entry(graph=None, copies=[], fixed=fixed, scalars=[(4, 7)], outputs=(), written_back=[], mempool=None)
    assert entry.matches(args)
    assert not entry.matches(args[:4] + [8])                 # a scalar baked into the graph changed
    moved = list(args)
    moved[fixed_count - 1 if fixed_count else 3] = torch.zeros(2)   # a tensor at a new address
    assert entry.matches(moved) is (fixed_count == 0)
