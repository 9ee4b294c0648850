"""The benchmark model's GEMMs at 1, 16 and 128 tokens under cuBLAS and cuBLASLt (needs CUDA).

    python tools/gemm_libraries.py

For each weight shape of the Nemotron-Nano-9B-v2-shaped model it captures a
CUDA graph of bf16 `F.linear` calls, rotating over enough weight copies that
no weight stays in L2, and prints the median time per call, the rate at
which it reads the weight, and the sum over one forward for each library.
It is the measurement behind pcg's `gemm_library="cublaslt"` default
(`pcg_backend/gemm_library.py`).
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pcg_backend.bench import PATTERN  # noqa: E402

H, I, V = 4480, 15680, 131072
LIBRARIES = ("cublas", "cublaslt")


def shapes() -> dict[str, tuple[int, int, int]]:
    """name -> (K, N, calls per forward) for the benchmark model's linear layers."""
    return {
        "in_proj": (H, 2 * 10240 + 2 * 8 * 128 + 128, PATTERN.count("M")),
        "out_proj": (10240, H, PATTERN.count("M")),
        "q_proj": (H, 5120, PATTERN.count("*")),
        "kv_proj": (H, 1024, 2 * PATTERN.count("*")),
        "o_proj": (5120, H, PATTERN.count("*")),
        "up_proj": (H, I, PATTERN.count("-")),
        "down_proj": (I, H, PATTERN.count("-")),
        "lm_head": (H, V, 1),
    }


def family_shapes(family: str) -> dict[str, tuple[int, int, int]]:
    """"KxN" -> (K, N, linear modules of that shape) for a benchmark family (`pcg_backend/families.py`),
    read off the model built on the meta device. A shared block (Zamba2's) counts once, however
    often a forward calls it."""
    import collections

    from transformers import AutoModelForCausalLM

    from pcg_backend.bench import nano9b_config
    from pcg_backend.families import config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(nano9b_config() if family == "nemotron_h" else config(family))
    counts = collections.Counter((m.in_features, m.out_features) for m in model.modules()
                                 if isinstance(m, torch.nn.Linear))
    return {f"{k}x{n}": (k, n, count) for (k, n), count in sorted(counts.items())}


def time_linear(k: int, n: int, m: int, library: str, linear=torch.nn.functional.linear) -> float:
    """Median microseconds per `linear` (default `F.linear`) of an (m, k) input and an (n, k) weight,
    with torch's preferred BLAS library set to `library`."""
    torch.backends.cuda.preferred_blas_library(library)
    # Enough copies (up to 8, about 400 MB) that each call reads its weight from memory, not L2.
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
               for _ in range(min(max(2, (400 << 20) // (k * n * 2)), 8))]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):   # lazy library init outside the capture
        for w in weights:
            linear(x, w)
    torch.cuda.synchronize()
    graph, rounds = torch.cuda.CUDAGraph(), 4
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for w in weights:
                linear(x, w)
    return replay_us(graph, rounds * len(weights))


def replay_us(graph: torch.cuda.CUDAGraph, calls: int, runs: int = 10) -> float:
    """Median µs per call over `runs` replays of `graph`, which records `calls` calls (after one replay
    unmeasured)."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("tools/gemm_libraries.py needs a CUDA GPU")
    table = shapes()
    print(torch.cuda.get_device_name(), "calls per forward:", {name: c for name, (_, _, c) in table.items()})
    previous = torch.backends.cuda.preferred_blas_library()
    try:
        for m in (1, 16, 128):
            totals = dict.fromkeys(LIBRARIES, 0.0)
            best = 0.0
            for name, (k, n, count) in table.items():
                us = {lib: time_linear(k, n, m, lib) for lib in LIBRARIES}
                rates = "  ".join(f"{lib} {t:7.1f} us ({k * n * 2 / (t * 1e-6) / 1e9:5.0f} GB/s)" for lib, t in us.items())
                print(f"M={m:4} {name:10} K={k:6} N={n:6} x{count:2}: {rates}", flush=True)
                for lib in LIBRARIES:
                    totals[lib] += count * us[lib]
                best += count * min(us.values())
            sums = ", ".join(f"{lib} {t / 1e3:.2f} ms" for lib, t in totals.items())
            print(f"M={m}: GEMMs per forward {sums}, best of both {best / 1e3:.2f} ms", flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


if __name__ == "__main__":
    main()
