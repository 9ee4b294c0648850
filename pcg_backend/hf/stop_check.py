"""Let `generate()` queue decode step t+1 while the GPU still runs step t.

HF's decoding loop asks after every token whether all sequences have
finished (`unfinished_sequences.max() == 0`), and reading that answer blocks
the host until the GPU has caught up. The next step's host work (HF's loop,
Dynamo's guards, pcg's replays and the eager attention of a DynamicCache)
then runs while the GPU idles: on the benchmark model that gap is most of
what a decode step costs above its kernels (docs/benchmarks.md).

HF already has the fix, `DeferredStopCheck`: it copies the flag to pinned
memory without waiting and reads it one step later, and when that late
answer says stop it undoes the one extra step (its token, and the cache
rows if the cache is returned and croppable). HF turns it on only for
`mps`. `patch_generate` turns it on for CUDA too, for the `generate()` of a
model whose forward is compiled with pcg, under HF's own other conditions
(not an assistant model; a returned cache must be croppable). Every loop
that defers is counted (`deferred_stop_checks` in `pcg_backend.stats()`).
Other models, and transformers versions without the class, are left alone.
With plain `torch.compile`, routing is turned on by the model's first
compiled forward, after that first `generate()` entered HF's loop: that one
call keeps the per-step check.
"""

from __future__ import annotations

import contextvars
import functools
import logging

import torch

from ..stats import STATS
from .auto_compile import forward_compiled_with_pcg

log = logging.getLogger("pcg_backend")

# True while a pcg-compiled model's `_sample` runs (the decoding loop that builds the stop check).
_IN_PCG_SAMPLE: contextvars.ContextVar[bool] = contextvars.ContextVar("pcg_in_pcg_sample", default=False)


def patch_generate(patches) -> None:
    """Wrap `_sample` and `DeferredStopCheck.is_supported` (see the module docstring); recorded in `patches`."""
    from transformers.generation import utils

    deferred = getattr(utils, "DeferredStopCheck", None)
    if deferred is None or not hasattr(utils.GenerationMixin, "_sample"):
        return  # a transformers without the deferred check: its loop syncs every step, as before

    def wrap_sample(original):
        @functools.wraps(original)
        def _sample(self, *args, **kwargs):
            token = _IN_PCG_SAMPLE.set(forward_compiled_with_pcg(self, warn=False))
            try:
                return original(self, *args, **kwargs)
            finally:
                _IN_PCG_SAMPLE.reset(token)

        return _sample

    def wrap_is_supported(original):
        @functools.wraps(original)
        def is_supported(device, cache, cache_is_returned, is_assistant):
            if _IN_PCG_SAMPLE.get() and getattr(device, "type", None) == "cuda":
                # HF's own conditions, asked as if for mps (the one device it defers on).
                supported = original(torch.device("mps"), cache, cache_is_returned, is_assistant)
                if supported:
                    STATS.deferred_stop_checks += 1
                    STATS.note("generate() on a pcg-compiled model reads its stop flag one step late "
                               "(HF's DeferredStopCheck), so decode steps queue without a host sync")
                return supported
            return original(device, cache, cache_is_returned, is_assistant)

        return staticmethod(is_supported)

    patches.wrap(utils.GenerationMixin, "_sample", wrap_sample)
    patches.wrap(deferred, "is_supported", wrap_is_supported)
