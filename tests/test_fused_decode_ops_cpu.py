"""The decode step's fewer kernels, on CPU: `pcg::gated_rms_norm`, and relu2 moved into the skinny GEMM.

On CPU the ops run HF's arithmetic (`gated_norm.reference`, `F.linear` and
torch's relu and square), so they must give eager's outputs bit for bit; the
Triton kernels are checked against the same arithmetic under Triton's
interpreter (`test_skinny_gemm_interpreter_cpu.py`) and on the GPU
(`test_fused_decode_ops_gpu.py`).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from pcg_backend.hf.adapters import mamba2 as mamba2_adapter
from pcg_backend.ops import gated_norm, skinny_gemm
from pcg_backend.rewrite import skinny_routing
from pcg_backend.rewrite.skinny_routing import route_skinny_linears

# Every family's gated norm, and whether pcg may compute it: FalconH1's has another constructor and can
# normalise before the gate, so it is not the norm `reference` computes.
GATED_NORMS = [("nemotron_h", True), ("bamba", True), ("granitemoehybrid", True), ("zamba2", True), ("mamba2", True),
               ("falcon_h1", False)]


def _norm_class(family: str):
    """The gated norm class a family's mixer uses: defined in its modeling module or imported there
    (transformers 5.17's NemotronH uses Zamba2's)."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    (cls,) = {v for k, v in vars(module).items() if k.endswith("RMSNormGated") and isinstance(v, type)}
    return cls


@pytest.mark.parametrize("family, expected", GATED_NORMS)
def test_the_reference_check_accepts_exactly_the_norms_it_computes(family, expected):
    assert gated_norm.computes_reference(_norm_class(family)) is expected


@pytest.mark.parametrize("family", [f for f, ok in GATED_NORMS if ok])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width, group", [(16, 16), (64, 8), (96, 32)])
def test_gated_rms_norm_equals_each_familys_norm_bit_for_bit(family, dtype, width, group):
    torch.manual_seed(width + group)
    try:
        norm = _norm_class(family)(width, group_size=group, eps=1e-5).to(dtype)
    except TypeError:   # transformers 5.17's Bamba, GraniteMoeHybrid and Mamba2 norms take no group size
        norm = _norm_class(family)(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width) + 0.5)
        y, z = torch.randn(3, 2, width, dtype=dtype), torch.randn(3, 2, width, dtype=dtype)
        got = torch.ops.pcg.gated_rms_norm(y, z, norm.weight, 1e-5, gated_norm.group_size(norm))
        assert torch.equal(got, norm(y, z))


def test_enabling_marks_the_reference_norms_and_disable_removes_the_mark():
    from pcg_backend import hf

    norm_class, falcon_norm, was_enabled = _norm_class("nemotron_h"), _norm_class("falcon_h1"), hf.is_enabled()
    hf.enable()
    try:
        assert getattr(norm_class, mamba2_adapter.REFERENCE_NORM) is norm_class
        assert not hasattr(falcon_norm, mamba2_adapter.REFERENCE_NORM)

        class Overriding(norm_class):   # inherits the mark, but not the arithmetic it vouches for
            def forward(self, hidden_states, gate=None):
                return hidden_states

        y = torch.randn(2, 1, 8, dtype=torch.bfloat16, device="meta")
        marked, subclass = norm_class(8, group_size=4), Overriding(8, group_size=4)
        # The mark holds for the class itself only; on CPU the kernel does not apply either way.
        assert getattr(type(marked), mamba2_adapter.REFERENCE_NORM, None) is type(marked)
        assert getattr(type(subclass), mamba2_adapter.REFERENCE_NORM, None) is not type(subclass)
        assert not mamba2_adapter._norm_kernel_applies(marked, y)
        hf.disable()
        assert mamba2_adapter.REFERENCE_NORM not in vars(norm_class)
    finally:
        if was_enabled:
            hf.enable()
        else:
            hf.disable()


def test_the_check_runs_on_cpu_inside_a_meta_device_context():
    # HF's from_pretrained builds models under torch.device("meta"); the check must not fail there.
    class Copy(_norm_class("bamba")):   # a class the check has not cached yet
        pass

    with torch.device("meta"):
        assert gated_norm.computes_reference(Copy)


def test_the_check_rejects_a_norm_that_rounds_in_another_order():
    class WeightsInFp32(_norm_class("nemotron_h")):
        """The same signature and the same numbers in fp32; in bf16 the weight multiplies before the cast."""

        def forward(self, hidden_states, gate=None):
            h = hidden_states.float() * F.silu(gate.float())
            groups = h.view(*h.shape[:-1], -1, self.group_size)
            groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (self.weight.float() * groups.view(h.shape)).to(hidden_states.dtype)

    assert not gated_norm.computes_reference(WeightsInFp32)


@pytest.mark.parametrize("device", ["cpu", "meta"])   # meta: the fake kernel checks the same
def test_bad_group_sizes_raise(device):
    y = torch.randn(2, 12, device=device)
    ones = torch.ones(12, device=device)
    with pytest.raises(ValueError, match="groups of 5"):
        torch.ops.pcg.gated_rms_norm(y, y, ones, 1e-5, 5)
    with pytest.raises(ValueError, match="groups of 4"):
        torch.ops.pcg.gated_rms_norm(y, y[:, :8], ones, 1e-5, 4)
    with pytest.raises(ValueError, match="groups of 0"):
        torch.ops.pcg.gated_rms_norm(y, y, ones, 1e-5, 0)


def test_the_fake_kernel_gives_a_contiguous_result_of_the_promoted_dtype():
    y = torch.empty(4, 3, 16, device="meta", dtype=torch.bfloat16).transpose(0, 1)   # dense, not contiguous
    out = torch.ops.pcg.gated_rms_norm(y, y, torch.empty(16, device="meta"), 1e-5, 8)
    assert out.shape == y.shape and out.is_contiguous() and out.dtype == torch.float32


@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "zamba2", "granitemoehybrid", "mamba2"])
def test_a_decode_step_through_the_norm_op_equals_eager(family, monkeypatch):
    # On CPU the kernel does not apply, so the adapter keeps HF's norm; with the adapter told that it
    # does (its class check kept), decode steps run pcg::gated_rms_norm's reference: eager's bits in fp32.
    import copy

    from hf_models import tiny_model

    monkeypatch.setattr(mamba2_adapter, "_norm_kernel_applies", lambda norm, out: getattr(
        type(norm), mamba2_adapter.REFERENCE_NORM, None) is type(norm))
    torch._dynamo.reset()
    model = tiny_model(family)
    twin = copy.copy(model)
    twin.forward = torch.compile(model.forward, backend="pcg", options={"progress": False})
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    before = dict(gated_norm.LAUNCHES)
    with torch.no_grad():
        kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
        ref, got = model.generate(ids, **kwargs), twin.generate(ids, **kwargs)
    torch._dynamo.reset()
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Every Mamba2 layer's norm, in each of the 3 decode steps.
    layers = sum(type(m).__name__.endswith("RMSNormGated") for m in model.modules())
    assert gated_norm.LAUNCHES["reference"] - before["reference"] == 3 * layers
    assert gated_norm.LAUNCHES["norm_kernel"] == before["norm_kernel"]


class Relu2Mlp(torch.nn.Module):
    """NemotronH's MLP: up, relu, square, down; `form` picks how the square is written."""

    def __init__(self, form="square", hidden=64, inner=1024):
        super().__init__()
        self.up = torch.nn.Linear(hidden, inner, bias=False, dtype=torch.bfloat16)
        self.down = torch.nn.Linear(inner, 512, bias=False, dtype=torch.bfloat16)
        self.form = form

    def forward(self, x):
        h = F.relu(self.up(x))
        if self.form == "square":
            h = torch.square(h)
        elif self.form == "pow":
            h = h.pow(2)
        elif self.form == "cube":
            h = h.pow(3)
        else:   # "shared": the relu has a second reader, so it must stay
            return self.down(torch.square(h)) , h.sum()
        return self.down(h)


def _routed(model, *inputs, mark_batch=True):
    """`model` compiled by a backend that runs only the routing pass (decode-style symbolic rows)."""
    graphs = []

    def backend(gm, example_inputs):
        route_skinny_linears(gm, symbolic_rows=True)
        graphs.append(gm)
        return gm.forward

    if mark_batch:
        for t in inputs:
            torch._dynamo.mark_dynamic(t, 0)
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return got, graphs[0]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("form, fused", [("square", True), ("pow", True), ("cube", False), ("shared", False)])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_relu_then_square_moves_into_the_linear(form, fused, batch):
    torch.manual_seed(batch)
    model = Relu2Mlp(form)
    x = torch.randn(batch, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    before = dict(skinny_gemm.LAUNCHES)
    got, gm = _routed(model, x)
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.pcg.skinny_linear.default]
    assert len(linears) == 2
    assert [n.args[3:] for n in linears] == ([("relu2",), ()] if fused else [(), ()])
    assert (F.relu in _targets(gm)) is not fused
    squares = [t for t in _targets(gm) if t is torch.square] + [n for n in gm.graph.nodes if n.target == "pow"]
    assert (not squares) is fused
    assert skinny_gemm.LAUNCHES["linear"] - before["linear"] == 2
    if form == "shared":
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    else:
        assert torch.equal(got, ref)


def test_an_unknown_activation_is_an_error():
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(600, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'gelu' is not one of"):
        torch.ops.pcg.skinny_linear(x, w, None, "gelu")
