"""Model state at stable addresses: buffers pcg owns and lends to each new cache.

HF allocates a cache's Mamba states (and a static cache's KV rows) lazily,
inside the first forward of each `generate()` call. A decode graph reads and
writes that state at the address it was captured with, so a new cache at new
addresses would mean a new capture on every call. Serving engines avoid this
by owning a state pool indexed by request slot; this module is that pool for
HF caches.

A graph output that the graph itself allocated and a split op wrote in place
is model state (`analyse/fx_facts.created_state_outputs`). The runtime copies
each such output into a *slot*: a buffer pcg allocated once for that shape
and dtype, and returns a handle that shares the slot's memory. The cache
keeps the handle. When the last reference to the handle dies (the cache, and
any view of it, since views keep their base alive), the slot is free again.
The next call takes the free slots of each shape lowest index first, so a
new cache gets the very addresses of the one before it, and the decode graphs
captured at warm-up replay. A second cache alive at the same time takes
other slots (a new one the first time, counted), never another cache's.
Before allocating a slot while all of a shape's slots are lent, the pool runs
the garbage collector once: a dropped cache caught in a reference cycle
would otherwise hold its slots until Python collects it.
"""

from __future__ import annotations

import gc
import weakref

import torch

from .batched_copy import copy_pairs
from .stats import STATS


def _shape_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


class StatePool:
    """Every slot pcg allocated, per (shape, strides, dtype, device), and which are lent out."""

    def __init__(self) -> None:
        self._slots: dict[tuple, list[torch.Tensor]] = {}
        self._lent: dict[tuple, set[int]] = {}
        self._collecting_pays = True   # the last collection freed a slot (or none was needed since)

    def lend(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Handles to free slots holding a copy of each of `states` (one grouped copy)."""
        handles, pairs = [], []
        collected = False
        for state in states:
            key = _shape_key(state)
            found = self._free_slot(key)
            if found is None and self._slots[key] and not collected and self._collecting_pays:
                # A cache dropped by its caller may still wait in a reference cycle (the
                # calls that compile leave some); collecting once here saves a slot, and the
                # capture that new addresses would cost. A full collection costs a fraction of
                # a second beside Dynamo's objects: once it frees nothing (the caller keeps its
                # caches), it is not tried again until a slot comes back on its own.
                collected = True
                gc.collect()
                found = self._free_slot(key)
                self._collecting_pays = found is not None
            elif found is not None and not collected:
                self._collecting_pays = True
            index, slot = found if found is not None else self._allocate(key, state)
            handle = torch.empty((0,), dtype=state.dtype, device=state.device).set_(
                slot.untyped_storage(), slot.storage_offset(), slot.size(), slot.stride())
            lent = self._lent[key]
            lent.add(index)
            # The slot is free once the handle's TensorImpl dies: views keep it alive through their base.
            weakref.finalize(handle, lent.discard, index)
            handles.append(handle)
            pairs.append((slot, state))
        copy_pairs(pairs)
        return handles

    def _free_slot(self, key: tuple) -> tuple[int, torch.Tensor] | None:
        """The lowest-index free slot for `key` and its index, or None."""
        lent = self._lent.setdefault(key, set())
        return next(((i, slot) for i, slot in enumerate(self._slots.setdefault(key, [])) if i not in lent), None)

    def _allocate(self, key: tuple, like: torch.Tensor) -> tuple[int, torch.Tensor]:
        slots = self._slots[key]
        slots.append(torch.empty_strided(like.size(), like.stride(), dtype=like.dtype, device=like.device))
        STATS.state_slots += 1
        STATS.state_slot_bytes += slots[-1].untyped_storage().nbytes()
        return len(slots) - 1, slots[-1]

    def lent(self) -> int:
        """How many slots a live cache holds."""
        return sum(len(s) for s in self._lent.values())

    def release(self) -> None:
        """Forget every slot (live handles keep their memory; new calls allocate afresh)."""
        self._slots.clear()
        self._lent = {}


POOL = StatePool()
