"""`pcg::skinny_linear` and the pass that routes captured linear layers to it, on CPU.

On CPU the op is `F.linear` (the Triton kernel needs CUDA), so a routed
graph must give bit-identical outputs; `test_skinny_gemm_gpu.py` checks the
kernel and the routing inside captured pieces.
"""

import pytest
import torch

import pcg_backend
from pcg_backend.ops import skinny_gemm
from pcg_backend.options import parse_options
from pcg_backend.rewrite.skinny_routing import route_skinny_linears, routed_twin


class ThreeLinears(torch.nn.Module):
    """One linear the pass may route (bf16, 4096 columns) and two it must not (256 columns; fp32)."""

    def __init__(self):
        super().__init__()
        self.wide = torch.nn.Linear(64, 4096, bias=True, dtype=torch.bfloat16)
        self.narrow = torch.nn.Linear(64, 256, bias=False, dtype=torch.bfloat16)
        self.fp32 = torch.nn.Linear(64, 4096, bias=False)

    def forward(self, x):
        return self.wide(x).sum(-1) + self.narrow(x).sum(-1) + self.fp32(x.float()).sum(-1)


def _compile_routed(model, symbolic_rows=False):
    """`model` compiled by a backend that only runs the routing pass; the counts it returned."""
    counts, graphs = [], []

    def backend(gm, example_inputs):
        counts.append(route_skinny_linears(gm, symbolic_rows))
        graphs.append(gm)
        return gm.forward

    return torch.compile(model, backend=backend), counts, graphs


@pytest.mark.parametrize("rows, dynamic, symbolic_rows, expected", [
    (1, False, False, 1), (16, False, False, 1), (17, False, False, 0), (8, True, False, 0),
    (40, True, True, 1), (17, False, True, 0),
])
def test_pass_routes_only_wide_half_precision_linears_with_few_rows(rows, dynamic, symbolic_rows, expected):
    torch.manual_seed(0)
    model = ThreeLinears()
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)   # symbolic rows (a padded prefill graph): only with symbolic_rows
    compiled, counts, graphs = _compile_routed(model, symbolic_rows)
    before = dict(skinny_gemm.LAUNCHES)
    with torch.no_grad():
        got, ref = compiled(x), model(x)
    assert counts == [expected]
    routed = [n for n in graphs[0].graph.nodes if n.target is torch.ops.pcg.skinny_linear.default]
    assert len(routed) == expected
    assert torch.equal(got, ref)                      # on CPU the op is F.linear itself
    assert skinny_gemm.LAUNCHES["linear"] - before["linear"] == expected
    assert skinny_gemm.LAUNCHES["triton"] == before["triton"]


@pytest.mark.parametrize("tokens, expected", [(1, 1), (16, 1), (17, 0), (512, 0)])
def test_symbolic_batch_is_routed_only_where_its_static_rows_are_few(tokens, expected):
    # (B, S, H) with B symbolic: a decode step (S = 1) has few rows at every batch the op takes;
    # with 17 or more static tokens per sequence no batch does, and the linear is left alone.
    torch.manual_seed(0)
    model = ThreeLinears()
    x = torch.randn(3, tokens, 64, dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    compiled, counts, _ = _compile_routed(model, symbolic_rows=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
    assert counts == [expected]


def test_routed_twin_routes_symbolic_rows_in_a_copy_and_leaves_the_piece_alone():
    torch.manual_seed(0)
    model = ThreeLinears()
    twins, inputs = [], []

    def backend(gm, example_inputs):
        twins.append(routed_twin(gm))
        inputs.append(example_inputs)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(compiled(x), ref)
        (twin, routed), = twins
        assert routed == 1                      # the wide bf16 linear only
        targets = [n.target for n in twin.graph.nodes]
        assert targets.count(torch.ops.pcg.skinny_linear.default) == 1
        before = skinny_gemm.LAUNCHES["linear"]
        (out,) = twin(*inputs[0])              # the graph's own inputs: the parameters, the size, x
        assert torch.equal(out, ref)            # on CPU the op is F.linear itself
        assert skinny_gemm.LAUNCHES["linear"] - before == 1
        # The compiled piece itself was not rewritten: it calls no op.
        before = skinny_gemm.LAUNCHES["linear"]
        assert torch.equal(compiled(x), ref)
        assert skinny_gemm.LAUNCHES["linear"] == before


def test_routed_twin_of_a_graph_without_eligible_linears_is_none():
    twins = []

    def backend(gm, example_inputs):
        twins.append(routed_twin(gm))
        return gm.forward

    model = torch.nn.Linear(64, 256, dtype=torch.bfloat16)    # too few columns
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    assert twins == [(None, 0)]


def test_op_is_f_linear_on_cpu_and_has_a_shape_only_fake():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 64), torch.randn(4096, 64), torch.randn(4096)
    assert torch.equal(torch.ops.pcg.skinny_linear(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.equal(torch.ops.pcg.skinny_linear(x, w), torch.nn.functional.linear(x, w))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.pcg.skinny_linear(torch.empty(2, 5, 64), torch.empty(4096, 64))
    assert out.shape == (2, 5, 4096)


def test_kernel_is_never_chosen_for_cpu_tensors():   # the limits on CUDA: test_skinny_gemm_gpu.py
    w = torch.empty(4096, 64, dtype=torch.bfloat16)
    assert not skinny_gemm.supported(torch.empty(1, 64, dtype=torch.bfloat16), w)   # CPU (and no Triton here)


def test_option_skinny_gemm_defaults_to_all_and_rejects_other_values():
    assert parse_options({}).skinny_gemm == "all"
    assert parse_options({"skinny_gemm": "static"}).skinny_gemm == "static"
    assert parse_options({"skinny_gemm": "off"}).skinny_gemm == "off"
    with pytest.raises(ValueError, match="skinny_gemm must be one of"):
        parse_options({"skinny_gemm": "cutlass"})


def test_cpu_graphs_are_not_routed():
    # Without CUDA graphs the pieces run eagerly, where the op's dispatch would only add host time.
    model = ThreeLinears()
    compiled = torch.compile(model, backend="pcg")
    with torch.no_grad():
        assert torch.equal(compiled(torch.ones(1, 64, dtype=torch.bfloat16)), model(torch.ones(1, 64, dtype=torch.bfloat16)))
    assert pcg_backend.stats()["skinny_linears"] == 0


@pytest.mark.parametrize("k, n, shared_memory, stages", [
    (10240, 4480, 232448, 5),     # out_proj on an H200-sized SM: the fifth stage fits
    (15680, 4480, 232448, 5),     # down_proj
    (4480, 5120, 232448, 5),      # q_proj
    (10240, 4480, 166912, 4),     # an A100-sized SM: five 40 KiB stages do not fit
    (10240, 4480, None, 4),       # shared memory unknown
    (4480, 131072, 232448, 4),    # lm_head: wider weights were not searched with five
    (4480, 22656, 232448, 3),     # in_proj: the 128-wide tile, unchanged
])
def test_tile_takes_a_fifth_stage_only_where_it_was_measured_and_fits(k, n, shared_memory, stages):
    tile = skinny_gemm._tile(1, k, n, shared_memory)
    assert tile["num_stages"] == stages
    if stages == 5:   # the fifth stage is taken only with room for it and Triton's own spare bytes
        needed = 5 * skinny_gemm._stage_bytes(tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"])
        assert needed + skinny_gemm._SPARE_BYTES <= shared_memory


@pytest.mark.parametrize("k, n, sms, splits", [
    (4480, 1024, 132, 6),       # kv_proj: 16 column blocks; eight parts asked, 18 K steps give six of 3
    (12288, 3072, 132, 2),      # FalconH1's down_proj: 48 blocks, two parts each in one wave
    (7168, 3584, 132, 2),       # 56 blocks: still under SPLIT_BELOW of the SMs
    (3072, 1536, 132, 4),       # 24 blocks: five parts asked, 12 K steps give four of 3
    (1536, 512, 132, 6),        # no more parts than K has 256-wide steps
    (8192, 4096, 132, 1),       # 64 blocks: two parts measured no faster than one
    (10240, 4480, 132, 1),      # out_proj: 70 blocks, two parts would need a second wave
    (4480, 22656, 132, 1),      # in_proj: 354 blocks already fill the SMs
    (4480, 1024, None, 1),      # SM count unknown: never split
])
def test_tile_splits_k_only_into_parts_that_fit_one_wave(k, n, sms, splits):
    tile = skinny_gemm._tile(1, k, n, 232448, sms)
    assert tile.get("SPLIT_K", 1) == splits
    blocks = -(-n // tile["BLOCK_N"])
    if splits > 1:   # the count the launch uses, all in one wave
        assert skinny_gemm.k_parts(k, tile["BLOCK_K"], splits)[1] == splits   # triton_linear launches as many
        assert blocks * splits <= sms and tile["num_stages"] == 4


@pytest.mark.parametrize("k", [130, 256, 1000, 1536, 4480, 12288])
@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8])
def test_k_parts_cover_k_in_whole_steps_with_no_empty_part(k, parts):
    step, launched = skinny_gemm.k_parts(k, 256, parts)
    assert step % 256 == 0 and 1 <= launched <= parts
    assert (launched - 1) * step < k <= launched * step   # every part launched has K to sum
