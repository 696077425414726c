"""Bias + tanh-GELU of an MLP's first layer: a = gelu_tanh(z + bias), for z = x @ W1^T (..., H) and bias (H,).

gelu_tanh(u) = 0.5 * u * (1 + tanh(v)), v = k0 * (u + 0.044715 * u^3), k0 = sqrt(2 / pi), and
gelu_tanh'(u) = 0.5 * (1 + tanh(v)) + 0.5 * u * (1 - tanh(v)^2) * k0 * (1 + 3 * 0.044715 * u^2).
Everything is computed in fp32 (fp64 for fp64 inputs, which exist for gradcheck) and rounded once on store.

Forward: one kernel over (BLOCK_M, BLOCK_H) tiles of z, one grid axis with column blocks fastest (programs
running together cover whole rows: contiguous memory). Backward: saves (z, bias), not a; grid (column
blocks, row chunks), each program walks rows_per_chunk rows of one column block in BLOCK_M-row tiles,
writes dz = da * gelu_tanh'(z + bias) and keeps a (BLOCK_M, BLOCK_H) fp32 register accumulator of the same
dz values *before* rounding to z's dtype, reduced over rows once at the end into an fp32 (n_chunks, H)
buffer of partial column sums. dbias = that buffer's sum (kernels/partial_sums.py), rounded to bias's dtype: no
atomics, bit-identical run to run, and more accurate than summing the rounded dz (what PyTorch's autograd
of `F.gelu(z + bias)` does). Offsets are int64 (M * H >= 2^31 works); masks allow any M, H >= 1.

Bytes moved, for N = M * H elements of s bytes (s = 2 for bf16): forward reads z and writes a, 2*s*N
(1.21 GB at DiT-XL/2 training, M = 256 * 256 = 65536, H = 4608: 0.29 ms at 4.2 TB/s); backward reads da and
z and writes dz, 3*s*N (1.81 GB, 0.43 ms), plus n_chunks * H * 4 bytes of partial sums written and read
back once (2.4 MB there). The bias vector is read once per tile (from cache). The Inductor kernels this
replaces moved 2*s*N (bias + gelu), 3*s*N (gelu_backward) and another s*N (fc1's bias gradient, a separate
column sum that re-reads dz).

Launch rule (`forward_config` / `backward_config`; fixed, no autotuning; `LaunchConfig` overrides it for a
sweep). BLOCK_H = min(256, next_power_of_2(H)) (256 divides DiT's MLP widths 1536, 3072, 4096 and 4608),
forward BLOCK_M = 32, 8 warps: a 32 x 256 tile is 8192 elements, 32 per thread, i.e. four 16-byte vector
loads of bf16 in flight per thread and 16 KiB per program. Forward grid: cdiv(M, 32) * cdiv(H, 256)
programs (36,864 at XL); on an H200 it runs at 99% of the measured copy bandwidth (BENCHMARKS.md).
Backward: 16 x 256 tiles, 4 warps, 256 rows per program (more only when M / 256 would pass the grid's
limit on chunks): 256 chunks x 18 column blocks = 4608 programs at XL, each streaming 256 x 256 elements
with one row reduction at the end (the per-tile accumulation is element-wise, no cross-warp reduction
inside the loop). A sweep of 3 tile heights x 2 warp counts x 4 chunk sizes on an H200 (session 5) put
this first at M = 32768 and 65536 with H = 4608: 0.252 and 0.468 ms, against 0.265 and 0.476 ms for the
first rule (32 x 256 tiles, 8 warps, about 2300 programs).

tanh: with FAST_TANH (the default on CUDA for bf16/fp16 inputs) it is the hardware approximation
`tanh.approx.f32` (one MUFU op; PTX ISA: maximum relative error about 2^-11, 2^-10.987, over the whole
range). That is at or below the rounding of the outputs (unit roundoff 2^-8 for bf16, 2^-11 for fp16), so
where a and dz are O(|u|) they round to within about one ulp of the exact values. Caveat: the error is
relative to tanh itself, so near saturation (|v| >~ 3) it is an absolute error of up to 2^-11 on 1 + t
(u << 0) and on 1 - t^2: there a and dz may carry absolute errors up to about |u| * 2^-12 and
|u| * (1 + 0.134 u^2) * 2^-11, comparable to the rounding of O(1) values but not small relative to the
tails themselves (tests/gpu/test_kernels_gpu.py checks u in [-12, 12] with the three-way rule). Without
FAST_TANH (fp32 and fp64 inputs everywhere; every dtype under TRITON_INTERPRET=1, where inline asm cannot
run) tanh comes from one exp and one division, written so that nothing overflows or cancels: with
e = exp(-2|v|) in (0, 1] and r = 1 / (1 + e), 0.5 * (1 + t) = r (v >= 0) or e * r (v < 0), and
0.5 * (1 - t^2) = 2 * e * r^2, accurate in the tails too. `_forward(..., fast_tanh=False)` (and
`_backward`) take this path for 16-bit inputs on CUDA as well, at one more MUFU op per element.

torch.compile: the op and its backward are torch.library.triton_ops, so compiled graphs hold them without a
break on the GPU. Under TRITON_INTERPRET=1 (CPU) the launchers call the interpreted kernels directly, so
eager calls work there and torch.compile does not.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from .launch import RUNS_IN_INTERPRETER, as_rows, launchable, row_major_tile
from .partial_sums import sum_chunks

# constexpr globals go on the right of a tensor product: the interpreter's constexpr * tensor is not a tensor.
K0 = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
CUBIC = tl.constexpr(0.044715)
MAX_BLOCK_H = 256
BLOCK_M, NUM_WARPS = 32, 8  # forward: rows of a tile and warps
BACKWARD_BLOCK_M, BACKWARD_NUM_WARPS = 16, 4
ROWS_PER_CHUNK = 256  # backward rows per program, unless the grid's chunk limit needs more
MAX_CHUNKS = 65535  # CUDA's limit on the grid's second axis
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FAST_TANH_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _tanh_halves(v, FAST_TANH: tl.constexpr):
    """(0.5 * (1 + tanh(v)), 0.5 * (1 - tanh(v)^2)) for v in fp32 (fp64 for fp64 inputs)."""
    if FAST_TANH:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1
        )  # fmt: skip
        return 0.5 + 0.5 * t, 0.5 - 0.5 * t * t
    else:
        e = tl.exp(-2.0 * tl.abs(v))  # in (0, 1]: no overflow
        r = 1.0 / (1.0 + e)  # in [1/2, 1)
        er = e * r
        return tl.where(v >= 0, r, er), 2.0 * er * r


@triton.jit
def _bias_gelu_fwd_kernel(
    Z_ptr,  # (M, H) row stride stride_z, unit column stride
    BIAS_ptr,  # (H,) contiguous
    A_ptr,  # (M, H) contiguous
    M,
    H,
    stride_z,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    compute = tl.float64 if Z_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows, cols = row_major_tile(M, H, BLOCK_M, BLOCK_H)  # (BLOCK_M,) int64, (BLOCK_H,)
    col_ok = cols < H
    mask = (rows < M)[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_H)
    bias = tl.load(BIAS_ptr + cols, mask=col_ok, other=0.0).to(compute)  # (BLOCK_H,)
    z = tl.load(Z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(compute)
    u = z + bias[None, :]  # (BLOCK_M, BLOCK_H)
    half_one_plus_t, _ = _tanh_halves((u + u * u * u * CUBIC) * K0, FAST_TANH)
    a = u * half_one_plus_t
    tl.store(A_ptr + rows[:, None] * H + cols[None, :], a.to(A_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DA_ptr,  # (M, H) grad of a, row stride stride_da, unit column stride
    Z_ptr,  # (M, H) row stride stride_z, unit column stride
    BIAS_ptr,  # (H,) contiguous
    DZ_ptr,  # (M, H) contiguous
    DBIAS_PART_ptr,  # (n_chunks, H) contiguous fp32 (fp64 for fp64 inputs): column sums of dz over a chunk
    M,
    H,
    rows_per_chunk,  # runtime, not constexpr: it depends on M, which torch.compile may make symbolic
    stride_da,
    stride_z,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    compute = tl.float64 if Z_ptr.dtype.element_ty == tl.float64 else tl.float32
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    chunk = tl.program_id(1)
    first_row = chunk.to(tl.int64) * rows_per_chunk  # int64
    n_rows = tl.minimum(rows_per_chunk, M - chunk * rows_per_chunk)  # rows in this chunk (M < 2^31 rows)
    col_ok = cols < H
    bias = tl.load(BIAS_ptr + cols, mask=col_ok, other=0.0).to(compute)  # (BLOCK_H,)
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=compute)  # element-wise partial sums; one row reduction at the end
    for tile_start in range(0, n_rows, BLOCK_M):
        local = tile_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        rows = first_row + local  # (BLOCK_M,) int64
        mask = (local < n_rows)[:, None] & col_ok[None, :]  # (BLOCK_M, BLOCK_H)
        da = tl.load(DA_ptr + rows[:, None] * stride_da + cols[None, :], mask=mask, other=0.0).to(compute)
        z = tl.load(Z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(compute)
        u = z + bias[None, :]
        half_one_plus_t, half_one_minus_t2 = _tanh_halves((u + u * u * u * CUBIC) * K0, FAST_TANH)
        dgelu = half_one_plus_t + u * half_one_minus_t2 * ((u * u * (3.0 * CUBIC) + 1.0) * K0)
        dz = da * dgelu  # masked elements: da = 0, so dz = 0 and the sums are untouched
        tl.store(DZ_ptr + rows[:, None] * H + cols[None, :], dz.to(DZ_ptr.dtype.element_ty), mask=mask)
        acc += dz
    tl.store(DBIAS_PART_ptr + chunk.to(tl.int64) * H + cols, tl.sum(acc, axis=0), mask=col_ok)


class LaunchConfig(NamedTuple):
    """How a kernel is launched: tiles of `block_m` x `block_h` (powers of two), `num_warps`, and (backward)
    the rows one program walks (best a multiple of block_m, so that only the last chunk has a ragged tile)."""

    block_m: int
    block_h: int
    num_warps: int
    rows_per_chunk: int = 0  # backward only


def _block_h(H: int) -> int:
    return min(MAX_BLOCK_H, triton.next_power_of_2(H))


def forward_config(M: int, H: int) -> LaunchConfig:
    """The forward's launch rule (module docstring)."""
    return LaunchConfig(BLOCK_M, _block_h(H), NUM_WARPS)


def backward_config(M: int, H: int) -> LaunchConfig:
    """The backward's launch rule (module docstring): ROWS_PER_CHUNK rows per program, power-of-two chunks."""
    rows_per_chunk = max(ROWS_PER_CHUNK, triton.next_power_of_2(triton.cdiv(M, MAX_CHUNKS)))
    return LaunchConfig(BACKWARD_BLOCK_M, _block_h(H), BACKWARD_NUM_WARPS, rows_per_chunk)


def uses_fast_tanh(dtype: torch.dtype, device: torch.device) -> bool:
    """The default tanh: tanh.approx.f32 for bf16/fp16 on CUDA; exact for fp32/fp64 and in the interpreter."""
    return not RUNS_IN_INTERPRETER and device.type == "cuda" and dtype in FAST_TANH_DTYPES


def _fast_tanh_flag(fast_tanh: bool | None, dtype: torch.dtype, device: torch.device) -> bool:
    if fast_tanh is None:
        return uses_fast_tanh(dtype, device)
    if fast_tanh and (RUNS_IN_INTERPRETER or device.type != "cuda" or dtype == torch.float64):
        raise ValueError(f"fast_tanh=True needs fp32/bf16/fp16 on CUDA (inline PTX); got {dtype} on {device}")
    return fast_tanh


def _check_inputs(z: torch.Tensor, bias: torch.Tensor) -> None:
    """Raise a ValueError/TypeError naming the input whose shape, dtype or device does not fit."""
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"z has dtype {z.dtype}; expected one of {', '.join(map(str, SUPPORTED_DTYPES))}")
    if z.dim() < 1 or z.shape[-1] < 1:
        raise ValueError(f"z must be (..., H) with H >= 1; got shape {tuple(z.shape)}")
    H = z.shape[-1]
    if tuple(bias.shape) != (H,):
        raise ValueError(f"bias must have shape ({H},) to match z {tuple(z.shape)}; got {tuple(bias.shape)}")
    if bias.dtype != z.dtype:
        raise TypeError(f"bias has dtype {bias.dtype}; expected z's dtype {z.dtype}")
    if bias.device != z.device:
        raise ValueError(f"bias is on {bias.device}; expected z's device {z.device}")


def _forward(z, bias, config: LaunchConfig | None = None, fast_tanh: bool | None = None) -> torch.Tensor:
    """Launch the forward kernel; `config` and `fast_tanh` override the defaults (for a GPU sweep)."""
    H = z.shape[-1]
    a = torch.empty(z.shape, dtype=z.dtype, device=z.device)  # (..., H)
    if a.numel() == 0:
        return a
    z2 = as_rows(z, H)  # (M, H)
    M = z2.shape[0]
    block_m, block_h, num_warps, _ = config or forward_config(M, H)
    bias = bias.contiguous()  # (H,)
    launchable(_bias_gelu_fwd_kernel)[(triton.cdiv(M, block_m) * triton.cdiv(H, block_h),)](
        z2, bias, a, M, H, z2.stride(0),
        BLOCK_M=block_m, BLOCK_H=block_h, FAST_TANH=_fast_tanh_flag(fast_tanh, z.dtype, z.device),
        num_warps=num_warps,
    )  # fmt: skip
    return a


def _backward(
    grad_a, z, bias, config: LaunchConfig | None = None, fast_tanh: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel and finish dbias; returns (dz, dbias). Overrides as in `_forward`."""
    H = z.shape[-1]
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)  # (..., H)
    if dz.numel() == 0:
        return dz, torch.zeros_like(bias)
    da2, z2 = as_rows(grad_a, H), as_rows(z, H)  # (M, H)
    M = z2.shape[0]
    block_m, block_h, num_warps, rows_per_chunk = config or backward_config(M, H)
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1 for the backward; got {rows_per_chunk}")
    n_chunks = triton.cdiv(M, rows_per_chunk)
    if n_chunks > MAX_CHUNKS:
        raise ValueError(f"{M} rows in chunks of {rows_per_chunk} make {n_chunks} chunks; at most {MAX_CHUNKS}")
    part_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    dbias_part = torch.empty((n_chunks, H), dtype=part_dtype, device=z.device)  # (n_chunks, H)
    bias = bias.contiguous()  # (H,)
    launchable(_bias_gelu_bwd_kernel)[(triton.cdiv(H, block_h), n_chunks)](
        da2, z2, bias, dz, dbias_part, M, H, rows_per_chunk, da2.stride(0), z2.stride(0),
        BLOCK_M=block_m, BLOCK_H=block_h, FAST_TANH=_fast_tanh_flag(fast_tanh, z.dtype, z.device), num_warps=num_warps,
    )  # fmt: skip
    (dbias,) = sum_chunks([dbias_part.unsqueeze(0)], bias.dtype)  # (1, H)
    return dz, dbias.view(H)


@triton_op("dit_fast::bias_gelu", mutates_args=())
def _bias_gelu_op(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(z + bias) for z (..., H) and bias (H,)."""
    _check_inputs(z, bias)
    return _forward(z, bias)


@triton_op("dit_fast::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(
    grad_a: torch.Tensor, z: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dz, dbias) of bias_gelu, from the saved inputs (z, bias)."""
    return _backward(grad_a, z, bias)


def _bias_gelu_setup_context(ctx, inputs, output):
    z, bias = inputs
    ctx.save_for_backward(z, bias)  # not a: the backward recomputes tanh from z + bias


def _bias_gelu_backward(ctx, grad_a):
    z, bias = ctx.saved_tensors
    return _bias_gelu_backward_op(grad_a, z, bias)


_bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup_context)


def bias_gelu(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(z + bias); z (..., H), bias (H,) of z's dtype. Returns a new contiguous (..., H) tensor."""
    return _bias_gelu_op(z, bias)


def bias_gelu_ref(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch bias_gelu: F.gelu(z + bias, approximate="tanh")."""
    return F.gelu(z + bias, approximate="tanh")
