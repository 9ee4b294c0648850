"""Hugging Face hybrid models: routing their Mamba2 mixers and attention through pcg's split ops.

    import pcg_backend
    model = pcg_backend.compile(model)          # enables routing, then torch.compile(backend="pcg")

Routing wraps, at class level, the layers that an adapter (`adapters/`)
recognises in transformers' code. Each wrapper takes pcg's path only while
Dynamo traces for the pcg backend (`gate.tracing_for_pcg`), so eager runs and
other backends run HF's own code. `enable()` installs the wrappers,
`disable()` restores every original; `lifecycle.py` says when pcg enables
routing by itself. Importing this package imports no transformers.
"""

from .adapters import Adapter, adapters, register_adapter, unregister_adapter
from .lifecycle import disable, enable, install, is_enabled

__all__ = ["Adapter", "adapters", "disable", "enable", "install", "is_enabled", "register_adapter",
           "unregister_adapter"]
