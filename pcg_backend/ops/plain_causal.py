"""Whether a prefill's 4-D attention mask is plain causal, so SDPA may take its causal flag instead.

Run eagerly, HF skips building the mask of a prefill without padding and
calls SDPA with `is_causal=True`, which picks the flash kernel. Under
`torch.compile` it cannot read the padding mask's values while tracing, so
the traced graph always builds the boolean (batch, 1, q, k) mask, and SDPA
given a mask runs its memory-efficient kernel over the whole square, after
turning the mask into an additive bias. At 4096 tokens, 44 such layers of
the FalconH1 benchmark shape made a prefill above the largest bucket 8 %
slower than HF eager.

`pcg::attention` runs some calls outside any CUDA graph, with the real
count on the host: above the largest overflow bucket (the case this is
for), between the pieces of a forward, and in a static graph without CUDA
graphs. There it may read the mask: if it equals the causal pattern, the call passes no mask and SDPA's causal flag,
exactly what HF eager would have done. The check costs one comparison and
one host synchronisation. Every layer of a forward receives the same mask
tensor, so the verdict is kept for that tensor until the forward ends
(`ForwardContext.mask_verdicts`), and the sync is paid once per forward.
Not longer: a piece replayed from a CUDA graph returns the same tensor
object on every call with new contents, and a CUDA graph's writes leave
its version counter alone. Within the forward the version is compared too,
so a caller's own mask written in place is read again. Outside a pcg
forward nothing is kept. Shorter calls skip the check: a sync there weighs
more than the attention it could speed up.
"""

from __future__ import annotations

import torch

from .. import context
from ..stats import STATS

# Query rows from which a call's mask is checked (one sync per forward against O(rows^2) attention).
MIN_ROWS = 256


# Attention functions known to turn "no mask" into SDPA's causal flag for a causal module with more
# than one query row: HF's `sdpa_attention_forward`, added by the HF adapter when it wraps it. A
# function registered under "sdpa" by someone else keeps its mask.
TAKES_CAUSAL_FLAG: set = set()


def applies(rows: int, key: torch.Tensor, mask: torch.Tensor | None, function, is_causal: bool) -> bool:
    """True if a call of `rows` query rows may drop `mask` for SDPA's causal flag.

    That needs an attention `function` in TAKES_CAUSAL_FLAG, a causal module, at least MIN_ROWS query
    rows whose keys are exactly its own rows (no cache before them: SDPA's flag aligns the diagonal
    top-left), a square boolean 4-D mask equal to the causal pattern, and a call no CUDA graph records:
    not a capture, and not a piece that is warmed up, probed and captured under this forward's key,
    where a host read would be refused as a sync (or fail the capture), and a verdict kept from the
    warm-up would be baked into a graph that later calls with padding replay.
    Reads the mask on the host (synchronises) the first time it sees this mask tensor in a forward.
    """
    if function not in TAKES_CAUSAL_FLAG or not is_causal or rows < MIN_ROWS or key.shape[2] != rows:
        return False
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[2:] != (rows, rows):
        return False
    ctx = context.current()
    if ctx is not None and ctx.capture_key is not None and context.in_piece():
        return False
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    seen = ctx.mask_verdicts if ctx is not None else {}
    kept = seen.get(id(mask))
    # `_version` grows with every in-place write: a caller's own 4-D mask, edited between layers, is read
    # again. Inference tensors have no version counter; nothing writes a mask between a forward's layers.
    version = -1 if mask.is_inference() else mask._version
    if kept is not None and kept[0] is mask and kept[1] == version:
        return kept[2]
    verdict = is_plain_causal(mask)
    seen[id(mask)] = (mask, version, verdict)
    return verdict


def is_plain_causal(mask: torch.Tensor) -> bool:
    """True if every (batch, head) slice of the square boolean `mask` lets row i see keys 0..i, no more."""
    STATS.causal_mask_checks += 1
    rows = mask.shape[-1]
    positions = torch.arange(rows, device=mask.device)
    causal = positions[None, :] <= positions[:, None]
    return not bool(torch.ne(mask, causal).any())
