"""pcg: piecewise CUDA graphs for hybrid Mamba+attention models, as a torch.compile backend.

    import pcg_backend
    model = pcg_backend.compile(model, max_capture_size=256)
    # or: torch.compile(model, backend="pcg", options={"max_capture_size": 256})

Importing this package registers the "pcg" backend and nothing else: it
imports no transformers and patches nothing (HF routing: `pcg_backend.hf`).
After `pip install .` the `torch_dynamo_backends` entry point registers the
backend without an import.

Reading order: backend -> split -> analyse/ (fx_facts, token_dim,
padding_rule, node_kinds) -> rewrite/ (row_rewrites, schedule,
skinny_routing, aligned_linear) -> pieces: cudagraph (captured pieces) and eager_pieces
(split ops and pieces that cannot be captured) -> runtime, with options,
buckets, context and stats beside them; split ops live in `ops/`, HF routing
in `hf/`, the benchmark in `bench.py`.
"""

from __future__ import annotations

import sys

import torch

from . import context, hf
from .backend import pcg_backend
from .write_check import UndeclaredWriteError
from .analyse.padding_rule import register_row_wise
from .ops.registry import is_split_op, register_split_op, unregister_split_op
from .options import BackendOptionError, PcgOptionError, parse_options
from .stats import STATS

__all__ = [
    "compile", "context", "hf", "pcg_backend", "register_split_op", "unregister_split_op", "is_split_op",
    "register_row_wise", "PcgOptionError", "BackendOptionError", "UndeclaredWriteError", "stats", "reset_stats", "report",
    "refresh_weights",
]
__version__ = "0.1.0"


# Options that `torch.compile` reads from its `options` dict itself, before the backend sees them.
TORCH_OPTIONS = ("guard_filter_fn",)


def compile(model, *, dynamic: bool | None = None, fullgraph: bool = False, **options):
    """`torch.compile(model, backend="pcg", options=options)`, with the options checked here and HF routing on.

        model = pcg_backend.compile(model, max_capture_size=256, compiler="inductor")

    `options` are the backend's options as keywords (see the README's table),
    plus `guard_filter_fn`, which `torch.compile` itself takes in its options
    (TORCH_OPTIONS); `dynamic` and `fullgraph` go to `torch.compile`. A bad option raises
    `PcgOptionError`, a `ValueError` naming the valid choices, from this call,
    before anything is traced. When `model` is an HF model (an `nn.Module`
    with transformers layers, or a method of one such as `model.forward`), HF
    routing is enabled first (`pcg_backend.hf.enable()`), so that Dynamo's
    first trace goes through it. (Plain `torch.compile(..., backend="pcg")`
    gets there too: the backend enables routing at its first HF graph and
    makes Dynamo trace that frame once more.)
    """
    parse_options({k: v for k, v in options.items() if k not in TORCH_OPTIONS})
    if _is_hf_model(model):
        hf.enable()
    return torch.compile(model, backend="pcg", options=options or None, dynamic=dynamic, fullgraph=fullgraph)


def _is_hf_model(model) -> bool:
    if "transformers" not in sys.modules:
        return False  # it cannot hold transformers layers
    owner = getattr(model, "__self__", model)   # a bound method such as model.forward
    return isinstance(owner, torch.nn.Module) and any(
        type(m).__module__.startswith("transformers.") for m in owner.modules())


def stats() -> dict:
    """A snapshot of pcg's counters (see the README for each key)."""
    return STATS.as_dict()


def reset_stats() -> None:
    """Zero every counter (graph records are kept with the graphs they describe only until reset)."""
    STATS.reset()


def refresh_weights() -> None:
    """Recompute the arithmetic on weights alone that pcg took out of its graphs, before each graph's next call.

    pcg notices in-place writes to parameters, `load_state_dict` and `.data`
    swaps by itself. Call this after changing a weight in a way that moves
    neither its version counter nor its address: through `param.data`
    (`param.data.mul_(0.5)`) or through another tensor on its storage.
    """
    from .rewrite import weight_prologue

    weight_prologue.refresh_all()


def report() -> str:
    """What pcg did, for a reader: a summary first, then each graph, the captures, the HF routing and the counters.

    The summary gives the graphs, whether CUDA graphs ran (or, where none
    could, says once that they are off), each reason pcg ran something
    without a CUDA graph (once, with its count), the graphs it could not pad
    and why, and how many HF layers were routed. See `stats.py`.
    """
    return STATS.report()


def _register() -> None:
    from torch._dynamo.backends import registry

    # When torch loads us through the entry point, it registers the function
    # itself right after this import; registering here too would be a duplicate.
    if "pcg" not in registry._BACKENDS and "pcg" not in registry._COMPILER_FNS:
        registry.register_backend(pcg_backend, name="pcg")


_register()
