"""The Mamba2 split op: the token-mixing core of an HF Mamba2 mixer, on the real tokens only.

It owns everything between the projected `(xBC, dt)` and the scan output: the
causal conv1d and its conv-state write, the SSD chunk scan (or
`selective_state_update` for decode, or a one-launch scan, `short_scan` or
`one_chunk_scan`, for a fresh prefill of up to 128 rows on CUDA) and its
SSM-state write. `in_proj`
before it and the gated norm and `out_proj` after it stay in captured pieces.

Kernels are the HF modeling module's own functions, which transformers binds
to mamba-ssm / causal-conv1d when they import and to the torch reference
otherwise, so pcg computes exactly what eager computes. There are three
exceptions on CUDA. A decode step goes to `state_update.py`, which launches
mamba-ssm's own step kernel with the op's `out` as its output: bit for bit
the same values. A fresh prefill of at most `short_scan.MAX_ROWS` rows goes
to `short_scan.py`'s kernel: the same recurrence, summed in another order
(bf16 rounding apart); one of at most `one_chunk_scan.MAX_ROWS` rows to
`one_chunk_scan.py`'s, the chunked scan's arithmetic for a single chunk. And
a fresh prefill's causal conv runs inside `mamba2_prep.py`'s kernel, with
causal-conv1d's order of operations (bf16 rounding apart, the same values).
Run eagerly, the op slices its inputs to the real token count, so padding
never reaches the conv window or the SSM state, and the padded rows of
`out` are zeroed.

It is also `padding_safe`: inside a padded graph that pcg captures, the real
count n is a device tensor, and the op runs at the full bucket instead. Both
kernels are causal, so padded rows never change a real row's output; the
state is kept clean by making every padded row an identity step of the SSM
(dt = 0: no decay, no input; x, B and C zeroed so that NaN padding cannot
leak in either) and by gathering the conv window at rows n-width..n-1.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
import torch.nn.functional as F

from .. import context
from . import mamba2_prep, one_chunk_scan, short_scan, state_update
from .lean_op import lean_op
from .registry import register_split_op


@register_split_op(padding_safe=True)
@lean_op("pcg::mamba2_core", mutates_args=["conv_state", "ssm_state", "out"])
def mamba2_core(
    xBC: torch.Tensor,
    dt: torch.Tensor,
    mask: torch.Tensor | None,
    conv_state: torch.Tensor | None,
    ssm_state: torch.Tensor | None,
    out: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    A: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    kernels_module: str,
    n_groups: int,
    head_dim: int,
    state_size: int,
    chunk_size: int,
    activation: str,
    dt_min: float,
    dt_max: float,
    use_state: bool,
) -> None:
    kernels = sys.modules[kernels_module]
    batch, padded, conv_dim = xBC.shape
    count = context.device_token_count(padded)
    if count is not None and not (use_state and padded == 1):
        _padded_prefill(kernels, xBC, dt, mask, conv_state, ssm_state, out, conv_weight, conv_bias, A, D,
                        dt_bias, count, n_groups, head_dim, state_size, chunk_size, activation, dt_min, dt_max,
                        use_state)
        return
    n = context.real_tokens(padded)
    decode = padded == 1 and (use_state or (conv_state is not None and ssm_state is not None))
    dt_step = None   # a decode step's: the kernel adds dt_bias and applies the softplus
    if decode and not use_state:
        # A fresh one-token prefill is one recurrent step from zero state: the
        # step kernels compute it in 2 launches, where the chunked path takes
        # a layout copy, the conv and 5 scan kernels over a whole chunk. Unlike
        # a decode step, a prefill clamps dt to the time-step limits, so dt
        # is computed here and the step kernel takes it as it is.
        conv_state.zero_()
        ssm_state.zero_()
        dt = F.softplus(dt.float() + dt_bias).clamp_(dt_min, dt_max)
        # a zero bias, not None: mamba-ssm 2.3's selective_state_update reads dt_bias.stride() either way
        dt_step = {"dt_bias": dt_bias.new_zeros(1).expand(dt_bias.shape[0], head_dim), "dt_softplus": False}
    # decode: one row; causal_conv1d_update takes (batch, channels, 1) at any batch stride, as HF's
    # own decode hands it a view of the in-projection (a `.contiguous()` here cost a copy kernel per
    # layer at batch > 1)
    x = xBC[:, :n].transpose(1, 2) if decode else _channel_last(xBC[:, :n])
    dt = dt[:, :n]
    if mask is not None:
        mask = mask[:, :n]
    num_heads = A.shape[0]

    # 1. causal conv1d, writing the last conv_kernel real tokens into the conv state
    if decode:
        h = kernels.causal_conv1d_update(x, conv_state, conv_weight, conv_bias, activation=activation)
    else:
        full = x
        if conv_state is not None:
            width = conv_state.shape[-1]
            if use_state:
                full = torch.cat([conv_state, x], dim=-1)
            elif n < width:
                full = F.pad(x, (width - n, 0))
            conv_state.copy_(full[..., -width:])
        h = kernels.causal_conv1d_fn(full, conv_weight, conv_bias, activation=activation)[..., -n:]
    h = kernels.apply_mask_to_padding_states(h.transpose(1, 2), mask)
    groups_state = n_groups * state_size
    hs, B, C = torch.split(h, [conv_dim - 2 * groups_state, groups_state, groups_state], dim=-1)

    # 2. the SSM: one recurrent step in decode, the chunked scan otherwise
    if decode:
        step = dt_step or {"dt_bias": dt_bias[:, None].expand(-1, head_dim), "dt_softplus": True}
        args = (ssm_state, hs.view(batch, num_heads, head_dim), dt.transpose(1, 2).expand(-1, -1, head_dim),
                A[:, None, None].expand(-1, head_dim, state_size), B.view(batch, n_groups, state_size),
                C.view(batch, n_groups, state_size), D[:, None].expand(-1, head_dim))
        if state_update.step_into(out.view(batch, num_heads, head_dim), *args, **step):
            return
        y = kernels.mamba2_selective_state_update(*args, z=None, **step).view(batch, 1, -1)
    else:
        y = _chunk_scan(kernels, hs, dt, A, B, C, D, ssm_state, use_state, n_groups, head_dim, chunk_size,
                        dt_bias=dt_bias, dt_softplus=True, dt_limit=(dt_min, dt_max))
    out[:, :n] = y
    if n < padded:
        out[:, n:] = 0


def _channel_last(rows: torch.Tensor) -> torch.Tensor:
    """(batch, rows, channels) -> a (batch, channels, rows) view of a dense copy with channels innermost.

    causal-conv1d keeps this layout for its output, so the scan's `hs`, `B`
    and `C` are plain views of it. A `.contiguous()` after the transpose gives
    channels-first instead, and the scan copies all three back: on the 9B
    model's 2048-token prefill this layout cut 8.6 ms of copy kernels (H100;
    one profile had the chunk scan 2.5 ms slower on the strided views, a
    later one had it at its earlier 3.2 ms). The kernel's channel-last path
    needs strides that are multiples of 8.
    """
    if rows.shape[-1] % 8:
        return rows.transpose(1, 2).contiguous()
    return rows.contiguous().transpose(1, 2)


def _padded_prefill(kernels, xBC, dt, mask, conv_state, ssm_state, out, conv_weight, conv_bias, A, D, dt_bias,
                    count, n_groups, head_dim, state_size, chunk_size, activation, dt_min, dt_max, use_state):
    """The prefill core at the full bucket, with the real count `count` (a device tensor): capturable.

    Every op here is a kernel in each layer's graph (27 per model), and at
    16 tokens each costs about as much as its launch, so the masking is kept
    to what the state needs: `h` zeroed on padded rows and their dt set to 0
    (the one-launch scans take the count and read those rows as zeros
    themselves, which saves the mask's kernel). `xBC` is not masked (the
    conv is causal, so a padded row reaches only padded outputs, and those
    are zeroed in `h` or skipped by the scan), nor is the scan's output
    (a padded row's output is C·state + D·x with C = x = 0, which is 0).
    On CUDA, a fresh prefill does everything up to and including the conv in
    one Triton kernel (`mamba2_prep`); the torch ops below compute the same
    values. A fresh prefill of up to 128 rows then scans in one more
    (`short_scan` up to 2 rows, `one_chunk_scan` above).
    """
    batch, padded, conv_dim = xBC.shape
    fresh = conv_state is not None and not use_state
    if fresh and mamba2_prep.available(xBC, conv_state):
        if mamba2_prep.conv_fusable(conv_weight, conv_bias, activation, conv_state):
            # The conv in the same launch as the rest: one kernel fewer per layer.
            h, dt, keep = mamba2_prep.prepare(xBC, dt, dt_bias, count, conv_state, dt_min, dt_max,
                                              conv=(conv_weight, conv_bias, activation))
        else:   # defensive: HF's mixers pass a weight and activation the fused conv takes
            x, dt, keep = mamba2_prep.prepare(xBC, dt, dt_bias, count, conv_state, dt_min, dt_max)
            h = kernels.causal_conv1d_fn(x.transpose(1, 2), conv_weight, conv_bias, activation=activation)
            h = h.transpose(1, 2)
        valid = keep[None, :, None]
        dt_args = {"dt_bias": None, "dt_softplus": False}
    else:
        valid = (torch.arange(padded, device=xBC.device) < count)[None, :, None]   # (1, padded, 1)
        h = _padded_conv(kernels, _channel_last(xBC), conv_state, conv_weight, conv_bias, count, activation,
                         use_state).transpose(1, 2)
        # The one-launch scans take dt as the chunked scan's softplus and clamp leave it, as `prepare`
        # gives it. (Where they then decline all the same, on a strided h, the chunked scan gets that
        # dt: the same values up to the rounding of torch's softplus against mamba-ssm's.)
        process = fresh and ssm_state is not None and one_chunk_scan.may_apply(xBC, ssm_state, out)
        dt, dt_args = _padded_dt(dt, dt_bias, valid, dt_min, dt_max, process=process)
    h = kernels.apply_mask_to_padding_states(h, mask)   # h: (batch, rows, channels)
    widths = [conv_dim - 2 * n_groups * state_size, n_groups * state_size, n_groups * state_size]
    one_launch = fresh and not dt_args["dt_softplus"]
    # The one-launch scans read rows from `count` on as zeros themselves; h is masked wherever the
    # chunked scan runs.
    scan = _fresh_scan(*torch.split(h, widths, dim=-1), dt, ssm_state, out) if one_launch else None
    if scan is None:
        h = torch.where(valid, h, 0)
    hs, B, C = torch.split(h, widths, dim=-1)
    if scan is not None:
        # One launch writing y and the final state in place, where the chunked scan takes five
        # launches and two copies.
        scan(hs, dt, A, B, C, D, ssm_state, out, n_groups, head_dim, count=count)
        return
    y = _chunk_scan(kernels, hs, dt, A, B, C, D, ssm_state, use_state, n_groups, head_dim, chunk_size, **dt_args)
    out.copy_(y)


def _fresh_scan(hs, B, C, dt, ssm_state, out):
    """The one-launch kernel for a fresh scan of this many rows, or None for the chunked scan:
    token by token up to `short_scan.MAX_ROWS` rows, as one SSD chunk up to `one_chunk_scan.MAX_ROWS`.
    Both take the same calls apart from the row limit, so one check serves both."""
    if ssm_state is None or not one_chunk_scan.applies(hs, dt, B, C, ssm_state, out):
        return None
    return short_scan.short_scan if hs.shape[1] <= short_scan.MAX_ROWS else one_chunk_scan.one_chunk_scan


def _padded_conv(kernels, x, conv_state, conv_weight, conv_bias, count, activation, use_state):
    """The causal conv1d of a padded prefill over x (batch, conv_dim, padded), writing the conv state.

    Continuing from a state: over [previous window | x]. A fresh prefill: over
    x alone (the kernel's own left padding is the zero window), and the new
    state is columns n-width..n-1, zero before column 0.
    """
    if conv_state is not None and use_state:
        width = conv_state.shape[-1]
        full = torch.cat([conv_state.to(x.dtype), x], dim=-1)
        # the last `width` real columns end at column width + n of `full`
        conv_state.copy_(full.index_select(-1, count + torch.arange(width, device=x.device)))
        return kernels.causal_conv1d_fn(full, conv_weight, conv_bias, activation=activation)[..., width:]
    if conv_state is not None:
        width = conv_state.shape[-1]
        columns = torch.arange(-width, 0, device=x.device) + count
        window = x.index_select(-1, columns.clamp(min=0))
        conv_state.copy_(torch.where(columns >= 0, window, 0))
    return kernels.causal_conv1d_fn(x, conv_weight, conv_bias, activation=activation)


def _padded_dt(dt, dt_bias, valid, dt_min, dt_max, process=False):
    """dt with padded rows as identity steps of the SSM (dt = 0), and the scan's dt arguments.

    The kernels compute dt = clamp(softplus(dt + dt_bias), dt_min, dt_max),
    and softplus(-inf) is exactly 0, in Triton and in torch. With a positive
    dt_min the clamp would lift that 0, so then dt is computed here instead,
    as it is when `process` asks for it (the one-launch scans take dt computed).
    """
    if dt_min > 0 or process:
        dt = torch.where(valid, F.softplus(dt.float() + dt_bias).clamp_(dt_min, dt_max), 0.0)
        return dt, {"dt_bias": None, "dt_softplus": False}
    dt = torch.where(valid, dt, float("-inf"))
    return dt, {"dt_bias": dt_bias, "dt_softplus": True, "dt_limit": (dt_min, dt_max)}


def _chunk_scan(kernels, hs, dt, A, B, C, D, ssm_state, use_state, n_groups, head_dim, chunk_size, **dt_args):
    """The SSD chunk scan over all rows of `hs` (batch, rows, heads * head_dim); writes the final state."""
    batch, rows, _ = hs.shape
    result = kernels.mamba2_chunk_scan(
        hs.reshape(batch, rows, -1, head_dim),
        dt,
        A,
        B.reshape(batch, rows, n_groups, -1),
        C.reshape(batch, rows, n_groups, -1),
        chunk_size=chunk_size,
        D=D,
        z=None,
        return_final_states=ssm_state is not None,
        initial_states=ssm_state if use_state else None,
        **dt_args,
    )
    if ssm_state is not None:
        result, final = result
        ssm_state.copy_(final)
    return result.reshape(batch, rows, -1)


# Decided once at import: importing inside a traced function is a graph break.
KERNELS_AVAILABLE = importlib.util.find_spec("mamba_ssm") is not None


def scan_output_dtype(model_dtype: torch.dtype, decode: bool) -> torch.dtype:
    """The dtype HF's own mixer produces before the gated norm, so pcg matches it exactly."""
    if KERNELS_AVAILABLE:
        return model_dtype
    # The torch reference scan computes in fp32; its decode step casts back.
    return model_dtype if decode else torch.float32
