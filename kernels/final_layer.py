"""DiT's final adaLN layer as one fused op: out = (LayerNorm(x) * (1 + scale) + shift) @ weight.T + bias.

LayerNorm has no affine parameters; statistics are fp32 (fp64 for fp64 inputs, which exist for gradcheck).
shift and scale are per sample, (B, D), broadcast over the T tokens, and are read through any strides,
so the views that `mod.chunk(2, dim=1)` gives are used without a copy.

Forward, one kernel, grid (T-chunks, B): a program owns BLOCK_M tokens of one sample. Pass 1 walks D in
BLOCK_K chunks and merges per-chunk mean/M2 (Chan's parallel update) into exact row statistics; pass 2 walks
D again (the tile is now in L1/L2), rebuilds the modulated tile h and accumulates h @ weight.T with tl.dot,
one BLOCK_O slice of the outputs at a time. x is read from HBM once. h is written once (with the first
output slice) and saved, with mean and rstd, for the backward: it costs one (B, T, D) write, and spares
the backward a second pass over x to rebuild it.

Backward, no kernel of its own: grad_h = dout @ weight (a cuBLAS product, (B*T, O) x (O, D)); dx, dshift
and dscale from ln_modulate's backward kernel (kernels/ln_modulate.py: deterministic per-sample sums, no
atomics); dweight = dout^T @ h (cuBLAS) and dbias = sum of dout (accumulated in fp32). An earlier design with two
Triton backward kernels (dh formed per tile with tl.dot and never stored; dweight by split-K over
rebuilt h) measured 0.32 ms at B=128, T=256 on an H200 against 0.22 ms for Inductor's compiled reference:
both were latency-bound loops over 128-column chunks (BENCHMARKS.md).

Block sizes of the forward (fixed rule, no autotuning; tuned for DiT's D=1152 and O in {32, 128, 512}):
  BLOCK_K = min(128, next_power_of_2(D)); BLOCK_M = 16 tokens (tl.dot's smallest M);
  BLOCK_O = next_power_of_2(O) (at least 16), capped so that a weight tile, BLOCK_O by the larger of the
  other two blocks, is at most 32 KiB: with the pipeliner's stages that stays well inside Hopper's
  227 KiB of shared memory; num_warps = 2. bench/kernel_sweep.py timed 12 shapes on an H200 at D = 1152:
  16 tokens x 2 warps 0.075 ms at B*T = 32768, the former 32 x 4 0.0825 ms, 16 x 4 0.095 ms.
Limits: 1 <= D <= MAX_D = 8192, ln_modulate's bound (ValueError past it); any O >= 1 (not only powers of
two), with x re-read from cache once per BLOCK_O slice; row offsets are int64, so B*T*D >= 2^31 works.
All five tensors must share one dtype (fp32, bf16, fp16, or fp64); fp32 products use
input_precision="ieee" so TF32 never rounds them.

torch.compile: the op and its backward are torch.library.triton_ops, so compiled graphs hold them without a
break on the GPU. Under TRITON_INTERPRET=1 (CPU) the launchers call the interpreted kernels directly, so
eager calls work there and torch.compile does not.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .launch import RUNS_IN_INTERPRETER, as_rows, launchable
from .ln_modulate import MAX_BLOCK_D
from .ln_modulate import _backward as ln_modulate_backward

MAX_D = MAX_BLOCK_D
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _final_layer_fwd_kernel(
    X_ptr,  # (N, D) tokens of x, N = B * T, unit column stride
    SHIFT_ptr,  # (B, D) any strides
    SCALE_ptr,  # (B, D) any strides
    W_ptr,  # (O, D) nn.Linear weight, any strides
    BIAS_ptr,  # (O,)
    OUT_ptr,  # (N, O) contiguous
    H_ptr,  # (N, D) contiguous: the modulated norm, saved for the backward's weight gradient
    MEAN_ptr,  # (N,) fp32 (fp64 for fp64 inputs)
    RSTD_ptr,  # (N,)
    T, D, O,
    stride_x_row, stride_shift_b, stride_shift_d, stride_scale_b, stride_scale_d, stride_w_o, stride_w_d,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    WIDE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32/fp64 (never rounded to TF32), "tf32" (a no-op) for 16-bit
):
    """Normalise, modulate and project BLOCK_M tokens of one sample."""
    stats_dtype = tl.float64 if X_ptr.dtype.element_ty == tl.float64 else tl.float32
    dot_dtype = stats_dtype if WIDE_DOT else X_ptr.dtype.element_ty  # tl.dot operands
    chunk = tl.program_id(0)
    sample = tl.program_id(1).to(tl.int64)
    tokens = chunk * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    token_mask = tokens < T
    rows = sample * T + tokens  # (BLOCK_M,) int64
    x_row_ptrs = X_ptr + rows[:, None] * stride_x_row  # (BLOCK_M, 1)

    mean = tl.zeros((BLOCK_M,), dtype=stats_dtype)
    m2 = tl.zeros((BLOCK_M,), dtype=stats_dtype)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < D
        # evict_last: pass 2 reads the tile again (1-3% faster on an H200, session 6's sweep)
        x = tl.load(x_row_ptrs + cols[None, :], mask=token_mask[:, None] & col_mask[None, :], other=0.0,
                    eviction_policy="evict_last")
        x = x.to(stats_dtype)  # (BLOCK_M, BLOCK_K)
        n_total = tl.minimum(k0 + BLOCK_K, D).to(stats_dtype)  # columns merged once this chunk is in
        n_chunk = n_total - k0  # k0 columns were merged before
        chunk_mean = tl.sum(x, axis=1) / n_chunk  # (BLOCK_M,)
        centered = tl.where(col_mask[None, :], x - chunk_mean[:, None], 0.0)
        delta = chunk_mean - mean
        mean += delta * (n_chunk / n_total)
        m2 += tl.sum(centered * centered, axis=1) + delta * delta * (k0 * n_chunk / n_total)
    rstd = 1.0 / tl.sqrt(m2 / D + tl.cast(eps, stats_dtype))  # eps is fp64 under Inductor (ln_modulate.py)
    tl.store(MEAN_ptr + rows, mean, mask=token_mask)
    tl.store(RSTD_ptr + rows, rstd, mask=token_mask)

    shift_ptrs = SHIFT_ptr + sample * stride_shift_b
    scale_ptrs = SCALE_ptr + sample * stride_scale_b
    for o0 in range(0, O, BLOCK_O):
        outs = o0 + tl.arange(0, BLOCK_O)
        out_mask = outs < O
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=stats_dtype)
        for k0 in range(0, D, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < D
            x = tl.load(x_row_ptrs + cols[None, :], mask=token_mask[:, None] & col_mask[None, :], other=0.0)
            shift = tl.load(shift_ptrs + cols * stride_shift_d, mask=col_mask, other=0.0).to(stats_dtype)
            scale = tl.load(scale_ptrs + cols * stride_scale_d, mask=col_mask, other=0.0).to(stats_dtype)
            xhat = (x.to(stats_dtype) - mean[:, None]) * rstd[:, None]
            h = xhat * (1.0 + scale[None, :]) + shift[None, :]  # (BLOCK_M, BLOCK_K)
            tl.store(H_ptr + rows[:, None] * D + cols[None, :], h.to(H_ptr.dtype.element_ty),
                     mask=token_mask[:, None] & col_mask[None, :] & (o0 == 0))  # once, with the first slice
            w_t = tl.load(  # (BLOCK_K, BLOCK_O): weight read transposed
                W_ptr + outs[None, :] * stride_w_o + cols[:, None] * stride_w_d,
                mask=col_mask[:, None] & out_mask[None, :], other=0.0,
            )
            acc = tl.dot(h.to(dot_dtype), w_t.to(dot_dtype), acc, input_precision=DOT_PRECISION, out_dtype=stats_dtype)
        bias = tl.load(BIAS_ptr + outs, mask=out_mask, other=0.0).to(stats_dtype)
        out = acc + bias[None, :]
        tl.store(
            OUT_ptr + rows[:, None] * O + outs[None, :],
            out.to(OUT_ptr.dtype.element_ty),
            mask=token_mask[:, None] & out_mask[None, :],
        )


TILE_BYTES = 32 * 1024  # largest (BLOCK_O, BLOCK_K) tile of weight loaded for one tl.dot


class ForwardConfig(NamedTuple):
    """How the forward kernel is launched (the defaults are the rule in the module docstring)."""

    block_m: int = 16  # tokens per program
    block_k: int = 128  # cap of the column chunk
    num_warps: int = 2


def _block_k(D: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(D)))


def _block_o(O: int, other_block: int, dtype: torch.dtype) -> int:
    """Output-slice width: all of O when an (O, other_block) tile fits TILE_BYTES, else the widest that does."""
    cap = max(16, TILE_BYTES // (other_block * dtype.itemsize))
    return max(16, min(cap, triton.next_power_of_2(O)))


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _wide_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot multiplies in fp32/fp64 ("ieee") rather than on 16-bit tensor-core operands.

    True for fp32 and fp64 inputs. Also for bf16 under the interpreter, which multiplies bf16 tiles as raw
    uint16 (numpy has no bf16): widening gives the same result, as bf16 products are exact in fp32 and the
    GPU accumulates in fp32 too.
    """
    return dtype in (torch.float32, torch.float64) or (RUNS_IN_INTERPRETER and dtype == torch.bfloat16)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact for wide floats (a string constexpr: triton 3.6 cannot pick one in-kernel)."""
    return "ieee" if _wide_dot(dtype) else "tf32"


def _check_inputs(x, shift, scale, weight, bias) -> None:
    """Raise a ValueError (shape, device) or TypeError (dtype) naming the first argument that does not fit."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, D); got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if not 1 <= D <= MAX_D:
        raise ValueError(f"final_layer supports 1 <= D <= {MAX_D}; got D={D}")
    if T < 1 or B < 1:
        raise ValueError(f"x must hold at least one token; got shape {tuple(x.shape)}")
    for name, t in (("shift", shift), ("scale", scale)):
        if tuple(t.shape) != (B, D):
            raise ValueError(f"{name} must be (B, D) = {(B, D)} to match x {tuple(x.shape)}; got {tuple(t.shape)}")
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must be (O, D) with D={D} (nn.Linear layout); got {tuple(weight.shape)}")
    O = weight.shape[0]
    if tuple(bias.shape) != (O,):
        raise ValueError(f"bias must be (O,) = ({O},) to match weight {tuple(weight.shape)}; got {tuple(bias.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    for name, t in (("shift", shift), ("scale", scale), ("weight", weight), ("bias", bias)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; expected x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _launch_forward(x, shift, scale, weight, bias, eps, config: ForwardConfig = ForwardConfig()):
    """Check inputs, run the forward kernel; returns out (B, T, O), h (B, T, D), mean and rstd (B*T,) in fp32.

    `config` overrides the launch rule (bench/kernel_sweep.py times alternatives that way).
    """
    _check_inputs(x, shift, scale, weight, bias)
    B, T, D = x.shape
    O = weight.shape[0]
    x2d = as_rows(x, D)  # (N, D)
    out = torch.empty((B * T, O), device=x.device, dtype=x.dtype)  # (N, O)
    h = torch.empty((B, T, D), device=x.device, dtype=x.dtype)  # (B, T, D)
    mean = torch.empty((B * T,), device=x.device, dtype=_stats_dtype(x.dtype))  # (N,)
    rstd = torch.empty_like(mean)  # (N,)
    block_m = config.block_m
    block_k = _block_k(D, config.block_k)
    grid = (triton.cdiv(T, block_m), B)
    launchable(_final_layer_fwd_kernel)[grid](
        x2d, shift, scale, weight, bias, out, h, mean, rstd,
        T, D, O,
        x2d.stride(0), shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1),
        weight.stride(0), weight.stride(1),
        eps,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_O=_block_o(O, max(block_m, block_k), x.dtype),
        WIDE_DOT=_wide_dot(x.dtype), DOT_PRECISION=_dot_precision(x.dtype), num_warps=config.num_warps,
    )
    return out.view(B, T, O), h, mean, rstd


def _launch_backward(grad_out, x, h, scale, weight, mean, rstd):
    """dx, dshift, dscale, dweight, dbias from the saved x, h, mean and rstd (module docstring)."""
    B, T, D = x.shape
    O = weight.shape[0]
    if tuple(grad_out.shape) != (B, T, O):
        raise ValueError(f"grad_out must be (B, T, O) = {(B, T, O)}; got {tuple(grad_out.shape)}")
    dout = grad_out.to(x.dtype).reshape(B * T, O)  # (N, O)
    grad_h = (dout @ weight).view(B, T, D)  # (B, T, D): the linear's input gradient
    dx, _, _, dshift, dscale = ln_modulate_backward(grad_h, None, x, None, None, scale, mean, rstd)
    dweight = dout.t() @ h.reshape(B * T, D)  # (O, D)
    dbias = dout.sum(0)  # (O,): torch accumulates 16-bit sums in fp32 and rounds once, in one kernel
    return dx, dshift, dscale, dweight, dbias


@triton_op("dit_fast::final_layer", mutates_args=())
def _final_layer_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward as a registered op: out (B, T, O) plus the saved h (B, T, D), mean and rstd (B*T,)."""
    return _launch_forward(x, shift, scale, weight, bias, eps)


@triton_op("dit_fast::final_layer_backward", mutates_args=())
def _final_layer_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward as a registered op, so compiled backward graphs hold it without a break."""
    return _launch_backward(grad_out, x, h, scale, weight, mean, rstd)


def _setup_context(ctx, inputs, output):
    x, _shift, scale, weight, _bias, _eps = inputs
    _out, h, mean, rstd = output
    ctx.save_for_backward(x, h, scale, weight, mean, rstd)
    ctx.mark_non_differentiable(h, mean, rstd)


def _backward(ctx, grad_out, _grad_h, _grad_mean, _grad_rstd):
    x, h, scale, weight, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dweight, dbias = _final_layer_backward_op(grad_out, x, h, scale, weight, mean, rstd)
    return dx, dshift, dscale, dweight, dbias, None


_final_layer_op.register_autograd(_backward, setup_context=_setup_context)


def final_layer(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """DiT final layer: (LayerNorm(x) * (1 + scale) + shift) @ weight.T + bias; x (B, T, D) -> (B, T, O).

    shift, scale: (B, D), per sample (strided chunk views are fine); weight (O, D), bias (O,) as in nn.Linear.
    """
    out, _h, _mean, _rstd = _final_layer_op(x, shift, scale, weight, bias, eps)
    return out


def final_layer_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Plain PyTorch reference, as in DiT's FinalLayer: affine-free LayerNorm, modulate, nn.Linear."""
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)  # (B, T, D)
    h = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, T, D)
    return torch.nn.functional.linear(h, weight, bias)  # (B, T, O)
