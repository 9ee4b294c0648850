"""A toy token-mixing split op, in the style of vLLM's `silly::attention`.

`pcg_toy::mix(x, out)` writes a causal running mean of `x` along its token
dim into `out`: dim 0 of (T, H), dim 1 of (B, S, H), the dim before the
features, as pcg's token-dim rule reads it (`mix_functional` and
`running_sum` take 2-D inputs only). It mixes tokens, so padding rows would
corrupt it: it reads the real token count from pcg's context, computes on
those rows only, and zeroes the padded rows of `out`. It also counts its
calls, for exact assertions.

`pcg_toy::running_sum(x, state, out)` is the stateful one, a miniature of a
recurrent layer: `out` gets `state` plus the running sum of the real rows,
and `state` (written in place, like an SSM state) advances by their sum.
Prefill is a call with many rows, decode a call with one.
"""

from __future__ import annotations

import torch

from .. import context
from .registry import register_split_op

CALLS = {"mix": 0, "mix_functional": 0, "running_sum": 0}


@register_split_op
@torch.library.custom_op("pcg_toy::mix", mutates_args=["out"])
def mix(x: torch.Tensor, out: torch.Tensor) -> None:
    CALLS["mix"] += 1
    n = context.real_tokens(x.shape[-2])
    counts = torch.arange(1, n + 1, device=x.device, dtype=x.dtype).unsqueeze(-1)
    out[..., :n, :] = x[..., :n, :].cumsum(-2) / counts
    out[..., n:, :] = 0


@register_split_op
@torch.library.custom_op("pcg_toy::mix_functional", mutates_args=())
def mix_functional(x: torch.Tensor) -> torch.Tensor:
    CALLS["mix_functional"] += 1
    n = context.real_tokens(x.shape[0])
    out = torch.zeros_like(x)
    counts = torch.arange(1, n + 1, device=x.device, dtype=x.dtype).unsqueeze(-1)
    out[:n] = x[:n].cumsum(0) / counts
    return out


@mix_functional.register_fake
def _(x):
    return torch.empty_like(x)


@register_split_op
@torch.library.custom_op("pcg_toy::running_sum", mutates_args=["state", "out"])
def running_sum(x: torch.Tensor, state: torch.Tensor, out: torch.Tensor) -> None:
    CALLS["running_sum"] += 1
    n = context.real_tokens(x.shape[0])
    out[:n] = state + x[:n].cumsum(0)
    out[n:] = 0
    state.add_(x[:n].sum(0))
