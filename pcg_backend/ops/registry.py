"""The split-op registry.

A split op is a torch custom op that mixes tokens or touches state. The
backend cuts every graph at its nodes and runs it eagerly, so it may use
kernels that cannot be traced or captured. Register it by OpOverload,
OpOverloadPacket, "ns::name", or as a decorator over `torch.library.custom_op`.
"""

from __future__ import annotations

import torch

_SPLIT_OPS: set[str] = set()
_CUDAGRAPH_SAFE: set[str] = set()
_PADDING_SAFE: set[str] = set()


def _qualname(op) -> str:
    """The "ns::name" of a custom op given in any accepted form, or raise ValueError."""
    if isinstance(op, torch._library.custom_ops.CustomOpDef):
        return op._qualname
    if isinstance(op, torch._ops.OpOverload):
        return op._schema.name
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    if isinstance(op, str):
        if "::" not in op:
            raise ValueError(f"split op name {op!r} must look like 'namespace::name'")
        ns, name = op.split("::", 1)
        name = name.split(".")[0]
        try:
            getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError) as e:
            raise ValueError(
                f"{op!r} is not a registered torch op; define it with torch.library.custom_op first"
            ) from e
        return f"{ns}::{name}"
    raise ValueError(
        f"register_split_op needs a torch custom op (OpOverload, OpOverloadPacket, 'ns::name' or a "
        f"torch.library.custom_op), got {type(op).__name__}: wrap your function with "
        f"@torch.library.custom_op('ns::name', mutates_args=...) first"
    )


def register_split_op(op=None, *, cudagraph_safe: bool = False, padding_safe: bool = False):
    """Register `op` as a split op and return it unchanged (so it also works as a decorator).

    `cudagraph_safe=True` promises that the op can be captured in a CUDA graph
    when it runs at a fixed shape: no host syncs, no allocations whose address
    must survive the call, no shape-dependent host logic beyond the shapes
    themselves. pcg then captures it together with its neighbours in graphs
    that always run at their exact size (decode steps; see README). Without
    the promise it always runs eagerly. Use `@register_split_op(cudagraph_safe=True)`
    as a decorator.

    `padding_safe=True` (implies `cudagraph_safe`) promises more: when
    `context.device_token_count(padded)` returns a tensor, the op reads the
    real token count from it on the device, instead of slicing on the host,
    so one captured graph is right for every count in its bucket, and padded
    rows never reach its state. pcg then captures the op inside padded graphs
    (prefill) as well.
    """
    if op is None:
        return lambda real_op: register_split_op(real_op, cudagraph_safe=cudagraph_safe, padding_safe=padding_safe)
    name = _qualname(op)
    _SPLIT_OPS.add(name)
    for flag, names in ((cudagraph_safe or padding_safe, _CUDAGRAPH_SAFE), (padding_safe, _PADDING_SAFE)):
        if flag:
            names.add(name)
        else:
            names.discard(name)
    return op


def unregister_split_op(op) -> None:
    _SPLIT_OPS.discard(_qualname(op))
    _CUDAGRAPH_SAFE.discard(_qualname(op))
    _PADDING_SAFE.discard(_qualname(op))


def is_cudagraph_safe(name: str) -> bool:
    return name in _CUDAGRAPH_SAFE


def is_padding_safe(name: str) -> bool:
    return name in _PADDING_SAFE


def registered_split_ops() -> frozenset[str]:
    return frozenset(_SPLIT_OPS)


def split_op_name(target) -> str | None:
    """The registered name if an FX node target is a split op, else None."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    return name if name in _SPLIT_OPS else None


def is_split_op(target) -> bool:
    return split_op_name(target) is not None
