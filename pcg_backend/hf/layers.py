"""A registry of HF layer modules that split ops look up by an integer key.

A custom op cannot take an nn.Module argument, so the traced graph carries an
int key and the split op finds the module (its weights, its attention
implementation) here at run time, like SGLang's forward context does.
"""

from __future__ import annotations

import torch

from ..stats import STATS

_MODULES: list[torch.nn.Module] = []


@torch._dynamo.assume_constant_result
def key_of(module: torch.nn.Module, route: str) -> int:
    """The module's key. Runs at trace time only (its result is a graph constant), so routing is noted once per trace."""
    key = module.__dict__.get("_pcg_layer_key")
    if key is None:
        key = len(_MODULES)
        _MODULES.append(module)
        module.__dict__["_pcg_layer_key"] = key
    STATS.routing.append(f"{type(module).__name__} layer {getattr(module, 'layer_idx', '?')}: {route}")
    return key


def module_of(key: int) -> torch.nn.Module:
    return _MODULES[key]
