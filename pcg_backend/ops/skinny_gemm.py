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
first call compiles one kernel per tile, bias/no-bias variant and
activation, and autotunes nothing.

`activation="relu2"` applies NemotronH's relu and square as the kernel
stores its output, with HF's roundings (to the output dtype before and
after squaring); `rewrite/skinny_routing.py` moves them there from the
graph, one kernel fewer per MLP layer of a decode step.

A tile with `SPLIT_K` > 1 also splits K: program (n, s) sums its share of K
into an fp32 partial, and the last of a column block's programs to finish
adds the partials in a fixed order, with the bias (one launch; an arrival
counter per column block tells a program whether it is the last). It is for
weights with too few column blocks to keep the GPU's SMs busy: narrow
projections such as `kv_proj` (1024 columns) and FalconH1's 3072-column
weights, which cuBLAS also reads slowly (`_tile`).

The op takes the kernel only where it measured faster: CUDA, bf16 or fp16,
at most MAX_ROWS rows, at least MIN_COLUMNS output columns (on the H200,
with split-K, every weight shape of the benchmark families from 512 columns
up measured faster than cuBLASLt at 1 and 8 rows, or within 0.4 µs of it;
below 512 are adapter and router weights too small to matter). Anything else goes to
`F.linear` (then the activation, in torch), which is also what a CPU run uses.
`pcg_backend/rewrite/skinny_routing.py` decides which graph nodes call it.
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
MIN_COLUMNS = 512
# Launches per path, counted on the host (so at capture, not at replay): tests read them.
LAUNCHES = {"triton": 0, "linear": 0}


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True if the Triton kernel takes this call (see the module docstring)."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and w.dim() == 2 and w.stride(1) == 1 and w.shape[0] >= MIN_COLUMNS and x.shape[-1] == w.shape[1]
            and x.numel() <= MAX_ROWS * x.shape[-1])


if triton is not None:

    @triton.jit
    def _activate(acc, y_ptr, ACTIVATION: tl.constexpr):
        # The output in y's dtype, after the activation. "relu2" (NemotronH's MLP) rounds to y's dtype
        # before and after squaring, as HF's relu and square of the linear's output do.
        if ACTIVATION == "relu2":
            rounded = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
            r = tl.where(rounded < 0.0, 0.0, rounded)   # keeps a NaN, as torch.relu does (tl.maximum drops it)
            acc = r * r
        return acc.to(y_ptr.dtype.element_ty)

    @triton.jit
    def _skinny_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, swn, sym,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ACTIVATION: tl.constexpr,
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
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], _activate(acc, y_ptr, ACTIVATION),
                 mask=m_in[:, None] & n_in[None, :])

    @triton.jit
    def _skinny_split_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, arrivals_ptr, M, N, K, sxm, swn, sym, K_PER_SPLIT,
        SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACTIVATION: tl.constexpr,
    ):
        # Program (n, s) sums K_PER_SPLIT of K for its BLOCK_N columns into fp32 partial sum s.
        # The last of a column block's SPLITS programs to arrive adds the partials in split
        # order (the same bits whichever arrives last), writes the output, and resets the
        # block's arrival counter for the next launch: one kernel, no second launch to add.
        pid_n = tl.program_id(0)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_in = rm < M
        n_in = rn < N
        tile_in = m_in[:, None] & n_in[None, :]
        start = tl.program_id(1) * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, start + K_PER_SPLIT, BLOCK_K):
            k = k0 + rk
            k_in = k < K
            x = tl.load(x_ptr + rm[:, None] * sxm + k[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * swn + k[:, None], mask=n_in[None, :] & k_in[:, None], other=0.0)
            acc = tl.dot(x, w, acc)
        tile = rm[:, None] * N + rn[None, :]
        tl.store(part_ptr + tl.program_id(1) * M * N + tile, acc, mask=tile_in)
        # Every thread's partial is stored before the counter moves (barrier), and the counter's
        # acquire-release makes all earlier programs' partials visible to the last one.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                # .cg: read from L2, where the other SMs' partials are, never a stale L1 line.
                total += tl.load(part_ptr + s * M * N + tile, mask=tile_in, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=n_in, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * sym + rn[None, :], _activate(total, y_ptr, ACTIVATION), mask=tile_in)
            tl.atomic_xchg(arrivals_ptr + pid_n, 0, sem="relaxed", scope="gpu")


# The kernel holds all of x's rows in one tile, padded to a power of two of at least 16 (tl.dot's
# minimum). `tools/skinny_gemm.py --search` may try up to this many rows with tiles of its own;
# above 16 rows the long-K shapes need split-K to fill the GPU, and cuBLAS won there.
LARGEST_BLOCK_M = 128


def _tile(m: int, k: int, n: int, shared_memory: int | None = None, sm_count: int | None = None) -> dict:
    """Tile sizes and launch settings for at most MAX_ROWS rows of a linear layer with an (n, k) weight.

    What the autotuner chose on the H100 for the benchmark model's shapes at 1, 8 and 16 rows
    (tools/skinny_gemm.py): 256-wide steps over 4 stages for most, 128-wide steps over 3 for
    short rows with enough columns for several programs per SM (`in_proj`, `up_proj`). The
    256-wide tile takes a fifth stage for fewer than 8192 columns where a block's `shared_memory`
    (bytes) holds it: on the H200 that read those projections 2-7 % faster at 1 and 8 rows
    (`out_proj` 25.4 µs against 25.9 at one row, `down_proj` 37.6 against 40.2, `q_proj` 14.2
    against 14.5; tools/skinny_gemm.py --search). Wider weights were not searched with it; 16 rows
    share the tile of 1 and 8 (BLOCK_M 16 either way).

    A weight whose column blocks fill less than SPLIT_BELOW of the GPU's SMs (`sm_count`) leaves
    most SMs without a program; its K is then split (`SPLIT_K`, the number of parts launched)
    into as many parts as keep every program in one wave (a block's shared memory holds one
    program per SM), in whole BLOCK_K steps. On the H200 (132 SMs) that read `kv_proj` (1024
    columns, 6 parts) in 6.6 µs at one row, against 11.9 unsplit and 8.0 on cuBLASLt, and
    FalconH1's 3072-column weights (2 parts) 5-12 % faster than cuBLASLt. A second wave costs
    more than it gains (`out_proj`, 70 blocks: 25.8 µs unsplit, 35.4 in two parts), and 64
    blocks in two parts were no faster than unsplit (4096 columns, a 8192-long K: 19.7 µs
    unsplit, 19.9-20.6 in two parts); 56 blocks were (3584 columns: 17.1 against 16.0).
    Split tiles keep four pipeline stages, which measured at least as fast as five for them.
    """
    if m > MAX_ROWS:
        raise ValueError(f"pcg's skinny GEMM tiles cover at most {MAX_ROWS} rows, got {m}")
    if k <= 4608 and 8192 <= n < 65536:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    fits = shared_memory is not None and shared_memory >= 5 * _stage_bytes(16, 64, 256) + _SPARE_BYTES
    stages = 5 if fits and n < 8192 else 4
    tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": stages}
    blocks = -(-n // tile["BLOCK_N"])
    if sm_count and blocks < SPLIT_BELOW * sm_count:
        # No more parts than fit one wave, nor than MAX_SPLITS partials to add; whole K steps each.
        _, splits = k_parts(k, tile["BLOCK_K"], min(sm_count // blocks, MAX_SPLITS))
        if splits > 1:
            tile.update(SPLIT_K=splits, num_stages=4)
    return tile


# The most partial sums one output tile is split into (the last program adds them all).
MAX_SPLITS = 8
# Split K only where the column blocks fill less than this share of the SMs (see `_tile`).
SPLIT_BELOW = 0.45


def k_parts(k: int, block_k: int, parts: int) -> tuple[int, int]:
    """(K per part, parts launched) for K split into at most `parts` parts of whole `block_k` steps.

    The parts launched can be fewer than asked: 4480 in 256-wide steps is 18 steps, and eight
    parts of 3 steps (768) cover it in six.
    """
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    step = cdiv(cdiv(k, parts), block_k) * block_k
    return step, cdiv(k, step)


# Shared memory a pipelined tile needs beyond its stages (Triton's own bookkeeping, barriers).
_SPARE_BYTES = 8 << 10


def _stage_bytes(block_m: int, block_n: int, block_k: int) -> int:
    """Shared memory one pipeline stage holds: an x tile and a weight tile, 2 bytes per element."""
    return (block_m * block_k + block_k * block_n) * 2


@functools.lru_cache(maxsize=None)
def _device_facts(device_index: int) -> tuple[int | None, int]:
    """(bytes of shared memory one block may opt in to, or None where torch does not say (ROCm); SMs) of a GPU."""
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", None), props.multi_processor_count


def triton_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  tile: dict | None = None, activation: str = "") -> torch.Tensor:
    """`F.linear(x, w, bias)` through the Triton kernel, then `activation` (see ACTIVATIONS); the caller checks
    `supported` first. `tile` overrides the tile table (`tools/skinny_gemm.py` searches with it)."""
    _check_activation(activation)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    if m > LARGEST_BLOCK_M:
        raise ValueError(f"triton_linear takes at most {LARGEST_BLOCK_M} rows, got {m}")
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tile is None:
        facts = (None, None)
        if x.is_cuda:
            facts = _device_facts(x.device.index if x.device.index is not None else torch.cuda.current_device())
        tile = _tile(m, k, n, *facts)
    launch = {key: value for key, value in tile.items() if key != "SPLIT_K"}
    columns = triton.cdiv(n, tile["BLOCK_N"])
    # Triton launches on the current device; the tensors may live on another one. (CPU tensors
    # reach here only under Triton's interpreter, TRITON_INTERPRET=1.)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if tile.get("SPLIT_K", 1) == 1:
            _skinny_kernel[(columns,)](
                x2, w, bias if bias is not None else w, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
                HAS_BIAS=bias is not None, ACTIVATION=activation, **launch)
        else:
            step, splits = k_parts(k, tile["BLOCK_K"], tile["SPLIT_K"])
            part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
            _skinny_split_kernel[(columns, splits)](
                x2, w, bias if bias is not None else w, y, part, arrival_counters(x.device, columns), m, n, k,
                x2.stride(0), w.stride(0), y.stride(0), step, SPLITS=splits, HAS_BIAS=bias is not None,
                ACTIVATION=activation, **launch)
    return y.reshape(*lead, n)


# One arrival counter per column block, per device, zero between launches (the last program of a
# block resets its own). pcg::moe_router's split launches use them too, one per token block. Launches
# that share them must not overlap: pcg launches and replays every such kernel on one stream per
# device, where kernels run one after another.
_ARRIVALS: dict[str, torch.Tensor] = {}
ARRIVAL_SLOTS = 4096


def arrival_counters(device: torch.device, blocks: int) -> torch.Tensor:
    """The device's zeroed int32 arrival counters (a fixed number: captured graphs keep their address).

    Allocated on the first split launch on the device, which in pcg is a piece's warm-up run
    before its capture. Inside a capture the zero fill would only be recorded, and the counters
    would come from the capture's memory pool, so a first use there is an error.
    """
    if blocks > ARRIVAL_SLOTS:
        raise ValueError(f"a split-K launch of {blocks} column blocks; the counters cover {ARRIVAL_SLOTS}")
    counters = _ARRIVALS.get(str(device))
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("pcg::skinny_linear and pcg::moe_router split their work with counters that "
                               "are allocated on the first such call, which must come before any CUDA graph "
                               "capture of it: call it once outside the capture (pcg's own warm-up does)")
        counters = _ARRIVALS[str(device)] = torch.zeros(ARRIVAL_SLOTS, dtype=torch.int32, device=device)
    return counters


# What the kernel can apply to its output before storing it, as the eager ops after a linear do.
ACTIVATIONS = {
    "": lambda y: y,
    "relu2": lambda y: torch.square(torch.relu(y)),   # NemotronH's MLP (HF's ReLUSquaredActivation)
}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"pcg::skinny_linear: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")


@lean_op("pcg::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: str = "") -> torch.Tensor:
    _check_activation(activation)
    if supported(x, weight) and (bias is None or bias.stride(0) == 1):
        LAUNCHES["triton"] += 1
        return triton_linear(x, weight, bias, activation=activation)
    LAUNCHES["linear"] += 1
    return ACTIVATIONS[activation](torch.nn.functional.linear(x, weight, bias))


@torch.library.register_fake("pcg::skinny_linear")
def _skinny_linear_fake(x, weight, bias=None, activation=""):
    _check_activation(activation)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
