"""A decode step's SSM update, written straight into the Mamba2 op's output.

mamba-ssm's `selective_state_update` returns a new tensor, which the op then
copies into its `out` buffer: inside a decode graph that is one more node per
Mamba2 layer (a 1 µs copy and its launch gap, 27 per step of the 9B
NemotronH, about 1 % of a step). `step_into` launches mamba-ssm's own Triton
kernel with `out` as its output instead, with the wrapper's rows per program
(and, where measured faster, fewer warps: `WARPS`), so the values are the
ones eager computes, bit for bit.

The kernel is a private function of mamba-ssm. It is used only where its
argument list is exactly the one this launcher was written against and the
public wrapper still chooses its launch parameters the way `block_config`
and the tied-head rule below do (mamba-ssm 2.2.3 to 2.3.x); with any other
mamba-ssm, or on a device without it, `step_into` returns False and the op
calls the public function and copies, as before. The launch is always
mamba-ssm's kernel: where HF was told to use a hub build of it instead
(`use_kernels`), a decode step runs the installed package's.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

# The kernel's parameters in mamba-ssm 2.2.3-2.3.x (`_selective_scan_update_kernel.arg_names`).
EXPECTED_ARGS = (
    "state_ptr", "x_ptr", "dt_ptr", "dt_bias_ptr", "A_ptr", "B_ptr", "C_ptr", "D_ptr", "z_ptr", "out_ptr",
    "state_batch_indices_ptr", "batch", "nheads", "dim", "dstate", "nheads_ngroups_ratio",
    "stride_state_batch", "stride_state_head", "stride_state_dim", "stride_state_dstate",
    "stride_x_batch", "stride_x_head", "stride_x_dim", "stride_dt_batch", "stride_dt_head", "stride_dt_dim",
    "stride_dt_bias_head", "stride_dt_bias_dim", "stride_A_head", "stride_A_dim", "stride_A_dstate",
    "stride_B_batch", "stride_B_group", "stride_B_dstate", "stride_C_batch", "stride_C_group", "stride_C_dstate",
    "stride_D_head", "stride_D_dim", "stride_z_batch", "stride_z_head", "stride_z_dim",
    "stride_out_batch", "stride_out_head", "stride_out_dim",
    "DT_SOFTPLUS", "TIE_HDIM", "BLOCK_SIZE_M", "HAS_DT_BIAS", "HAS_D", "HAS_Z", "HAS_STATE_BATCH_INDICES",
    "BLOCK_SIZE_DSTATE",
)


@functools.lru_cache(maxsize=None)
def kernel():
    """mamba-ssm's state-update kernel where its arguments are the expected ones, else None."""
    try:
        module = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    except Exception:   # not installed, or it fails to import here (no GPU, another triton)
        return None
    found = getattr(module, "_selective_scan_update_kernel", None)
    # `arg_names` is what Triton binds a launch's arguments by (heuristics wrappers carry it too).
    inner = found
    while inner is not None and not hasattr(inner, "arg_names"):
        inner = getattr(inner, "fn", None)
    if tuple(getattr(inner, "arg_names", ())) != EXPECTED_ARGS or not _same_launch_rules(module):
        return None
    return found


# Lines of mamba-ssm's wrapper that decide what `step_into` copies: its block table and tied-head rule.
WRAPPER_RULES = (
    "((32, 4) if dstate <= 16",
    "((16, 4) if dstate <= 32 else",
    "((8, 4) if dstate <= 64 else",
    "((4, 4) if dstate <= 128 else",
    "((4, 8))))))",
    "tie_hdim = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0",
    "grid = lambda META: (triton.cdiv(dim, META['BLOCK_SIZE_M']), batch, nheads)",
)


def _same_launch_rules(module) -> bool:
    """True where mamba-ssm's public wrapper still launches as `step_into` does (its source says so)."""
    try:
        source = inspect.getsource(module.selective_state_update)
    except (AttributeError, OSError, TypeError):
        return False
    return all(rule in source for rule in WRAPPER_RULES)


def block_config(dstate: int) -> tuple[int, int]:
    """(rows per program, warps) as mamba-ssm's wrapper picks them, so the reduction order is its own."""
    if dstate <= 16:
        return 32, 4
    if dstate <= 32:
        return 16, 4
    if dstate <= 64:
        return 8, 4
    if dstate <= 128:
        return 4, 4
    return 4, 8


# Warps per program where pcg launches with fewer than mamba-ssm's wrapper. At dstate 128 (every family's
# 9B shape) one warp per 4-row program took 19.2 µs per layer at batch 8 on an H200, against 21.1 µs with
# the wrapper's four (3.95 against 4.28 µs at batch 1), with the same bits. The GPU test checks state and
# output bit for bit against the wrapper at dstate 128 and batches 1, 2 and 8.
WARPS = {128: 1}


def step_into(out, state, x, dt, A, B, C, D, dt_bias, dt_softplus: bool) -> bool:
    """One recurrent step of every head, into `out` (batch, heads, head_dim); False where it cannot launch.

    Shapes are those of mamba-ssm's `selective_state_update` with heads:
    state (batch, heads, head_dim, dstate), x and dt (batch, heads, head_dim),
    A (heads, head_dim, dstate), B and C (batch, groups, dstate), D and
    dt_bias (heads, head_dim).
    """
    launch = kernel() if x.is_cuda else None
    if launch is None or out.dtype != x.dtype:
        return False
    _, heads, dim, dstate = state.shape
    batch, groups = x.shape[0], B.shape[1]   # the batch of the step, as mamba-ssm takes it
    rows, warps = block_config(dstate)
    warps = WARPS.get(dstate, warps)
    tie = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0
    with torch.cuda.device(x.device.index):
        launch[(-(-dim // rows), batch, heads)](   # grid: ceil(dim / rows) row blocks per head
            state, x, dt, dt_bias, A, B, C, D, None, out, None,
            batch, heads, dim, dstate, heads // groups,
            *state.stride(), *x.stride(), *dt.stride(), *dt_bias.stride(), *A.stride(),
            *B.stride(), *C.stride(), *D.stride(), 0, 0, 0, *out.stride(),
            dt_softplus, tie, rows,
            num_warps=warps,
        )
    return True
