"""Runtime metadata that pcg publishes to split ops during a forward.

Split ops receive activations padded to the bucket size. They call
`current()` to learn the real token count, slice their inputs to it, and
zero the padded rows of their outputs. Outside a pcg forward (plain eager),
`current()` returns None and `real_tokens(default)` returns the default.

Split ops captured inside padded graphs (registered `padding_safe`) cannot
slice on the host: the captured graph replays for every count in its bucket.
For them pcg also publishes the count on the device, in one buffer per device
whose address never changes (`device_token_count`), refilled before each forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    """One pcg forward.

    `num_tokens` real rows along the token dim run at `padded_tokens` rows;
    both are None for a graph without a dynamic token dim. `capture_key`
    names the CUDA graphs to replay (None: run without graphs, because of
    `eager_reason`). `warmup` marks the forwards pcg runs on its own to
    capture every bucket up front: their results are thrown away, and split
    ops get private copies of the tensors they write, so model state is untouched.
    `overflow_refusals` is a list only for a call padded to an overflow bucket
    (above the ladder, captured on first use): a piece that cannot be captured
    there appends why, instead of giving up CUDA graphs at every bucket.
    """

    num_tokens: int | None
    padded_tokens: int | None
    capture_key: tuple | None = None
    eager_reason: str = ""
    warmup: bool = False
    device_count: torch.Tensor | None = None   # holds num_tokens, for padding-safe ops captured in pieces
    overflow_refusals: list[str] | None = None
    # Masks read on the host in this forward (ops/plain_causal.py): id -> (mask, its version, verdict).
    mask_verdicts: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)


_local = threading.local()


def current() -> ForwardContext | None:
    """The context of the pcg forward running on this thread, or None."""
    return getattr(_local, "ctx", None)


def real_tokens(padded: int) -> int:
    """The real token count for a token dim of size `padded` (itself outside pcg)."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None or ctx.num_tokens is None or ctx.padded_tokens != padded:
        return padded
    return ctx.num_tokens


def device_token_count(padded: int) -> torch.Tensor | None:
    """The real token count as a 1-element int64 tensor on the device, if pcg published one for `padded` rows.

    None means: slice on the host with `real_tokens` (plain eager, or a split
    op that runs eagerly between pieces).
    """
    ctx = getattr(_local, "ctx", None)
    if ctx is None or ctx.device_count is None or ctx.padded_tokens != padded:
        return None
    return ctx.device_count


def in_piece() -> bool:
    """True while a piece runs the ops fused into it (`piece_running`), not while a split op runs on its own.

    Ops whose padded path only pays off captured (attention, the static KV
    write) take it only here: run on its own between pieces, the host path
    with the real count is both correct and the one that was there before.
    """
    return getattr(_local, "in_piece", False)


class piece_running:
    """Mark the Python run of a piece's ops (a capture, its warm-up, or an uncaptured run).

    A class, not a `contextlib` generator: an eager piece enters it on every
    call, and this costs a third as much.
    """

    __slots__ = ("previous",)

    def __enter__(self):
        self.previous = getattr(_local, "in_piece", False)
        _local.in_piece = True

    def __exit__(self, *exc):
        _local.in_piece = self.previous


_COUNT_BUFFERS: dict[torch.device, torch.Tensor] = {}


def count_buffer(device: torch.device) -> torch.Tensor:
    """The per-device buffer behind `device_token_count` (captured graphs read it at this address)."""
    if device not in _COUNT_BUFFERS:
        _COUNT_BUFFERS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _COUNT_BUFFERS[device]


@contextlib.contextmanager
def forward_context(ctx: ForwardContext | None):
    """Publish `ctx` for the duration of one forward (nesting restores the outer one)."""
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous
