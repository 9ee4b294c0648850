"""Time a fresh prefill's Mamba2 scan per layer, in a CUDA graph: the kernels pcg can route it to.

    python tools/fresh_scan_timing.py [--rows 2,4,8,16,24,32,64,128] [--batches 1,8] [--families F,...]
                                      [--default-launch]

For each family's 9B shape (`families.mamba2_shape`), row count and batch:
mamba-ssm's chunked scan with the two copies `_chunk_scan` adds (the final
state into the cache, y into the op's output), `short_scan` (rows up to 64)
and `one_chunk_scan` at its default launch and at the other launches given
by `CONFIGS`, the one-launch kernels reading the real row count from the
device as they do in a model. Each figure is the median over 10 replays of
a graph of 20 launches, in µs. The short scan's row limit and the one-chunk
scan's launch defaults come from this table; it needs a GPU, mamba-ssm and
Triton.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemm_libraries import replay_us  # noqa: E402

from pcg_backend.families import FAMILIES, mamba2_shape  # noqa: E402
from pcg_backend.ops import one_chunk_scan, short_scan  # noqa: E402

CONFIGS = ({"BLOCK_P": 16, "num_warps": 4}, {"BLOCK_P": 32, "num_warps": 4}, {"BLOCK_P": 32, "num_warps": 8},
           {"num_warps": 4}, {"num_warps": 8})


def graph_us(fn, reps: int = 20) -> float:
    """Median µs per call of `fn`, replayed in a CUDA graph of `reps` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return replay_us(graph, reps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2,4,8,16,24,32,64,128")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--default-launch", action="store_true",
                        help="time the one-chunk scan at its default launch only, not also at CONFIGS")
    args = parser.parse_args(argv)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for family in args.families.split(","):
        heads, head_dim, groups, state, chunk = mamba2_shape(family)
        for batch in (int(b) for b in args.batches.split(",")):
            for rows in (int(r) for r in args.rows.split(",")):
                width = heads * head_dim
                h = torch.randn(batch, rows, width + 2 * groups * state, device="cuda", dtype=torch.bfloat16)
                hs, B, C = torch.split(h, [width, groups * state, groups * state], dim=-1)
                dt = torch.rand(batch, rows, heads, device="cuda") * 0.1
                A = -torch.rand(heads, device="cuda") - 0.5
                D = torch.randn(heads, device="cuda")
                ssm_state = torch.empty(batch, heads, head_dim, state, device="cuda")
                out = torch.empty(batch, rows, width, device="cuda", dtype=torch.bfloat16)
                count = torch.tensor([rows], device="cuda")   # as in a model: pcg's device count

                def chunked():
                    y, final = mamba_chunk_scan_combined(
                        hs.reshape(batch, rows, heads, head_dim), dt, A, B.reshape(batch, rows, groups, state),
                        C.reshape(batch, rows, groups, state), chunk_size=chunk, D=D, z=None,
                        return_final_states=True)
                    ssm_state.copy_(final)
                    out.copy_(y.reshape(batch, rows, -1))

                line = [f"{family:16} b{batch} T={rows:3}: chunked+copies {graph_us(chunked):6.1f}"]
                if short_scan.shapes_fit(hs, dt, B, C, ssm_state, out, T_max=64):
                    us = graph_us(lambda: short_scan.short_scan(hs, dt, A, B, C, D, ssm_state, out, groups, head_dim,
                                                                    count=count))
                    line.append(f"short {us:6.1f}")
                if one_chunk_scan.applies(hs, dt, B, C, ssm_state, out):
                    for config in ({},) if args.default_launch else ({}, *CONFIGS):
                        try:
                            us = graph_us(lambda: one_chunk_scan.one_chunk_scan(
                                hs, dt, A, B, C, D, ssm_state, out, groups, head_dim, count=count,
                                config=config))
                            line.append(f"one-chunk{config or ''} {us:6.1f}")
                        except Exception as e:  # noqa: BLE001 - a launch that does not fit is reported
                            line.append(f"one-chunk{config} failed ({type(e).__name__})")
                print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
