"""The last step of every backward's deterministic reduction: add up per-chunk partial sums, round once.

The backward kernels of ln_modulate, gated_residual_ln_modulate, gated_residual and bias_gelu reduce their
per-sample (or per-column) gradients over rows without atomics: each program owns a chunk of rows and
writes its fp32 (fp64 for fp64 inputs) partial sum, into buffers of shape (G, n_chunks, D). `sum_chunks`
adds the chunks of up to three same-shape buffers in one kernel, in a fixed order, and rounds each result
once to the gradient's dtype. `.sum(1).to(dtype)` took two kernels per buffer: six tiny launches for
gated_residual_ln_modulate's dshift, dscale and dgate where this takes one.

Grid (G, column blocks); a program walks the chunks in tiles of BLOCK_C x BLOCK_D, so a long chunk axis
(bias_gelu: 256 chunks at DiT-XL/2 training shapes) takes a few loop iterations, not hundreds. BLOCK_D is
chosen to give about TARGET_PROGRAMS programs, within [MIN_BLOCK_D, MAX_BLOCK_D]; a tile holds at most TILE
elements per buffer.
"""
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .launch import launchable

MAX_BUFFERS = 3
TARGET_PROGRAMS = 512
MIN_BLOCK_D, MAX_BLOCK_D = 32, 256
TILE = 2048
NUM_WARPS = 4


@triton.jit
def _sum_chunks_kernel(
    A_ptr,  # (G, n_chunks, D) contiguous partial sums
    B_ptr,  # same shape; read only when N_BUFFERS > 1
    C_ptr,  # same shape; read only when N_BUFFERS > 2
    OUT_A_ptr,  # (G, D) contiguous, the sums over chunks in the output dtype
    OUT_B_ptr,
    OUT_C_ptr,
    n_chunks,
    D,
    N_BUFFERS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D
    acc_a = tl.zeros([BLOCK_C, BLOCK_D], dtype=A_ptr.dtype.element_ty)
    acc_b = tl.zeros([BLOCK_C, BLOCK_D], dtype=A_ptr.dtype.element_ty)
    acc_c = tl.zeros([BLOCK_C, BLOCK_D], dtype=A_ptr.dtype.element_ty)
    for first in range(0, n_chunks, BLOCK_C):
        chunks = first + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        mask = (chunks < n_chunks)[:, None] & col_ok[None, :]
        offsets = (group * n_chunks + chunks[:, None]) * D + cols[None, :]  # (BLOCK_C, BLOCK_D) int64
        acc_a += tl.load(A_ptr + offsets, mask=mask, other=0.0)
        if N_BUFFERS > 1:
            acc_b += tl.load(B_ptr + offsets, mask=mask, other=0.0)
        if N_BUFFERS > 2:
            acc_c += tl.load(C_ptr + offsets, mask=mask, other=0.0)
    out_offsets = group * D + cols  # (BLOCK_D,)
    tl.store(OUT_A_ptr + out_offsets, tl.sum(acc_a, axis=0).to(OUT_A_ptr.dtype.element_ty), mask=col_ok)
    if N_BUFFERS > 1:
        tl.store(OUT_B_ptr + out_offsets, tl.sum(acc_b, axis=0).to(OUT_B_ptr.dtype.element_ty), mask=col_ok)
    if N_BUFFERS > 2:
        tl.store(OUT_C_ptr + out_offsets, tl.sum(acc_c, axis=0).to(OUT_C_ptr.dtype.element_ty), mask=col_ok)


def sum_chunks(parts: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Sums over dim 1 of 1 to 3 contiguous (G, n_chunks, D) buffers of one shape and dtype: (G, D) each, in dtype."""
    if not 1 <= len(parts) <= MAX_BUFFERS:
        raise ValueError(f"sum_chunks takes 1 to {MAX_BUFFERS} buffers; got {len(parts)}")
    first = parts[0]
    for part in parts:
        if part.dim() != 3 or part.shape != first.shape or part.dtype != first.dtype or not part.is_contiguous():
            raise ValueError(
                f"partial-sum buffers must be contiguous (G, n_chunks, D) of one shape and dtype; got "
                f"{[(tuple(p.shape), p.dtype, p.is_contiguous()) for p in parts]}"
            )
    G, n_chunks, D = first.shape
    outs = [torch.empty((G, D), dtype=dtype, device=first.device) for _ in parts]
    if first.numel() == 0:
        return [out.zero_() for out in outs]
    block_d = max(MIN_BLOCK_D, min(MAX_BLOCK_D, triton.next_power_of_2(triton.cdiv(G * D, TARGET_PROGRAMS))))
    block_c = min(triton.next_power_of_2(n_chunks), max(1, TILE // block_d))
    unused = MAX_BUFFERS - len(parts)  # slots the kernel never touches get the first buffer
    launchable(_sum_chunks_kernel)[(G, triton.cdiv(D, block_d))](
        *parts, *[first] * unused, *outs, *[outs[0]] * unused, n_chunks, D,
        N_BUFFERS=len(parts), BLOCK_C=block_c, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )  # fmt: skip
    return outs
