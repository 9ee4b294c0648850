"""Where the host's time goes in one call, unprofiled: the benchmark's view of a call's phases.

A profiler inflates every host operation it records, so a profile cannot say
how long the host really takes before the GPU gets its first graph. This
times a call with `time.perf_counter` stamps at the boundaries pcg owns:

* **to pcg**: from the call to pcg's runner (`PiecewiseRunner.__call__`):
  Dynamo's guards, its bytecode before the graph, and any model code that
  runs outside the compiled graph;
* **pcg to launch**: from the runner to the first graph replay (bucket
  choice, padding, the device count, the address check);
* **launches**: the host time inside `CUDAGraph.replay`, summed;
* **between replays**: from the first replay to the last one's end, less
  the launches: where a call replays several graphs, the eager split ops
  and pcg's work between them (0 for a call of one graph);
* **pcg after**: from the last replay to the runner's return (slicing back,
  lending state slots, copying outputs out of graph memory);
* **to return**: from the runner's return to the call's (Dynamo's code after
  the graph, the model's output objects);
* **device tail**: from the call's return to a synchronized device: the
  work still queued.

Only the benchmark uses it; it patches two methods for the duration of a
measurement and restores them.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .runtime import PiecewiseRunner

PHASES = ("to pcg", "pcg to launch", "launches", "between replays", "pcg after", "to return", "device tail")


@contextlib.contextmanager
def _stamped(stamps: list):
    """Record (what, time) pairs at runner entry/exit and around every graph replay."""
    runner_call = PiecewiseRunner.__call__
    replay = torch.cuda.CUDAGraph.replay

    def timed_runner(self, *args):
        stamps.append(("enter", time.perf_counter()))
        try:
            return runner_call(self, *args)
        finally:
            stamps.append(("exit", time.perf_counter()))

    def timed_replay(self):
        stamps.append(("replay", time.perf_counter()))
        try:
            return replay(self)
        finally:
            stamps.append(("replayed", time.perf_counter()))

    PiecewiseRunner.__call__ = timed_runner
    torch.cuda.CUDAGraph.replay = timed_replay
    try:
        yield
    finally:
        PiecewiseRunner.__call__ = runner_call
        torch.cuda.CUDAGraph.replay = replay


def split_call(stamps: list, start: float, returned: float, synced: float) -> dict | None:
    """Seconds per phase of one call from its stamps (`time.perf_counter` values), and the runner calls and
    replays it made; None if no graph replayed. The phases add up to the call's time to a synchronized
    device."""
    def first(what):
        return next((t for w, t in stamps if w == what), None)

    def last(what):
        return next((t for w, t in reversed(stamps) if w == what), None)

    enter, replay, replayed, leave = first("enter"), first("replay"), last("replayed"), last("exit")
    if None in (enter, replay, replayed, leave):
        return None
    starts = [t for w, t in stamps if w == "replay"]
    ends = [t for w, t in stamps if w == "replayed"]
    launches = sum(e - s for s, e in zip(starts, ends))
    return {
        "to pcg": enter - start,
        "pcg to launch": replay - enter,
        "launches": launches,
        "between replays": replayed - replay - launches,
        "pcg after": leave - replayed,
        "to return": returned - leave,
        "device tail": synced - returned,
        "runner calls": sum(w == "enter" for w, _ in stamps),
        "replays": len(starts),
    }


def measure(run, repeats: int = 5) -> str:
    """Medians over `repeats` calls of `run()` (each after a synchronized device), as one line."""
    calls = []
    for _ in range(repeats):
        stamps: list = []
        torch.cuda.synchronize()
        with _stamped(stamps):
            start = time.perf_counter()
            run()
            returned = time.perf_counter()
            torch.cuda.synchronize()
            synced = time.perf_counter()
        split = split_call(stamps, start, returned, synced)
        if split is None:
            return "no graph replayed"
        calls.append(split)
    parts = [f"{name} {1e3 * statistics.median(c[name] for c in calls):.2f}" for name in PHASES]
    counts = f"{calls[0]['runner calls']} runner call(s), {calls[0]['replays']} replay(s)"
    return "ms, medians: " + ", ".join(parts) + f" ({counts} per call)"
