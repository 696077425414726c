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
from functools import cache
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


class TmaBackwardConfig(NamedTuple):
    """Tiles of `rows` rows, `num_warps`, pipeline `stages`; a program reduces `rows_per_chunk` rows of one sample."""

    rows: int
    num_warps: int
    stages: int
    rows_per_chunk: int


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@cache  # a few (D, element size) pairs per process; called on every launch
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


def tma_backward_config(M: int, D: int) -> TmaBackwardConfig:
    """The backward's launch rule (swept on an H200 at D = 1152, bench/results/sweeps): a row per warp, tiles
    of about 1152 elements (1 row x 1 warp at D = 1152: 0.075 ms at B*T = 32768, 2 x 2 0.082, and 4 x 2
    spills, 0.26), 3 stages, and chunks of about M / 512 rows of one sample (a power of two, 16 to 256)."""
    rows = max(1, min(16, triton.next_power_of_2(max(1, 1152 // D))))
    chunk = max(rows, min(256, max(16, triton.next_power_of_2(triton.cdiv(M, 512)))))
    return TmaBackwardConfig(rows, max(1, min(8, rows * D // 1152)), 3, chunk)


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


@triton.jit
def _ln_modulate_bwd_tma_kernel(
    dha_desc, dhb_desc,  # grad of h as (M, NA + NB, SEG) boxes, as the forward's
    xa_desc, xb_desc,  # x likewise
    dxa_desc, dxb_desc,  # dx likewise
    SCALE_ptr,  # (B, D) row stride stride_scale
    MEAN_ptr,  # (M,)
    RSTD_ptr,  # (M,)
    DSHIFT_PART_ptr,  # (B, n_chunks, D) contiguous partial sums over a chunk's rows
    DSCALE_PART_ptr,  # (B, n_chunks, D)
    T,
    rows_per_chunk,  # a multiple of ROWS, as T is: no tile crosses a chunk
    stride_scale,
    ROWS: tl.constexpr,
    NA: tl.constexpr,
    NB: tl.constexpr,
    SEG: tl.constexpr,
    STAGES: tl.constexpr,
):
    compute = tl.float64 if MEAN_ptr.dtype.element_ty == tl.float64 else tl.float32
    D: tl.constexpr = (NA + NB) * SEG
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    first_row = sample * T + chunk * rows_per_chunk
    n_rows = tl.minimum(rows_per_chunk, T - chunk * rows_per_chunk)
    cols_a = tl.arange(0, NA)[:, None] * SEG + tl.arange(0, SEG)[None, :]  # (NA, SEG)
    gain_a = 1.0 + tl.load(SCALE_ptr + sample * stride_scale + cols_a).to(compute)[None, :, :]  # (1, NA, SEG)
    dshift_a = tl.zeros([NA, SEG], dtype=compute)
    dscale_a = tl.zeros([NA, SEG], dtype=compute)
    if NB > 0:
        cols_b = NA * SEG + tl.arange(0, NB)[:, None] * SEG + tl.arange(0, SEG)[None, :]  # (NB, SEG)
        gain_b = 1.0 + tl.load(SCALE_ptr + sample * stride_scale + cols_b).to(compute)[None, :, :]
        dshift_b = tl.zeros([NB, SEG], dtype=compute)
        dscale_b = tl.zeros([NB, SEG], dtype=compute)

    for start in tl.range(0, n_rows, ROWS, num_stages=STAGES):
        row0 = first_row + start
        rows = row0 + tl.arange(0, ROWS)  # (ROWS,)
        mean = tl.load(MEAN_ptr + rows).to(compute)[:, None, None]  # (ROWS, 1, 1)
        rstd = tl.load(RSTD_ptr + rows).to(compute)[:, None, None]
        dh_a = dha_desc.load([row0, 0, 0]).to(compute)  # (ROWS, NA, SEG)
        xhat_a = (xa_desc.load([row0, 0, 0]).to(compute) - mean) * rstd
        dxhat_a = dh_a * gain_a
        mean_dxhat = tl.sum(tl.sum(dxhat_a, axis=2), axis=1)  # (ROWS,), divided by D below
        mean_dxhat_xhat = tl.sum(tl.sum(dxhat_a * xhat_a, axis=2), axis=1)
        if NB > 0:
            dh_b = dhb_desc.load([row0, NA, 0]).to(compute)  # (ROWS, NB, SEG)
            xhat_b = (xb_desc.load([row0, NA, 0]).to(compute) - mean) * rstd
            dxhat_b = dh_b * gain_b
            mean_dxhat += tl.sum(tl.sum(dxhat_b, axis=2), axis=1)
            mean_dxhat_xhat += tl.sum(tl.sum(dxhat_b * xhat_b, axis=2), axis=1)
        mean_dxhat = (mean_dxhat / D)[:, None, None]
        mean_dxhat_xhat = (mean_dxhat_xhat / D)[:, None, None]
        dx_a = (dxhat_a - mean_dxhat - xhat_a * mean_dxhat_xhat) * rstd
        dxa_desc.store([row0, 0, 0], dx_a.to(dxa_desc.dtype))
        dshift_a += tl.sum(dh_a, axis=0)
        dscale_a += tl.sum(dh_a * xhat_a, axis=0)
        if NB > 0:
            dx_b = (dxhat_b - mean_dxhat - xhat_b * mean_dxhat_xhat) * rstd
            dxb_desc.store([row0, NA, 0], dx_b.to(dxb_desc.dtype))
            dshift_b += tl.sum(dh_b, axis=0)
            dscale_b += tl.sum(dh_b * xhat_b, axis=0)

    part = (sample * tl.num_programs(1) + chunk).to(tl.int64) * D
    tl.store(DSHIFT_PART_ptr + part + cols_a, dshift_a.to(DSHIFT_PART_ptr.dtype.element_ty))
    tl.store(DSCALE_PART_ptr + part + cols_a, dscale_a.to(DSCALE_PART_ptr.dtype.element_ty))
    if NB > 0:
        tl.store(DSHIFT_PART_ptr + part + cols_b, dshift_b.to(DSHIFT_PART_ptr.dtype.element_ty))
        tl.store(DSCALE_PART_ptr + part + cols_b, dscale_b.to(DSCALE_PART_ptr.dtype.element_ty))


def _descriptors(t: torch.Tensor, layout: TmaLayout, rows: int) -> tuple[TensorDescriptor, TensorDescriptor]:
    """The two boxes' descriptors of an (M, D) row view; the second repeats the first when NB = 0."""
    segments = t.unflatten(1, (layout.na + layout.nb, layout.seg))  # (M, NA + NB, SEG), a view
    part_a = TensorDescriptor.from_tensor(segments, [rows, layout.na, layout.seg])
    part_b = TensorDescriptor.from_tensor(segments, [rows, layout.nb, layout.seg]) if layout.nb else part_a
    return part_a, part_b


@cache
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 1 under the CPU interpreter (a few persistent programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _program_count(n_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    """Persistent programs: programs_per_sm per SM, at most one per tile."""
    return max(1, min(n_tiles, programs_per_sm * _sm_count(device)))


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


def backward_tma(
    grad_h2, x2, scale, mean, rstd, dx2, dshift_part, dscale_part, T: int, config: TmaBackwardConfig
) -> None:
    """Launch the TMA backward on (M, D) row views; (B, n_chunks, D) partial sums of dshift and dscale.

    The caller checked `can_use_tma([grad_h2, x2, dx2], D)` and that T and config.rows_per_chunk are
    multiples of config.rows.
    """
    D = x2.shape[1]
    layout = tma_layout(D, x2.element_size())
    rows, num_warps, stages, rows_per_chunk = config
    B, n_chunks, _ = dshift_part.shape
    kernel = launchable(_ln_modulate_bwd_tma_kernel)
    kernel[(B, n_chunks)](
        *_descriptors(grad_h2, layout, rows), *_descriptors(x2, layout, rows), *_descriptors(dx2, layout, rows),
        scale, mean, rstd, dshift_part, dscale_part,
        T, rows_per_chunk, scale.stride(0),
        ROWS=rows, NA=layout.na, NB=layout.nb, SEG=layout.seg, STAGES=stages, num_warps=num_warps,
    )  # fmt: skip
