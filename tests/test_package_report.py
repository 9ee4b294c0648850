"""`pcg_backend.report()`: a summary first, each reason once, CUDA graphs off said once on CPU, details after."""

import torch

import pcg_backend
from pcg_backend.stats import GPU_ONLY, Stats
from toy_models import ToyModel, compile_toy

SIZES = [1, 2, 4, 8, 16]


def _sections(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith(" ") and not line.startswith("=")]


def test_cpu_report_summarises_first_and_says_once_that_cuda_graphs_are_off():
    torch.manual_seed(0)
    model = ToyModel(2)                                  # 5 pieces: 3 token-wise, 2 split ops
    compiled = compile_toy(model, capture_sizes=SIZES, max_overflow_size=0)
    for n in (3, 5, 40):                                 # 40 is above the largest bucket, with no overflow buckets
        x = torch.randn(n, 16)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    text = pcg_backend.report()
    lines = text.splitlines()
    assert _sections(text) == ["pcg report", "Summary", "Graphs", "Counters (pcg_backend.stats())"]
    assert lines[3] == ("  1 graph(s) compiled: 5 pieces, 3 capturable, 2 split-op nodes (0 of them inside "
                        "captured pieces), 2 call(s) padded to a bucket")
    assert lines[4] == ("  CUDA graphs off: the graph runs on CPU (6 runs). Every piece ran eagerly: "
                        "the same results, no speed-up")
    assert lines[5:7] == ["  Runs without a CUDA graph for other reasons (runs  reason):",
                          "           3  token count above the largest bucket 16"]
    assert text.count("CUDA graphs off") == 1
    assert "  graph0: 5 pieces, 3 capturable, 2 split ops, token symbol s" in text
    counters = [line.split()[0] for line in lines[lines.index("Counters (pcg_backend.stats())") + 1:-1]]
    assert counters == ["graphs_compiled", "pieces", "capturable_pieces", "split_op_nodes", "split_ops_in_graphs",
                        "aligned_linears", "overflow_calls", "compile_seconds",
                        "padded_calls", "state_slots", "state_slot_bytes", "weight_nodes_hoisted",
                        "weight_prologue_runs", "deferred_stop_checks", "causal_mask_checks",
                        "causal_flag_attention", "eager_runs"]   # no GPU-only counter
    assert lines[-1].startswith("  (without CUDA graphs, the GPU-only counters are all 0: skinny_linears, ")


def test_a_reason_shared_by_graphs_is_given_once_and_referred_to():
    lin = torch.nn.Linear(4, 4)

    def f(x):
        y = lin(x)
        return y.sum(0), y.flip(0)      # both read across the token dim: the graph cannot be padded

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES}, dynamic=True)
    for n in (3, 4, 5):
        compiled(torch.randn(n, 4))
    text = pcg_backend.report()
    reason = "sum reads across the token dim"
    assert text.count(reason) == 1
    summary = [line for line in text.splitlines() if reason in line][0]
    assert summary.startswith("           1  [1] sum_1: ") and summary.endswith(" (graph0)")
    graph = [line for line in text.splitlines() if line.startswith("  graph0:")][0]
    assert graph.endswith(", padding exact bucket sizes only: [1]")
    assert "  Runs without a CUDA graph for other reasons (runs  reason):" in text
    assert "           2  graph0: token count is not a bucket size and the graph cannot be padded" in text


def test_routing_is_listed_once_per_layer_and_counted_in_the_summary():
    stats = Stats()
    for _ in range(3):                  # the same layers traced in three graphs
        stats.route("model.layers.0.mixer", "NemotronHMamba2Mixer", "Mamba2 core via pcg::mamba2_core", True)
        stats.route("model.layers.1.mixer", "NemotronHAttention", "attention via pcg::attention (sdpa)", True)
        stats.route("model.layers.2.mixer", "OddMixer", "NOT routed, missing norm", False)
    assert stats.as_dict()["routing"] == [
        "model.layers.0.mixer (NemotronHMamba2Mixer): Mamba2 core via pcg::mamba2_core",
        "model.layers.1.mixer (NemotronHAttention): attention via pcg::attention (sdpa)",
        "model.layers.2.mixer (OddMixer): NOT routed, missing norm",
    ]
    text = stats.report()
    assert ("  HF layers: 2 routed through pcg's ops (1 Mamba2 core via pcg::mamba2_core, 1 attention via "
            "pcg::attention (sdpa)), 1 not routed (see HF layer routing)") in text
    assert text.count("model.layers.0.mixer") == 1


def test_gpu_counters_stay_when_cuda_graphs_ran():
    stats = Stats()
    stats.cuda_graphs_captured, stats.cuda_graph_replays, stats.graph_memory_bytes = 4, 12, 3 * 2**20
    stats.eager("token count above the largest bucket 16", 2)
    text = stats.report()
    assert ("  CUDA graphs: 4 captured (0.0 s, 3 MiB of graph memory), 12 replays; 0 of the captures on callers' "
            "calls, not up front") in text
    assert all(f"  {key} " in text for key in GPU_ONLY)
    assert "CUDA graphs off" not in text


@torch._dynamo.config.patch(capture_scalar_outputs=True)
def test_a_piece_that_runs_eagerly_is_explained_once():
    from pcg_backend.ops import toy  # noqa: F401  (registers pcg_toy::mix)

    lin = torch.nn.Linear(4, 4)

    def f(x):
        y = lin(x)
        out = torch.empty_like(y)
        torch.ops.pcg_toy.mix(y, out)
        return lin(out) * lin.bias[0].item()     # a host read of a tensor value: that piece runs eagerly

    compiled = torch.compile(f, backend="pcg", options={"capture_sizes": SIZES}, dynamic=True)
    for n in (3, 5):
        x = torch.randn(n, 4)
        torch.testing.assert_close(compiled(x), f(x), atol=1e-5, rtol=0)
    text = pcg_backend.report()
    reason = "item() reads a tensor's value on the host"
    assert text.count(reason) == 1
    [piece] = [r for r in pcg_backend.stats()["eager_reasons"] if reason in r]
    assert f"           2  {piece}" in text                      # in the summary, with its runs
    assert f"    - {piece.split(': ')[0]} (reason and runs in the summary)" in text
