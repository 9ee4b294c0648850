"""tools/trace_gaps.py on a small hand-built Chrome trace: events grouped by the call that launched them."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "tools" / "trace_gaps.py"


def _tool():
    spec = importlib.util.spec_from_file_location("trace_gaps", PATH)
    tool = importlib.util.module_from_spec(spec)
    sys.modules["trace_gaps"] = tool   # dataclasses look their module up there
    spec.loader.exec_module(tool)
    return tool


def _trace():
    """Two compiled calls (a graph launch each, two kernels) with one HF kernel between, and a 40 µs wait."""
    ev = []

    def host(name, ts, dur, cat="user_annotation"):
        ev.append({"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur})

    def kernel(name, ts, dur, corr, launch_ts):
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": launch_ts, "dur": 1,
                   "args": {"correlation": corr}})
        ev.append({"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}})

    host("Torch-Compiled Region: 0/3", 0, 50)
    kernel("gemm", 100, 30, 1, 10)
    kernel("norm", 131, 2, 2, 11)          # 1 µs after the gemm
    host("aten::argmax", 60, 20, "cpu_op")
    kernel("argmax", 134, 3, 3, 65)        # launched outside any compiled call
    host("Torch-Compiled Region: 0/3", 150, 50)
    host("pcg::attention", 155, 40, "cpu_op")
    kernel("gemm", 177, 30, 4, 160)        # 40 µs after argmax ends: launched inside pcg::attention
    return ev


def test_calls_group_events_by_the_compiled_call_that_launched_them():
    tool = _tool()
    calls = tool.calls(_trace())
    assert [(c.name, len(c.events)) for c in calls] == [
        ("Torch-Compiled Region: 0/3 @0", 2), ("outside", 1), ("Torch-Compiled Region: 0/3 @1", 1)]
    first = calls[0]
    assert (first.busy, first.span, first.inner_gaps()) == (32, 33, 1)
    assert first.top(1) == [("gemm", 1, 30)]


def test_long_gaps_name_the_host_op_behind_the_late_event(tmp_path, capsys):
    tool = _tool()
    assert tool.long_gaps(_trace(), 15) == [(137, 40, "gemm", "pcg::attention")]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": _trace()}, f)
    tool.main([str(path), "--gap-us", "15"])
    out = capsys.readouterr().out
    assert "1 GPU idle times over 15 µs, 0.040 ms in all" in out
    assert "40.0 µs before gemm  (launched in pcg::attention)" in out
