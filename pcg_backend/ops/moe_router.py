"""`pcg::moe_router`: an MoE block's top-k router (logits, top-k, softmax over the k) in one Triton launch.

GraniteMoe's routers (GraniteMoeHybrid's among them) compute

    logits = F.linear(hidden, weight).float()          # (tokens, experts)
    top_logits, top_index = logits.topk(k, dim=-1)
    top_weights = softmax(top_logits, dim=-1).type_as(hidden)

which on a GPU is a cuBLAS GEMM over a 64-row weight, a cast, PyTorch's
top-k (a select kernel and a bitonic sort) and the softmax: five or six
launches and about 18 µs per layer for a few tokens on an H200, 0.7 ms of a
40-layer Granite-4.0-H-Tiny prefill. Here program (token block, expert
block) computes 16 tokens' logits for 16 experts (Granite's 64 × 1536
weight is read by four SMs at once), rounds them to the hidden states'
dtype as the GEMM's output is rounded and stores them; the last program of
a token block to arrive (an arrival counter, shared with
`skinny_gemm`'s split-K launches) picks the k largest by repeated maxima
and normalises them, in registers. One launch in all. (With 16 experts or
fewer, or more than `skinny_gemm.ARRIVAL_SLOTS` token blocks, one program
per token block does it all.)

Ties: of equal logits the lower expert id is taken first. PyTorch's top-k
leaves the order of equal values unspecified; where a tie straddles the
k-th place the two may choose different experts. The logits' own
accumulation order differs from cuBLAS's too, so near-ties can fall either
way: bf16 noise, as for any reordered sum.

A row whose logits are all NaN selects no expert: its ids are `experts`,
an id outside the experts, which `pcg::moe_experts` skips. (On a GPU a
NaN logit among others is passed over; HF's top-k would take it first.)
Each program reads only its own token rows, so a padded row never changes a
real one: the op is row-wise (`analyse/padding_rule.py`).

The kernel serves CUDA, bf16 or fp16 hidden states and weight of one dtype,
2-D hidden states whose rows are contiguous, at most MAX_EXPERTS experts. Any
other call (fp32, a CPU run) runs HF's arithmetic in torch, bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import skinny_gemm
from .lean_op import lean_op

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build ships without Triton
    triton = None

# The logits of a block of tokens live in registers: BLOCK_T x padded experts fp32 values.
MAX_EXPERTS = 256
BLOCK_T = 16
BLOCK_K = 128
# Experts per program: the least tl.dot takes, so that Granite's 64 experts spread over 4 SMs.
E_BLOCK = 16
# Calls per path, counted on the host (at capture, not at replay): tests read them.
LAUNCHES = {"triton": 0, "torch": 0}


def supported(hidden: torch.Tensor, weight: torch.Tensor, top_k: int) -> bool:
    """True if the Triton kernel takes this call (see the module docstring)."""
    return (triton is not None and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == hidden.dtype and hidden.dim() == 2 and weight.dim() == 2
            and hidden.shape[1] == weight.shape[1] and hidden.stride(-1) == 1 and weight.stride(-1) == 1
            and 1 <= top_k <= weight.shape[0] <= MAX_EXPERTS and weight.device == hidden.device)


def reference(hidden: torch.Tensor, weight: torch.Tensor, top_k: int):
    """HF's router arithmetic: (logits fp32, top-k weights in hidden's dtype, top-k expert ids)."""
    logits = F.linear(hidden, weight).float()
    top_logits, top_index = logits.topk(top_k, dim=-1)
    return logits, torch.softmax(top_logits, dim=-1).type_as(hidden), top_index


if triton is not None:

    @triton.jit
    def _top_k(vals, weights_ptr, ids_ptr, rt, t_in, re, E: tl.constexpr, E_PAD: tl.constexpr,
               TOPK: tl.constexpr, K_PAD: tl.constexpr):
        # The k largest of each row of `vals` (E_PAD logits, -inf past the experts) by repeated maxima,
        # then the softmax over them. An expert once taken is never taken again, even where fewer than
        # k logits are above -inf (torch.topk's ids are distinct too).
        rj = tl.arange(0, K_PAD)
        picked = tl.zeros((rt.shape[0], K_PAD), dtype=tl.float32)
        ids = tl.zeros((rt.shape[0], K_PAD), dtype=tl.int32)
        taken = tl.zeros((rt.shape[0], E_PAD), dtype=tl.int32)
        for j in tl.static_range(TOPK):
            best = tl.max(tl.where(taken == 0, vals, float("-inf")), 1)
            # The lowest free expert id among equal maxima; none (E_PAD) when no logit equals the
            # maximum (a row of NaN).
            idx = tl.min(tl.where((vals == best[:, None]) & (taken == 0), re[None, :], E_PAD), 1)
            picked = tl.where(rj[None, :] == j, best[:, None], picked)
            ids = tl.where(rj[None, :] == j, idx[:, None], ids)
            taken = tl.where(re[None, :] == idx[:, None], 1, taken)
        # softmax over the k picked logits; the first is their maximum.
        p = tl.where(rj[None, :] < TOPK, tl.exp(picked - tl.max(picked, 1)[:, None]), 0.0)
        weights = p / tl.sum(p, 1)[:, None]
        ids = tl.minimum(ids, E)   # past the experts (a NaN row's): E, an id the experts op skips
        out = rt[:, None].to(tl.int64) * TOPK + rj[None, :]
        keep = t_in[:, None] & (rj[None, :] < TOPK)
        tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=keep)
        tl.store(ids_ptr + out, ids.to(tl.int64), mask=keep)

    @triton.jit
    def _router_kernel(x_ptr, w_ptr, logits_ptr, weights_ptr, ids_ptr, arrivals_ptr, T, H, sxt, swe,
                       E: tl.constexpr, E_PAD: tl.constexpr, E_BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                       TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (t, s) computes the logits of BLOCK_T tokens for experts s * E_BLOCK onwards; the last
        # of a token block's SPLITS programs to arrive picks the top k over all of them and resets the
        # block's arrival counter for the next launch. Split over the experts, the router's weight is
        # read by SPLITS SMs at once instead of one.
        pid_t = tl.program_id(0)
        rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        re = tl.program_id(1) * E_BLOCK + tl.arange(0, E_BLOCK)
        rk = tl.arange(0, BLOCK_K)
        t_in = rt < T
        e_in = re < E
        acc = tl.zeros((BLOCK_T, E_BLOCK), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + rk
            k_in = kk < H
            x = tl.load(x_ptr + rt[:, None].to(tl.int64) * sxt + kk[None, :], mask=t_in[:, None] & k_in[None, :],
                        other=0.0)
            w = tl.load(w_ptr + re[None, :] * swe + kk[:, None], mask=e_in[None, :] & k_in[:, None], other=0.0)
            acc = tl.dot(x, w, acc)
        # The GEMM's output is rounded to the hidden states' dtype before HF's `.float()`.
        logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(logits_ptr + rt[:, None].to(tl.int64) * E + re[None, :], logits,
                 mask=t_in[:, None] & e_in[None, :])
        if SPLITS == 1:
            # One program holds all the experts' logits (E_BLOCK is E_PAD): pick from the registers.
            _top_k(tl.where(e_in[None, :], logits, float("-inf")), weights_ptr, ids_ptr, rt, t_in, re,
                   E, E_PAD, TOPK, K_PAD)
        else:
            # Every thread's logits are stored before the counter moves (barrier), and the counter's
            # acquire-release makes all earlier programs' logits visible to the last one.
            tl.debug_barrier()
            arrived = tl.atomic_add(arrivals_ptr + pid_t, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLITS - 1:
                every = tl.arange(0, E_PAD)
                # .cg: read from L2, where the other programs' logits are, never a stale L1 line.
                vals = tl.load(logits_ptr + rt[:, None].to(tl.int64) * E + every[None, :],
                               mask=t_in[:, None] & (every < E)[None, :], other=float("-inf"), cache_modifier=".cg")
                _top_k(vals, weights_ptr, ids_ptr, rt, t_in, every, E, E_PAD, TOPK, K_PAD)
                tl.atomic_xchg(arrivals_ptr + pid_t, 0, sem="relaxed", scope="gpu")


def triton_router(hidden: torch.Tensor, weight: torch.Tensor, top_k: int):
    """(logits, weights, ids) through the kernel; the caller checks `supported` first."""
    tokens, width = hidden.shape
    experts = weight.shape[0]
    logits = torch.empty(tokens, experts, dtype=torch.float32, device=hidden.device)
    weights = torch.empty(tokens, top_k, dtype=hidden.dtype, device=hidden.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=hidden.device)
    if tokens == 0:
        return logits, weights, ids
    blocks = triton.cdiv(tokens, BLOCK_T)
    # Splitting needs an arrival counter per token block (shared with pcg::skinny_linear's split-K
    # launches, which run on the same stream); past the counters' number, one program per block.
    splits = triton.cdiv(experts, E_BLOCK) if blocks <= skinny_gemm.ARRIVAL_SLOTS else 1
    e_block = E_BLOCK if splits > 1 else max(16, triton.next_power_of_2(experts))
    arrivals = skinny_gemm.arrival_counters(hidden.device, blocks) if splits > 1 else logits
    # Triton launches on the current device; the tensors may live on another one. (CPU tensors
    # reach here only under Triton's interpreter, TRITON_INTERPRET=1.)
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _router_kernel[(blocks, splits)](
            hidden, weight, logits, weights, ids, arrivals, tokens, width, hidden.stride(0), weight.stride(0),
            E=experts, E_PAD=max(16, triton.next_power_of_2(experts)), E_BLOCK=e_block, SPLITS=splits,
            TOPK=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, num_warps=4)
    return logits, weights, ids


@lean_op("pcg::moe_router", mutates_args=())
def moe_router(hidden: torch.Tensor, weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    if supported(hidden, weight, top_k):
        LAUNCHES["triton"] += 1
        return triton_router(hidden, weight, top_k)
    LAUNCHES["torch"] += 1
    return reference(hidden, weight, top_k)


@torch.library.register_fake("pcg::moe_router")
def _moe_router_fake(hidden, weight, top_k):
    lead = hidden.shape[:-1]
    return (hidden.new_empty(*lead, weight.shape[0], dtype=torch.float32), hidden.new_empty(*lead, top_k),
            hidden.new_empty(*lead, top_k, dtype=torch.int64))
