"""Arithmetic on weights alone moves out of the graph, and follows every change to those weights.

`rewrite/weight_prologue.py` takes `-exp(A_log)` and its kind out of each
graph and recomputes it only when a source parameter's version or address
moves. Outputs must equal eager's bit for bit (the prologue runs the same
torch ops eagerly), before and after in-place writes and `.data` swaps.
"""

import copy

import pytest
import torch

import pcg_backend
from pcg_backend.rewrite import weight_prologue


class Mixer(torch.nn.Module):
    """A Mamba2-like `A = -exp(A_log)` next to a weight that only a view reads and one that activations read."""

    def __init__(self, width=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A_log = torch.nn.Parameter(torch.rand(width, generator=g).add(0.5).log())
        self.proj = torch.nn.Parameter(torch.randn(width, width, generator=g))
        self.scale = torch.nn.Parameter(torch.rand(width, generator=g))

    def forward(self, x):
        A = -torch.exp(self.A_log.float())
        return x * A + x @ self.proj.t() + x * self.scale


def _compiled(model):
    torch._dynamo.reset()
    pcg_backend.reset_stats()
    return torch.compile(model, backend="pcg", options={"progress": False})


def _x(seed=1, rows=3):
    return torch.randn(rows, 8, generator=torch.Generator().manual_seed(seed))


def test_a_over_a_log_runs_once_outside_the_graph():
    model = Mixer()
    compiled = _compiled(model)
    with torch.no_grad():
        for seed in range(3):
            assert torch.equal(compiled(_x(seed)), model(_x(seed)))
    stats = pcg_backend.stats()
    # float (a no-op on fp32, kept in the chain), exp and neg; the view of `proj` and `x * scale` stay.
    assert stats["weight_nodes_hoisted"] == 3
    assert stats["weight_prologue_runs"] == 1
    assert stats["graphs_compiled"] == 1
    assert "3 node(s) of arithmetic on the weights alone" in pcg_backend.report()


@pytest.mark.parametrize("change", ["in place", "data swap", "load_state_dict"])
def test_a_changed_weight_is_recomputed_before_the_next_call(change):
    model = Mixer()
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(_x())
        if change == "in place":
            model.A_log.mul_(0.5)
        elif change == "data swap":
            model.A_log.data = torch.rand(8).add(2.0).log()
        else:
            model.load_state_dict(Mixer(seed=5).state_dict())
        assert torch.equal(compiled(_x()), model(_x()))
        assert torch.equal(compiled(_x(2)), model(_x(2)))   # and only once
    stats = pcg_backend.stats()
    assert stats["weight_prologue_runs"] == 2
    assert stats["graphs_compiled"] == 1


def test_two_models_sharing_the_compiled_code_each_get_their_own_weights():
    first, second = Mixer(seed=0), Mixer(seed=3)
    torch._dynamo.reset()
    pcg_backend.reset_stats()
    a = torch.compile(first, backend="pcg", options={"progress": False})
    b = torch.compile(second, backend="pcg", options={"progress": False})
    with torch.no_grad():
        for model, compiled in ((first, a), (second, b), (first, a), (second, b)):
            assert torch.equal(compiled(_x()), model(_x()))
    # One graph serves both; each switch of model recomputes into the same tensors.
    assert pcg_backend.stats()["graphs_compiled"] == 1
    assert pcg_backend.stats()["weight_prologue_runs"] == 4


def test_a_write_through_data_needs_refresh_weights():
    # `param.data` has a version counter of its own, so this write moves neither the parameter's
    # version nor its address: pcg_backend.refresh_weights() is how a caller says so.
    model = Mixer()
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(_x())
        model.A_log.data.mul_(0.5)
        pcg_backend.refresh_weights()
        assert torch.equal(compiled(_x()), model(_x()))
    assert pcg_backend.stats()["weight_prologue_runs"] == 2


class Shared(torch.nn.Module):
    """Weight-only results that must stay per call: one written in place, one returned, one expanded."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.w = torch.nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        a = self.w.exp()
        if self.kind == "written":
            a.mul_(2)
            return x * a
        if self.kind == "returned":
            return x * a, a
        return x @ a.expand(4, 4)   # "expanded": a dense copy would not have the traced stride 0


@pytest.mark.parametrize("kind", ["written", "returned", "expanded"])
def test_results_written_returned_or_expanded_stay_in_the_graph(kind):
    model = Shared(kind)
    compiled = _compiled(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        outs = [compiled(x) for _ in range(3)]
        for out in outs:
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        if kind == "returned":
            assert outs[0][1] is not outs[1][1]
    assert pcg_backend.stats()["weight_nodes_hoisted"] == 0


def test_nothing_is_hoisted_from_a_graph_traced_with_autograd_on():
    model = Mixer()
    compiled = _compiled(model)
    # (pcg is an inference backend; hoisting would cut A_log off the autograd graph, so it does not happen)
    torch.testing.assert_close(compiled(_x()).detach(), model(_x()).detach(), rtol=0, atol=0)
    assert pcg_backend.stats()["weight_nodes_hoisted"] == 0


def test_results_larger_than_the_cap_stay_in_the_graph(monkeypatch):
    monkeypatch.setattr(weight_prologue, "MAX_ELEMENTS", 4)
    model = Mixer()
    compiled = _compiled(model)
    with torch.no_grad():
        assert torch.equal(compiled(_x()), model(_x()))
    assert pcg_backend.stats()["weight_nodes_hoisted"] == 0


class Casts(torch.nn.Module):
    """Only views and a no-op cast of the weights: nothing worth a kernel to hoist."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.w.float().t()


def test_views_and_no_op_casts_of_weights_stay():
    model = Casts()
    compiled = _compiled(model)
    with torch.no_grad():
        assert torch.equal(compiled(_x()), model(_x()))
    assert pcg_backend.stats()["weight_nodes_hoisted"] == 0


@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "falcon_h1", "granitemoehybrid", "zamba2", "mamba2"])
def test_every_family_hoists_a_per_mamba2_layer_and_follows_updates(family):
    from hf_models import tiny_model

    torch._dynamo.reset()
    pcg_backend.reset_stats()
    model = tiny_model(family)
    twin = copy.copy(model)
    twin.forward = torch.compile(model.forward, backend="pcg", options={"progress": False})
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    mixers = [m for m in model.modules() if hasattr(m, "A_log")]
    with torch.no_grad():
        for _ in range(2):
            ref, got = model.generate(ids, **kwargs), twin.generate(ids, **kwargs)
            assert torch.equal(got.sequences, ref.sequences)
            assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))
            stats = pcg_backend.stats()
            # A_log.float(), exp and neg, for each Mamba2 layer, in each graph
            assert stats["weight_nodes_hoisted"] == 3 * len(mixers) * stats["graphs_compiled"]
            runs = stats["weight_prologue_runs"]
            for mixer in mixers:
                mixer.A_log.add_(0.25)
    assert runs > stats["graphs_compiled"]   # the update of the first pass was picked up in the second


def test_a_model_built_under_inference_mode_keeps_its_arithmetic_in_the_graph():
    # Its parameters are inference tensors, which keep no version counter: a write could not be seen.
    torch._dynamo.reset()
    pcg_backend.reset_stats()
    with torch.inference_mode():
        model = Mixer()
        compiled = torch.compile(model, backend="pcg", options={"progress": False})
        assert torch.equal(compiled(_x()), model(_x()))
        model.A_log.mul_(0.5)
        assert torch.equal(compiled(_x()), model(_x()))
    assert pcg_backend.stats()["weight_nodes_hoisted"] == 0


class Marked(torch.nn.Parameter):
    """A Parameter subclass, as quantized-weight libraries make them."""


def test_a_parameter_subclass_is_no_source():
    model = Mixer()
    model.A_log = Marked(model.A_log.detach().clone())
    compiled = _compiled(model)
    with torch.no_grad():
        assert torch.equal(compiled(_x()), model(_x()))
    assert pcg_backend.stats()["weight_nodes_hoisted"] == 0
