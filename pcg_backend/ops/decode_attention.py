"""Attention for one query row per sequence (a decode step), in one or two Triton launches.

HF's SDPA path for a decode step over a cache repeats each KV head for its
query heads (`repeat_kv`: two copies of the whole cache per layer) and hands
SDPA a boolean 4-D mask, which its memory-efficient kernel turns into an
additive bias first (three fills and a `where`). Eight kernels per
attention layer, and on an H200 at the 9B NemotronH's shape (40 query
heads, 8 KV heads of 128) 14 µs per layer over 64 keys, 46 µs over 600 and
182 µs at batch 8 over 600, where SDPA without a mask takes 5-14 µs.

`decode_attention` reads the cache where it lies: one program per (sequence,
KV head, split of the keys) scores all the query heads that share that KV
head against a block of keys at a time, with the mask applied as it loads
(boolean: False hides a key; float: added to the score), and keeps an
online softmax in fp32. Where the keys are split, a second kernel merges
the splits' partial sums. The result is written straight into the
attention op's output, in (batch, query, heads, head_dim) layout.

It differs from SDPA's kernels only in the order of the fp32 sums (bf16
noise). A query row whose every key is masked gets zeros. `applies` says
where it runs: CUDA, bf16 or fp16, one query row, at most 256 per head.
"""

from __future__ import annotations

import contextlib
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build ships without Triton
    triton = None

# Launches, counted on the host (at capture, not replay): tests read them.
LAUNCHES = {"decode_attention": 0}

MAX_HEAD_DIM = 256
# Keys per program: a block at a time, and enough splits of a long cache to give every SM work.
BLOCK_KEYS = 64
TARGET_PROGRAMS = 132


def applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """True where `decode_attention` computes this call: Triton, CUDA tensors, and shapes it takes."""
    devices_ok = query.is_cuda and key.is_cuda and value.is_cuda and (mask is None or mask.is_cuda)
    return triton is not None and devices_ok and shapes_fit(query, key, value, mask)


def shapes_fit(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """(batch, heads, 1, D) half-precision queries over (batch, kv_heads, L, D) keys and values, D <= 256,
    heads a multiple of kv_heads, and a mask of None or (batch or 1, heads or 1, 1, L), boolean or float."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.shape[2] != 1:
        return False
    batch, heads, _, dim = query.shape
    if batch == 0 or heads == 0 or dim == 0:
        return False
    if key.shape[0] != batch or value.shape[:3] != key.shape[:3] or key.shape[-1] != dim or value.shape[-1] != dim:
        return False
    if query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if dim > MAX_HEAD_DIM or key.shape[1] == 0 or heads % key.shape[1] or key.shape[2] == 0:
        return False
    if mask is not None:
        if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
            return False
        if mask.shape[2] != 1 or mask.shape[3] != key.shape[2]:
            return False
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            return False
    return True


def splits_for(batch: int, kv_heads: int, keys: int) -> int:
    """How many parts a cache of `keys` is cut into: enough programs for the SMs, whole blocks each."""
    blocks = -(-keys // BLOCK_KEYS)
    want = -(-TARGET_PROGRAMS // (batch * kv_heads))
    return max(1, min(blocks, want))


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, part_acc_ptr, part_ml_ptr,
        kv_heads, keys, keys_per_split, scale_log2,
        sqb, sqh, sqd, skb, skh, skl, skd, svb, svh, svl, svd, smb, smh, sml, sob, soh, sod,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        BLOCK: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr,
    ):
        # Program (sequence x KV head, split): all GROUP query heads of one KV head over a range of keys.
        pid, split = tl.program_id(0), tl.program_id(1)
        # 64-bit offsets: a large static cache's batch stride times the batch index passes 2**31 elements.
        b, kvh = (pid // kv_heads).to(tl.int64), (pid % kv_heads).to(tl.int64)
        g = tl.arange(0, GROUP_PAD)
        heads = kvh * GROUP + g
        real_head = g < GROUP
        d = tl.arange(0, DIM_PAD)
        real_dim = d < DIM
        q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :] * sqd,
                    mask=real_head[:, None] & real_dim[None, :], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, keys)
        for first in range(start, end, BLOCK):
            cols = first + tl.arange(0, BLOCK)
            real_col = cols < end
            kv_mask = real_col[:, None] & real_dim[None, :]
            k = tl.load(k_ptr + b * skb + kvh * skh + cols[:, None] * skl + d[None, :] * skd, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2          # (GROUP_PAD, BLOCK), in log2 units
            visible = real_head[:, None] & real_col[None, :]
            if MASK == 1:   # boolean: False hides the key
                allowed = tl.load(m_ptr + b * smb + heads[:, None] * smh + cols[None, :] * sml, mask=visible, other=0)
                visible = visible & (allowed != 0)
            if MASK == 2:   # additive
                bias = tl.load(m_ptr + b * smb + heads[:, None] * smh + cols[None, :] * sml, mask=visible, other=0.0)
                s = s + bias.to(tl.float32) * 1.4426950408889634
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 instead, so exp2 gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - shift)
            p = tl.exp2(s - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * svb + kvh * svh + cols[:, None] * svl + d[None, :] * svd, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLIT:
            # Partial sums of this split, merged by _merge_kernel: acc (b, heads, splits, DIM_PAD), (m, l).
            nsplit = tl.num_programs(1)
            row = (b * kv_heads * GROUP + heads) * nsplit + split
            tl.store(part_acc_ptr + row[:, None] * DIM_PAD + d[None, :], acc, mask=real_head[:, None])
            tl.store(part_ml_ptr + row * 2, m_i, mask=real_head)
            tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=real_head)
        else:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(o_ptr + b * sob + heads[:, None] * soh + d[None, :] * sod, out.to(o_ptr.dtype.element_ty),
                     mask=real_head[:, None] & real_dim[None, :])

    @triton.jit
    def _merge_kernel(part_acc_ptr, part_ml_ptr, o_ptr, heads, nsplit, sob, soh, sod,
                      DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr):
        # Program (sequence x head): the softmax-weighted sum of its splits' partial results.
        pid = tl.program_id(0).to(tl.int64)
        b, h = pid // heads, pid % heads
        s = tl.arange(0, SPLIT_PAD)
        real = s < nsplit
        rows = pid * nsplit + s
        m = tl.load(part_ml_ptr + rows * 2, mask=real, other=float("-inf"))
        l_s = tl.load(part_ml_ptr + rows * 2 + 1, mask=real, other=0.0)
        top = tl.max(m, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(m - top)
        d = tl.arange(0, DIM_PAD)
        acc = tl.load(part_acc_ptr + rows[:, None] * DIM_PAD + d[None, :], mask=real[:, None], other=0.0)
        total = tl.sum(l_s * w, 0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(o_ptr + b * sob + h * soh + d * sod, out.to(o_ptr.dtype.element_ty), mask=d < DIM)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     out: torch.Tensor, scale: float) -> None:
    """softmax(q k^T * scale [+ mask]) v for one query row, into `out` (batch, 1, heads, head_dim).

    `applies(query, key, value, mask)` must hold. A KV head serves `heads //
    kv_heads` consecutive query heads, as HF's `repeat_kv` pairs them.
    """
    batch, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    dim_pad = max(16, triton.next_power_of_2(dim))
    nsplit = splits_for(batch, kv_heads, keys)
    blocks = -(-keys // BLOCK_KEYS)
    keys_per_split = -(-blocks // nsplit) * BLOCK_KEYS
    nsplit = -(-keys // keys_per_split)   # no split left without keys
    if mask is None:
        mask_kind, mask_arg, mask_strides = 0, query, (0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        mask_arg = mask
        mask_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(1) if mask.shape[1] > 1 else 0,
                        mask.stride(3))
    if nsplit > 1:
        part_acc = torch.empty(batch * heads * nsplit, dim_pad, device=query.device, dtype=torch.float32)
        part_ml = torch.empty(batch * heads * nsplit, 2, device=query.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out
    o = out[:, 0]   # (batch, heads, dim)
    LAUNCHES["decode_attention"] += 1
    with torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext():
        _decode_attention_kernel[(batch * kv_heads, nsplit)](
            query, key, value, mask_arg, o, part_acc, part_ml,
            kv_heads, keys, keys_per_split, scale * math.log2(math.e),
            query.stride(0), query.stride(1), query.stride(3),
            *key.stride()[:2], key.stride(2), key.stride(3),
            *value.stride()[:2], value.stride(2), value.stride(3),
            *mask_strides, *o.stride(),
            GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, DIM_PAD=dim_pad,
            BLOCK=BLOCK_KEYS, MASK=mask_kind, SPLIT=nsplit > 1, num_warps=4,
        )
        if nsplit > 1:
            _merge_kernel[(batch * heads,)](part_acc, part_ml, o, heads, nsplit, *o.stride(),
                                            DIM=dim, DIM_PAD=dim_pad, SPLIT_PAD=max(2, triton.next_power_of_2(nsplit)),
                                            num_warps=4)


def reference(query, key, value, mask, scale):
    """What `decode_attention` computes, in fp32 torch (for tests): (batch, 1, heads, head_dim)."""
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    s = query.float() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2).to(query.dtype)
