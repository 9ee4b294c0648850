"""Keep a pcg-compiled forward through `generate()`: HF's own auto-compile is skipped for it.

With a static cache on a CUDA device, HF's `generate()` compiles the model's
forward a second time for the decode steps (`get_compiled_call`: Inductor
with CUDA graph trees). A forward that the user compiled with pcg is then
traced again under that second compile, which inlines it: the decode steps
run Inductor's graphs instead of pcg's, pcg's stats no longer describe them,
and two CUDA-graph systems with their own memory pools share the process.

`patch_generate` wraps `GenerationMixin._valid_auto_compile_criteria`: when
the model's `forward` is a `torch.compile` wrapper whose backend is pcg, HF
does not compile it again. Any other forward keeps HF's decision. A compiled
forward whose backend cannot be read (torch internals that moved) keeps HF's
decision too, with a warning, since pcg then cannot tell whose it is.
"""

from __future__ import annotations

import functools
import inspect
import logging

log = logging.getLogger("pcg_backend")

# How far to follow `_torchdynamo_orig_backend` from the compile wrapper's callback: in torch
# 2.11-2.13 the chain is CatchErrorsWrapper -> ConvertFrame -> WrapBackendDebug -> _TorchCompileWrapper.
_MAX_WRAPPERS = 8
_TOLD: set[type] = set()   # model classes whose skipped auto-compile was logged (once each)


def compiled_backend_name(fn) -> str | None:
    """The registered name of the backend `fn` was compiled with by `torch.compile`, or None.

    None for a function that is not a `torch.compile` wrapper, and for one
    whose backend cannot be read.
    """
    if getattr(fn, "_torchdynamo_orig_callable", None) is None:
        return None
    try:
        wrapper = inspect.getclosurevars(fn).nonlocals.get("callback")
    except (TypeError, ValueError):
        return None
    for _ in range(_MAX_WRAPPERS):
        if wrapper is None:
            return None
        name = getattr(wrapper, "compiler_name", None)
        if isinstance(name, str):
            return name
        wrapper = getattr(wrapper, "_torchdynamo_orig_backend", None)
    return None


def forward_compiled_with_pcg(model, warn: bool = True) -> bool:
    """True if `model.forward` is a `torch.compile` wrapper with the pcg backend.

    A compiled forward whose backend cannot be read counts as not pcg's;
    `warn` says so in the log, with what that means for HF's auto-compile.
    """
    forward = getattr(model, "forward", None)
    if getattr(forward, "_torchdynamo_orig_callable", None) is None:
        return False
    name = compiled_backend_name(forward)
    if name is None and warn:
        log.warning("pcg: %s.forward is compiled, but pcg cannot read with which backend; generate() "
                    "may compile it again with a static cache (pass disable_compile=True to keep yours)",
                    type(model).__name__)
    return name == "pcg"


def patch_generate(patches) -> None:
    """Wrap HF's auto-compile decision (see the module docstring); recorded in `patches` for `disable()`."""
    from transformers.generation.utils import GenerationMixin

    if not hasattr(GenerationMixin, "_valid_auto_compile_criteria"):
        return  # a transformers without auto-compile: nothing compiles the forward a second time

    def wrap(original):
        @functools.wraps(original)
        def _valid_auto_compile_criteria(self, *args, **kwargs):
            if forward_compiled_with_pcg(self):
                if type(self) not in _TOLD:
                    _TOLD.add(type(self))
                    log.info("pcg: generate() keeps %s.forward compiled with pcg; HF's auto-compile for "
                             "static caches is skipped", type(self).__name__)
                return False
            return original(self, *args, **kwargs)

        return _valid_auto_compile_criteria

    patches.wrap(GenerationMixin, "_valid_auto_compile_criteria", wrap)
