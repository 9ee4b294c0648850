"""The split-op registry.

A split op is a torch custom op that mixes tokens or touches state. The
backend cuts every graph at its nodes and runs it eagerly, so it may use
kernels that cannot be traced or captured. Register it by OpOverload,
OpOverloadPacket, "ns::name", the CustomOpDef that `torch.library.custom_op`
returns, or as a decorator over `torch.library.custom_op`; `is_split_op`
accepts the same forms.

An op has one set of promises (`cudagraph_safe`, `padding_safe`) at a time:
registering it again with the same flags does nothing, with other flags
raises `ValueError`. To change them, `unregister_split_op` first.
"""

from __future__ import annotations

import torch

_SPLIT_OPS: set[str] = set()
_CUDAGRAPH_SAFE: set[str] = set()
_PADDING_SAFE: set[str] = set()


def _form_name(op) -> str | None:
    """The "ns::name" of `op` in any form `register_split_op` accepts, without checking that it exists."""
    if isinstance(op, torch._library.custom_ops.CustomOpDef):
        return op._qualname
    if isinstance(op, torch._ops.OpOverload):
        return op._schema.name
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    if isinstance(op, str) and "::" in op:
        ns, name = op.split("::", 1)
        return f"{ns}::{name.split('.')[0]}"   # "ns::name.overload" names the op
    return None


def _qualname(op) -> str:
    """The "ns::name" of a custom op given in any accepted form, or raise ValueError."""
    name = _form_name(op)
    if isinstance(op, str):
        if name is None:
            raise ValueError(f"split op name {op!r} must look like 'namespace::name'")
        ns, name = name.split("::", 1)
        try:
            getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError) as e:
            raise ValueError(
                f"{op!r} is not a registered torch op; define it with torch.library.custom_op first"
            ) from e
        return f"{ns}::{name}"
    if name is not None:
        return name
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
    flags = (bool(cudagraph_safe or padding_safe), bool(padding_safe))
    if name in _SPLIT_OPS:
        old = (name in _CUDAGRAPH_SAFE, name in _PADDING_SAFE)
        if old != flags:
            raise ValueError(
                f"split op {name} is already registered with {_describe(*old)}; registering it again with "
                f"{_describe(*flags)} would change its promises: call unregister_split_op({name!r}) first"
            )
        return op
    _SPLIT_OPS.add(name)
    if flags[0]:
        _CUDAGRAPH_SAFE.add(name)
    if flags[1]:
        _PADDING_SAFE.add(name)
    return op


def _describe(cudagraph_safe: bool, padding_safe: bool) -> str:
    return f"cudagraph_safe={cudagraph_safe}, padding_safe={padding_safe}"


def unregister_split_op(op) -> None:
    """Forget `op` (any form `register_split_op` accepts) and its flags; a no-op if it is not registered."""
    name = _qualname(op)
    for names in (_SPLIT_OPS, _CUDAGRAPH_SAFE, _PADDING_SAFE):
        names.discard(name)


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


def is_split_op(op) -> bool:
    """True if `op`, in any form `register_split_op` accepts, is a registered split op; False for anything else."""
    name = _form_name(op)
    return name is not None and name in _SPLIT_OPS
