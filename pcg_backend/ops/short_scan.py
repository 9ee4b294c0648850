"""The SSM scan of a short, fresh Mamba2 prefill in one Triton kernel, token by token.

A fresh padded prefill (`mamba2._padded_prefill` with no state to continue
from) hands its scan to mamba-ssm's chunked SSD scan,
`mamba_chunk_scan_combined`: five kernels (chunk cumsum, chunk state, state
passing, bmm, chunk scan), then copies of the final state into the cache and
of y into the op's `out`. At 16 tokens that is launch-bound, a few hundred
FLOPs per state element: a profile put the scan at about 18 µs per layer,
and with the copies it took 21 µs in a CUDA graph on an H200 at the 9B
NemotronH's shape (91 µs at batch 8).

`short_scan` runs the recurrence itself in one launch: one program per
(sequence, head, block of head_dim rows) keeps its block of the state in
fp32 registers and steps through the rows,

    state = state * exp(dt_t * A) + (dt_t * x_t) B_t^T,    y_t = state C_t + D * x_t,

reading each row's x, dt, B and C once, writing y straight into the op's
`out` and the state after the last row straight into the cache's
`ssm_state`. Padded rows are identity steps (dt = 0, x = B = C = 0): given
pcg's device count of real tokens, the kernel reads the rows from it on as
zeros, whatever they hold; without one, the caller must have zeroed them.
So the state after the last padded row is the state after the last real
token, and a padded row's y is 0.

It is for short prefills only (`MAX_ROWS`). The loop is sequential in the
rows, where the chunked scan does the same work as matrix products over
whole chunks in parallel, so its time grows linearly with the row count
while the chunked scan's stays near its launch cost. Measured in the same
setting: 6.5 µs at 8 rows, 10.4 at 16, 18.2 at 32 (batch 8: 26, 46, 93
µs), against 21 and 91 µs for the chunked scan and its copies.
`one_chunk_scan`, the chunked scan's arithmetic for one chunk in one
launch, costs about the same at every row count up to 32 (4-6 µs at batch
1), so it is faster from 8 rows on for every shape timed (at 16 rows,
batch 1: 3.9-4.6 µs against this kernel's 11-12; `tools/fresh_scan_timing.py`,
H200), and at 4 rows for all but one (FalconH1's state of 256 at batch 1).
This kernel keeps buckets of up to 2 rows, where it was faster for every
shape timed (3.8-4.5 µs against 3.9-6.3 at batch 1, 11.7-14.8 against
12.4-18.2 at batch 8). Buckets of 1 token never reach either: the core
takes them as one step.

It computes only a fresh scan (no initial state, no softplus or clamp of
dt, no z gate): exactly what `_chunk_scan` is asked for after `prepare`.
It differs from the chunked scan only in rounding: the order of its fp32
sums, and the chunked kernels round some intermediate products to the
model dtype where this one keeps fp32 (`test_short_scan_gpu.py` bounds its
error against an fp32 recurrence by twice the chunked scan's).

`applies` says where it runs: CUDA tensors (or fp16 CPU ones under
Triton's interpreter, for tests), bf16 or fp16 activations, 1 to `MAX_ROWS`
rows, a state size up to `MAX_STATE`, and unit channel strides. In pcg that
means a Mamba2 core with mamba-ssm (whose scan output has the model's dtype)
and causal-conv1d (whose channel-last output gives the unit strides).
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build ships without Triton
    triton = None

# Launches, counted on the host (at capture, not replay): tests read them.
LAUNCHES = {"short_scan": 0}

# Rows (the padded bucket) up to which a fresh prefill's scan takes this kernel; above, `one_chunk_scan`.
MAX_ROWS = 2
# Sequences per launch: the batch is the grid's third dimension, which CUDA caps at 65535.
MAX_BATCH = 65535
# The state size up to which a program's state tile stays in registers (the families' largest is 256).
MAX_STATE = 256
# fp32 state values per thread in the default launch (one warp per program).
STATE_PER_THREAD = 32


def launch_config(state_size: int, head_dim: int) -> dict:
    """BLOCK_P (head_dim rows per program), num_warps and UNROLL for a state of `state_size`.

    Defaults from one short sweep (H200, CUDA graph, 16 rows, batch 1 and 8,
    the families' shapes, BLOCK_P 2-32, 1-2 warps, unrolled or not), made
    when the kernel took buckets of up to 16 rows (it now takes 2, where
    they were not tuned again): within 7 % of its best at batch 1 and 9 % at
    batch 8, where twice the rows per program at N = 128 did best.
    One warp per program, holding a (N, BLOCK_P) fp32 tile of
    `STATE_PER_THREAD` values per thread (BLOCK_P = 1024 / N, at most
    head_dim rounded up to a power of two): 8 rows at the families' N = 128,
    4 at N = 256. One warp because Triton puts a wider program's extra warps
    along N, and every row's `y` (a sum over N) then crosses warps through
    shared memory and a barrier, once per token. UNROLL (off) unrolls the row
    loop, making the row count a compile-time constant (one compile per
    bucket) so that the compiler can issue later rows' loads early; it won
    some batch-1 shapes by up to 6 % and lost at batch 8 (up to 18 %).
    """
    block_p = max(1, min(32 * STATE_PER_THREAD // pow2(state_size), pow2(head_dim)))
    return {"BLOCK_P": block_p, "num_warps": 1, "UNROLL": False}


def pow2(n: int) -> int:
    """The least power of two >= n (Triton's `next_power_of_2`, which a CPU-only build lacks)."""
    return 1 << max(0, n - 1).bit_length()


def may_apply(xBC: torch.Tensor, ssm_state: torch.Tensor, out: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """The part of `applies` known before the conv, from the Mamba2 core's input xBC (batch, rows, channels),
    its state and its output: Triton, the device, the dtypes, the row count (up to `max_rows`, which
    `one_chunk_scan` raises) and the state size. The core computes dt for the kernels only where it holds."""
    return (triton is not None and _device_ok(xBC) and xBC.dtype in (torch.bfloat16, torch.float16)
            and out.dtype == xBC.dtype and 1 <= xBC.shape[1] <= max_rows and ssm_state.dim() == 4
            and 1 <= ssm_state.shape[-1] <= MAX_STATE)


def _device_ok(t: torch.Tensor) -> bool:
    # Under the interpreter only fp16: it reads bf16 through NumPy, which has none, and truncates it.
    return t.is_cuda or (INTERPRETED and t.device.type == "cpu" and t.dtype == torch.float16)


def applies(hs: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm_state: torch.Tensor,
            out: torch.Tensor, T_max: int = MAX_ROWS) -> bool:
    """True where `short_scan` computes this call: Triton, CUDA tensors on one device (CPU ones only under
    Triton's interpreter), and shapes it takes (`shapes_fit`)."""
    if triton is None:
        return False
    tensors = (hs, dt, B, C, ssm_state, out)
    if all(t.is_cuda for t in tensors):
        devices_ok = len({t.device for t in tensors}) == 1
    else:
        devices_ok = _device_ok(hs) and all(t.device.type == "cpu" for t in tensors)
    return devices_ok and shapes_fit(hs, dt, B, C, ssm_state, out, T_max)


def shapes_fit(hs: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm_state: torch.Tensor,
               out: torch.Tensor, T_max: int = MAX_ROWS) -> bool:
    """hs (batch, T, heads * head_dim) in bf16 or fp16 with 1 <= T <= T_max; dt (batch, T, heads) fp32;
    B and C (batch, T, groups * N) in hs's dtype, heads a multiple of groups, N <= MAX_STATE; ssm_state
    (batch, heads, head_dim, N) floating; out hs's shape and dtype; unit last-dim strides for hs, B, C, out."""
    if hs.dim() != 3 or dt.dim() != 3 or B.dim() != 3 or C.dim() != 3 or ssm_state.dim() != 4 or out.dim() != 3:
        return False
    batch, rows, width = hs.shape
    _, heads, head_dim, state_size = ssm_state.shape
    if not 1 <= batch <= MAX_BATCH or not 1 <= rows <= T_max or heads == 0 or head_dim == 0 or not 1 <= state_size <= MAX_STATE:
        return False
    if hs.dtype not in (torch.bfloat16, torch.float16) or B.dtype != hs.dtype or C.dtype != hs.dtype:
        return False
    if out.dtype != hs.dtype or dt.dtype != torch.float32 or not ssm_state.dtype.is_floating_point:
        return False
    if ssm_state.shape[0] != batch or width != heads * head_dim or tuple(dt.shape) != (batch, rows, heads):
        return False
    if B.shape != C.shape or B.shape[:2] != (batch, rows) or B.shape[2] % state_size:
        return False
    groups = B.shape[2] // state_size
    if groups == 0 or heads % groups or out.shape != hs.shape:
        return False
    return all(t.stride(-1) == 1 for t in (hs, B, C, out))


if triton is not None:

    @triton.jit
    def real_rows(count_ptr, rows, COUNTED: tl.constexpr):
        # The rows to scan: the real token count pcg publishes on the device where the caller passed it
        # (rows past it are padding, whatever they hold), else all of them.
        if COUNTED:
            real = tl.minimum(tl.load(count_ptr).to(tl.int32), rows)
        else:
            real = rows
        return real

    @triton.jit
    def _step(state, x_row, dt_row, b_row, c_row, y_row, a, d, p, p_in, n, n_in, live):
        # One row of the recurrence; returns the new state. Every load here is independent of the state.
        # A row past the real count (`live` false) loads zeros: an identity step whose y is 0.
        x = tl.load(x_row + p, mask=p_in & live, other=0.0).to(tl.float32)
        dt = tl.load(dt_row, mask=live, other=0.0).to(tl.float32)
        b = tl.load(b_row + n, mask=n_in & live, other=0.0).to(tl.float32)
        c = tl.load(c_row + n, mask=n_in & live, other=0.0).to(tl.float32)
        state = state * tl.exp(dt * a) + b[:, None] * (dt * x)[None, :]
        y = tl.sum(state * c[:, None], 0) + d * x
        tl.store(y_row + p, y.to(y_row.dtype.element_ty), mask=p_in)
        return state

    @triton.jit
    def _short_scan_kernel(
        x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, y_ptr, state_ptr, count_ptr,
        rows, head_dim, state_size, heads_per_group,
        sx_b, sx_t, sdt_b, sdt_t, sdt_h, sa, sb_b, sb_t, sc_b, sc_t, sd, sy_b, sy_t,
        ss_b, ss_h, ss_p, ss_n,
        ROWS: tl.constexpr, N_PAD: tl.constexpr, BLOCK_P: tl.constexpr, UNROLL: tl.constexpr,
        COUNTED: tl.constexpr,
    ):
        # Program (head_dim block, head, sequence): its block of the state, over every row. The tile is
        # (N, BLOCK_P), head_dim innermost: Triton spreads a warp's lanes over the innermost dimension first,
        # so each lane holds a run of N for its p, and a row's y (a sum over N) is mostly in-thread adds
        # with a few shuffles, where (BLOCK_P, N) spread N over all 32 lanes: five shuffles per p, per row.
        # 64-bit offsets: a large batch's stride times its index can pass 2**31 elements.
        pb = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        bi = tl.program_id(2).to(tl.int64)
        g = h // heads_per_group
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = p < head_dim
        n = tl.arange(0, N_PAD)
        n_in = n < state_size
        a = tl.load(a_ptr + h * sa).to(tl.float32)
        d = tl.load(d_ptr + h * sd).to(tl.float32)
        real = real_rows(count_ptr, rows, COUNTED)
        # Row 0's pointers; each step moves them on by one row stride (pointer arithmetic is 64-bit).
        x_row = x_ptr + bi * sx_b + h * head_dim
        dt_row = dt_ptr + bi * sdt_b + h * sdt_h
        b_row = b_ptr + bi * sb_b + g * state_size
        c_row = c_ptr + bi * sc_b + g * state_size
        y_row = y_ptr + bi * sy_b + h * head_dim
        state = tl.zeros((N_PAD, BLOCK_P), dtype=tl.float32)
        if UNROLL:
            for t in tl.static_range(ROWS):
                state = _step(state, x_row + t * sx_t, dt_row + t * sdt_t, b_row + t * sb_t, c_row + t * sc_t,
                              y_row + t * sy_t, a, d, p, p_in, n, n_in, t < real)
        else:
            for t in range(rows):
                state = _step(state, x_row, dt_row, b_row, c_row, y_row, a, d, p, p_in, n, n_in, t < real)
                x_row += sx_t
                dt_row += sdt_t
                b_row += sb_t
                c_row += sc_t
                y_row += sy_t
        dst = state_ptr + bi * ss_b + h * ss_h + n[:, None] * ss_n + p[None, :] * ss_p
        tl.store(dst, state.to(state_ptr.dtype.element_ty), mask=n_in[:, None] & p_in[None, :])

    # The interpreter runs the kernel on CPU tensors (Triton decides this when the kernel is decorated).
    INTERPRETED = type(_short_scan_kernel).__name__ == "InterpretedFunction"
else:
    INTERPRETED = False
    _short_scan_kernel = None   # `applies` is False without Triton


def short_scan(hs: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               D: torch.Tensor, ssm_state: torch.Tensor, out: torch.Tensor, n_groups: int, head_dim: int,
               count: torch.Tensor | None = None, config: dict | None = None) -> None:
    """The fresh scan of every row of `hs` into `out` (y) and `ssm_state` (the state after the last row).

    `applies(hs, dt, B, C, ssm_state, out)` must hold. Shapes as in
    `shapes_fit`; A and D are (heads,), any float dtype and stride. Head h
    reads group h // (heads // n_groups) of B and C, as HF's
    `repeat_interleave` pairs them. With `count` (a 1-element integer
    tensor on the device: pcg's real token count), rows from `count` on are
    padding whatever they hold: the kernel reads them as identity steps
    (zeros) and writes their y as 0. Without it, padded rows must already be
    identity steps. `config` overrides `launch_config`'s defaults (for tests
    and tuning).
    """
    cfg = {**launch_config(ssm_state.shape[-1], head_dim), **(config or {})}
    launch_scan(_short_scan_kernel, "short_scan", hs, dt, A, B, C, D, ssm_state, out, n_groups, head_dim, count,
                cfg["BLOCK_P"], ROWS=hs.shape[1] if cfg["UNROLL"] else 0, N_PAD=pow2(ssm_state.shape[-1]),
                UNROLL=cfg["UNROLL"], num_warps=cfg["num_warps"])
    LAUNCHES["short_scan"] += 1


def launch_scan(kernel, name: str, hs, dt, A, B, C, D, ssm_state, out, n_groups: int, head_dim: int,
                count: torch.Tensor | None, block_p: int, **meta) -> None:
    """Launch one of the fresh-scan kernels, this module's or `one_chunk_scan`'s, which take the same
    arguments: one program per (block of `block_p` head_dim rows, head, sequence); `meta` holds the
    kernel's own compile-time constants and launch options."""
    batch, rows, _ = hs.shape
    heads = dt.shape[-1]
    state_size = ssm_state.shape[-1]
    check_parameters(hs, A, B, D, heads, n_groups, state_size, name)
    if count is not None and (count.numel() != 1 or count.device != hs.device or count.dtype.is_floating_point):
        raise ValueError(f"{name}: the real token count must be one integer on {hs.device}, got "
                         f"{tuple(count.shape)} {count.dtype} on {count.device}")
    grid = (triton.cdiv(head_dim, block_p), heads, batch)
    with torch.cuda.device(hs.device) if hs.is_cuda else contextlib.nullcontext():
        kernel[grid](
            hs, dt, A, B, C, D, out, ssm_state, dt if count is None else count,
            rows, head_dim, state_size, heads // n_groups,
            hs.stride(0), hs.stride(1), *dt.stride(), A.stride(0), B.stride(0), B.stride(1),
            C.stride(0), C.stride(1), D.stride(0), out.stride(0), out.stride(1), *ssm_state.stride(),
            BLOCK_P=block_p, COUNTED=count is not None, **meta,
        )


def check_parameters(hs, A, B, D, heads: int, n_groups: int, state_size: int, kernel: str) -> None:
    """Raise ValueError where B's width, A or D do not fit the call (what `shapes_fit` cannot see)."""
    if B.shape[-1] != n_groups * state_size or A.shape != (heads,) or D.shape != (heads,):
        raise ValueError(f"{kernel}: B of width {B.shape[-1]} is not {n_groups} groups of the state's "
                         f"{state_size}, or A {tuple(A.shape)} / D {tuple(D.shape)} are not ({heads},)")
    if A.device != hs.device or D.device != hs.device:
        raise ValueError(f"{kernel}: A and D on {A.device} / {D.device}, the activations on {hs.device}")


def reference(hs: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor, n_groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `short_scan` computes, as the fp32 recurrence in torch (for tests).

    Returns y (batch, T, heads * head_dim) and the state after the last row
    (batch, heads, head_dim, N), both fp32.
    """
    batch, rows, _ = hs.shape
    heads = dt.shape[-1]
    x = hs.float().reshape(batch, rows, heads, head_dim)
    B = B.float().reshape(batch, rows, n_groups, -1).repeat_interleave(heads // n_groups, dim=2)
    C = C.float().reshape(batch, rows, n_groups, -1).repeat_interleave(heads // n_groups, dim=2)
    dt, A, D = dt.float(), A.float(), D.float()
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    ys = []
    for t in range(rows):
        decay = torch.exp(dt[:, t] * A)[..., None, None]                      # (batch, heads, 1, 1)
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state @ C[:, t, :, :, None])[..., 0] + D[:, None] * x[:, t])
    return torch.stack(ys, 1).reshape(batch, rows, heads * head_dim), state
