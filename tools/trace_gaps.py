"""Where the GPU waits, call by call, in a Chrome trace from `python -m pcg_backend.bench --profile --trace`.

    python tools/trace_gaps.py TRACE.json.gz [--gap-us 15] [--top 12]

Each GPU event (kernel, copy, fill) is assigned to the compiled call that
launched it: the `Torch-Compiled Region` annotation around its launch on the
host, matched by the profiler's correlation id. For each call it prints the
kernel count, the time the GPU was busy, the span from its first to its last
event, the small gaps between consecutive events, and its largest kernels.
Then it lists every gap longer than --gap-us with the host op that launched
the event after it: where the GPU waited on the host, and why. Events that no
compiled call launched (HF's generate loop between steps, for instance) are
grouped as "outside".

A profiler trace inflates host time, so a gap here is an upper bound on one
in an unprofiled run; kernel durations are not affected. "Busy" adds event
durations, so on several streams at once it counts overlap twice; and a gap
inside one graph replay is named after the host op that launched the graph,
though there the GPU waited on itself.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from dataclasses import dataclass, field

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "python_function")
REGION = "Torch-Compiled Region"
OUTSIDE = "outside"


@dataclass
class CallSummary:
    name: str
    events: list = field(default_factory=list)

    @property
    def busy(self) -> float:
        return sum(e["dur"] for e in self.events)

    @property
    def span(self) -> float:
        return max(e["ts"] + e["dur"] for e in self.events) - self.events[0]["ts"]

    def inner_gaps(self) -> float:
        """Idle µs between consecutive events of this call."""
        idle, end = 0.0, self.events[0]["ts"] + self.events[0]["dur"]
        for e in self.events[1:]:
            idle += max(0.0, e["ts"] - end)
            end = max(end, e["ts"] + e["dur"])
        return idle

    def top(self, n: int) -> list[tuple[str, int, float]]:
        by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        for e in self.events:
            by_name[e["name"]][0] += 1
            by_name[e["name"]][1] += e["dur"]
        return sorted(((k, c, d) for k, (c, d) in by_name.items()), key=lambda x: -x[2])[:n]


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def _launches(events) -> dict:
    """correlation id -> the host runtime call (cudaLaunchKernel, cudaGraphLaunch, ...) that launched it."""
    return {e["args"]["correlation"]: e for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}


def _innermost(host_ops, t: float, names=None):
    """The shortest host op (of `names`, if given) whose interval holds time `t`, else None."""
    best = None
    for op in host_ops:
        if op["ts"] <= t <= op["ts"] + op["dur"] and (names is None or op["name"].startswith(names)):
            if best is None or op["dur"] < best["dur"]:
                best = op
    return best


def calls(events) -> list[CallSummary]:
    """GPU events grouped by the compiled call whose launch they came from, in time order."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = _launches(events)
    regions = sorted((e for e in events if e.get("cat") in HOST_CATEGORIES and e["name"].startswith(REGION)),
                     key=lambda e: e["ts"])
    starts = [r["ts"] for r in regions]
    out: list[CallSummary] = []
    for e in gpu:
        launch = launches.get(e.get("args", {}).get("correlation"))
        name = OUTSIDE
        if launch is not None:
            i = bisect.bisect_right(starts, launch["ts"]) - 1
            if i >= 0 and launch["ts"] <= regions[i]["ts"] + regions[i]["dur"]:
                name = f"{regions[i]['name']} @{i}"
        if not out or out[-1].name != name:
            out.append(CallSummary(name))
        out[-1].events.append(e)
    return out


def long_gaps(events, gap_us: float) -> list[tuple[float, float, str, str]]:
    """(start µs, length µs, next event, host op that launched it) for every GPU idle time over `gap_us`."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    launches = _launches(events)
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES]
    found = []
    end = gpu[0]["ts"] + gpu[0]["dur"] if gpu else 0.0
    for e in gpu[1:]:
        if e["ts"] - end > gap_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            op = _innermost(host, launch["ts"]) if launch is not None else None
            found.append((end, e["ts"] - end, e["name"], op["name"] if op else "?"))
        end = max(end, e["ts"] + e["dur"])
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--gap-us", type=float, default=15.0, help="list GPU idle times longer than this")
    parser.add_argument("--top", type=int, default=12, help="kernels listed per compiled call")
    args = parser.parse_args(argv)
    events = load(args.trace)
    for call in calls(events):
        print(f"== {call.name}: {len(call.events)} GPU events, busy {call.busy / 1e3:.3f} ms, "
              f"span {call.span / 1e3:.3f} ms, gaps between them {call.inner_gaps() / 1e3:.3f} ms")
        if call.name != OUTSIDE:
            for name, count, dur in call.top(args.top):
                print(f"   {dur:9.1f} µs {count:5d}  {name[:100]}")
    gaps = long_gaps(events, args.gap_us)
    print(f"\n{len(gaps)} GPU idle times over {args.gap_us:g} µs, {sum(g[1] for g in gaps) / 1e3:.3f} ms in all:")
    for start, length, name, op in gaps:
        print(f"   {length:9.1f} µs before {name[:60]}  (launched in {op})")


if __name__ == "__main__":
    main()
