"""The layer kinds pcg routes in HF models: one adapter module per kind.

An adapter says how to recognise its kind of layer in transformers' code and
how to route it through pcg's split ops. It never assigns to transformers
itself: it wraps through `Patches`, so that `pcg_backend.hf.disable()` can
put every original back.

* `patch_modeling_module(module, patches)` runs once for each loaded
  `transformers.models.<family>.modeling_<family>` module: it finds the
  classes or functions of its kind there (by structure, not by family
  name, so a new family that reuses a known kind needs no code) and wraps
  them.
* `patch_library(patches)`, if given, runs once per `enable()` for code that
  all families share (the cache layers, HF's attention-function registry).

Every module in this package is an adapter: it ends with
`register_adapter(Adapter(...))`, and `adapters()` imports them all. So a new
layer kind is one split op under `pcg_backend/ops/` plus one file here.
Adapters from outside pcg may call `register_adapter` too.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from types import ModuleType
from typing import Callable

from ..patches import Patches


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One kind of HF layer that pcg routes through split ops."""

    kind: str
    patch_modeling_module: Callable[[ModuleType, Patches], None]
    patch_library: Callable[[Patches], None] | None = None


_ADAPTERS: dict[str, Adapter] = {}
_BUILTINS_LOADED = False


def register_adapter(adapter: Adapter) -> Adapter:
    """Add `adapter`; registering the same adapter again is a no-op, another one under its kind an error."""
    known = _ADAPTERS.get(adapter.kind)
    if known is not None and known != adapter:
        raise ValueError(f"an HF adapter for {adapter.kind!r} is already registered ({known}); "
                         f"unregister it first or give the new one another kind")
    _ADAPTERS[adapter.kind] = adapter
    return adapter


def unregister_adapter(kind: str) -> None:
    _ADAPTERS.pop(kind, None)


def adapters() -> list[Adapter]:
    """Every registered adapter; the first call imports pcg's own (each module of this package)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            importlib.import_module(f"{__name__}.{info.name}")
        _BUILTINS_LOADED = True
    return list(_ADAPTERS.values())
