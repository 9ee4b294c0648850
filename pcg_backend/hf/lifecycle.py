"""HF routing's lifecycle: `enable()`, `disable()`, and the backend's hook that enables it on first use.

`import pcg_backend` imports no transformers and patches nothing. Routing is
installed by:

* `pcg_backend.hf.enable()`, explicitly;
* `pcg_backend.compile(model, ...)`, before Dynamo traces an HF model;
* the backend's first call on a graph traced from an HF model (plain
  `torch.compile(model, backend="pcg")`). That graph was traced without
  routing, so the hook enables routing and raises Dynamo's restart signal:
  Dynamo traces the frame again, through the wrappers, and hands the backend
  the routed graph. The restart happens once per process (and once more for
  each modeling module imported later and not yet wrapped).

`enable()` asks every adapter (`adapters/`) to wrap what it recognises, in
the shared library code and in each loaded modeling module, and wraps
`PreTrainedModel.post_init` so that modeling modules imported later are
wrapped when their first model is built. For a model whose forward is
compiled with pcg it keeps `generate()` from compiling that forward a
second time (`auto_compile.py`) and, on CUDA and under HF's own
conditions, lets its decoding loop read the stop flag one step late
(`stop_check.py`). `disable()` puts every original
back (`patches.py`). Graphs compiled while routing was on keep their split
ops; `torch._dynamo.reset()` drops them. The next pcg compile of an HF model
enables routing again.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

from .adapters import adapters
from . import auto_compile, stop_check
from .patches import PATCHES

log = logging.getLogger("pcg_backend")

_SCANNED: set[str] = set()
_state = {"enabled": False}


def is_enabled() -> bool:
    return _state["enabled"]


def enable() -> int:
    """Install HF routing (idempotent); returns how many attributes it wrapped now (0: nothing new).

    Imports transformers (ImportError without it). Eager runs and other
    backends are unchanged: every wrapper runs the original outside a pcg trace.
    """
    import transformers  # noqa: F401  (enabling routing is a request to use it)

    before = len(PATCHES)
    if not _state["enabled"]:
        for adapter in adapters():
            if adapter.patch_library is not None:
                adapter.patch_library(PATCHES)
        _wrap_post_init()
        auto_compile.patch_generate(PATCHES)
        stop_check.patch_generate(PATCHES)
        _state["enabled"] = True
    _scan_modeling_modules()
    added = len(PATCHES) - before
    if added:
        log.info("pcg: HF routing enabled (%d attributes wrapped)", added)
    return added


def disable() -> int:
    """Restore every attribute `enable()` wrapped; returns how many it restored."""
    restored = PATCHES.restore_all()
    _SCANNED.clear()
    _state["enabled"] = False
    if restored:
        log.info("pcg: HF routing disabled (%d attributes restored)", restored)
    return restored


def _unscanned_modeling_modules() -> list:
    return [(name, module) for name, module in list(sys.modules.items())
            if name.startswith("transformers.models.") and ".modeling_" in name and name not in _SCANNED and module]


def _scan_modeling_modules() -> None:
    for name, module in _unscanned_modeling_modules():
        _SCANNED.add(name)
        for adapter in adapters():
            adapter.patch_modeling_module(module, PATCHES)


def _wrap_post_init() -> None:
    from transformers.modeling_utils import PreTrainedModel

    def wrap(original):
        @functools.wraps(original)
        def post_init(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            _scan_modeling_modules()  # the model's modeling module is imported by now
            return result

        return post_init

    PATCHES.wrap(PreTrainedModel, "post_init", wrap)


def _traces_hf_model(gm) -> bool:
    """Whether the graph being compiled was traced from transformers code (its modules or its frame)."""
    try:
        if gm is None:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            tx = InstructionTranslator.current_tx()
            if os.path.abspath(tx.f_code.co_filename).startswith(_transformers_dir()):
                return True
            graph = tx.output.graph
        else:
            graph = gm.graph
    except Exception:  # noqa: BLE001 - no trace to look at: assume it may be HF, a restart is harmless
        return True
    for node in graph.nodes:
        for _, cls in (node.meta.get("nn_module_stack") or {}).values():
            if str(getattr(cls, "__module__", cls)).startswith("transformers."):
                return True
    return False


def _transformers_dir() -> str:
    return os.path.dirname(os.path.abspath(sys.modules["transformers"].__file__)) + os.sep


def install(gm=None) -> None:
    """The backend's hook, called at every graph before it is split.

    On a graph traced from an HF model while routing was off (or before a
    modeling module it uses was wrapped), enable routing and make Dynamo
    trace the frame again, now through the wrappers. `gm` is the graph; when
    it is not passed, the graph Dynamo is compiling is read from Dynamo.
    """
    if "transformers" not in sys.modules or (is_enabled() and not _unscanned_modeling_modules()):
        return  # nothing HF, or nothing new to wrap: this graph was traced through the wrappers
    hf = _traces_hf_model(gm)
    if not (hf or is_enabled()):
        return  # never install routing for a model that is not HF
    if enable() and hf:
        _trace_again()


def _trace_again() -> None:
    """Make Dynamo drop the graph being compiled and trace its frame again (now through the wrappers)."""
    try:
        from torch._dynamo.exc import TensorifyScalarRestartAnalysis
        from torch._dynamo.symbolic_convert import InstructionTranslator

        # The new trace takes another path (the wrappers), so the record of the
        # last one, which Dynamo would replay to find its graph breaks, must go.
        InstructionTranslator.current_tx().speculation_log.clear()
    except Exception:  # noqa: BLE001 - a torch without these: keep this graph unrouted
        log.warning("pcg: HF routing was enabled after Dynamo traced this graph, which stays unrouted; "
                    "call pcg_backend.hf.enable() or use pcg_backend.compile(model) before the first call")
        return
    # The one restart signal that Dynamo passes on from a backend instead of wrapping it
    # in BackendCompilerFailed (torch 2.11-2.13, `OutputGraph.call_user_compiler`).
    raise TensorifyScalarRestartAnalysis(restart_reason="pcg enabled HF routing; tracing again through it")
