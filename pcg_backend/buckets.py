"""The bucket ladder, and padding and slicing along the token dimension.

A bucket is a padded token count. A call with `n` real tokens runs at the
smallest bucket >= n; the padded rows are zeros (never uninitialised memory,
which has spread NaNs into real tokens in other serving engines) and are
sliced off the outputs. Above the ladder, coarser overflow buckets
(`overflow_ladder`) take calls up to the option `max_overflow_size`.
"""

from __future__ import annotations

import bisect

import torch

# Waste bound for the default ladder above the smallest sizes: a call of
# (previous bucket + 1) tokens spends at most this fraction of a bucket on padding.
MAX_PAD_WASTE = 0.12
# The same bound for the overflow buckets above the ladder, which are fewer and coarser:
# each is captured on first use, and each holds graph memory for its size.
MAX_OVERFLOW_WASTE = 0.2


def default_ladder(max_size: int = 512) -> tuple[int, ...]:
    """1, 2, 4, 8, then steps of 8 up to 128, 16 up to 256 and 32 above (35 sizes to 512).

    Every step above 64 keeps the padding waste of the worst case (previous
    bucket + 1 tokens) under 12%: 64->72 wastes 9.7%, 128->144 10.4%, 256->288
    10.8%. Below 64 the absolute waste is at most 7 rows, which costs nothing
    measurable because those calls are bound by reading the weights, not by
    compute. Multiples of 8 keep the GEMMs on tensor-core friendly shapes.
    """
    sizes = [1, 2, 4]
    size = 8
    while size <= max_size:
        sizes.append(size)
        size += 8 if size < 128 else 16 if size < 256 else 32
    sizes = [s for s in sizes if s <= max_size]
    if sizes[-1] != max_size:
        sizes.append(max_size)
    return tuple(sizes)


def overflow_ladder(largest: int, max_size: int) -> tuple[int, ...]:
    """Coarse buckets above the ladder's `largest`, up to `max_size`: steps of a quarter, in multiples of 8.

    From 512 to 2048: 640, 800, 1000, 1248, 1560, 1944, 2048. A call of
    (previous bucket + 1) tokens wastes at most `MAX_OVERFLOW_WASTE` of its
    bucket on padding. Empty when `max_size` is not above `largest`.
    """
    sizes = []
    size = largest
    while size < max_size:
        size = min(max_size, size + max(8, size // 4 // 8 * 8))
        sizes.append(size)
    return tuple(sizes)


class Ladder:
    """Maps a real token count to its bucket in O(1) for counts up to the largest bucket."""

    def __init__(self, sizes: tuple[int, ...]):
        self.sizes = sizes
        self.largest = sizes[-1]
        # A dense table makes the per-call lookup a list index, not a bisect.
        self._table = [sizes[bisect.bisect_left(sizes, n)] for n in range(self.largest + 1)]

    def bucket(self, n: int) -> int | None:
        """The bucket for `n` tokens, or None when `n` is above the largest bucket."""
        if n > self.largest:
            return None
        return self._table[n]


def pad_dims(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """Return `t` zero-padded at the end of each dim in `sizes` (dim -> new size)."""
    shape = list(t.shape)
    for dim, size in sizes.items():
        shape[dim] = size
    if shape == list(t.shape):
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def slice_dims(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """Return a view of `t` cut down to `sizes` (dim -> real size) along those dims."""
    index = [slice(None)] * t.dim()
    for dim, size in sizes.items():
        index[dim] = slice(0, size)
    return t[tuple(index)]


def fit_dims(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    """`t` cut or zero-padded to `sizes`, contiguous (the up-front capture's inputs at each bucket)."""
    cut = {d: s for d, s in sizes.items() if s < t.shape[d]}
    return pad_dims(slice_dims(t, cut), sizes).contiguous()
