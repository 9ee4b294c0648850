"""Finding HF hybrid layers by structure and installing pcg's class-level wrappers.

A class is treated as a Mamba2 mixer when its `forward` source uses the
Mamba2 parameters (`A_log`, `dt_bias`, `conv1d`, `in_proj`); at trace time the
instance is checked attribute by attribute, and a mixer that cannot be routed
keeps its own forward and is listed in `pcg_backend.report()` with the reason.
So a new family with the same mixer works without code changes here.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch

from ..stats import STATS
from .attention import wrap_attention_function, wrap_dynamic_update, wrap_static_update
from .gate import tracing_for_pcg
from .layers import note_routing
from .mixer import missing_attributes, routed_forward

_SCANNED: set[str] = set()
_MIXER_MARKERS = ("A_log", "dt_bias", "conv1d", "in_proj")


def _looks_like_mamba2_mixer(cls) -> bool:
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or "forward" not in cls.__dict__:
        return False
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return all(marker in source for marker in _MIXER_MARKERS) and "ssm_state_size" in source


def _wrap_mixer_forward(original):
    @functools.wraps(original)
    def forward(self, hidden_states, *args, **kwargs):
        if tracing_for_pcg():
            missing = missing_attributes(self)
            if not missing:
                if args:  # (cache, attention_mask) passed positionally
                    names = ("cache", "attention_mask")
                    kwargs.update(zip(names, args))
                return routed_forward(self, hidden_states, **kwargs)
            note_routing(f"{type(self).__name__} layer {getattr(self, 'layer_idx', '?')}: NOT routed, "
                         f"missing {', '.join(missing)}")
        return original(self, hidden_states, *args, **kwargs)

    forward._pcg_wrapped = True
    return forward


def _scan_module(module) -> None:
    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == module.__name__ and _looks_like_mamba2_mixer(value):
            if not getattr(value.forward, "_pcg_wrapped", False):
                value.forward = _wrap_mixer_forward(value.forward)
    eager = getattr(module, "eager_attention_forward", None)
    if callable(eager) and not getattr(eager, "_pcg_wrapped", False):
        module.eager_attention_forward = wrap_attention_function(eager, f"eager:{module.__name__}")


def _install_cache_and_registry() -> None:
    from transformers import cache_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for cls, wrap in ((cache_utils.DynamicLayer, wrap_dynamic_update), (cache_utils.StaticLayer, wrap_static_update)):
        if not getattr(cls.update, "_pcg_wrapped", False):
            cls.update = wrap(cls.update)
    for impl in ("sdpa",):
        fn = ALL_ATTENTION_FUNCTIONS._global_mapping.get(impl)
        if fn is not None and not getattr(fn, "_pcg_wrapped", False):
            ALL_ATTENTION_FUNCTIONS._global_mapping[impl] = wrap_attention_function(fn, impl)


def _wrap_post_init() -> None:
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, "_pcg_wrapped", False):
        return

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        install()  # the model's modeling module is imported by now
        return result

    post_init._pcg_wrapped = True
    PreTrainedModel.post_init = post_init


def install() -> None:
    """Wrap every loaded transformers model family (idempotent, cheap after the first call)."""
    if "transformers" not in sys.modules:
        return
    _install_cache_and_registry()
    _wrap_post_init()
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and ".modeling_" in name and name not in _SCANNED and module:
            _SCANNED.add(name)
            _scan_module(module)


def routed_layers() -> list[str]:
    return list(STATS.routing)
