"""What a CUDA graph of many small kernels costs to launch and to run, as one graph or split into several.

    python tools/graph_launch_probe.py [--kernels 600,1800] [--graphs 1,2,4,8]

A captured prefill of a 9B hybrid is one graph of 500-2000 kernels, and in
a profile `cudaGraphLaunch` takes 0.5-1.9 ms of host time, so the GPU might
wait on the launch. This times graphs of N tiny kernels (an add on 4096
floats) replayed as K graphs of N / K: the host's time to launch them, the
wall time to a synchronized device, and the execution time with the launches
queued behind a sleeping kernel (no host in the way). Unprofiled, the launch
is a few tens of µs whatever N, and each kernel costs about 1 µs to run: the
profiled launch time is the profiler's own, and what many kernels cost is
their count. Needs a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _capture(x: torch.Tensor, kernels: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(kernels):
            x.add_(1.0)
    return graph


def probe(kernels: int, graphs: int, repeats: int = 30) -> tuple[float, float, float]:
    """Median ms of (host launch, wall, queued execution) for `kernels` adds as `graphs` graphs."""
    x = torch.zeros(4096, device="cuda")
    parts = [_capture(x, kernels // graphs) for _ in range(graphs)]
    for g in parts:
        g.replay()
    torch.cuda.synchronize()
    host, wall, run = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for g in parts:
            g.replay()
        launched = time.perf_counter()
        torch.cuda.synchronize()
        host.append(launched - start)
        wall.append(time.perf_counter() - start)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(5_000_000)   # keeps the device busy while the host queues the replays
        before.record()
        for g in parts:
            g.replay()
        after.record()
        torch.cuda.synchronize()
        run.append(before.elapsed_time(after) / 1e3)
    return tuple(1e3 * statistics.median(v) for v in (host, wall, run))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="600,1800")
    parser.add_argument("--graphs", default="1,2,4,8")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda, flush=True)
    for kernels in (int(k) for k in args.kernels.split(",")):
        for graphs in (int(g) for g in args.graphs.split(",")):
            host, wall, run = probe(kernels, graphs)
            print(f"{kernels} kernels as {graphs} graph(s): launch {host:.3f} ms on the host, wall {wall:.3f} ms, "
                  f"execution when queued {run:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
