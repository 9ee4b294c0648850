"""pcg: piecewise CUDA graphs for hybrid Mamba+attention models, as a torch.compile backend.

    import torch
    model = torch.compile(model, backend="pcg")

Importing this package registers the "pcg" backend; after `pip install .`
the `torch_dynamo_backends` entry point registers it without an import.
Reading order: backend -> split (token_dim, node_kinds, schedule, fx_facts) -> runtime
-> cudagraph (captured pieces) and
eager_pieces (split ops and pieces that cannot be captured), with options,
buckets, context and stats beside them; split ops live in `ops/`, HF routing
in `hf/`, the benchmark in `bench.py`.
"""

from __future__ import annotations

from . import context
from .backend import pcg_backend
from .eager_pieces import UndeclaredWriteError
from .ops.registry import is_split_op, register_split_op, unregister_split_op
from .stats import STATS

__all__ = [
    "context", "pcg_backend", "register_split_op", "unregister_split_op", "is_split_op", "UndeclaredWriteError",
    "stats", "reset_stats", "report",
]
__version__ = "0.1.0"


def stats() -> dict:
    """A snapshot of pcg's counters (see the README for each key)."""
    return STATS.as_dict()


def reset_stats() -> None:
    """Zero every counter (graph records are kept with the graphs they describe only until reset)."""
    STATS.reset()


def report() -> str:
    """A readable table of graphs, pieces, captures, replays and every reason pcg ran without graphs."""
    return STATS.report()


def _register() -> None:
    from torch._dynamo.backends import registry

    # When torch loads us through the entry point, it registers the function
    # itself right after this import; registering here too would be a duplicate.
    if "pcg" not in registry._BACKENDS and "pcg" not in registry._COMPILER_FNS:
        registry.register_backend(pcg_backend, name="pcg")


_register()


def _install_hf() -> None:
    # transformers is optional: wrap HF families only if it can be imported.
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    from .hf import install

    install()


_install_hf()
