"""`pcg::gated_rms_norm`: a Mamba2 decode step's gated RMSNorm in one kernel.

After the SSM, HF's Mamba2 mixers apply a gated, grouped RMSNorm and then
`out_proj`:

    h = y.float() * silu(z.float());  h /= rms(h) per group of `group_size`
    out_proj(norm.weight * h.to(y.dtype))

Inductor compiles the norm into two kernels (a reduction and a pointwise
pass), so a decode step of the 9B NemotronH spends 54 small kernels, each
about 1.2 µs of GPU time with its launch gap, on the 27 norms.

`gated_rms_norm` is the norm in one Triton kernel (a program per row and
group), with HF's roundings: the normalised value is cast to the input
dtype before the weight multiplies it. Where the kernel does not apply
(`kernel_applies`: CPU, no Triton, fp32, a weight of another dtype, a group
above MAX_GROUP) it runs `reference`, HF's own arithmetic; the adapter
calls the op only where the kernel applies, decided at trace time.

Fusing the norm into `out_proj`'s skinny GEMM as well (gating, weighting
and summing squares as each K step loads, and scaling each group's partial
product afterwards) would save a second kernel, but the kernel built that
way ran a 10240 x 4480 projection in 340 µs on the H200 against 25 µs
unfused: the computed input tile leaves the pipelined loop that streams the
weight. The norm stays a kernel of its own.

The Mamba2 adapter (`hf/adapters/mamba2.py`) calls `gated_rms_norm` in a
decode step where the norm's class computes exactly `reference`
(`computes_reference`, checked when the modeling module is patched, outside
any trace) and the kernel applies.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from .lean_op import lean_op

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build ships without Triton
    triton = None

# Launches per path, counted on the host (at capture, not replay): tests read them.
LAUNCHES = {"norm_kernel": 0, "reference": 0}


def reference(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """HF's gated RMSNorm (norm after the gate, grouped), in HF's order of operations and roundings."""
    h = y.float() * F.silu(z.float())
    groups = h.view(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
    return weight * groups.view(h.shape).to(y.dtype)


def group_size(norm: torch.nn.Module) -> int:
    """The width a gated norm normalises over: its `group_size`, or its whole width where it has none
    (transformers 5.17's Bamba, GraniteMoeHybrid and Mamba2 norms normalise the whole width)."""
    return getattr(norm, "group_size", None) or norm.weight.shape[-1]


def _small_instance(norm_class: type) -> torch.nn.Module:
    """`norm_class` at width 8, in groups of 4 where its constructor takes a group size."""
    try:
        return norm_class(8, group_size=4, eps=1e-5)
    except TypeError:
        return norm_class(8, eps=1e-5)


@functools.lru_cache(maxsize=None)
def computes_reference(norm_class: type) -> bool:
    """True if `norm_class(hidden_size, [group_size=...,] eps=...)` computes `reference` bit for bit, in fp32
    and in bf16 (where the order of the casts and the weight's multiply shows), on a small CPU input: pcg
    replaces only a norm it has seen give the same numbers. Built on the CPU whatever device or dtype context
    the caller is in (HF's `from_pretrained` builds its model inside a meta-device context)."""
    try:
        with torch.device("cpu"):
            norm = _small_instance(norm_class).float()
            generator = torch.Generator().manual_seed(0)
            y, z = (torch.randn(2, 3, 8, generator=generator, dtype=torch.float32) for _ in range(2))
            with torch.no_grad():
                norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
                for dtype in (torch.float32, torch.bfloat16):
                    norm.to(dtype)
                    yd, zd = y.to(dtype), z.to(dtype)
                    if not torch.equal(norm(yd, zd), reference(yd, zd, norm.weight, 1e-5, group_size(norm))):
                        return False
        return True
    except Exception:  # noqa: BLE001 - another constructor or forward: not the norm this op computes
        return False


# The largest group one program normalises: a whole group is one block, at most 32 elements a thread.
MAX_GROUP = 16384


def kernel_applies(y: torch.Tensor, weight: torch.Tensor, group_size: int) -> bool:
    """True where `gated_rms_norm` runs its Triton kernel rather than `reference` (also usable on fake tensors)."""
    return (triton is not None and y.is_cuda and weight.is_cuda and y.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == y.dtype and weight.dim() == 1 and weight.stride(0) == 1
            and 0 < group_size <= MAX_GROUP)


if triton is not None:

    @triton.jit
    def _gated_norm_kernel(y_ptr, z_ptr, w_ptr, o_ptr, G, eps, sym, szm, som, BLOCK: tl.constexpr):
        # Program (row, group): the whole group in one block, as HF normalises it.
        row, group = tl.program_id(0), tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        inside = offs < G
        k = group * G + offs
        y = tl.load(y_ptr + row * sym + k, mask=inside, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * szm + k, mask=inside, other=0.0).to(tl.float32)
        h = y * (z * tl.sigmoid(z))
        normed = (h * tl.rsqrt(tl.sum(h * h, axis=0) / G + eps)).to(o_ptr.dtype.element_ty)
        w = tl.load(w_ptr + k, mask=inside, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * som + k, (w * normed.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=inside)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as (rows, last dim) with unit stride on the last dim (a view where the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def norm_launch(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    """The norm kernel's launch; the op checks the shapes first."""
    y2, z2 = _rows(y), _rows(z)
    out = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    block = triton.next_power_of_2(group_size)   # a whole group per program: 4-16 warps, as its size needs
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _gated_norm_kernel[(y2.shape[0], y2.shape[1] // group_size)](
            y2, z2, weight, out, group_size, eps, y2.stride(0), z2.stride(0), out.stride(0),
            BLOCK=block, num_warps=min(16, max(4, block // 512)))
    return out.view(y.shape)


def _checked(y, z, weight, group_size) -> None:
    if group_size <= 0 or y.shape != z.shape or y.shape[-1] % group_size or weight.shape != y.shape[-1:]:
        raise ValueError(f"pcg::gated_rms_norm: y {tuple(y.shape)}, gate {tuple(z.shape)} and weight "
                         f"{tuple(weight.shape)} do not make groups of {group_size}")


@lean_op("pcg::gated_rms_norm", mutates_args=())
def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int) -> torch.Tensor:
    _checked(y, z, weight, group_size)
    if kernel_applies(y, weight, group_size) and z.is_cuda and y.numel():
        LAUNCHES["norm_kernel"] += 1
        return norm_launch(y, z, weight, eps, group_size)
    LAUNCHES["reference"] += 1
    return reference(y, z, weight, eps, group_size)


@torch.library.register_fake("pcg::gated_rms_norm")
def _gated_rms_norm_fake(y, z, weight, eps, group_size):
    _checked(y, z, weight, group_size)
    return y.new_empty(y.shape, dtype=torch.promote_types(weight.dtype, y.dtype))
