"""`pcg::skinny_linear`: `F.linear` through a Triton kernel when x has few rows.

With 1 to 16 rows (a decode step, a short prefill) a linear layer reads its
whole weight to do very little arithmetic, so its time is the weight's bytes
over the bandwidth it reaches. On the H100, cuBLASLt reads the benchmark
model's projections at 2395-2852 GB/s at one row, this kernel at 2475-3086
GB/s: one forward's GEMMs take 5.96 ms instead of 6.50 at 1 row, 6.01
instead of 6.86 at 8 and 6.03 instead of 6.60 at 16 (`tools/skinny_gemm.py`;
docs/benchmarks.md).

Every program owns a block of BLOCK_N output columns (weight rows) and all
of x's rows, so each weight byte is read once, and x's rows go through the
tensor cores padded to 16. Accumulation is fp32; the output has x's dtype,
as cuBLAS gives it. The tile is fixed per weight shape and the GPU's shared
memory (what `triton.autotune` chose on the H100 for the benchmark model's
shapes, with a deeper pipeline where an H200 measured it faster), so the
first call compiles one kernel per tile and bias/no-bias variant, and
autotunes nothing.

A tile with `SPLIT_K` > 1 also splits K: program (n, s) sums its share of K
into an fp32 partial, and a second kernel adds the partials in a fixed
order, with the bias. It is for weights with too few column blocks to fill
the GPU (a 4480-column weight gives 70 programs for 132 SMs). No shape in
the tile table takes it yet: `tools/skinny_gemm.py --split` times it, and
the table changes only where that measures faster.

The op takes the kernel only where it measured faster: CUDA, bf16 or fp16,
at most MAX_ROWS rows, at least MIN_COLUMNS output columns (with fewer, too
few programs fill the GPU: `kv_proj`'s 1024 columns took 11.9 µs against
cuBLASLt's 8.5). Anything else goes to `F.linear`, which is also what a CPU
run uses. `pcg_backend/rewrite/skinny_routing.py` decides which graph nodes call it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from .lean_op import lean_op

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build ships without Triton
    triton = None

MAX_ROWS = 16
MIN_COLUMNS = 4096
# Launches per path, counted on the host (so at capture, not at replay): tests read them.
LAUNCHES = {"triton": 0, "linear": 0}


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True if the Triton kernel takes this call (see the module docstring)."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and w.dim() == 2 and w.stride(1) == 1 and w.shape[0] >= MIN_COLUMNS and x.shape[-1] == w.shape[1]
            and x.numel() <= MAX_ROWS * x.shape[-1])


if triton is not None:

    @triton.jit
    def _skinny_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_in = rm < M
        n_in = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            k_in = k < K
            x = tl.load(x_ptr + rm[:, None] * sxm + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * swn + k[:, None], mask=n_in[None, :] & k_in[:, None], other=0.0)
            acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_in[:, None] & n_in[None, :])

    @triton.jit
    def _skinny_split_kernel(
        x_ptr, w_ptr, part_ptr, M, N, K, sxm, swn, K_PER_SPLIT,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Program (n, s) sums K_PER_SPLIT of K for its BLOCK_N columns into fp32 partial sum s.
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_in = rm < M
        n_in = rn < N
        start = tl.program_id(1) * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, start + K_PER_SPLIT, BLOCK_K):
            k = k0 + rk
            k_in = k < K
            x = tl.load(x_ptr + rm[:, None] * sxm + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * swn + k[:, None], mask=n_in[None, :] & k_in[:, None], other=0.0)
            acc = tl.dot(x, w, acc)
        tl.store(part_ptr + (tl.program_id(1) * M + rm[:, None]) * N + rn[None, :], acc,
                 mask=m_in[:, None] & n_in[None, :])

    @triton.jit
    def _split_sum_kernel(part_ptr, b_ptr, y_ptr, M, N, sym,
                          SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # The partial sums in a fixed order (the same bits every run), plus the bias, in x's dtype.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = i < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(part_ptr + s * M * N + i, mask=inside, other=0.0)
        row = i // N
        col = i % N
        if HAS_BIAS:
            acc += tl.load(b_ptr + col, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * sym + col, acc.to(y_ptr.dtype.element_ty), mask=inside)


# The kernel holds all of x's rows in one tile, padded to a power of two of at least 16 (tl.dot's
# minimum). `tools/skinny_gemm.py --search` may try up to this many rows with tiles of its own;
# above 16 rows the long-K shapes need split-K to fill the GPU, and cuBLAS won there.
LARGEST_BLOCK_M = 128


def _tile(m: int, k: int, n: int, shared_memory: int | None = None) -> dict:
    """Tile sizes and launch settings for at most MAX_ROWS rows of a linear layer with an (n, k) weight.

    What the autotuner chose on the H100 for the benchmark model's shapes at 1, 8 and 16 rows
    (tools/skinny_gemm.py): 256-wide steps over 4 stages for most, 128-wide steps over 3 for
    short rows with enough columns for several programs per SM (`in_proj`, `up_proj`). The
    256-wide tile takes a fifth stage for fewer than 8192 columns where a block's `shared_memory`
    (bytes) holds it: on the H200 that read those projections 2-7 % faster at 1 and 8 rows
    (`out_proj` 25.4 µs against 25.9 at one row, `down_proj` 37.6 against 40.2, `q_proj` 14.2
    against 14.5; tools/skinny_gemm.py --search). Wider weights were not searched with it; 16 rows
    share the tile of 1 and 8 (BLOCK_M 16 either way).
    """
    if m > MAX_ROWS:
        raise ValueError(f"pcg's skinny GEMM tiles cover at most {MAX_ROWS} rows, got {m}")
    if k <= 4608 and 8192 <= n < 65536:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    fits = shared_memory is not None and shared_memory >= 5 * _stage_bytes(16, 64, 256) + _SPARE_BYTES
    stages = 5 if fits and n < 8192 else 4
    return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": stages}


# Shared memory a pipelined tile needs beyond its stages (Triton's own bookkeeping, barriers).
_SPARE_BYTES = 8 << 10


def _stage_bytes(block_m: int, block_n: int, block_k: int) -> int:
    """Shared memory one pipeline stage holds: an x tile and a weight tile, 2 bytes per element."""
    return (block_m * block_k + block_k * block_n) * 2


@functools.lru_cache(maxsize=None)
def _shared_memory(device_index: int) -> int | None:
    """Bytes of shared memory one block may opt in to on that GPU (None where torch does not say: ROCm)."""
    return getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", None)


def triton_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  tile: dict | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)` through the Triton kernel; the caller checks `supported` first.
    `tile` overrides the tile table (`tools/skinny_gemm.py` searches with it)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    if m > LARGEST_BLOCK_M:
        raise ValueError(f"triton_linear takes at most {LARGEST_BLOCK_M} rows, got {m}")
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tile = tile or _tile(m, k, n, _shared_memory(x.device.index if x.device.index is not None
                                                 else torch.cuda.current_device()) if x.is_cuda else None)
    launch = {key: value for key, value in tile.items() if key != "SPLIT_K"}
    columns = triton.cdiv(n, tile["BLOCK_N"])
    # Triton launches on the current device; the tensors may live on another one. (CPU tensors
    # reach here only under Triton's interpreter, TRITON_INTERPRET=1.)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if tile.get("SPLIT_K", 1) == 1:
            _skinny_kernel[(columns,)](
                x2, w, bias if bias is not None else w, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
                HAS_BIAS=bias is not None, **launch)
        else:
            step = triton.cdiv(triton.cdiv(k, tile["SPLIT_K"]), tile["BLOCK_K"]) * tile["BLOCK_K"]
            splits = triton.cdiv(k, step)
            part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
            _skinny_split_kernel[(columns, splits)](x2, w, part, m, n, k, x2.stride(0), w.stride(0), step, **launch)
            _split_sum_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](
                part, bias if bias is not None else part, y, m, n, y.stride(0),
                SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=_SUM_BLOCK)
    return y.reshape(*lead, n)


# Elements per program of the split-K sum: a few programs for the few rows and columns it adds.
_SUM_BLOCK = 1024


@lean_op("pcg::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if supported(x, weight) and (bias is None or bias.stride(0) == 1):
        LAUNCHES["triton"] += 1
        return triton_linear(x, weight, bias)
    LAUNCHES["linear"] += 1
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.register_fake("pcg::skinny_linear")
def _skinny_linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
