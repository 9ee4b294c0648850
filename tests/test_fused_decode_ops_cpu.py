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

# Every family's gated norm, and whether pcg may compute it: FalconH1's can normalise before the gate
# and weights in fp32, so it is not the norm `reference` computes.
GATED_NORMS = [
    ("nemotron_h", "NemotronHRMSNormGated", True), ("bamba", "BambaRMSNormGated", True),
    ("granitemoehybrid", "GraniteMoeHybridRMSNormGated", True), ("zamba2", "Zamba2RMSNormGated", True),
    ("mamba2", "MambaRMSNormGated", True), ("falcon_h1", "FalconH1RMSNormGated", False),
]


def _norm_class(family: str, name: str):
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


@pytest.mark.parametrize("family, name, expected", GATED_NORMS)
def test_the_reference_check_accepts_exactly_the_norms_it_computes(family, name, expected):
    assert gated_norm.computes_reference(_norm_class(family, name)) is expected


@pytest.mark.parametrize("family, name", [(f, n) for f, n, ok in GATED_NORMS if ok])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width, group", [(16, 16), (64, 8), (96, 32)])
def test_gated_rms_norm_equals_each_familys_norm_bit_for_bit(family, name, dtype, width, group):
    torch.manual_seed(width + group)
    norm = _norm_class(family, name)(width, group_size=group, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width) + 0.5)
        y, z = torch.randn(3, 2, width, dtype=dtype), torch.randn(3, 2, width, dtype=dtype)
        assert torch.equal(torch.ops.pcg.gated_rms_norm(y, z, norm.weight, 1e-5, group), norm(y, z))


def test_patching_a_modeling_module_registers_its_reference_norms():
    import transformers.models.falcon_h1.modeling_falcon_h1 as falcon
    import transformers.models.nemotron_h.modeling_nemotron_h as nemotron

    from pcg_backend.hf.patches import Patches

    patches = Patches()
    try:
        mamba2_adapter.patch_modeling_module(nemotron, patches)
        mamba2_adapter.patch_modeling_module(falcon, patches)
    finally:
        patches.restore_all()
    assert getattr(nemotron.NemotronHRMSNormGated, mamba2_adapter.REFERENCE_NORM) is True
    assert not hasattr(falcon.FalconH1RMSNormGated, mamba2_adapter.REFERENCE_NORM)


def test_bad_group_sizes_raise():
    y = torch.randn(2, 12)
    with pytest.raises(ValueError, match="groups of 5"):
        torch.ops.pcg.gated_rms_norm(y, y, torch.ones(12), 1e-5, 5)
    with pytest.raises(ValueError, match="groups of 4"):
        torch.ops.pcg.gated_rms_norm(y, y[:, :8], torch.ones(12), 1e-5, 4)


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
    assert skinny_gemm.LAUNCHES["linear"] - before["linear"] == 2
    if form == "shared":
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    else:
        assert torch.equal(got, ref)


def test_an_unknown_activation_is_an_error():
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(600, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'gelu' is not one of"):
        torch.ops.pcg.skinny_linear(x, w, None, "gelu")
