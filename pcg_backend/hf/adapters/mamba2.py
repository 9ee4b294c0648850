"""Adapter for HF's Mamba2 mixer: token-wise work in the graph, the token-mixing core in `pcg::mamba2_core`.

Recognise: a class defined in a modeling module whose `forward` source uses
the Mamba2 parameters (`A_log`, `dt_bias`, `conv1d`, `in_proj`) and
`ssm_state_size`. NemotronH, Bamba, FalconH1, GraniteMoeHybrid, Zamba2 and
Mamba2 all share this mixer, so each is found without naming it.

Route: the class's `forward` is wrapped. Inside a pcg trace the wrapper checks
the instance attribute by attribute (`missing_attributes`); a mixer that has
them all runs `routed_forward`, which reproduces the mixer's forward
(transformers 5.17 to 5.24; FalconH1's multipliers included) but hands the
core to the split op, so `in_proj`, the gated RMSNorm and `out_proj` are
captured with the rest of the token-wise work. A mixer that lacks one keeps
its own forward, and `pcg_backend.report()` says what it lacks. Outside a
pcg trace the original forward runs unchanged.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn.functional as F

from ...ops import gated_norm, mamba2  # noqa: F401  (registers pcg::gated_rms_norm, pcg::mamba2_core)
from ...ops.mamba2 import scan_output_dtype
from ..gate import tracing_for_pcg
from ..layers import note_routing
from . import Adapter, register_adapter

MARKERS = ("A_log", "dt_bias", "conv1d", "in_proj", "ssm_state_size")
REQUIRED = (
    "in_proj", "conv1d", "out_proj", "A_log", "D", "dt_bias", "intermediate_size", "conv_dim", "num_heads",
    "head_dim", "n_groups", "ssm_state_size", "chunk_size", "layer_idx", "activation", "time_step_limit",
    "conv_kernel_size",
)
ROUTED = "Mamba2 core via pcg::mamba2_core"

# Set on each gated RMSNorm class that computes `gated_norm.reference` exactly (tried on CPU when its
# module is patched), with the class itself as its value, so that a subclass, which may override
# `forward`, does not inherit it. A decode step hands such norms to pcg::gated_rms_norm. FalconH1's,
# whose constructor and arithmetic differ (it can normalise before gating), keeps its own forward.
# A class attribute, not a list, because Dynamo guards on what a trace reads: a list that grows when
# another modeling module is patched would recompile every graph that read it.
REFERENCE_NORM = "_pcg_computes_reference_norm"

# How a new cache's states are allocated; the tests fill them with NaN instead, to prove that
# a fresh prefill writes every element.
uninitialized_like = torch.empty_like


def looks_like_mixer(cls) -> bool:
    """True for an nn.Module class that defines a forward and whose source uses every Mamba2 marker."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or "forward" not in vars(cls):
        return False
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return False
    return all(marker in source for marker in MARKERS)


def missing_attributes(mixer: torch.nn.Module) -> list[str]:
    """What a module lacks to be routed as a Mamba2 mixer (empty: it can be routed)."""
    missing = [a for a in REQUIRED if not hasattr(mixer, a)]
    if getattr(mixer, "mamba_rms_norm", True) and not hasattr(mixer, "norm"):
        missing.append("norm")
    return missing


def _norm_kernel_applies(norm: torch.nn.Module, out: torch.Tensor) -> bool:
    """True where pcg::gated_rms_norm computes `norm` and runs its Triton kernel (decided at trace time:
    elsewhere the op would run HF's arithmetic as separate eager kernels, which Inductor fuses better)."""
    return (getattr(type(norm), REFERENCE_NORM, None) is type(norm)
            and gated_norm.kernel_applies(out, norm.weight, gated_norm.group_size(norm)))


def routed_forward(mixer, hidden_states, cache=None, attention_mask=None, cache_params=None, **kwargs):
    if cache is None:
        cache = cache_params  # transformers < 5.20 names it cache_params
    kernels = sys.modules[type(mixer).__module__]
    batch, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype

    hidden_states = kernels.apply_mask_to_padding_states(hidden_states, attention_mask)
    if hasattr(mixer, "ssm_in_multiplier"):  # FalconH1
        hidden_states = hidden_states * mixer.ssm_in_multiplier
    projected = mixer.in_proj(hidden_states)
    if hasattr(mixer, "mup_vector"):  # FalconH1
        projected = projected * mixer.mup_vector
    gate, xBC, dt = projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)

    layer = cache.layers[mixer.layer_idx] if cache is not None else None
    use_state = layer is not None and layer.has_previous_state[0]
    if layer is not None and not layer.is_conv_states_initialized[0]:
        # HF allocates state lazily from templates; doing it here keeps the
        # allocation out of the split op. If it lands in a captured piece, the
        # runtime clones it out of graph memory when it leaves the graph.
        layer.lazy_initialization(
            conv_states=xBC.new_empty(batch, mixer.conv_dim, mixer.conv_kernel_size),
            recurrent_states=xBC.new_empty(
                batch, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, dtype=torch.float32
            ),
            conv_kernel_size=mixer.conv_kernel_size,
        )
        # HF fills the new states with zeros, but a fresh prefill overwrites all of both
        # (pcg::mamba2_core writes the whole conv window, and the scan's final state or an
        # explicit zero for one token). Left unread, the zero fills are dead code in the graph:
        # 2 kernels per layer that wrote 5.2 MB per sequence per layer on the 9B NemotronH.
        layer.conv_states[0] = uninitialized_like(layer.conv_states[0])
        layer.recurrent_states[0] = uninitialized_like(layer.recurrent_states[0])
    decode = use_state and seq_len == 1
    out = torch.empty(batch, seq_len, mixer.intermediate_size, dtype=scan_output_dtype(dtype, decode),
                      device=hidden_states.device)
    note_routing(type(mixer).__name__, str(mixer.layer_idx), ROUTED, True)
    dt_min, dt_max = mixer.time_step_limit
    torch.ops.pcg.mamba2_core(
        xBC, dt, attention_mask,
        layer.conv_states[0] if layer is not None else None,
        layer.recurrent_states[0] if layer is not None else None,
        out, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, -torch.exp(mixer.A_log.float()), mixer.D, mixer.dt_bias,
        type(mixer).__module__, mixer.n_groups, mixer.head_dim, mixer.ssm_state_size, mixer.chunk_size,
        mixer.activation, float(dt_min), float(dt_max), use_state,
    )
    if layer is not None:
        layer.has_previous_state[0] = True

    if getattr(mixer, "mamba_rms_norm", True):
        if decode and out.dtype == dtype and _norm_kernel_applies(mixer.norm, out):
            # One kernel instead of the two Inductor makes of HF's norm.
            scan_output = torch.ops.pcg.gated_rms_norm(out, gate, mixer.norm.weight, mixer.norm.variance_epsilon,
                                                       gated_norm.group_size(mixer.norm))
        else:
            scan_output = mixer.norm(out, gate)
    else:  # FalconH1 without the gated norm gates with silu(z)
        scan_output = out * F.silu(gate.to(out.dtype))
    return mixer.out_proj(scan_output.to(dtype))


def wrap_forward(original):
    @functools.wraps(original)
    def forward(self, hidden_states, *args, **kwargs):
        if tracing_for_pcg():
            missing = missing_attributes(self)
            if not missing:
                if args:  # (cache, attention_mask) passed positionally
                    kwargs.update(zip(("cache", "attention_mask"), args))
                return routed_forward(self, hidden_states, **kwargs)
            note_routing(type(self).__name__, str(getattr(self, "layer_idx", "?")),
                         f"NOT routed, missing {', '.join(missing)}", False)
        return original(self, hidden_states, *args, **kwargs)

    return forward


def patch_modeling_module(module, patches) -> None:
    for value in list(vars(module).values()):
        if (isinstance(value, type) and value.__module__ == module.__name__ and value.__name__.endswith("RMSNormGated")
                and gated_norm.computes_reference(value)):
            patches.mark(value, REFERENCE_NORM, value)
        # Only classes the module defines: an imported mixer is wrapped in its own module.
        if isinstance(value, type) and value.__module__ == module.__name__ and looks_like_mixer(value):
            patches.wrap(value, "forward", wrap_forward)


ADAPTER = register_adapter(Adapter("Mamba2 mixer", patch_modeling_module))
