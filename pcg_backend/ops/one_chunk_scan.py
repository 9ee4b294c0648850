"""The SSM scan of a fresh Mamba2 prefill of up to 128 rows as one SSD chunk, in one Triton kernel.

Before this kernel, a fresh padded prefill's scan of more than 16 rows went
to mamba-ssm's chunked SSD scan: five kernels (chunk cumsum, chunk state, state
passing, bmm, chunk scan), then copies of the final state into the cache and
of y into the op's `out`. Up to the model's chunk size (128 or 256 in the
families' published configs) the whole prefill is one chunk, and each of
those launches does little: the chain costs 18-30 µs per layer in a CUDA
graph on an H200, where the arithmetic takes a few. (A model whose chunk
size is below the bucket gets the same SSM computed as one chunk here,
where the chunked scan would pass states between chunks: the same values,
rounded differently.)

`one_chunk_scan` does that chunk's work in one launch. One program per
(block of head_dim rows, head, sequence) loads the chunk's x, dt, B and C
once and computes, with tensor-core products over the rows,

    cs_t  = A * (dt_1 + ... + dt_t)
    y_t   = sum over s <= t of exp(cs_t - cs_s) * dt_s * (C_t . B_s) * x_s  +  D * x_t
    state = sum over s of exp(cs_T - cs_s) * dt_s * x_s B_s^T

writing y straight into the op's `out` and the state straight into the
cache's `ssm_state`. This is the chunked scan's arithmetic for a chunk with a
zero initial state, with the same roundings: C B^T summed in fp32, the decayed
scores rounded to the model dtype before their product with x, and B scaled
by its decay and dt, rounded likewise, before the state's product. Padded
rows are identity steps (dt = 0, x = B = C = 0): the kernel reads rows from
pcg's device count on as zeros, or, without a count, the caller zeroes
them. They add nothing to the state and their y is 0.

The products hold a (T, T) score tile, so the row count is capped at
`MAX_ROWS` = 128. Measured per layer in a CUDA graph on an H200
(`tools/fresh_scan_timing.py`, before its launch defaults and the state's
decay took their present form), at 24 to 128 rows it took 3.5-15 µs at
batch 1 and 19-92 µs at batch 8 across the shapes measured, against
18-30 and 106-169 µs for the chunked scan and its copies, and 2.6 to 3.9
times less than `short_scan` at 24 rows. It is as fast at 8 and 16 rows
(3.8-6.5 µs at batch 1, 13-21 at batch 8), where the short scan's time
grows with the rows, so only buckets of at most `short_scan.MAX_ROWS` (2)
keep the token-by-token kernel.
Which calls it takes follows `short_scan.applies`: the same dtypes, devices
and unit channel strides, with this module's row limit.
"""

from __future__ import annotations

import torch

from . import short_scan

triton, tl = short_scan.triton, (short_scan.tl if short_scan.triton is not None else None)

# Launches, counted on the host (at capture, not replay): tests read them.
LAUNCHES = {"one_chunk_scan": 0}

# Rows (the padded bucket) up to which a fresh prefill's scan takes this kernel: its (T, T) score tile
# bounds it. Up to `short_scan.MAX_ROWS`, the short scan takes precedence.
MAX_ROWS = 128
# tl.dot's smallest tile side: T, N and the head_dim block are padded up to it.
MIN_TILE = 16


def launch_config(rows: int, state_size: int, head_dim: int) -> dict:
    """BLOCK_P (head_dim rows per program) and num_warps.

    A whole head per program: the scores C B^T depend on the head's group
    only, so splitting a head's rows over programs computes them once per
    block, and that lost at every shape above 32 rows (H200,
    `tools/fresh_scan_timing.py`). 4 warps up to 64 rows with states of up
    to 128, 8 above: 4 were faster at 24-64 rows there (by up to a third at
    batch 8), 8 at 128 rows at batch 1 and with FalconH1's state of 256.
    """
    block_p = max(MIN_TILE, short_scan.pow2(head_dim))
    return {"BLOCK_P": block_p, "num_warps": 8 if rows > 64 or state_size > 128 else 4}


def may_apply(xBC: torch.Tensor, ssm_state: torch.Tensor, out: torch.Tensor) -> bool:
    """`short_scan.may_apply` with this kernel's row limit: whether the core should compute dt for it."""
    return short_scan.may_apply(xBC, ssm_state, out, max_rows=MAX_ROWS)


def applies(hs: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, ssm_state: torch.Tensor,
            out: torch.Tensor) -> bool:
    """True where `one_chunk_scan` computes this call: `short_scan.applies` with this kernel's row limit."""
    return short_scan.applies(hs, dt, B, C, ssm_state, out, T_max=MAX_ROWS)


if triton is not None:
    real_rows = short_scan.real_rows   # a JIT function: the kernel calls it by a global name

    @triton.jit
    def _one_chunk_kernel(
        x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, y_ptr, state_ptr, count_ptr,
        rows, head_dim, state_size, heads_per_group,
        sx_b, sx_t, sdt_b, sdt_t, sdt_h, sa, sb_b, sb_t, sc_b, sc_t, sd, sy_b, sy_t,
        ss_b, ss_h, ss_p, ss_n,
        T_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_P: tl.constexpr, COUNTED: tl.constexpr,
    ):
        # Program (head_dim block, head, sequence). 64-bit offsets: a large batch's stride times its index
        # can pass 2**31 elements.
        pb = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        bi = tl.program_id(2).to(tl.int64)
        g = h // heads_per_group
        t = tl.arange(0, T_PAD)
        t_out = t < rows                                  # the rows of y to write
        t_in = t < real_rows(count_ptr, rows, COUNTED)   # the rows to read: zeros past them
        n = tl.arange(0, N_PAD)
        n_in = n < state_size
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        p_in = p < head_dim
        a = tl.load(a_ptr + h * sa).to(tl.float32)
        d = tl.load(d_ptr + h * sd).to(tl.float32)
        dt = tl.load(dt_ptr + bi * sdt_b + h * sdt_h + t * sdt_t, mask=t_in, other=0.0).to(tl.float32)
        cs = tl.cumsum(dt * a, 0)                                                     # (T,)
        tn = t_in[:, None] & n_in[None, :]
        b = tl.load(b_ptr + bi * sb_b + g * state_size + t[:, None] * sb_t + n[None, :], mask=tn, other=0.0)
        c = tl.load(c_ptr + bi * sc_b + g * state_size + t[:, None] * sc_t + n[None, :], mask=tn, other=0.0)
        tp = t_in[:, None] & p_in[None, :]
        x = tl.load(x_ptr + bi * sx_b + h * head_dim + t[:, None] * sx_t + p[None, :], mask=tp, other=0.0)

        # y: the causal, decayed scores times x, plus the skip term.
        scores = tl.dot(c, tl.trans(b))                                               # (T, T) fp32
        causal = t[:, None] >= t[None, :]
        # exp of -inf above the diagonal, where cs_t - cs_s would be positive and could overflow
        decay = tl.exp(tl.where(causal, cs[:, None] - cs[None, :], float("-inf")))
        scores = scores * decay * dt[None, :]
        y = tl.dot(scores.to(x.dtype), x) + d * x.to(tl.float32)                      # (T, P)
        tl.store(y_ptr + bi * sy_b + h * head_dim + t[:, None] * sy_t + p[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=t_out[:, None] & p_in[None, :])

        # The state after the last row: x^T times B, each row scaled by its decay to the end and its dt.
        # cs at the last row (padded rows add dt = 0), as the chunked scan reads its chunk's end
        last = tl.sum(tl.where(t == T_PAD - 1, cs, 0.0), 0)
        to_end = tl.exp(last - cs) * dt                                               # (T,)
        b_scaled = (b.to(tl.float32) * to_end[:, None]).to(x.dtype)
        state = tl.dot(tl.trans(x), b_scaled)                                         # (P, N)
        dst = state_ptr + bi * ss_b + h * ss_h + p[:, None] * ss_p + n[None, :] * ss_n
        tl.store(dst, state.to(state_ptr.dtype.element_ty), mask=p_in[:, None] & n_in[None, :])
else:
    _one_chunk_kernel = None   # `applies` is False without Triton


def one_chunk_scan(hs: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, ssm_state: torch.Tensor, out: torch.Tensor, n_groups: int, head_dim: int,
                   count: torch.Tensor | None = None, config: dict | None = None) -> None:
    """The fresh scan of every row of `hs` into `out` (y) and `ssm_state` (the state after the last row).

    `applies(hs, dt, B, C, ssm_state, out)` must hold; arguments as
    `short_scan.short_scan` takes them (and `short_scan.reference` is what
    both compute, up to rounding), `count` included. `config` overrides `launch_config`'s
    defaults (for tests and tuning).
    """
    rows, state_size = hs.shape[1], ssm_state.shape[-1]
    cfg = {**launch_config(rows, state_size, head_dim), **(config or {})}
    short_scan.launch_scan(_one_chunk_kernel, "one_chunk_scan", hs, dt, A, B, C, D, ssm_state, out, n_groups,
                           head_dim, count, cfg["BLOCK_P"], T_PAD=max(MIN_TILE, short_scan.pow2(rows)),
                           N_PAD=max(MIN_TILE, short_scan.pow2(state_size)), num_warps=cfg["num_warps"])
    LAUNCHES["one_chunk_scan"] += 1
