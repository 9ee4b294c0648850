"""The benchmark's pure parts on CPU: the layer pattern, the table's ratios, and argument checks."""

import pytest
import torch

from pcg_backend import bench


def test_short_pattern_keeps_an_attention_layer():
    assert bench.short_pattern(None) == bench.PATTERN and len(bench.PATTERN) == 56
    assert bench.short_pattern(8) == "M-M-M-M*"               # no '*' in the first 8: the last M becomes one
    assert bench.short_pattern(15) == bench.PATTERN[:15]      # already holds the first attention layer
    with pytest.raises(ValueError, match="at least 2"):
        bench.short_pattern(1)


def test_table_gives_ratios_to_eager_and_to_the_floor():
    results = [
        {"variant": "eager", "prefill_ms": {16: 45.0}, "decode_ms": {1: 30.0}, "first_call_s": 30.0},
        {"variant": "pcg-inductor", "prefill_ms": {16: 9.0}, "decode_ms": {1: 7.5, 8: 10.0}, "first_call_s": 50.0,
         "graph_memory_mib": 1500.0},
    ]
    text = bench.table(results, floor_ms=6.0, state_ms_per_row=0.5)
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in text.splitlines()
            if line.strip().startswith(("eager", "pcg-inductor"))}
    # ms, x eager, x floor, x (floor + batch x state)
    assert rows[("pcg-inductor", "prefill", "16")] == ["9.00", "5.00", "1.50", "-"]
    assert rows[("pcg-inductor", "decode", "b=1")] == ["7.50", "4.00", "1.25", "1.15"]     # 7.5 / 6.5
    assert rows[("pcg-inductor", "decode", "b=8")] == ["10.00", "-", "1.67", "1.00"]       # 10 / (6 + 8 x 0.5)
    assert rows[("eager", "prefill", "16")] == ["45.00", "1.00", "7.50", "-"]
    assert "graph memory 1500 MiB" in text


def test_state_bytes_per_row_counts_every_mamba2_layers_fp32_ssm_state_and_conv_state():
    from hf_models import tiny_model

    model = tiny_model("nemotron_h")
    c = model.config
    mamba_layers = c.hybrid_override_pattern.count("M")
    heads, head_dim, state = c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size
    conv_dim = heads * head_dim + 2 * c.n_groups * state
    element = next(model.parameters()).element_size()
    expected = mamba_layers * (heads * head_dim * state * 4 + conv_dim * c.conv_kernel * element)
    assert mamba_layers > 0 and bench.state_bytes_per_row(model) == expected


@pytest.mark.parametrize("bad, message", [("[1]", "must be a JSON object"), ("{x", "not valid JSON")])
def test_pcg_options_must_be_a_json_object(bad, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--pcg-options", bad])
    assert message in capsys.readouterr().err


def test_unknown_variant_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--variants", "eager,fast"])
    assert "unknown variant(s) ['fast']" in capsys.readouterr().err


def test_gemm_tool_times_exactly_the_benchmark_models_linear_layers():
    """tools/gemm_libraries.py's shape table (behind the `gemm_library` default) is the 9B model's."""
    import collections
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    path = Path(__file__).resolve().parent.parent / "tools" / "gemm_libraries.py"
    spec = importlib.util.spec_from_file_location("gemm_libraries", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench.nano9b_config())
    found = collections.Counter(
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    expected = collections.Counter()
    for k, n, count in tool.shapes().values():
        expected[(k, n)] += count
    assert found == expected


def test_gemm_tools_family_shapes_are_the_familys_linear_layers():
    """tools/skinny_gemm.py --family F times F's weight shapes; for nemotron_h they are the hand-written table's."""
    import collections
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "gemm_libraries.py"
    spec = importlib.util.spec_from_file_location("gemm_libraries", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    by_shape = collections.Counter()
    for k, n, count in tool.shapes().values():
        by_shape[(k, n)] += count
    assert {(k, n): c for k, n, c in tool.family_shapes("nemotron_h").values()} == dict(by_shape)
    falcon = tool.family_shapes("falcon_h1")
    # 44 layers: k and v (512 columns), q and o (3072), the Mamba2 out-projection and down_proj.
    assert falcon["3072x512"] == (3072, 512, 88) and falcon["3072x3072"] == (3072, 3072, 88)
    assert falcon["5120x3072"][2] == falcon["12288x3072"][2] == 44


def test_quick_runs_eager_and_pcg_inductor_unless_variants_are_named():
    assert bench.chosen_variants(None, quick=True) == ["eager", "pcg-inductor"]
    assert bench.chosen_variants(None, quick=False) == list(bench.VARIANTS)
    assert bench.chosen_variants("eager,compile", quick=True) == ["eager", "compile"]


def test_baseline_runs_first_with_its_options_over_the_shared_ones(capsys):
    assert bench.chosen_variants("eager,pcg-inductor", quick=False, baseline=True) == [
        bench.BASELINE, "eager", "pcg-inductor"]
    shared, baseline = {"max_capture_size": 64}, {"skinny_gemm": "static", "max_capture_size": 32}
    assert bench.variant_options(bench.BASELINE, shared, baseline) == {"max_capture_size": 32, "skinny_gemm": "static"}
    assert bench.variant_options("pcg-inductor", shared, baseline) == shared
    # Named without --baseline-options it is an unknown variant, whose options nobody gave.
    with pytest.raises(SystemExit):
        bench.main(["--variants", bench.BASELINE])
    assert "unknown variant(s) ['pcg-baseline']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--baseline-options", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_traffic_plan_is_seeded_and_spans_the_buckets():
    from pcg_backend import traffic

    calls = traffic.plan(0, 400, 64, [1, 4, 8])
    assert calls == traffic.plan(0, 400, 64, [1, 4, 8])
    assert {c.batch for c in calls} == {1, 4, 8}
    prompts = [c.prompt for c in calls]
    assert min(prompts) == 1 and 64 < max(prompts) <= 128
    assert 0.05 < sum(p > 64 for p in prompts) / len(prompts) < 0.15   # a share above the largest bucket


def test_traffic_prompts_are_left_padded_with_a_full_first_row():
    import torch

    from pcg_backend import traffic

    ids, mask = traffic.prompts(traffic.Call(4, 12), 128, "cpu", torch.Generator().manual_seed(0))
    assert ids.shape == mask.shape == (4, 12) and bool(mask[0].all())
    for row in range(4):
        pad = int((mask[row] == 0).sum())
        assert bool((mask[row, :pad] == 0).all()) and bool((mask[row, pad:] == 1).all()) and pad <= 4
        assert bool((ids[row, :pad] == 0).all())
    C = traffic.Call
    assert traffic.warm_up_calls([C(1, 5), C(4, 9), C(1, 30), C(4, 1), C(4, 40)], largest=16) == [
        C(4, 40), C(1, 5), C(1, 30), C(4, 1), C(4, 9), C(4, 40)]


@pytest.mark.parametrize("seed", range(40))
def test_warm_up_reaches_every_path_of_every_batch_size_in_generated_plans(seed):
    """Each (batch, path) pair of the plan is warmed: one token, padded to a bucket, above the largest bucket."""
    import random

    from pcg_backend import traffic

    rng = random.Random(seed)
    largest = rng.choice([8, 32, 512])
    calls = traffic.plan(seed, rng.randint(1, 120), largest, rng.sample(range(1, 9), rng.randint(1, 8)))

    def path(c):
        return (c.batch, "one" if c.prompt == 1 else "padded" if c.prompt <= largest else "exact")

    warm = traffic.warm_up_calls(calls, largest)
    assert warm[0].prompt == max(c.prompt for c in calls)
    assert {path(c) for c in warm} == {path(c) for c in calls}
    assert len(warm) == 1 + len({path(c) for c in calls})


@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "falcon_h1", "zamba2", "granitemoehybrid", "mamba2"])
def test_family_shapes_are_7_to_10_b_parameters_with_their_layer_mix(family):
    import torch
    from transformers import AutoModelForCausalLM

    from pcg_backend import families

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(families.config(family))
    params = sum(p.numel() for p in model.parameters())
    assert 7e9 < params < 10e9, params
    cfg = model.config
    attention = {
        "nemotron_h": lambda: sum(t in ("attention", "full_attention") for t in cfg.layers_block_type),
        "bamba": lambda: len(cfg.attn_layer_indices),
        "falcon_h1": lambda: cfg.num_hidden_layers,            # attention beside Mamba2 in every layer
        "zamba2": lambda: cfg.layers_block_type.count("hybrid"),   # hybrid layers
        "granitemoehybrid": lambda: sum(t in ("attention", "full_attention") for t in cfg.layer_types),
        "mamba2": lambda: 0,
    }[family]()
    assert attention == {"nemotron_h": 4, "bamba": 3, "falcon_h1": 44, "zamba2": 9, "granitemoehybrid": 4,
                         "mamba2": 0}[family]
    if family == "zamba2":
        # Each hybrid layer's block holds weights of its own (transformers ties Zamba2's blocks only with
        # tied word embeddings): the floor, which reads every weight once, counts every block use.
        per_layer = [[id(p) for p in layer.shared_transformer.parameters()] for layer in model.model.layers
                     if hasattr(layer, "shared_transformer")]
        assert len(per_layer) == 9 and len({i for ids in per_layer for i in ids}) == sum(map(len, per_layer))
    # The Mamba2 sizes the scan tools and tests take from `mamba2_shape` are the built mixers' own.
    mixers = [m for m in model.modules() if hasattr(m, "A_log")]
    assert mixers and {(m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m.chunk_size)
                       for m in mixers} == {families.mamba2_shape(family)}


def test_unknown_family_and_layers_outside_nemotron_h_are_errors(capsys):
    from pcg_backend import families

    with pytest.raises(ValueError, match="unknown family 'jamba'"):
        families.config("jamba")
    with pytest.raises(SystemExit):
        bench.main(["--family", "bamba", "--layers", "8"])
    assert "--layers shortens the nemotron_h pattern only" in capsys.readouterr().err


def test_noise_needs_traffic(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--noise", "--variants", "eager"])
    assert "--noise needs --traffic" in capsys.readouterr().err


def test_an_empty_batches_list_measures_prefills_only(monkeypatch):
    """`--batches ""` runs no decode: no decode graph is compiled in a run meant to profile prefills."""
    seen = {}

    def stop(*args, **kwargs):
        seen["batches"] = args[3]
        raise SystemExit(0)

    monkeypatch.setattr(bench, "run_variant", stop)
    monkeypatch.setattr(bench, "build_model", lambda *a: torch.nn.Linear(1, 1))
    monkeypatch.setattr(bench, "weight_bytes", lambda model: 1)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda: 1.0)
    monkeypatch.setattr(bench, "state_bytes_per_row", lambda model: 0)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "test")
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        bench.main(["--variants", "pcg-inductor", "--prefill", "16", "--batches", "", "--out", "/tmp/pcg_bench_test"])
    assert seen["batches"] == []


def test_prefill_profiles_are_written_before_any_decode(monkeypatch, tmp_path):
    """A run cut short while the decode graph compiles keeps the prefills' profiles: they are
    written right after the prefill timings, and the decode profiles are appended after decode."""
    import itertools
    import types

    order = []
    randint = torch.randint
    monkeypatch.setattr(bench.torch, "randint", lambda *a, device=None, **k: randint(*a, **k))
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench, "install_variant", lambda *a, **k: None)
    seconds = itertools.count(1)
    monkeypatch.setattr(bench, "timed", lambda fn, repeats: float(next(seconds)))
    monkeypatch.setattr(bench, "profile_runs", lambda model, path, prefills, trace_dir=None, batches=(1,),
                        append=False: order.append(("profile", tuple(prefills), tuple(batches), append)))

    class Model:
        config = types.SimpleNamespace(vocab_size=100)

        def __call__(self, ids):
            return None

        def generate(self, ids, **kwargs):
            order.append(("generate", ids.shape[0]))

    bench.run_variant(Model(), "eager", [16, 128], [1, 8], 4, 1, profile_dir=str(tmp_path))
    profiles = [entry for entry in order if entry[0] == "profile"]
    assert profiles == [("profile", (16, 128), (), False), ("profile", (), (1, 8), True)]
    assert order.index(profiles[0]) < order.index(("generate", 1))   # before the first decode
    order.clear()
    bench.run_variant(Model(), "eager", [16], [], 4, 1, profile_dir=str(tmp_path))
    assert order == [("profile", (16,), (), False)]


def test_skip_guard_eval_times_calls_that_still_match_eager(monkeypatch):
    """`--skip-guard-eval`: the calls `timed` measures run with Dynamo checking only the guards that tell
    its graphs apart. After a warm-up that compiled them, pcg's padded graph still serves a new length,
    with eager's result and nothing compiled again."""
    import pcg_backend
    from hf_models import tiny_model
    from torch._dynamo import eval_frame

    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench, "_SKIP_GUARD_EVAL", [True])
    torch._dynamo.reset()
    pcg_backend.reset_stats()
    model = tiny_model("nemotron_h")
    compiled = torch.compile(model, backend="pcg", options={"max_capture_size": 32, "progress": False})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (5, 9):   # the static graph, then the dynamic, padded one
            compiled(torch.randint(3, 128, (1, n), generator=g))
        graphs, padded = pcg_backend.stats()["graphs_compiled"], pcg_backend.stats()["padded_calls"]
        ids = torch.randint(3, 128, (1, 7), generator=g)
        got, stances = [], []

        def call():
            stances.append(eval_frame._stance.skip_guard_eval_unsafe)
            got.append(compiled(ids).logits)

        bench.timed(call, 2)
        assert not eval_frame._stance.skip_guard_eval_unsafe   # only inside the timed calls
        ref = model(ids).logits
    torch._dynamo.reset()
    assert stances == [True, True]
    for logits in got:
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert pcg_backend.stats()["graphs_compiled"] == graphs
    assert pcg_backend.stats()["padded_calls"] == padded + 2     # 7 tokens padded to the bucket of 8


def test_timeline_splits_a_profile_into_host_lead_device_busy_and_idle():
    """The profile's timeline line: the host's time before the first device work, the device's span,
    its busy time as the union of overlapping intervals, the idle rest, and cudaGraphLaunch's host time."""
    import types

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    def event(name, device, start, end):
        return types.SimpleNamespace(name=name, device_type=device, is_user_annotation=False,
                                     time_range=Interval(start, end))

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [event("forward", cpu, 100, 2000), event("cudaGraphLaunch", cpu, 700, 1000),
              event("k1", cuda, 1100, 1300), event("k2", cuda, 1250, 1400),   # overlapping: 300 µs busy
              event("k3", cuda, 1600, 1700)]
    line = bench._timeline(types.SimpleNamespace(events=lambda: events))
    assert line == ("host before the first device work 1.00 ms; device span 0.60 ms, busy 0.40, idle 0.20; "
                    "in cudaGraphLaunch 0.30 ms")
    assert bench._timeline(types.SimpleNamespace(events=lambda: events[:2])) == "no device or host events"


def test_host_split_times_default_calls_then_calls_skipping_guards(monkeypatch):
    """`_host_split` runs the call `repeats` times by default, then as often with Dynamo skipping guard
    evaluation, and reports both medians."""
    from torch._dynamo import eval_frame

    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    stances = []
    line = bench._host_split(lambda: stances.append(eval_frame._stance.skip_guard_eval_unsafe), repeats=3)
    assert stances == [False] * 3 + [True] * 3
    assert "skipping guards" in line and line.endswith("(medians of 3)")


def test_timed_keeps_every_calls_seconds_for_the_spread(monkeypatch):
    """`timed` returns the median and keeps each call's seconds; `_spread` prints their range and the
    first calls (a slow start, or one slow call in a few, shows there)."""
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: None)
    durations = iter([0.005, 0.001, 0.002, 0.004, 0.003])
    ticks = [0.0]   # the clock moves only inside `fn`, by each call's duration
    monkeypatch.setattr(bench.time, "perf_counter", lambda: ticks[0])

    def fn():
        ticks[0] += next(durations)

    assert bench.timed(fn, 5) == pytest.approx(0.003)
    assert bench._LAST_TIMES == pytest.approx([0.005, 0.001, 0.002, 0.004, 0.003])
    assert bench._spread() == "1.00-5.00 ms, first 5.00, 1.00, 2.00"


def test_host_phases_split_one_call_at_pcgs_boundaries():
    """The phases of one call come from its stamps: the first runner entry and replay, the last replay's end
    and runner exit; launches sum every replay's host time; a call without a replay has no split."""
    from pcg_backend import host_phases

    stamps = [("enter", 1.0), ("replay", 1.5), ("replayed", 1.75), ("exit", 2.0),
              ("enter", 2.5), ("replay", 3.0), ("replayed", 3.5), ("exit", 4.0)]
    split = host_phases.split_call(stamps, start=0.5, returned=4.25, synced=6.0)
    assert split == {"to pcg": 0.5, "pcg to launch": 0.5, "launches": 0.75, "between replays": 1.25,
                     "pcg after": 0.5, "to return": 0.25, "device tail": 1.75, "runner calls": 2, "replays": 2}
    # The phases cover the whole call, however many graphs it replays.
    assert sum(split[name] for name in host_phases.PHASES) == 6.0 - 0.5
    assert host_phases.split_call([("enter", 1.0), ("exit", 2.0)], 0.0, 3.0, 4.0) is None


def test_host_phases_measure_reads_the_patched_runner_and_replay(monkeypatch):
    """`measure` times calls through the patched runner and replay (stand-ins on CPU: a runner that
    replays twice), gives medians per phase in ms with the counts, and says so when nothing replays."""
    from pcg_backend import host_phases
    from pcg_backend.runtime import PiecewiseRunner

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: None)   # the "real" replay `_stamped` wraps
    # The "real" runner: two graph replays (looked up on the class at call time, as `_stamped` patches it).
    monkeypatch.setattr(PiecewiseRunner, "__call__",
                        lambda self: (torch.cuda.CUDAGraph.replay(None), torch.cuda.CUDAGraph.replay(None)))
    runner = PiecewiseRunner.__new__(PiecewiseRunner)
    line = host_phases.measure(lambda: runner(), repeats=3)
    assert line.startswith("ms, medians: to pcg ") and "between replays" in line
    assert line.endswith("(1 runner call(s), 2 replay(s) per call)"), line
    assert host_phases.measure(lambda: None, repeats=2) == "no graph replayed"


def test_host_phases_patches_runner_and_replay_only_while_measuring():
    from pcg_backend import host_phases
    from pcg_backend.runtime import PiecewiseRunner

    before = (PiecewiseRunner.__call__, torch.cuda.CUDAGraph.replay)
    stamps = []
    with host_phases._stamped(stamps):
        assert PiecewiseRunner.__call__ is not before[0] and torch.cuda.CUDAGraph.replay is not before[1]
        runner = PiecewiseRunner.__new__(PiecewiseRunner)
        with pytest.raises(AttributeError):
            runner()   # an unset runner fails inside the real __call__; the stamps still close
    assert [w for w, _ in stamps] == ["enter", "exit"]
    assert (PiecewiseRunner.__call__, torch.cuda.CUDAGraph.replay) == before
