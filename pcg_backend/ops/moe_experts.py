"""`pcg::moe_experts`: a gated MoE block's experts for a few tokens, in three Triton launches and no sort.

HF's `grouped_mm` experts path sorts the (token, expert) pairs by expert,
counts them (`histc`, `cumsum`), gathers the tokens, runs two grouped GEMMs
with cuBLAS's CUTLASS kernel, weights the rows and puts them back in token
order: about twenty kernels per MoE layer. For a prefill of 16 tokens of
Granite-4.0-H-Tiny's shape on an H200 the grouped GEMMs took 51 µs per call,
at half the copy bandwidth, and the sorts and gathers as much again as the
GEMMs' reads should cost.

Here one program per expert lists the pairs routed to it (a running
`cumsum` over the top-k ids; no sort), then:

* the up kernel: program (expert, block of intermediate columns) gathers
  its expert's tokens straight from the hidden states, multiplies them by
  the gate and up rows of that expert's weight, and stores
  `silu(gate) * up` for each pair;
* the down kernel: program (expert, block of hidden columns) multiplies
  those rows by the expert's down weight, scales each by its routing weight
  and stores it at the pair's row;
* the combine kernel: program (token, block of hidden columns) sums the
  token's k rows in fp32, in k order as HF's sum does, and rounds once.

An expert no token chose costs one program that reads a counter and
returns, so a step reads only the chosen experts' weights. Each product is
rounded where HF's path rounds it (the GEMM outputs and the SiLU to the
weights' dtype, its product with `up` too, the routing-weighted rows to the
wider of the weights' and the routing weights' dtypes), so the two differ
only in the order of fp32 sums (on an H200 they gave the same bits). A pair
whose expert id is outside the experts (an expert-parallel sentinel) adds
zero, as HF's grouped path makes it: the combine kernel skips its row.

The kernels serve CUDA, bf16 or fp16 weights and hidden states of one dtype
with rows of unit stride, matching shapes, at most MAX_TOKENS tokens;
anything else (a long prefill, fp32, a CPU run) goes to the HF
implementation the adapter wrapped (`ORIGINAL_EXPERTS`), over the same
weights. That fallback is HF's eager code, which for fp32 on CUDA reads the
experts' token counts on the host: a capture of it fails pcg's sync probe
and the piece runs eagerly, with the reason in the report
(`cudagraph.py`). Padded rows route like any token and touch only their own
output rows, so the op is row-wise (`analyse/padding_rule.py`).
"""

from __future__ import annotations

import contextlib

import torch

from . import skinny_gemm
from .lean_op import lean_op

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build ships without Triton
    triton = None

# Up to this many tokens the kernels run; above it HF's grouped GEMMs, whose larger tiles should win
# back their sorts on the device. Measured on an H200 in CUDA graphs up to 512 tokens (2.1x faster than
# HF there). Above the largest bucket the op runs outside CUDA graphs, where a 600-token GraniteMoeHybrid
# prefill with HF's path took 130 ms against HF eager's 125 (not profiled), hence the margin. The
# kernels take any count (more tokens only mean more row tiles per expert); 513-4096 were not timed.
MAX_TOKENS = 4096
# HF implementations by name ("grouped_mm", ...), kept by the adapter for what the kernels do not take.
ORIGINAL_EXPERTS: dict = {}
# Calls per path, counted on the host (at capture, not at replay): tests read them.
LAUNCHES = {"triton": 0, "original": 0}


def supported(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """True if the Triton kernels take this call (see the module docstring)."""
    if not (triton is not None and hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16)
            and gate_up.dtype == hidden.dtype and down.dtype == hidden.dtype and hidden.dim() == 2
            and top_k_index.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3
            and hidden.shape[0] <= MAX_TOKENS and gate_up.stride(-1) == 1 and down.stride(-1) == 1):
        return False
    experts, inter2, width = gate_up.shape
    return (top_k_index.shape == top_k_weights.shape and top_k_index.shape[0] == hidden.shape[0]
            and width == hidden.shape[1] and tuple(down.shape) == (experts, width, inter2 // 2) and inter2 % 2 == 0
            and len({t.device for t in (hidden, top_k_index, top_k_weights, gate_up, down)}) == 1)


if triton is not None:

    @triton.jit
    def _route_kernel(ids_ptr, pairs_ptr, counts_ptr, S, BLOCK: tl.constexpr):
        # Program e writes the indices of the pairs routed to expert e, in pair order, to row e of
        # `pairs` (S wide: an expert can hold every pair), and their number to counts[e].
        e = tl.program_id(0)
        total = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), 0)
        for s0 in range(0, S, BLOCK):
            offs = s0 + tl.arange(0, BLOCK)
            hit = (tl.load(ids_ptr + offs, mask=offs < S, other=-1) == e).to(tl.int32)
            place = total + tl.cumsum(hit, 0) - 1
            tl.store(pairs_ptr + e.to(tl.int64) * S + place, offs, mask=hit > 0)
            total += tl.sum(hit, 0)
        tl.store(counts_ptr + e, total)

    @triton.jit
    def _up_kernel(x_ptr, w_ptr, h_ptr, pairs_ptr, counts_ptr, S, I, H, sxt, swe, swn,
                   TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # h[pair, n] = silu(x[token] . gate[e, n]) * (x[token] . up[e, n]) for the pairs of expert e.
        e = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_in = rn < I
        w_e = w_ptr + e.to(tl.int64) * swe
        count = tl.load(counts_ptr + e)
        for m0 in range(0, count, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_in = rows < count
            pair = tl.load(pairs_ptr + e.to(tl.int64) * S + rows, mask=row_in, other=0)
            token = pair // TOPK
            gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + rk
                k_in = kk < H
                x = tl.load(x_ptr + token[:, None] * sxt + kk[None, :], mask=row_in[:, None] & k_in[None, :],
                            other=0.0)
                w_mask = n_in[None, :] & k_in[:, None]
                wg = tl.load(w_e + rn[None, :] * swn + kk[:, None], mask=w_mask, other=0.0)
                wu = tl.load(w_e + (rn + I)[None, :] * swn + kk[:, None], mask=w_mask, other=0.0)
                gate = tl.dot(x, wg, gate)
                up = tl.dot(x, wu, up)
            # HF's roundings: each GEMM's output, the SiLU, and its product with up.
            out_ty = h_ptr.dtype.element_ty
            g = gate.to(out_ty).to(tl.float32)
            act = (g * tl.sigmoid(g)).to(out_ty).to(tl.float32)
            h = (act * up.to(out_ty).to(tl.float32)).to(out_ty)
            tl.store(h_ptr + pair[:, None] * I + rn[None, :], h, mask=row_in[:, None] & n_in[None, :])

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, y_ptr, weights_ptr, pairs_ptr, counts_ptr, S, H, I, swe, swn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[pair, n] = (h[pair] . down[e, n]) * routing_weight[pair] for the pairs of expert e.
        e = tl.program_id(0)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_in = rn < H
        w_e = w_ptr + e.to(tl.int64) * swe
        count = tl.load(counts_ptr + e)
        for m0 in range(0, count, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_in = rows < count
            pair = tl.load(pairs_ptr + e.to(tl.int64) * S + rows, mask=row_in, other=0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                kk = k0 + rk
                k_in = kk < I
                h = tl.load(h_ptr + pair[:, None] * I + kk[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
                w = tl.load(w_e + rn[None, :] * swn + kk[:, None], mask=n_in[None, :] & k_in[:, None], other=0.0)
                acc = tl.dot(h, w, acc)
            # HF rounds the GEMM's output to the weights' dtype, then multiplies by the routing weight in
            # the wider of the two dtypes (y's, fp32 when the routing weights come in fp32).
            scale = tl.load(weights_ptr + pair, mask=row_in, other=0.0).to(tl.float32)
            y = (acc.to(h_ptr.dtype.element_ty).to(tl.float32) * scale[:, None]).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + pair[:, None] * H + rn[None, :], y, mask=row_in[:, None] & n_in[None, :])

    @triton.jit
    def _combine_kernel(y_ptr, ids_ptr, out_ptr, H, E, TOPK: tl.constexpr, BLOCK_N: tl.constexpr):
        # out[t, n] = sum over j of y[t * TOPK + j, n], in j order and fp32, skipping ids outside the experts
        # (their rows of y were never written).
        t = tl.program_id(0).to(tl.int64)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = rn < H
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in tl.static_range(TOPK):
            e = tl.load(ids_ptr + t * TOPK + j)
            ok = (e >= 0) & (e < E)
            acc += tl.load(y_ptr + (t * TOPK + j) * H + rn, mask=n_in & ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + rn, acc.to(out_ptr.dtype.element_ty), mask=n_in)


def _block_m(tokens: int) -> int:
    # An expert holds at most `tokens` pairs (top-k ids are distinct per token; repeated ids only make
    # the kernels loop over more tiles); a tile of 16 rows is tl.dot's least.
    return 16 if tokens <= 16 else 32 if tokens <= 64 else 64


# Tiles measured on an H200 at Granite-4.0-H-Tiny's shape (tools/moe_experts.py --search): at 1 and 16
# tokens no other width, depth or pipeline came out more than about 5 % faster, within the spread of the
# routings drawn. The up kernel's tile holds BLOCK_N gate rows and BLOCK_N up rows.
UP_TILE = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
DOWN_TILE = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
ROUTE_BLOCK = 1024
COMBINE_BLOCK = 512


def _shared_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return skinny_gemm._device_facts(device.index if device.index is not None else torch.cuda.current_device())[0]


def _fit(tile: dict, block_m: int, weight_tiles: int, shared: int | None) -> dict:
    """`tile` with as many pipeline stages as the SM's shared memory holds at this BLOCK_M (at most the tile's)."""
    if shared is None:
        return tile
    stage = (block_m + weight_tiles * tile["BLOCK_N"]) * tile["BLOCK_K"] * 2
    return {**tile, "num_stages": max(1, min(tile["num_stages"], shared // stage))}


def triton_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The experts' output (tokens, hidden) through the kernels; the caller checks `supported` first."""
    tokens, hidden_dim = hidden.shape
    experts, inter2, _ = gate_up.shape
    inter = inter2 // 2
    top_k = top_k_index.shape[-1]
    pairs_total = tokens * top_k
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    # The kernels read ids and weights at unit stride: a column sliced from a wider top-k is not.
    ids = top_k_index.reshape(-1).contiguous()
    routing = top_k_weights.reshape(-1).contiguous()
    pairs = torch.empty(experts, pairs_total, dtype=torch.int32, device=hidden.device)
    counts = torch.empty(experts, dtype=torch.int32, device=hidden.device)
    h = torch.empty(pairs_total, inter, dtype=hidden.dtype, device=hidden.device)
    # A pair with an id outside the experts is listed by no program: its row stays unwritten, and the
    # combine kernel skips it.
    y = torch.empty(pairs_total, hidden_dim, dtype=torch.promote_types(hidden.dtype, top_k_weights.dtype),
                    device=hidden.device)
    out = torch.empty(tokens, hidden_dim, dtype=hidden.dtype, device=hidden.device)
    if tokens == 0:
        return out
    block_m = _block_m(tokens)
    shared = _shared_memory(hidden.device)
    up_tile = _fit(UP_TILE, block_m, 2, shared)
    down_tile = _fit(DOWN_TILE, block_m, 1, shared)
    # Triton launches on the current device; the tensors may live on another one. (CPU tensors
    # reach here only under Triton's interpreter, TRITON_INTERPRET=1.)
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _route_kernel[(experts,)](ids, pairs, counts, pairs_total, BLOCK=min(ROUTE_BLOCK, triton.next_power_of_2(
            max(pairs_total, 16))))
        _up_kernel[(experts, triton.cdiv(inter, up_tile["BLOCK_N"]))](
            x, gate_up, h, pairs, counts, pairs_total, inter, hidden_dim, x.stride(0), gate_up.stride(0),
            gate_up.stride(1), TOPK=top_k, BLOCK_M=block_m, **up_tile)
        _down_kernel[(experts, triton.cdiv(hidden_dim, down_tile["BLOCK_N"]))](
            h, down, y, routing, pairs, counts, pairs_total, hidden_dim, inter, down.stride(0), down.stride(1),
            BLOCK_M=block_m, **down_tile)
        _combine_kernel[(tokens, triton.cdiv(hidden_dim, COMBINE_BLOCK))](
            y, ids, out, hidden_dim, experts, TOPK=top_k, BLOCK_N=COMBINE_BLOCK, num_warps=4)
    return out


class GatedExperts(torch.nn.Module):
    """The attributes HF's experts implementations read, over the op's weights (a gated SiLU MLP per expert)."""

    has_gate = True
    has_bias = False
    is_transposed = False
    is_concatenated = True
    has_post_expert_norm = False
    # So that HF's paths skip an id past the experts (the router op's id for a NaN row) rather than
    # index out of bounds; the adapter never routes expert-parallel experts here.
    _is_expert_parallel = True

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down
        self.num_experts = gate_up.shape[0]
        self.act_fn = torch.nn.SiLU()

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.act_fn(gate) * up


@lean_op("pcg::moe_experts", mutates_args=())
def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, impl: str) -> torch.Tensor:
    if supported(hidden, top_k_index, top_k_weights, gate_up, down):
        LAUNCHES["triton"] += 1
        return triton_experts(hidden, top_k_index, top_k_weights, gate_up, down)
    if impl not in ORIGINAL_EXPERTS:
        raise RuntimeError(f"pcg::moe_experts: no HF experts implementation {impl!r} was wrapped in this process "
                           f"(known: {sorted(ORIGINAL_EXPERTS)})")
    LAUNCHES["original"] += 1
    return ORIGINAL_EXPERTS[impl](GatedExperts(gate_up, down), hidden, top_k_index, top_k_weights)


@torch.library.register_fake("pcg::moe_experts")
def _moe_experts_fake(hidden, top_k_index, top_k_weights, gate_up, down, impl):
    return hidden.new_empty(hidden.shape)
