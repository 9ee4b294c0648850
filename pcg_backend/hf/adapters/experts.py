"""Adapter for HF MoE experts: the "grouped_mm" and "batched_mm" entries of HF's experts registry.

transformers' MoE models (GraniteMoeHybrid among them) decorate their
experts class with `use_experts_implementation`, which looks the forward up
by `config._experts_implementation` in `ALL_EXPERTS_FUNCTIONS`. Inside a pcg
trace the wrapped entries send a gated SiLU MLP per expert (HF's default
layout: gate and up concatenated, no bias, not transposed, no expert
parallelism, no norm after the experts) to `pcg::moe_experts`
(`ops/moe_experts.py`), which runs inside the captured graph. Any other
layout keeps HF's function, and the routing report says why. Outside a pcg
trace the originals run unchanged.
"""

from __future__ import annotations

import functools

import torch

from ...ops import moe_experts as ops
from ..gate import tracing_for_pcg
from ..layers import note_routing
from . import Adapter, register_adapter

EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


# HF's default gate (`silu(gate) * up` over concatenated halves), set when the registry is wrapped.
_DEFAULT_GATE: list = []


def unsupported_layout(experts: torch.nn.Module) -> str | None:
    """Why `pcg::moe_experts` cannot stand in for these experts' forward, or None if it can.

    It runs while Dynamo traces, so it reads plain attributes only (no imports, no new objects).
    """
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    checks = (
        (getattr(experts, "has_gate", False), "not gated"),
        (not getattr(experts, "has_bias", True), "biased"),
        (not getattr(experts, "is_transposed", True), "transposed weights"),
        (getattr(experts, "is_concatenated", True), "gate and up interleaved"),
        (not getattr(experts, "_is_expert_parallel", False), "expert parallel"),
        (not getattr(experts, "has_post_expert_norm", False), "a norm after the experts"),
        (getattr(type(experts), "_apply_gate", None) in _DEFAULT_GATE, "its own gating"),
        (type(getattr(experts, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"), "not SiLU"),
        (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
         and down.dim() == 3, "weights not 3-D"),
    )
    reasons = [reason for ok, reason in checks if not ok]
    return ", ".join(reasons) if reasons else None


def wrap_experts_function(original, impl: str):
    # pcg::moe_experts falls back to the original by this name, in every graph routed through it,
    # so the entry outlives `disable()` (graphs compiled before it still call it).
    ops.ORIGINAL_EXPERTS[impl] = original

    @functools.wraps(original)
    def experts(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        if not tracing_for_pcg():
            return original(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        reason = "arguments beyond the routing" if args or kwargs else unsupported_layout(module)
        layer = str(getattr(module, "layer_idx", "?"))
        if reason is not None:
            note_routing(type(module).__name__, layer, f"experts left to HF's {impl} ({reason})", False)
            return original(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        note_routing(type(module).__name__, layer, f"experts via pcg::moe_experts ({impl})", True)
        return torch.ops.pcg.moe_experts(hidden_states, top_k_index, top_k_weights,
                                         module.gate_up_proj, module.down_proj, impl)

    return experts


def patch_library(patches) -> None:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate
    except ImportError:  # a transformers without the experts registry: HF's MoE stays as it is
        return
    _DEFAULT_GATE[:] = [_default_apply_gate]
    for impl in EXPERTS_IMPLEMENTATIONS:
        if impl in ALL_EXPERTS_FUNCTIONS._global_mapping:
            patches.wrap_item(ALL_EXPERTS_FUNCTIONS._global_mapping, impl,
                              lambda f, impl=impl: wrap_experts_function(f, impl))


def patch_modeling_module(module, patches) -> None:
    """Nothing per module: the registry is shared."""


ADAPTER = register_adapter(Adapter("experts", patch_modeling_module, patch_library))
