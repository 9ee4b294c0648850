"""Many tensor copies in a few launches: one `torch._foreach_copy_` per dtype and device.

A padded prefill of the 9B model moves 54 state tensors into its graphs'
static buffers before the replays and back out after them, and a forward that
creates its cache returns those states, which leave graph memory as clones.
One `copy_` each costs about 10-30 µs of host time (H100 host, profiled), so
the 54 copies in front of the first replay kept the GPU waiting for about half
a millisecond. `_foreach_copy_` issues a group in one multi-tensor kernel
where the tensors allow it (dense, same dtype), and falls back to one copy
per pair inside ATen otherwise, which is still correct.
"""

from __future__ import annotations

import torch


def _groups(pairs):
    groups: dict[tuple, tuple[list, list]] = {}
    for dst, src in pairs:
        dsts, srcs = groups.setdefault((dst.dtype, dst.device, src.dtype, src.device), ([], []))
        dsts.append(dst)
        srcs.append(src)
    return groups.values()


def copy_pairs(pairs) -> None:
    """`dst.copy_(src)` for every `(dst, src)` pair, grouped into one foreach copy per dtype and device."""
    if torch.is_grad_enabled():
        # Autograd records `copy_`; the foreach form is not something to rely on for gradients.
        for dst, src in pairs:
            dst.copy_(src)
        return
    for dsts, srcs in _groups(pairs):
        if len(dsts) == 1:
            dsts[0].copy_(srcs[0])
        else:
            torch._foreach_copy_(dsts, srcs)


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clones of `tensors` (same strides where dense, as `clone` keeps them), copied in grouped launches."""
    clones = [torch.empty_like(t) for t in tensors]
    copy_pairs(zip(clones, tensors))
    return clones
