"""One Triton kernel that readies a fresh, padded Mamba2 prefill for the scan, causal conv included.

Inside a captured prefill graph the Mamba2 core runs at the bucket size and
reads the real token count n from a device tensor. Written with torch ops, the
work in front of the conv took about 15 small kernels per layer: a
channels-innermost copy of `xBC`, the row mask, six for the conv-state window
(rows n-width..n-1, zero before row 0), and five for dt. At 16 tokens each
costs about as much as its launch, 2-3 µs, so across the 9B model's 27 Mamba
layers they came to about 1 ms of GPU time per prefill (H100 profile).

`prepare` does all of it in one launch, one program per tile of rows and
channels of one sequence:

- `x`: `xBC` copied to a dense (batch, rows, channels) buffer, whose transpose
  is the channels-innermost layout causal-conv1d's fast path takes; or,
  given the conv's weights (`conv=`, the fresh prefill's usual case), the
  causal conv's output itself in that layout, computed as causal-conv1d
  computes it from a zero state, which saves the conv's own launch (about
  3 µs per layer at 16 tokens on an H200);
- the conv state: rows n-width..n-1 of `xBC` as its columns, zeros before
  row 0;
- `dt`: clamp(softplus(dt + dt_bias), dt_min, dt_max) in fp32, exactly as the
  scan kernels compute it themselves (the same softplus with its threshold at
  20), and 0 on padded rows, which makes each of them an identity step of the
  SSM;
- `keep`: the row mask, rows < n.

Only CUDA tensors go through it; on CPU the Mamba2 core uses torch ops for
the same values (`mamba2._padded_prefill`), which the CPU tests check.
`LAUNCHES` counts its launches on the host, with the conv and without: tests
read them to see which path a model took.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build ships without Triton
    triton = None

# Launches, counted on the host (at capture, not at replay), by whether the conv ran inside.
LAUNCHES = {"with_conv": 0, "without_conv": 0}


def available(xBC: torch.Tensor, conv_state: torch.Tensor) -> bool:
    """True if `prepare` can run: Triton, CUDA tensors, unit channel strides, and the conv's
    channel-last layout (which needs the channel count to be a multiple of 8)."""
    return (triton is not None and xBC.is_cuda and xBC.stride(-1) == 1 and xBC.shape[-1] % 8 == 0
            and conv_state.dtype == xBC.dtype)


if triton is not None:

    @triton.jit
    def _prep_kernel(
        x_ptr, x_sb, x_sr, out_ptr,
        state_ptr, s_sb, s_sc, s_sk,
        dt_ptr, dt_sb, dt_sr, dt_sh, bias_ptr, dt_out_ptr, keep_ptr, count_ptr,
        w_ptr, w_sc, w_sk, conv_bias_ptr,
        rows, channels, heads, dt_min, dt_max,
        WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
        CONV: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, SILU: tl.constexpr,
    ):
        b = tl.program_id(0)
        rb = tl.program_id(1)
        cb = tl.program_id(2)
        n = tl.load(count_ptr).to(tl.int32)
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        r_in = r < rows
        c_in = c < channels
        tile = r_in[:, None] & c_in[None, :]
        x = tl.load(x_ptr + b * x_sb + r[:, None] * x_sr + c[None, :], mask=tile, other=0.0)
        if CONV:
            # The causal conv itself, as causal-conv1d computes it: fp32, the bias first, then the taps
            # in order over rows r-WIDTH+1..r (zero before row 0), then the activation. Padded rows are
            # not masked: the conv is causal, so they reach only padded outputs.
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            if HAS_CONV_BIAS:
                acc += tl.load(conv_bias_ptr + c, mask=c_in, other=0.0).to(tl.float32)[None, :]
            for j in tl.static_range(WIDTH):
                src = r - (WIDTH - 1 - j)
                tap = tl.load(x_ptr + b * x_sb + src[:, None] * x_sr + c[None, :],
                              mask=tile & (src >= 0)[:, None], other=0.0)
                weight = tl.load(w_ptr + c * w_sc + j * w_sk, mask=c_in, other=0.0).to(tl.float32)
                acc += tap.to(tl.float32) * weight[None, :]
            if SILU:
                acc = acc / (1.0 + tl.exp(-acc))
            tl.store(out_ptr + (b * rows + r[:, None]) * channels + c[None, :], acc.to(x.dtype), mask=tile)
        else:
            tl.store(out_ptr + (b * rows + r[:, None]) * channels + c[None, :], x, mask=tile)

        # The conv state: real row r lands in column r - (n - WIDTH) when that is >= 0.
        column = r - (n - WIDTH)
        in_window = (column >= 0) & (r < n)
        state = state_ptr + b * s_sb + c[None, :] * s_sc
        tl.store(state + column[:, None] * s_sk, x, mask=tile & in_window[:, None])
        if rb == 0:
            # Fewer than WIDTH real rows: the columns before row 0 are zero, as after a zero-padded conv.
            k = tl.arange(0, WIDTH_P2)
            before = (k < WIDTH - n) & (k < WIDTH)
            zeros = tl.zeros((WIDTH_P2, BLOCK_C), dtype=x.dtype)
            tl.store(state + k[:, None] * s_sk, zeros, mask=before[:, None] & c_in[None, :])

        if cb == 0:
            h = tl.arange(0, BLOCK_H)
            h_in = h < heads
            rh = r_in[:, None] & h_in[None, :]
            dt = tl.load(dt_ptr + b * dt_sb + r[:, None] * dt_sr + h[None, :] * dt_sh, mask=rh, other=0.0)
            dt = dt.to(tl.float32) + tl.load(bias_ptr + h, mask=h_in, other=0.0).to(tl.float32)[None, :]
            # mamba-ssm's own softplus (ops/triton/softplus.py) and threshold, so dt matches its scan bit for bit
            dt = tl.where(dt <= 20.0, tl.math.log(tl.math.exp(dt) + 1), dt)
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
            dt = tl.where((r < n)[:, None], dt, 0.0)
            tl.store(dt_out_ptr + (b * rows + r[:, None]) * heads + h[None, :], dt, mask=rh)
            if b == 0:
                tl.store(keep_ptr + r, r < n, mask=r_in)


# What causal-conv1d applies after its conv, by the name HF's mixers pass it: whether it is SiLU.
CONV_ACTIVATIONS = {None: False, "silu": True, "swish": True}


def conv_fusable(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, activation: str | None,
                 conv_state: torch.Tensor) -> bool:
    """True if `prepare` can run the causal conv itself: a (channels, width) weight of the conv state's
    width and channel count, a bias of one value per channel (or none), and no activation or SiLU."""
    channels, width = conv_state.shape[-2:]
    return (conv_weight.dim() == 2 and tuple(conv_weight.shape) == (channels, width)
            and conv_weight.device == conv_state.device
            and (conv_bias is None or (conv_bias.dim() == 1 and conv_bias.shape[0] == channels
                                       and conv_bias.device == conv_state.device))
            and activation in CONV_ACTIVATIONS)


def prepare(xBC: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor, count: torch.Tensor,
            conv_state: torch.Tensor, dt_min: float, dt_max: float,
            conv: tuple[torch.Tensor, torch.Tensor | None, str | None] | None = None):
    """(x, dt, keep) for a fresh padded prefill, writing the conv state (see the module docstring).

    x: (batch, rows, channels) dense, in xBC's dtype; dt: (batch, rows, heads) fp32; keep: (rows,) bool.
    With `conv` = (weight, bias, activation) (`conv_fusable`), x is instead the causal conv's output
    after the activation, as `causal_conv1d_fn` gives it for a zero initial state, in the same layout:
    one launch fewer per layer.
    """
    batch, rows, channels = xBC.shape
    heads = dt.shape[-1]
    dt_bias = dt_bias.contiguous()   # the kernel reads it at unit stride; a no-op for a parameter
    width = conv_state.shape[-1]
    x = torch.empty(batch, rows, channels, dtype=xBC.dtype, device=xBC.device)
    dt_out = torch.empty(batch, rows, heads, dtype=torch.float32, device=xBC.device)
    keep = torch.empty(rows, dtype=torch.bool, device=xBC.device)
    if conv is not None:
        conv_weight, conv_bias, activation = conv
        if not conv_fusable(conv_weight, conv_bias, activation, conv_state):
            raise ValueError("mamba2_prep.prepare: this conv cannot be fused (see conv_fusable)")
        conv_bias = conv_bias.contiguous() if conv_bias is not None else None
    else:
        conv_weight, conv_bias, activation = xBC, None, None   # unread: CONV is off
    block_r = min(16, triton.next_power_of_2(rows))
    block_c = 256
    grid = (batch, triton.cdiv(rows, block_r), triton.cdiv(channels, block_c))
    _prep_kernel[grid](
        xBC, xBC.stride(0), xBC.stride(1), x,
        conv_state, conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        dt, dt.stride(0), dt.stride(1), dt.stride(2), dt_bias, dt_out, keep, count,
        conv_weight, conv_weight.stride(0), conv_weight.stride(-1), conv_bias if conv_bias is not None else x,
        rows, channels, heads, float(dt_min), float(dt_max),
        WIDTH=width, WIDTH_P2=triton.next_power_of_2(width),
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_H=triton.next_power_of_2(heads),
        CONV=conv is not None, HAS_CONV_BIAS=conv_bias is not None, SILU=CONV_ACTIVATIONS[activation],
    )
    LAUNCHES["with_conv" if conv is not None else "without_conv"] += 1
    return x, dt_out, keep
