"""ln_modulate's plain forward (no residual) with its rows read and written through TMA tensor descriptors.

The register-tile forward (kernels/ln_modulate.py) keeps each row in registers from its load to its store;
with the row's reductions in between, too few bytes are in flight per SM and the plain forward stalls at
73-76% of copy bandwidth on an H200, while the same tile as a plain copy reaches 95%. This kernel is
persistent and software-pipelined (`tl.range(num_stages=...)`): the TMA unit fetches the next tiles into
shared memory while the current one is reduced, so bytes in flight no longer cost registers.

A row of D elements is viewed as (D // SEG, SEG) segments of SEG = 128 bytes (fewer elements when D is
not a multiple of that), and the segments as two power-of-two parts, NA + NB (1152 = 64 * (16 + 2) in
bf16): one descriptor box each, so no lane is padding. `tma_layout` says whether a D decomposes that way
(DiT's 384, 768, 1024 and 1152 all do); kernels/ln_modulate.py falls back to its register-tile kernel
when it does not, when a tensor's base or row stride is not 16-byte aligned, and inside torch.compile
(`can_use_tma` says why).

Same contract as the register-tile forward: math in fp32 (fp64 for fp64 inputs), shift and scale per sample
(`row // T`), mean and rstd saved for the backward. gated_residual_ln_modulate keeps the register-tile kernel,
already at 89-91% of copy bandwidth: this design measured 0.098 ms against its 0.080 at B*T = 32768 on an
H200 (session 7, the residual's y load and x_new store through descriptors too).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from triton.tools.tensor_descriptor import TensorDescriptor

from .launch import launchable

SEGMENT_BYTES = 128
MIN_SEGMENT_BYTES = 16  # a TMA box's inner dimension must span a multiple of 16 bytes


class TmaLayout(NamedTuple):
    """A row as NA + NB segments of SEG elements (NB may be 0)."""

    seg: int
    na: int
    nb: int


class TmaConfig(NamedTuple):
    """Tiles of `rows` rows, `num_warps`, pipeline `stages`, and `programs_per_sm` persistent programs."""

    rows: int
    num_warps: int
    stages: int
    programs_per_sm: int


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tma_layout(D: int, element_size: int) -> TmaLayout | None:
    """The widest segments (at most 128 bytes) that split D into at most two power-of-two parts, or None."""
    seg = SEGMENT_BYTES // element_size
    while seg * element_size >= MIN_SEGMENT_BYTES:
        if D % seg == 0:
            n = D // seg
            na = 1 << (n.bit_length() - 1)
            if n == na or _is_power_of_two(n - na):
                return TmaLayout(seg, na, n - na)
        seg //= 2
    return None


def tma_config(D: int) -> TmaConfig:
    """The launch rule (swept on an H200 at D = 1152, bench/results/sweeps): about 4608 elements per tile,
    2304 per warp (4 rows x 2 warps at D = 1152), 3 stages, 4 programs per SM."""
    rows = max(1, min(16, triton.next_power_of_2(max(1, 4608 // D))))
    return TmaConfig(rows, max(1, min(8, rows * D // 2304)), 3, 4)


def _aligned(t: torch.Tensor) -> bool:
    """TMA's rule for a (rows, D) view: 16-byte aligned base and row stride, unit column stride.

    The base is judged by its offset into its storage (allocators align storages), which torch.compile's
    fake tensors have too; TensorDescriptor still asserts a real tensor's address.
    """
    byte_offset, row_bytes = t.storage_offset() * t.element_size(), t.stride(0) * t.element_size()
    return t.stride(1) == 1 and byte_offset % 16 == 0 and row_bytes % 16 == 0


def _traced(t: torch.Tensor) -> bool:
    """Whether t is torch.compile's stand-in (fake or functional) rather than data."""
    return isinstance(t, (FakeTensor, FunctionalTensor))


def can_use_tma(rows: list[torch.Tensor], D: int) -> bool:
    """Whether the TMA forward takes these (M, D) row views: D decomposes, every view is aligned, and the
    call is not being traced by torch.compile. Inside a compiled graph the register-tile kernel runs: torch
    2.11's triton_op tracing keeps a host TensorDescriptor's base tensor as a graph constant, and Inductor
    then fails on it ("tolist() shouldn't be called on a tensor with unallocated storage")."""
    if any(_traced(t) for t in rows):
        return False
    return tma_layout(D, rows[0].element_size()) is not None and all(_aligned(t) for t in rows)


@triton.jit
def _ln_modulate_fwd_tma_kernel(
    xa_desc, xb_desc,  # x as (M, NA + NB, SEG): boxes (ROWS, NA, SEG) at segment 0 and (ROWS, NB, SEG) at NA
    ha_desc, hb_desc,  # h likewise
    SHIFT_ptr,  # (B, D) row stride stride_shift
    SCALE_ptr,  # (B, D) row stride stride_scale
    MEAN_ptr,  # (M,) fp32 (fp64 for fp64 inputs)
    RSTD_ptr,  # (M,)
    M,
    T,
    stride_shift,
    stride_scale,
    eps,
    ROWS: tl.constexpr,
    NA: tl.constexpr,
    NB: tl.constexpr,
    SEG: tl.constexpr,
    STAGES: tl.constexpr,
    ROWS_SHARE_SAMPLE: tl.constexpr,  # T % ROWS == 0: every tile lies in one sample
):
    compute = tl.float64 if MEAN_ptr.dtype.element_ty == tl.float64 else tl.float32
    D: tl.constexpr = (NA + NB) * SEG
    cols_a = tl.arange(0, NA)[None, :, None] * SEG + tl.arange(0, SEG)[None, None, :]  # (1, NA, SEG)
    if NB > 0:
        cols_b = NA * SEG + tl.arange(0, NB)[None, :, None] * SEG + tl.arange(0, SEG)[None, None, :]  # (1, NB, SEG)
    n_tiles = tl.cdiv(M, ROWS)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        row0 = tile * ROWS  # TMA coordinates are int32 row indices; the descriptors address bytes in 64 bits
        rows = row0 + tl.arange(0, ROWS)  # (ROWS,)
        if ROWS_SHARE_SAMPLE:  # one sample's vectors, (1, ., SEG), broadcast over the tile
            per_sample = row0 // T
        else:  # each row's own sample; rows past M read sample 0's (their results are never stored)
            per_sample = tl.where(rows < M, rows // T, 0)[:, None, None]  # (ROWS, 1, 1)
        xa = xa_desc.load([row0, 0, 0]).to(compute)  # (ROWS, NA, SEG); rows past M read as zeros
        if NB > 0:
            xb = xb_desc.load([row0, NA, 0]).to(compute)  # (ROWS, NB, SEG)

        total = tl.sum(tl.sum(xa, axis=2), axis=1)  # (ROWS,)
        if NB > 0:
            total += tl.sum(tl.sum(xb, axis=2), axis=1)
        mean = total / D
        centered_a = xa - mean[:, None, None]
        squares = tl.sum(tl.sum(centered_a * centered_a, axis=2), axis=1)
        if NB > 0:
            centered_b = xb - mean[:, None, None]
            squares += tl.sum(tl.sum(centered_b * centered_b, axis=2), axis=1)
        # eps arrives as fp64 when Inductor launches the kernel: cast it (kernels/ln_modulate.py says why).
        rstd = 1.0 / tl.sqrt(squares / D + tl.cast(eps, compute))  # (ROWS,)

        shift_a = tl.load(SHIFT_ptr + per_sample * stride_shift + cols_a).to(compute)
        scale_a = tl.load(SCALE_ptr + per_sample * stride_scale + cols_a).to(compute)
        ha = centered_a * rstd[:, None, None] * (1.0 + scale_a) + shift_a
        ha_desc.store([row0, 0, 0], ha.to(ha_desc.dtype))
        if NB > 0:
            shift_b = tl.load(SHIFT_ptr + per_sample * stride_shift + cols_b).to(compute)
            scale_b = tl.load(SCALE_ptr + per_sample * stride_scale + cols_b).to(compute)
            hb = centered_b * rstd[:, None, None] * (1.0 + scale_b) + shift_b
            hb_desc.store([row0, NA, 0], hb.to(hb_desc.dtype))
        tl.store(MEAN_ptr + rows, mean.to(MEAN_ptr.dtype.element_ty), mask=rows < M)
        tl.store(RSTD_ptr + rows, rstd.to(RSTD_ptr.dtype.element_ty), mask=rows < M)


def _descriptors(t: torch.Tensor, layout: TmaLayout, rows: int) -> tuple[TensorDescriptor, TensorDescriptor]:
    """The two boxes' descriptors of an (M, D) row view; the second repeats the first when NB = 0."""
    segments = t.unflatten(1, (layout.na + layout.nb, layout.seg))  # (M, NA + NB, SEG), a view
    part_a = TensorDescriptor.from_tensor(segments, [rows, layout.na, layout.seg])
    part_b = TensorDescriptor.from_tensor(segments, [rows, layout.nb, layout.seg]) if layout.nb else part_a
    return part_a, part_b


def _program_count(n_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    """Persistent programs: programs_per_sm per SM on CUDA (a few under the CPU interpreter), at most one per tile."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(n_tiles, programs_per_sm * sms))


def forward_tma(x2, shift, scale, h2, mean, rstd, T: int, eps: float, config: TmaConfig | None = None) -> None:
    """Launch the TMA forward on (M, D) row views x2 -> h2; the caller checked `can_use_tma([x2, h2], D)`.

    `config` overrides the launch rule.
    """
    M, D = x2.shape
    layout = tma_layout(D, x2.element_size())
    rows, num_warps, stages, programs_per_sm = config or tma_config(D)
    kernel = launchable(_ln_modulate_fwd_tma_kernel)
    kernel[(_program_count(triton.cdiv(M, rows), x2.device, programs_per_sm),)](
        *_descriptors(x2, layout, rows), *_descriptors(h2, layout, rows),
        shift, scale, mean, rstd,
        M, T, shift.stride(0), scale.stride(0), eps,
        ROWS=rows, NA=layout.na, NB=layout.nb, SEG=layout.seg, STAGES=stages, ROWS_SHARE_SAMPLE=T % rows == 0,
        num_warps=num_warps,
    )  # fmt: skip
