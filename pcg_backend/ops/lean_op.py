"""Defining pcg's own ops so that an eager call costs one dispatcher hop.

`torch.library.custom_op` registers Python kernels for the Autograd and (for
ops that write an argument) ADInplaceOrView keys in front of the op's own
kernel. Each eager call therefore runs three Python functions, and torch
2.13's ADInplaceOrView kernel re-reads the schema once per argument: a call
of the 20-argument `pcg::mamba2_core` cost 110 µs of host time on a CPU where
the same op defined here costs 4 µs. That host time is paid wherever a
split op runs outside a CUDA graph (every attention layer of every call, and
all 27 Mamba2 cores of a prefill above the largest bucket), and those runs
are host-bound.

`lean_op` infers the schema from the type hints exactly as `custom_op` does,
and registers the function as the CompositeExplicitAutograd kernel, so the
Autograd and ADInplaceOrView keys fall back to torch's C++ handlers. What is
given up: autograd through these ops (they are inference kernels; a backward
that reaches one makes torch warn that no autograd kernel is registered) and
the version-counter bump for written arguments that the op does not write
with torch ops itself. pcg's ops write their declared arguments with in-place
torch ops, which bump it, except what the Mamba2 core's Triton kernels
write on CUDA: the conv state in the prep kernel (`mamba2_prep.py`), and the
SSM state and `out` in a decode step (`state_update.py`); nothing in
inference reads that counter.
"""

from __future__ import annotations

import inspect

import torch

_LIBRARIES: dict[str, torch.library.Library] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


def lean_op(qualname: str, *, mutates_args):
    """Decorator: define `qualname` ("ns::name") from a type-hinted function; returns the op packet.

    An op that returns nothing gets a fake (meta) kernel that does nothing;
    any other op needs one from `torch.library.register_fake(qualname)`.
    """
    namespace, name = qualname.split("::")

    def define(fn):
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
        lib = _library(namespace)
        lib.define(name + schema)
        lib.impl(name, fn, "CompositeExplicitAutograd")
        if inspect.signature(fn).return_annotation in (None, "None"):
            torch.library.register_fake(qualname, lambda *args, **kwargs: None, lib=lib)
        return getattr(getattr(torch.ops, namespace), name)

    return define
