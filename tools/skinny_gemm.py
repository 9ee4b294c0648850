"""pcg's Triton skinny-GEMM kernel against cuBLASLt on the benchmark model's shapes (needs CUDA).

    python tools/skinny_gemm.py [--rows 1,8,16] [--search 32,64,128] [--split 1,8] [--family F]

For each weight shape of the Nemotron-Nano-9B-v2-shaped model and each row
count, it checks `pcg_backend.ops.skinny_gemm.triton_linear` against an fp32
`F.linear` (relative error), then times it and cuBLASLt's `F.linear` the way
`tools/gemm_libraries.py` does: in a CUDA graph, rotating over weight copies
so that every call reads its weight from memory. It prints the time, the
weight-read rate, whether `pcg::skinny_linear` would take the kernel for
that shape, and the sum over one forward for cuBLASLt, for what
`pcg::skinny_linear` does, and (up to 16 rows) for the kernel everywhere.
`--split` times split-K tiles (`SPLIT`) at those row counts too, and prints
the fastest against the table's tile; `--extra K:N,...` adds weight shapes
(counted once per forward in the sums). `--family F` times another benchmark
family's weight shapes instead (`pcg_backend/families.py`), each counted as
often as the model has linear layers of that shape.
"""

import argparse
import functools
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_libraries import family_shapes, shapes, time_linear  # noqa: E402

from pcg_backend.families import FAMILIES  # noqa: E402
from pcg_backend.ops import skinny_gemm  # noqa: E402


SEARCH = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
          for bn, bk, w, st in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4, 5))]


def search(k: int, n: int, m: int, tiles: list[dict] = SEARCH) -> tuple[float, dict]:
    """The fastest of `tiles` (default SEARCH) for this shape: (microseconds, tile)."""
    best = (float("inf"), {})
    block_m = max(16, 1 << (m - 1).bit_length())
    for tile in tiles:
        tile = {"BLOCK_M": block_m, **tile}
        try:
            us = time_linear(k, n, m, "cublaslt", linear=functools.partial(skinny_gemm.triton_linear, tile=tile))
        except Exception as e:  # noqa: BLE001 - a tile that needs more shared memory than the SM has
            if "resources" not in str(e) and "shared memory" not in str(e):
                raise
            continue
        best = min(best, (us, tile), key=lambda t: t[0])
    return best


# Split-K tiles, and the same tiles unsplit (SPLIT_K 1) to compare against: 64- and 32-wide column
# blocks, 256-wide K steps over 4-5 stages or 128-wide ones over 3-4.
SPLIT = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": st, "SPLIT_K": sk}
         for bn, (bk, st), sk in itertools.product((64, 32), ((256, 4), (256, 5), (128, 3), (128, 4)),
                                                   (1, 2, 3, 4, 6, 8, 12))]


def relative_error(k: int, n: int, m: int) -> float:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    out = skinny_gemm.triton_linear(x, w, b).float()   # m <= MAX_ROWS: the tile table's
    return ((out - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--search", default="", help="row counts at which to search the tile")
    parser.add_argument("--split", default="", help="row counts at which to time split-K tiles")
    parser.add_argument("--extra", default="",
                        help="more weight shapes as K:N pairs, e.g. 12288:3072,5120:3072 (FalconH1's narrow ones)")
    parser.add_argument("--family", default=None, choices=FAMILIES,
                        help="time this benchmark family's weight shapes instead of Nemotron-Nano-9B-v2's")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/skinny_gemm.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), flush=True)
    previous = torch.backends.cuda.preferred_blas_library()
    facts = skinny_gemm._device_facts(torch.cuda.current_device())
    try:
        searched = {int(r) for r in args.search.split(",") if r}
        split = {int(r) for r in args.split.split(",") if r}
        base = family_shapes(args.family) if args.family else shapes()
        for m in sorted({int(r) for r in args.rows.split(",")} | searched | split):
            totals = {"cublaslt": 0.0, "pcg::skinny_linear": 0.0}
            extra = {f"{k}:{n}": (int(k), int(n), 1) for k, n in (p.split(":") for p in args.extra.split(",") if p)}
            for name, (k, n, count) in {**base, **extra}.items():
                lt = time_linear(k, n, m, "cublaslt")
                probe = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
                taken = skinny_gemm.supported(probe, torch.empty(n, k, device="cuda", dtype=torch.bfloat16))
                rate = lambda us: k * n * 2 / (us * 1e-6) / 1e9  # noqa: E731
                line = f"M={m:3} {name:10} K={k:6} N={n:6} x{count:2}: cublaslt {lt:7.1f} us ({rate(lt):5.0f} GB/s)"
                tr = None
                if m <= skinny_gemm.MAX_ROWS:   # the tile table covers these; --search tries its own
                    tr = time_linear(k, n, m, "cublaslt", linear=skinny_gemm.triton_linear)
                    line += (f"  triton {tr:7.1f} us ({rate(tr):5.0f} GB/s) {skinny_gemm._tile(m, k, n, *facts)}"
                             f"  rel err {relative_error(k, n, m):.1e}")
                print(f"{line}  op takes {'triton' if taken else 'F.linear'}", flush=True)
                if m in searched:
                    best_us, best_tile = search(k, n, m)
                    print(f"      best tile {best_tile}: {best_us:7.1f} us ({rate(best_us):5.0f} GB/s)", flush=True)
                    totals["best tiles"] = totals.get("best tiles", 0.0) + count * best_us
                if m in split and -(-n // 64) < facts[1]:   # too few column blocks to fill the SMs
                    keys = ("BLOCK_N", "BLOCK_K", "num_stages", "SPLIT_K")
                    timed = {tuple(t[key] for key in keys): search(k, n, m, [t])[0] for t in SPLIT}
                    print("      split-K (BLOCK_N, BLOCK_K, stages, splits): "
                          + "  ".join(f"{key} {us:.1f}" for key, us in sorted(timed.items(), key=lambda i: i[1])[:8]),
                          flush=True)
                    (block_n, block_k, stages, splits), split_us = min(timed.items(), key=lambda item: item[1])
                    print(f"      best split-K tile: BLOCK_N {block_n}, BLOCK_K {block_k}, {stages} stages, "
                          f"SPLIT_K {splits}: {split_us:7.1f} us ({rate(split_us):5.0f} GB/s)", flush=True)
                    totals["best split-K"] = totals.get("best split-K", 0.0) + count * min(split_us, tr or lt)
                totals["cublaslt"] += count * lt
                if tr is not None:
                    totals["triton everywhere"] = totals.get("triton everywhere", 0.0) + count * tr
                totals["pcg::skinny_linear"] += count * (tr if taken else lt)
            print(f"M={m}: GEMMs per forward " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in totals.items()),
                  flush=True)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


if __name__ == "__main__":
    main()
